"""What a checkpoint costs a rank in memory when FSDP2 shards the state: the streamed path against the gathered one.

A GPT-MoE (benchmarks/memory.py's model) with its AdamW state, dense and experts sharded over a gloo world of W
CPU processes (EP=1, so every tensor is split W ways; W=1 holds it whole), writes a checkpoint and loads it back
into the same model, two ways, alternating in each process:
  streamed  checkpoint.save_checkpoint / load_checkpoint on the sharded model: each sharded tensor is gathered
            alone where it is written; a load reads only this rank's slices of each file
  gathered  the previous path, kept reachable for this comparison: the same calls inside fsdp.gathered (every
            sharded parameter and its AdamW state whole on every rank at once; written back on a load)
A load goes into a fresh AdamW (as a resumed run: its state is allocated by the load). Per rank: the peak RSS
growth during each save and load (VmHWM after the call minus VmRSS before it, the peak reset first through
/proc/self/clear_refs; Linux only) and their seconds. Printed per world: the worst rank's growth in MiB (the
largest over the rounds), as a fraction of the whole state (parameters + AdamW, all ranks'), against world 1's
and against the gathered path's, the time ratio (medians over the rounds), and the worst growth of the ranks
that write no file (rank 0 writes them all: the others only send their shards to it when streamed).

Runs under the shards' malloc settings (benchmarks/_host.py; --no-reexec: the environment's).

Usage: python benchmarks/checkpoint_memory.py [--worlds 1 2 4] [--rounds 2] [--quick] [--no-reexec]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # the shards' malloc settings (raymoe.platform.host_memory)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _gloo import run_world  # noqa: E402

MODEL = dict(vocab_size=2048, block_size=64, n_layer=4, n_head=4, d_model=384, d_ff=1536, expert_ffn=768,
             num_experts=8, expert_interval=2, k=1, capacity_factor=1.25, dropout=0.0)
QUICK = dict(MODEL, n_layer=2, d_model=64, d_ff=128, expert_ffn=64, num_experts=4, block_size=32, vocab_size=512)
OPS = ("save", "load")


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak_growth(fn) -> tuple[int, float]:
    """(peak RSS growth in bytes, seconds) of ``fn()``: freed heap handed back first, the peak reset to now."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base, t0 = _status("VmRSS"), time.perf_counter()
    fn()
    return _status("VmHWM") - base, time.perf_counter() - t0


def _build(rank: int, world: int, quick: bool):
    """This rank's sharded model (as build_rank builds it) and AdamW with state, after one step."""
    from raymoe.config import load_config
    from raymoe.platform import fsdp, parallel
    from raymoe.platform.init import materialize, meta_model
    from raymoe.platform.model import GPTConfig
    from raymoe.platform.train_step import build_optimizer, train_step

    cfg = GPTConfig.from_dict(QUICK if quick else MODEL)
    layout = parallel.ParallelLayout.from_config(cfg, world, 1)
    groups = parallel.build_process_groups(layout, rank)
    model = meta_model(cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups, uniform_tokens=True))
    fsdp.apply_sharding(model, layout, groups, dense="shard", experts="shard")
    materialize(model, "cpu", load_config(None, ["run.seed=0"]))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    x = torch.randint(cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(rank))
    train_step(model, opt, [(x, x.roll(-1, 1))], lr=1e-3, grad_clip=1.0, total_micro_batches=world,
               grad_sync=parallel.make_grad_sync(model, layout, groups) if world > 1 else None,
               grad_norm_fn=parallel.make_grad_norm(model, layout, groups) if world > 1 else None)
    return model, opt


def _measure(rank: int, world: int, args) -> dict:
    import contextlib

    from raymoe.platform import checkpoint as ckpt
    from raymoe.platform import fsdp
    from raymoe.platform.train_step import build_optimizer

    model, opt = _build(rank, world, args.quick)
    out = {f"{way}_{op}_{m}": [] for way in ("streamed", "gathered") for op in OPS for m in ("bytes", "s")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = [tmp] if rank == 0 else [None]
        if world > 1:
            dist.broadcast_object_list(root, src=0)  # one folder for the world (one machine)
        for r in range(args.rounds):
            for way in ("streamed", "gathered"):
                path = f"{root[0]}/{way}{r}"

                def save():
                    with fsdp.gathered(model, opt) if way == "gathered" else contextlib.nullcontext():
                        d = ckpt.save_checkpoint(path, 1, model, opt, rng=False, write_manifest=False,
                                                 write_dense=rank == 0, write_experts=rank == 0, rank=rank)
                    if world > 1:
                        dist.barrier()
                    if rank == 0:
                        ckpt.finalize_checkpoint(d, writer_ranks=range(world))
                    if world > 1:
                        dist.barrier()

                def load():
                    # as a resumed run: the model built, its optimizer without state yet
                    fresh = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
                    with fsdp.gathered(model, fresh, write_back=True) if way == "gathered" else \
                            contextlib.nullcontext():
                        ckpt.load_checkpoint(path, model, fresh, restore_rng=False)

                for op, fn in (("save", save), ("load", load)):
                    grown, secs = _peak_growth(fn)
                    out[f"{way}_{op}_bytes"].append(grown)
                    out[f"{way}_{op}_s"].append(secs)
            if world > 1:
                dist.barrier()  # nobody removes the folder while another rank reads it
    state = sum(fsdp.local_bytes([p, *opt.state[p].values()]) for p in model.parameters())
    return {"state_bytes": state, **{k: max(v) if k.endswith("bytes") else statistics.median(v)
                                     for k, v in out.items()}}


def report(results: dict[int, list[dict]]) -> list[str]:
    """The table: per world and operation, the worst rank's peak growth, its ratios, and the seconds."""
    MiB, nan = 2 ** 20, float("nan")
    lines = ["peak RSS growth of the worst rank, MiB; whole: the model's parameters + AdamW state (all ranks')",
             "world op    whole  state/rank  streamed  gathered  streamed/whole  gathered/whole  streamed/world1  "
             "streamed/gathered  time streamed/gathered  streamed, ranks writing nothing"]
    for world, rs in sorted(results.items()):
        whole = sum(r["state_bytes"] for r in rs)
        for op in OPS:
            new, old = (max(r[f"{way}_{op}_bytes"] for r in rs) for way in ("streamed", "gathered"))
            one = max(r[f"streamed_{op}_bytes"] for r in results[1]) if 1 in results else nan
            secs = max(r[f"streamed_{op}_s"] for r in rs) / max(r[f"gathered_{op}_s"] for r in rs)
            idle = max((r[f"streamed_{op}_bytes"] for r in rs[1:]), default=nan)  # rank 0 writes every file
            lines.append(f"{world:5d} {op:5s} {whole / MiB:6.1f} {max(r['state_bytes'] for r in rs) / MiB:11.1f} "
                         f"{new / MiB:9.1f} {old / MiB:9.1f} {new / whole:15.2f} {old / whole:15.2f} "
                         f"{new / one:16.2f} {new / max(old, 1):18.2f} {secs:22.2f} {idle / MiB:31.1f}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round (a smoke run)")
    ap.add_argument("--no-reexec", action="store_true", help="keep this environment's malloc settings")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("needs Linux (/proc/self/clear_refs resets the peak RSS)")
    results = {w: run_world(w, _measure, args) for w in args.worlds}
    cfg = QUICK if args.quick else MODEL
    print(f"checkpoint save + load of a GPT-MoE (d_model {cfg['d_model']}, {cfg['n_layer']} layers, "
          f"{cfg['num_experts']} experts) with AdamW, dense and experts FSDP2-sharded over W gloo CPU ranks, "
          f"{args.rounds} round(s)")
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
