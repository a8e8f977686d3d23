"""Per-rank training memory, replicated vs FSDP2-sharded (cluster.dense_sharding / expert_sharding), CPU + gloo.

For world 1, 2, 4 each rank builds the GPT-MoE with its experts (EP ``--ep``, capped at the world) as
``build_rank`` does (on the meta device, sharded, then only its part allocated and initialised), trains a few
steps through ``train_step`` with the elastic per-step undo copy on (``raymoe.actors.shard_state.ShardState``),
and reports what it holds: bytes of parameters, gradients and AdamW state, dense and expert parts apart, the
undo copy, the copy of its shards its buddy keeps for elastic recovery (``ShardState.shard_copy``), its RSS
after the steps (as is, and live: after malloc_trim), its peak RSS (``ru_maxrss``) and its peak RSS right after
building (the start-up peak). RSS includes the process's runtime (Python, torch, gloo: the baseline, measured
after joining the process group and before building the model), which dominates for small models, so RSS is
also printed less that baseline (after the steps, live, at the peak, after building). Each (world, mode) runs
in fresh processes, so RSS is that configuration's own.
Speed is measured apart, in one world holding both models, their steps alternating (both see the same load on
a shared machine), once per ``--speed-seqs`` size (sequences per rank and step, one micro-batch): sharding costs
a fixed amount per step (each block's parameters gathered in forward and again in backward, its gradients
reduce-scattered, which gloo does as an all-reduce) while the compute grows with the tokens, so the ratio
depends on the tokens per rank. Printed as ratios to world 1 (one process holds everything; the largest rank), with the
issue's targets checked:

- sharded dense state (params + grads + AdamW) per rank <= 1/N of the replicated one + 10%;
- expert state per rank <= 1/EP of all experts;
- the undo copy <= one rank's share of parameters + AdamW state (+ buffers);
- tokens/s sharded / replicated at the same world, measured in this run, per size (target >= 0.8 on CPU).

    python benchmarks/memory.py [--quick] [--worlds 1 2 4] [--ep 2] [--steps 4] [--speed-seqs 4 16]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import time  # noqa: E402

import torch  # noqa: E402
from _gloo import run_world  # noqa: E402

from raymoe.actors.shard_state import peak_rss  # noqa: E402

MODEL = dict(vocab_size=2048, block_size=64, n_layer=4, n_head=4, d_model=384, d_ff=1536, expert_ffn=768,
             num_experts=8, expert_interval=2, k=1, capacity_factor=1.25, dropout=0.0)
QUICK = dict(MODEL, n_layer=2, d_model=64, d_ff=128, expert_ffn=64, num_experts=4, block_size=32, vocab_size=512)
KINDS = ("params", "grads", "optim")


class _Rank:
    """This rank's GPT-MoE (its experts; sharded as ``mode`` says), AdamW, undo copy and gradient hooks."""

    def __init__(self, rank: int, world: int, args, mode: str, mode_rows: int | None = None):
        from raymoe.actors.shard_state import ShardState
        from raymoe.config import load_config
        from raymoe.platform import fsdp, parallel
        from raymoe.platform.init import materialize, meta_model
        from raymoe.platform.model import GPTConfig
        from raymoe.platform.train_step import build_optimizer

        self.cfg = cfg = GPTConfig.from_dict(QUICK if args.quick else MODEL)
        layout = parallel.ParallelLayout.from_config(cfg, world, min(args.ep, world))
        groups = parallel.build_process_groups(layout, rank)
        # as build_rank builds a rank: on the meta device, sharded, then only this rank's part allocated
        self.model = meta_model(cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups, uniform_tokens=True))
        fsdp.apply_sharding(self.model, layout, groups, dense=mode, experts=mode)
        materialize(self.model, "cpu", load_config(None, ["run.seed=0"]))
        self.opt = build_optimizer(self.model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        self.undo = ShardState(self.model, self.opt, keep_undo=True)
        self.sync = parallel.make_grad_sync(self.model, layout, groups) if world > 1 else None
        self.norm = parallel.make_grad_norm(self.model, layout, groups) if world > 1 else None
        rows = args.batch // world if mode_rows is None else mode_rows
        self.gen, self.rows, self.step = torch.Generator().manual_seed(rank), rows, 0
        self.world = world

    def train(self) -> float:
        """One optimizer step on random tokens; its seconds."""
        from raymoe.platform.train_step import train_step

        x = torch.randint(self.cfg.vocab_size, (self.rows, self.cfg.block_size), generator=self.gen)
        self.undo.begin_step(self.step)
        self.step += 1
        t0 = time.perf_counter()
        train_step(self.model, self.opt, [(x, x.roll(-1, 1))], lr=1e-3, grad_clip=1.0, grad_sync=self.sync,
                   grad_norm_fn=self.norm, total_micro_batches=self.world)  # one micro-batch per rank
        return time.perf_counter() - t0

    def held(self) -> dict:
        """Bytes this rank holds: parameters, gradients, AdamW state (dense and experts apart), undo copy."""
        from raymoe.platform.fsdp import local_bytes
        from raymoe.platform.moe.experts import iter_expert_params

        expert_ids = {id(p) for _, p, _, _ in iter_expert_params(self.model)}
        out = {f"{part}_{kind}": 0 for part in ("dense", "expert") for kind in KINDS}
        for p in self.model.parameters():
            part = "expert" if id(p) in expert_ids else "dense"
            out[f"{part}_params"] += local_bytes([p])
            out[f"{part}_grads"] += local_bytes([p.grad])
            out[f"{part}_optim"] += local_bytes(v for v in self.opt.state[p].values() if v.dim())
        return {**out, "undo": self.undo.undo_bytes(), "buffers": local_bytes(self.model.buffers())}


def _rss(trim: bool = False) -> int:
    """Resident bytes now (Linux; 0 elsewhere). ``trim``: first hand free heap memory back to the system
    (raymoe's malloc settings keep up to 1 GiB of it mapped for speed), leaving what is live."""
    if trim:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _measure(rank: int, world: int, args, mode: str) -> dict:
    """Memory of one mode, alone in this process: bytes held after a few steps and the peak RSS. Mode "speed":
    both modes in this process, steps alternating between them, median step seconds of each."""
    if not mode.startswith("speed"):
        base = _rss()
        r = _Rank(rank, world, args, mode)
        built = peak_rss()  # the start-up peak: building and initialising this rank's part
        for _ in range(args.warmup + 1):
            r.train()
        out = {**r.held(), "peak_rss": peak_rss(), "rss": _rss(), "live_rss": _rss(trim=True), "base_rss": base,
               "build_peak_rss": built}
        copy = r.undo.shard_copy()  # after the peak was read: the copy lives at the buddy, not here
        return {**out, "copy": sum(t.numel() * t.element_size() for part in ("tensors", "opt")
                                   for t in copy[part].values() if torch.is_tensor(t))}
    rows = int(mode.removeprefix("speed"))  # sequences per rank and step
    ranks = {m: _Rank(rank, world, args, m, rows) for m in ("replicate", "shard")}
    times: dict[str, list[float]] = {m: [] for m in ranks}
    for i in range(args.warmup + args.steps):
        for m, r in ranks.items():  # interleaved: both see the same machine load
            t = r.train()
            if i >= args.warmup:
                times[m].append(t)
    return {f"{m}_step_s": statistics.median(t) for m, t in times.items()}


def _bytes(r: dict, parts=("dense", "expert"), kinds=KINDS) -> int:
    return sum(r[f"{part}_{kind}"] for part in parts for kind in kinds)


def _checks(world: int, ep: int, dense: float, expert: float, rs: list[dict], speeds: dict[int, float],
            block: int) -> list[str]:
    """The issue's targets for one sharded world, as printed lines."""
    share = max(_bytes(r, kinds=("params", "optim")) + r["buffers"] for r in rs)
    undo = max(r["undo"] for r in rs) / share

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = [f"world {world}: sharded dense state per rank {dense:.3f} of world 1 (target <= 1/N + 10% = "
           f"{1.1 / world:.3f}): {verdict(dense <= 1.1 / world)}",
           f"world {world}: expert state per rank {expert:.3f} of all experts (target <= 1/EP = {1 / ep:.3f}): "
           f"{verdict(expert <= 1 / ep + 1e-9)}",
           f"world {world}: undo copy {undo:.3f} of one rank's parameters + AdamW state + buffers "
           f"(target <= 1; AdamW's scalar step counts aside): {verdict(undo <= 1.001)}"]
    for rows, speed in speeds.items():
        out.append(f"world {world}: tokens/s sharded / replicated at {rows * block} tokens per rank and step "
                   f"{speed:.2f} (target >= 0.8): {verdict(speed >= 0.8)}")
    return out


def report(results: dict, worlds: list[int], ep: int, speed_rows: list[int], block: int) -> list[str]:
    """The table (the largest rank, as ratios to world 1) and the targets, as printed lines."""
    base = results[(1, "replicate")][0]
    lines = [f"{'world':>5} {'EP':>3} {'mode':<10} {'dense/w1':>8} {'expert/w1':>9} {'params/w1':>9} "
             f"{'grads/w1':>8} {'optim/w1':>8} {'undo/w1':>8} {'copy/w1':>8} {'RSS/w1':>7} {'live/w1':>7} "
             f"{'peak/w1':>7} {'live-base/w1':>12} {'peak-base/w1':>12} {'build-base/w1':>13} {'tok/s sh/rep':>12}"]
    checks = []
    for world in worlds:
        e = min(ep, world)
        for mode in ("replicate", "shard"):
            if (rs := results.get((world, mode))) is None:
                continue

            def ratio(fn, rs=rs):
                return max(fn(r) for r in rs) / fn(base)

            dense, expert = ratio(lambda r: _bytes(r, ("dense",))), ratio(lambda r: _bytes(r, ("expert",)))
            speeds = {}
            for rows in speed_rows if mode == "shard" else ():
                sp = results[(world, f"speed{rows}")]
                speeds[rows] = max(r["replicate_step_s"] for r in sp) / max(r["shard_step_s"] for r in sp)
            cols = [ratio(lambda r, k=k: _bytes(r, kinds=(k,))) for k in KINDS]
            lines.append(f"{world:>5} {e:>3} {mode:<10} {dense:>8.3f} {expert:>9.3f} {cols[0]:>9.3f} {cols[1]:>8.3f} "
                         f"{cols[2]:>8.3f} {ratio(lambda r: r['undo']):>8.3f} {ratio(lambda r: r['copy']):>8.3f} "
                         f"{ratio(lambda r: r['rss']):>7.2f} {ratio(lambda r: r['live_rss']):>7.2f} "
                         f"{ratio(lambda r: r['peak_rss']):>7.2f} "
                         f"{ratio(lambda r: r['live_rss'] - r['base_rss']):>12.2f} "
                         f"{ratio(lambda r: r['peak_rss'] - r['base_rss']):>12.2f} "
                         f"{ratio(lambda r: r['build_peak_rss'] - r['base_rss']):>13.2f} "
                         f"{'/'.join(f'{v:.2f}' for v in speeds.values()):>12}")
            if mode == "shard" and world > 1:
                checks += _checks(world, e, dense, expert, rs, speeds, block)
    mb = {k: base[k] / 2**20 for k in ("rss", "live_rss", "peak_rss", "base_rss", "copy", "build_peak_rss")}
    state = {k: _bytes(base, kinds=(k,)) / 2**20 for k in KINDS}
    lines.append(f"world 1: parameters {state['params']:.1f} MiB, gradients {state['grads']:.1f} MiB, AdamW "
                 f"{state['optim']:.1f} MiB ({_bytes(base, ('expert',)) / _bytes(base):.0%} of it experts); RSS after "
                 f"the steps {mb['rss']:.0f} MiB, live (after malloc_trim) {mb['live_rss']:.0f} MiB, peak "
                 f"{mb['peak_rss']:.0f} MiB, baseline before the model {mb['base_rss']:.0f} MiB, peak after building "
                 f"{mb['build_peak_rss']:.0f} MiB (a rank builds only its part, as build_rank does); the copy a buddy "
                 f"keeps {mb['copy']:.1f} MiB")
    return lines + [""] + checks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (capped at the world)")
    p.add_argument("--steps", type=int, default=4, help="timed steps (median step time)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step) of the memory runs")
    p.add_argument("--speed-seqs", type=int, nargs="+", default=[4, 16],
                   help="sequences per rank and step of the speed runs, one run each (FSDP's cost per step is fixed "
                        "while the compute grows with the tokens)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps (smoke test)")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.speed_seqs = 2, 1, args.speed_seqs[:1]
    worlds = sorted(set(args.worlds) | {1})
    results = {}
    for world in worlds:
        speed = [f"speed{n}" for n in args.speed_seqs]
        for mode in ("replicate", "shard", *speed) if world > 1 else ("replicate",):
            results[(world, mode)] = run_world(world, _measure, args, mode)
    block = (QUICK if args.quick else MODEL)["block_size"]
    print("\n".join(report(results, worlds, args.ep, args.speed_seqs, block)))


if __name__ == "__main__":
    main()
