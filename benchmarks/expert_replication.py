"""Hot-expert replication in expert-parallel serving: busiest-shard load / mean and decode tokens/s, with and
without copies of hot experts, measured in one run.

1. Trains a small GPT-MoE on the embedded corpus (Python's reference docs; nothing downloaded) with
   ``raymoe train``, so the routing is a trained router's on real text (skewed), not random.
2. Serves its checkpoint expert-parallel on a local Ray instance (`EPRunner`: ``--ep`` `InferenceShard`
   actors, gloo all-to-all), twice: without replication, and with ``--redundant`` extra slots per shard that
   the runner fills from the observed load every ``--replan-interval`` steps. Both decode the same corpus
   prompts greedily (the tokens must be identical).
3. Prints, per MoE layer, the busiest shard's token-choices / the mean over shards, over the measured decode
   window (the sum over its steps) and per step (mean over steps), and decode tokens/s of both runs and their
   ratio. Warm-up steps (the first plan) are not measured.

    python benchmarks/expert_replication.py [--quick] [--ep 4] [--redundant 1] [--train-steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import reexec_with_tuned_malloc  # noqa: E402

MODEL = ["model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.d_ff=512",
         "moe.num_experts=8", "moe.k=2", "moe.expert_interval=2", "moe.aux_loss_coef=0.001",
         "tokenizer.kind=byte", "train.global_batch_size=16", "train.micro_batch_size=16", "train.lr=3e-3",
         "train.warmup_steps=20", "train.eval_interval=100000", "train.log_interval=50", "train.progress=false",
         "sample.max_new_tokens=0"]


def train(work: Path, steps: int) -> str:
    """A checkpoint of the model trained ``steps`` steps on the default corpus."""
    from raymoe.cli import main
    from raymoe.platform.checkpoint import latest_checkpoint

    argv = ["train"]
    for s in MODEL + [f"run.output_dir={work}", "run.name=bench", f"data.cache_dir={work / 'cache'}",
                      f"train.steps={steps}", f"checkpoint.interval={steps}"]:
        argv += ["--set", s]
    if main(argv) != 0:
        raise SystemExit("training failed")
    return str(latest_checkpoint(work / "bench" / "checkpoints"))


def trained(work: Path, steps: int) -> str:
    """The run's checkpoint of ``steps`` steps in ``work``, trained now unless it is there already."""
    from raymoe.platform.checkpoint import MANIFEST

    ckpt = work / "bench" / "checkpoints" / f"step_{steps:08d}"
    if (ckpt / MANIFEST).is_file():
        print(f"reusing {ckpt}")
        return str(ckpt)
    t0 = time.perf_counter()
    ckpt = train(work, steps)
    print(f"trained {steps} steps on the default corpus in {time.perf_counter() - t0:.0f}s")
    return ckpt


def prompts(checkpoint: str, rows: int, length: int):
    """``rows`` windows of ``length`` tokens from the corpus, spread over it."""
    import torch

    from raymoe.platform.data import default_corpus_text
    from raymoe.platform.tokenizer import load_tokenizer

    text = default_corpus_text()
    tok = load_tokenizer(checkpoint)
    starts = [i * (len(text) - 4 * length) // rows for i in range(rows)]
    ids = [tok.encode(text[s:s + 4 * length])[:length] for s in starts]
    return torch.tensor(ids)


def shard_ratio(load_R) -> float:
    """Busiest shard / mean over shards (1.0 = balanced)."""
    mean = float(load_R.float().mean())
    return float(load_R.max()) / mean if mean > 0 else 1.0


def start(checkpoint: str, idx, args, redundant: int) -> dict:
    """An EP group serving the rows of ``idx`` (prefilled); the state `decode` advances."""
    import torch

    from raymoe.deployments.ep_runner import EPRunner

    runner = EPRunner(checkpoint, args.ep, max_rows=idx.shape[0], redundant_experts=redundant,
                      replan_interval_steps=args.replan_interval, num_cpus=0.5)
    tok = runner.prefill(idx, torch.ones_like(idx, dtype=torch.bool)).argmax(-1, keepdim=True)
    return {"runner": runner, "redundant": redundant, "tok": tok, "out": [tok], "seconds": 0.0, "steps": 0,
            "per_step": {}, "window": {}}


def decode(g: dict, steps: int, ep: int, measure: bool = True) -> None:
    """``steps`` greedy decode steps of group ``g``; measured: their time and every step's shard loads."""
    runner = g["runner"]
    E = runner.config.experts_per_layer()
    if g["redundant"]:
        runner.physical_load()  # what the slots received before this window does not count
    for _ in range(steps):
        t0 = time.perf_counter()
        g["tok"] = runner.decode(g["tok"]).argmax(-1, keepdim=True)
        seconds = time.perf_counter() - t0
        g["out"].append(g["tok"])
        if not measure:
            continue
        g["seconds"] += seconds
        g["steps"] += 1
        if g["redundant"]:  # rows each shard's slots received (copies included)
            loads = {lid: v.view(ep, -1).sum(1) for lid, v in runner.physical_load().items()}
        else:  # every expert at home: shard r's experts are the r-th block of E/ep
            loads = {lid: c.view(ep, E[lid] // ep).sum(1) for lid, c in runner.expert_counts.items()}
        for lid, v in loads.items():
            g["per_step"].setdefault(lid, []).append(shard_ratio(v))
            g["window"][lid] = v if lid not in g["window"] else g["window"][lid] + v


def serve_both(checkpoint: str, idx, args) -> tuple[dict, dict]:
    """Both groups side by side: warm-up (the first plans), then measured windows taken in turns, so load
    changes on a shared machine hit both alike."""
    groups = []
    try:
        for redundant in (0, args.redundant):
            groups.append(start(checkpoint, idx, args, redundant))
        for g in groups:
            decode(g, args.warmup, args.ep, measure=False)
        for _ in range(args.rounds):
            for g in groups:
                decode(g, args.steps // args.rounds, args.ep)
        for g in groups:  # busiest / mean over the measured window, and per step (mean over the steps)
            g["placements"] = g["runner"].placements
            g["window"] = {lid: shard_ratio(v) for lid, v in g["window"].items()}
            g["per_step"] = {lid: statistics.mean(v) for lid, v in g["per_step"].items()}
        return groups[0], groups[1]
    finally:
        for g in groups:
            g["runner"].shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes (a few training and decode steps)")
    p.add_argument("--ep", type=int, default=4, help="expert-parallel shards (8 experts: 2, 4 or 8)")
    p.add_argument("--redundant", type=int, default=1, help="redundant expert slots per shard and layer")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--rows", type=int, default=16, help="decode batch (rows of the whole group)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=16, help="decode steps before the measured window")
    p.add_argument("--steps", type=int, default=64, help="measured decode steps")
    p.add_argument("--replan-interval", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="measured windows per group, taken in turns")
    p.add_argument("--work-dir", default=None, help="keep the trained run here and reuse it when it exists "
                   "(default: a temporary folder)")
    p.add_argument("--no-reexec", action="store_true", help="keep this process's malloc settings")
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.warmup, args.steps, args.rows, args.replan_interval, args.rounds = 4, 4, 4, 8, 2, 2
    reexec_with_tuned_malloc()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = trained(Path(args.work_dir or tmp), args.train_steps)
        idx = prompts(ckpt, args.rows, args.prompt_len)
        ray.init(address="local", num_cpus=args.ep + 2, include_dashboard=False, log_to_driver=False)
        try:
            plain, rep = serve_both(ckpt, idx, args)
        finally:
            ray.shutdown()
    same = all(bool((a == b).all()) for a, b in zip(plain["out"], rep["out"]))
    print(f"EP={args.ep}, 8 experts, top-2, {args.redundant} redundant slot(s) per shard, {args.rows} rows, "
          f"{args.steps} measured decode steps; greedy tokens identical: {same}")
    print(f"{'layer':>5} {'busiest/mean window':>22} {'busiest/mean per step':>24}  last placement")
    print(f"{'':>5} {'plain':>10} {'replicated':>11} {'plain':>11} {'replicated':>12}")
    for lid in sorted(plain["window"]):
        print(f"{lid:>5} {plain['window'][lid]:>10.3f} {rep['window'][lid]:>11.3f} {plain['per_step'][lid]:>11.3f} "
              f"{rep['per_step'][lid]:>12.3f}  {rep['placements'].get(lid)}")
    tok_s = [idx.shape[0] * g["steps"] / g["seconds"] for g in (plain, rep)]
    print(f"decode tokens/s (measured windows taken in turns): plain {tok_s[0]:.1f}, replicated {tok_s[1]:.1f}, "
          f"replicated/plain {tok_s[1] / tok_s[0]:.2f}")
    if not same:
        raise SystemExit("replication changed the greedy tokens")


if __name__ == "__main__":
    main()
