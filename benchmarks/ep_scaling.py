"""Training throughput: MoE vs the dense model with the same active parameters, and 1 -> N expert shards.

Everything is measured in this run, side by side, and reported as ratios (absolute tokens/s on a shared CPU
box mean little):

1. MoE / dense tokens/s in one process: a GPT with top-1 MoE on every other block vs the same GPT with dense
   FFNs of the expert's size everywhere (equal active parameters per token). Steps alternate between the two
   models and the median step time of each is used.
2. Expert-parallel scaling on a local Ray instance: the same global batch trained by 1, 2 (, 4) ExpertShard
   actors (EP = number of shards, gloo all-to-all), tokens/s from the median step time after warm-up.
3. Framework overhead of the Ray path: the same model and data trained in this process by the one training
   loop (as ``raymoe train`` does locally) vs by one ExpertShard actor on the local Ray instance (elastic on,
   as by default), both with one torch thread; runs alternate (``--overhead-repeats`` pairs) and tokens/s
   come from the median step time of the run's records after warm-up. Ray / in-process is the ratio.
4. All-to-all efficiency: see benchmarks/all_to_all.py (the layer's exchange vs raw all_to_all_single);
   `--a2a` runs it here too.

    python benchmarks/ep_scaling.py [--quick] [--workers 1 2 4] [--overhead-repeats 3] [--a2a] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raymoe.config import load_config
from raymoe.platform.data import build_dataset, sample_batch
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.train_step import build_optimizer, train_step
from raymoe.platform.model_io import gpt_config_from

MODEL = ["model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.d_model=256", "model.d_ff=1024",
         "moe.num_experts=8", "moe.k=1", "moe.capacity_factor=1.25", "train.global_batch_size=16",
         "train.progress=false", "sample.max_new_tokens=0"]


def moe_vs_dense(steps: int, cache: str, device: str = "cpu") -> dict:
    """Median step time of the MoE and the equal-active-parameter dense model, interleaved (on a GPU: bf16
    autocast as `raymoe train` uses there, timed with synchronize)."""
    dev = torch.device(device)
    amp = torch.bfloat16 if dev.type == "cuda" else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cfg = load_config(None, MODEL + [f"data.cache_dir={cache}"])
    ds, _ = build_dataset(None, cache_dir=cache).split(0.05, block_size=128)
    models = {}
    for name, moe_layers in (("moe", None), ("dense", [])):
        torch.manual_seed(0)
        gcfg = GPTConfig.from_dict({**gpt_config_from(cfg).to_dict(), "moe_layers": moe_layers})
        model = GPT(gcfg).to(dev)
        models[name] = (model, build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                               device_type=dev.type))
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps + 2):
        x, y = sample_batch(ds, seed=0, step=step, rank=0, world=1, global_batch=16, block_size=128)
        x, y = x.to(dev), y.to(dev)
        for name, (model, opt) in models.items():
            sync()
            t0 = time.perf_counter()
            train_step(model, opt, [(x, y)], lr=1e-3, grad_clip=1.0, autocast_dtype=amp)
            sync()
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    tokens = 16 * 128
    out = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    params = {name: m.num_parameters() for name, (m, _) in models.items()}
    return {"tokens_per_s": out, "ratio_moe_over_dense": out["moe"] / out["dense"], "params": params}


def _run_config(cache: str, out: str, name: str, steps: int, workers: int | None):
    """The benchmark's training run: in this process (``workers`` None) or on ``workers`` Ray shards."""
    where = (["cluster.mode=local", "train.threads=1"] if workers is None else [
        "cluster.mode=ray", f"cluster.num_workers={workers}", "cluster.cpus_per_worker=1",
        f"cluster.ep_size={workers}"])
    return load_config(None, MODEL + where + [
        f"data.cache_dir={cache}", f"run.output_dir={out}", f"run.name={name}", f"train.steps={steps}",
        "train.micro_batch_size=4", f"train.eval_interval={steps}", "train.eval_batches=1", "train.log_interval=1"])


def _tokens_per_s(run_dir: Path) -> float:
    """Tokens/s of a finished run from the median step time of its records after two warm-up steps."""
    recs = [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]
    return recs[0]["tokens"] / statistics.median(r["step_s"] for r in recs[2:])


def ray_scaling(workers: list[int], steps: int, cache: str) -> dict:
    """Tokens/s of the same global batch trained by each number of shards (EP = shards); Ray is running."""
    from raymoe.actors.launch import train_on_ray

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for w in workers:
            train_on_ray(_run_config(cache, out, f"w{w}", steps, w))
            results[w] = _tokens_per_s(Path(out) / f"w{w}")
    return results


def undo_overhead(steps: int, cache: str) -> dict:
    """Median step time with the elastic undo copy (taken by ``ShardState.begin_step`` in every shard of a world
    of two or more with ``cluster.elastic``) / without, same model and data in this process with one thread, steps alternating."""
    from raymoe.actors.shard_state import ShardState

    torch.set_num_threads(1)
    cfg = load_config(None, MODEL + [f"data.cache_dir={cache}"])
    ds, _ = build_dataset(None, cache_dir=cache).split(0.05, block_size=128)
    runs = {}
    for name in ("undo", "plain"):
        torch.manual_seed(0)
        model = GPT(gpt_config_from(cfg))
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
        runs[name] = (model, opt, ShardState(model, opt, keep_undo=name == "undo"))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(steps + 2):
        x, y = sample_batch(ds, seed=0, step=step, rank=0, world=1, global_batch=16, block_size=128)
        for name, (model, opt, state) in runs.items():
            t0 = time.perf_counter()
            state.begin_step(step)  # the undo copy is taken here, before the step's forwards
            train_step(model, opt, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)], lr=1e-3, grad_clip=1.0)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"undo_s": med["undo"] - med["plain"], "ratio": med["plain"] / med["undo"]}


def ray_overhead(steps: int, cache: str, repeats: int) -> list[dict]:
    """Tokens/s of the same run in this process (one thread) and on one ExpertShard (one thread), alternating
    ``repeats`` times; Ray is running. Both read the step time the loop records (a world of one shard takes no
    undo copy)."""
    from raymoe.actors.launch import train_on_ray
    from raymoe.platform.host_memory import tune_malloc
    from raymoe.platform.trainer import LocalTrainer

    tune_malloc()  # as `raymoe train` does in its process, and every shard in its own
    pairs = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(repeats):
            LocalTrainer(_run_config(cache, out, f"local{i}", steps, None), log=lambda _: None).run()
            train_on_ray(_run_config(cache, out, f"ray{i}", steps, 1))
            local, on_ray = _tokens_per_s(Path(out) / f"local{i}"), _tokens_per_s(Path(out) / f"ray{i}")
            pairs.append({"local": local, "ray": on_ray, "ratio": on_ray / local})
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--overhead-repeats", type=int, default=3, help="in-process / Ray run pairs (0 = skip)")
    ap.add_argument("--a2a", action="store_true", help="also run benchmarks/all_to_all.py")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: MoE vs dense only (bf16), no Ray scaling")
    args = ap.parse_args()
    steps = 4 if args.quick else 12
    with tempfile.TemporaryDirectory() as cache:
        md = moe_vs_dense(steps if args.device == "cpu" else 10 * steps, cache, args.device)
        print(f"MoE vs dense (same active params; total {md['params']['moe']['total'] / 1e6:.2f}M vs "
              f"{md['params']['dense']['total'] / 1e6:.2f}M, active {md['params']['moe']['active'] / 1e6:.2f}M vs "
              f"{md['params']['dense']['active'] / 1e6:.2f}M):")
        print(f"  tokens/s moe {md['tokens_per_s']['moe']:.0f}  dense {md['tokens_per_s']['dense']:.0f}  "
              f"ratio {md['ratio_moe_over_dense']:.2f} (target >= 0.8)"
              + (f", on {args.device}" if args.device != "cpu" else ""))
        if args.device != "cpu":
            return
        import ray

        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        try:
            overhead = ray_overhead(steps + 2, cache, args.overhead_repeats) if args.overhead_repeats else []
            scaling = ray_scaling(args.workers, steps + 2, cache)
        finally:
            ray.shutdown()
        undo = undo_overhead(steps, cache) if overhead else None
    if overhead:
        print("framework overhead (same model and data, one thread; in-process loop vs one ExpertShard on Ray):")
        for p in overhead:
            print(f"  in-process {p['local']:.0f} tokens/s  Ray {p['ray']:.0f} tokens/s  ratio {p['ratio']:.2f}")
        print(f"  median ratio Ray / in-process {statistics.median(p['ratio'] for p in overhead):.2f} "
              "(target >= 0.95)")
        print(f"  of it the elastic undo copy: {undo['undo_s'] * 1e3:.1f} ms/step, tokens/s with / without it "
              f"{undo['ratio']:.2f} (in-process, one thread)")
    base = scaling[min(scaling)]
    print("expert-parallel scaling on Ray (same global batch, EP = shards, gloo):")
    for w, tps in scaling.items():
        print(f"  {w} shard(s): {tps:.0f} tokens/s  speed-up {tps / base:.2f}x")
    if args.a2a:
        subprocess.run([sys.executable, str(Path(__file__).with_name("all_to_all.py"))]
                       + (["--quick"] if args.quick else []), check=False)


if __name__ == "__main__":
    main()
