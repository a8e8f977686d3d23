"""DeepSpeed-MoE's findings in miniature: small models trained side by side on the embedded corpus.

Mirrors the comparisons of Rajbhandari et al., "DeepSpeed-MoE" (ICML 2022) with the ordinary training path
(`raymoe.config.load_config` + `LocalTrainer`), equal token budgets and paired seeds:

* fig1   dense base vs the same base + top-1 MoE on every other block (equal active parameters)   (Fig. 1)
* phen1  MoE on the first half vs the second half of the blocks                                 (Phenomenon-I)
* phen2  top-2 MoE vs Residual-MoE (dense MLP + top-1 expert) vs top-1                          (Phenomenon-II)
* fig4   MoE vs Pyramid-MoE vs Residual-MoE vs PR-MoE, with parameter counts                    (Fig. 4)
* mos    a 12.5%-shallower student (8 -> 7 blocks): no KD, KD for the whole run, staged KD      (Figs. 5-6, Tab. 5)
         the teacher is the MoE model of fig1 (seed 0)

Two investigations explain what the comparisons raise: first-half MoE against the dense model (routing: dropped
tokens and load per layer; training against validation loss; the same model without dropping tokens) and the
student against its teacher (the teacher trained twice as long; an 8-block student distilled the same way). Verdicts follow the rule of `paper_stats.py`, fixed in advance: 95% t intervals
of paired differences over >= 5 seeds.

Writes <out>/results.md (validation bits per byte: mean and 95% interval over seeds, paired differences,
total/active parameters, tokens per CPU-second), <out>/results.json and <out>/img/*.png (curves with 95% bands). Runs go to
a temporary folder unless --runs-dir is given. Trainings run in --jobs processes with one thread each.

    python benchmarks/paper_findings.py                 # the full comparison (~1 h on 2 idle cores)
    python benchmarks/paper_findings.py --device cuda   # >= 10x the tokens per run, on a GPU
    python benchmarks/paper_findings.py --quick         # pipeline check in a few minutes (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from paper_report import (COMPARISONS, LABELS, VOCAB, part_text, plot_comparison,  # noqa: E402
                          render_markdown, summarize, verdicts)

# model, schedule and budget of each mode; every run of one mode trains on the same number of tokens
SIZES = {
    "full": dict(d_model=128, n_head=4, d_ff=512, n_layer=8, block=64, batch=16, steps=500, warmup=30,
                 eval_interval=50, eval_batches=8, final_eval_batches=1000, experts=8, seeds=5, device="cpu"),
    # the same models with 10.24x the tokens per run (batch 64 x 128 tokens x 625 steps), for a GPU
    "cuda": dict(d_model=128, n_head=4, d_ff=512, n_layer=8, block=128, batch=64, steps=625, warmup=40,
                 eval_interval=50, eval_batches=8, final_eval_batches=1000, experts=8, seeds=5, device="cuda"),
    "quick": dict(d_model=32, n_head=2, d_ff=64, n_layer=8, block=32, batch=4, steps=4, warmup=1,
                  eval_interval=2, eval_batches=2, final_eval_batches=4, experts=4, seeds=2, device="cpu"),
}

def variant_overrides(name: str, size: dict, teacher: str | None) -> list[str]:
    """Dotted config overrides that turn the base model into variant ``name``."""
    n, e = size["n_layer"], size["experts"]
    half = list(range(n // 2))
    n_moe = len(range(1, n, 2))
    pyramid = [max(1, e // 2)] * (n_moe // 2) + [e] * (n_moe - n_moe // 2)
    table = {
        "dense": ["moe.moe_layers=[]"],
        "moe": [],
        "teacher_long": [f"train.steps={2 * size['steps']}"],
        "first_half": [f"moe.moe_layers={half}"],
        "first_half_dropless": [f"moe.moe_layers={half}", "moe.drop_tokens=false"],
        "second_half": [f"moe.moe_layers={[i + n // 2 for i in half]}"],
        "top2": ["moe.k=2"],
        "residual": ["moe.use_residual=true"],
        "pyramid": [f"moe.num_experts={pyramid}"],
        "pr_moe": [f"moe.num_experts={pyramid}", "moe.use_residual=true"],
    }
    if name in table:
        return table[name]
    # students: teacher loaded (same RNG use in all of them), the student shape comes from the teacher
    stop = {"student_nokd": 0, "student_kd": "null", "student_staged": size["steps"] // 2, "kd_same_depth": "null"}
    layers = n if name == "kd_same_depth" else n - n // 8
    return [f"distill.teacher_checkpoint={teacher}", f"distill.student_layers={layers}",
            f"distill.kd_stop_step={stop[name]}", "distill.kl_direction=teacher_student", "distill.beta=1.0",
            "distill.temperature=1.0"]


def base_overrides(size: dict, runs_dir: Path, name: str, seed: int, threads: int) -> list[str]:
    s = size
    return [
        f"run.name={name}_s{seed}", f"run.output_dir={runs_dir}", f"run.seed={seed}",
        f"model.d_model={s['d_model']}", f"model.n_head={s['n_head']}", f"model.d_ff={s['d_ff']}",
        f"model.n_layer={s['n_layer']}", f"model.block_size={s['block']}",
        f"moe.num_experts={s['experts']}", "moe.expert_interval=2", "moe.capacity_factor=1.25",
        "moe.eval_capacity_factor=2.0", "moe.min_capacity=4", "moe.aux_loss_coef=0.01",
        f"data.cache_dir={runs_dir / 'cache'}", "data.val_fraction=0.1",
        "tokenizer.kind=bpe", f"tokenizer.vocab_size={VOCAB}",
        f"train.steps={s['steps']}", f"train.global_batch_size={s['batch']}", "train.lr=3e-3", "train.min_lr=3e-4",
        f"train.warmup_steps={s['warmup']}", f"train.eval_interval={s['eval_interval']}",
        f"train.eval_batches={s['eval_batches']}", "train.log_interval=10", "train.progress=false",
        f"train.threads={threads}", f"train.device={s['device']}", "checkpoint.keep_last=1",
        "sample.max_new_tokens=0",
    ]


def routing_stats(records: list[dict], steps: int) -> list[dict]:
    """Per MoE layer over the second half of training: mean fraction of token-choices dropped at capacity and
    mean busiest-expert load / mean load."""
    late = [r for r in records if r["step"] > steps // 2 and r.get("expert_counts")]
    if not late:
        return []
    out = []
    for i in range(len(late[0]["expert_counts"])):
        imbalance = [max(c) / (sum(c) / len(c)) for c in (r["expert_counts"][i] for r in late) if sum(c)]
        out.append({"dropped": statistics.fmean(r["dropped_fraction"][i] for r in late),
                    "max_over_mean": statistics.fmean(imbalance) if imbalance else float("nan")})
    return out


def late_train_bpb(records: list[dict], steps: int) -> float | None:
    """Mean training bits per byte (of the cross-entropy, on the batches trained) over the last 10% of steps."""
    late = [r["bpb"] for r in records if r["step"] > steps - max(1, steps // 10) and "bpb" in r]
    return statistics.fmean(late) if late else None


def train_one(job: dict) -> dict:
    """Train one (variant, seed) run; returns its curve, final validation loss, parameters and throughput."""
    os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    from raymoe.config import load_config
    from raymoe.platform.data import eval_window_starts, window_bytes
    from raymoe.platform.report import read_records
    from raymoe.platform.trainer import LocalTrainer
    from raymoe.platform.training import val_metrics, window_loss_sums

    cfg = load_config(None, job["overrides"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer = LocalTrainer(cfg, log=lambda _msg: None)
    summary = trainer.run()
    wall = time.perf_counter() - t0
    # final loss on (up to) the whole validation split: the same windows for every run, so differences pair
    block, batch = cfg.model.block_size, cfg.train.global_batch_size
    starts = eval_window_starts(trainer.val_ds, block, batch, job["final_eval_batches"])
    total, val_tokens = window_loss_sums(trainer.model, trainer.val_ds, starts, block_size=block, micro_batch=batch,
                                         device=trainer.device)
    val_bytes = window_bytes(trainer.val_ds, starts, block)
    final = val_metrics(total, val_tokens, val_bytes)
    records = read_records(summary["run_dir"])
    speeds = [r["tokens_per_s"] for r in records if r["step"] > 1]  # step 1 pays for warm-up
    moe = trainer.model.moe_modules()
    result = {
        "variant": job["variant"], "seed": job["seed"], "final_bpb": final["val_bpb"], "final_val": final["val_loss"],
        "val_tokens": val_tokens, "val_bytes": val_bytes,
        "curve": [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r],
        "params": summary["parameters"], "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
        "wall_s": wall, "cpu_s": time.process_time() - cpu0, "checkpoint": summary["checkpoint"],
        "n_layer": trainer.model.config.n_layer, "steps": cfg.train.steps,
        "moe_layers": trainer.model.config.moe_layer_ids(),
        "experts": list(trainer.model.config.experts_per_layer().values()),
        "k": trainer.model.config.moe.k if moe else 0, "residual": bool(moe) and trainer.model.config.moe.use_residual,
        "routing": routing_stats(records, cfg.train.steps), "train_bpb": late_train_bpb(records, cfg.train.steps),
        "threads": job["threads"], "finished": time.time(),
        "load_after": os.getloadavg()[0],  # how busy the machine was at the end (other jobs included)
    }
    Path(summary["run_dir"], "paper_result.json").write_text(json.dumps(result))
    return result


def run_all(size: dict, seeds: list[int], runs_dir: Path, jobs: int, log) -> dict[tuple[str, int], dict]:
    """Train every variant for every seed; the students start once the teacher (MoE, first seed) is done."""
    threads = 1 if jobs > 1 else 2
    plain = ["moe", "dense", "first_half", "second_half", "top2", "residual", "pyramid", "pr_moe",
             "first_half_dropless"]
    students = ["student_kd", "student_staged", "student_nokd", "kd_same_depth"]

    def job(variant, seed, teacher=None):
        over = base_overrides(size, runs_dir, variant, seed, threads) + variant_overrides(variant, size, teacher)
        return {"variant": variant, "seed": seed, "threads": threads, "overrides": over,
                "final_eval_batches": size["final_eval_batches"]}

    results: dict[tuple[str, int], dict] = {}
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) if jobs > 1 else None
    try:
        def submit(j):  # a run finished by an earlier invocation with the same --runs-dir is read back
            done = _result_file(runs_dir, j)
            if done.is_file():
                return _Done(_read_back(done))
            return pool.submit(train_one, j) if pool else _Done(train_one(j))

        # seed by seed (every variant of a seed, its students included, before the next seed), so that a run
        # stopped early leaves complete paired seeds; the students start once the teacher (MoE, first seed) is done
        first = [job("moe", seeds[0])] + [job(v, seeds[0]) for v in plain if v != "moe"]
        futures = [(j, submit(j)) for j in first]
        teacher = futures[0][1].result()
        log(_line(teacher))
        for i, s in enumerate(seeds):
            later = [] if i == 0 else [job(v, s) for v in plain]
            later += [job(v, s, teacher["checkpoint"]) for v in students]
            later += [job("teacher_long", seeds[0])] if i == 1 else []
            futures += [(j, submit(j)) for j in later]
        for j, fut in futures:
            res = fut.result()
            results[(res["variant"], res["seed"])] = res
            if j is not futures[0][0]:
                log(_line(res))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


def _read_back(path: Path) -> dict:
    """A finished run's result; fields that runs of older versions of this script did not record are filled
    from the run folder (the training records; the file's time for when it finished)."""
    from raymoe.platform.report import read_records

    res = json.loads(path.read_text())
    res.setdefault("finished", path.stat().st_mtime)
    if "train_bpb" not in res:
        res["train_bpb"] = late_train_bpb(read_records(path.parent), res["steps"])
    return res


def _result_file(runs_dir: Path, job: dict) -> Path:
    return runs_dir / f"{job['variant']}_s{job['seed']}" / "paper_result.json"


class _Done:
    """A finished 'future' for --jobs 1 (no process pool)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _line(r: dict) -> str:
    return (f"  {r['variant']:15s} seed {r['seed']}: val {r['final_bpb']:.4f} bits/byte  "
            f"{r['params']['total'] / 1e6:.2f}M total / {r['params']['active'] / 1e6:.2f}M active  "
            f"{r['tokens_per_s']:.0f} tok/s  {r['wall_s']:.0f}s")


def train_everything(args, size: dict, seeds: list[int], mode: str) -> tuple[dict, dict]:
    """Train all runs (in a temp folder unless --runs-dir); returns the results and the run's metadata."""
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="paper_runs_"))
    t0 = time.perf_counter()
    print(f"training {len(seeds) * (len(LABELS) - 1) + 1} runs ({size['steps']} steps each) under {runs_dir}",
          flush=True)
    try:
        train_tokens = _prepare(size, runs_dir)
        results = run_all(size, seeds, runs_dir, args.jobs, log=lambda m: print(m, flush=True))
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    first = results[("moe", seeds[0])]
    # how busy the machine was and with how many threads is recorded per run (runs may come from earlier
    # invocations with another --jobs)
    meta = {"mode": mode, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "wall_s": time.perf_counter() - t0,
            "val_tokens": first["val_tokens"], "val_bytes": first["val_bytes"], "train_tokens": train_tokens}
    return results, meta


def _prepare(size: dict, runs_dir: Path) -> int:
    """Learn the tokenizer and tokenize the text once, before the workers race for them; the training split's
    length in tokens."""
    from raymoe.config import load_config
    from raymoe.platform.training import build_splits

    train_ds, _ = build_splits(load_config(None, base_overrides(size, runs_dir, "prepare", 0, 1)))
    return len(train_ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps: checks the pipeline only")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the same models with 10.24x the tokens per run (needs a GPU)")
    ap.add_argument("--out", default=None, help="folder for results.md and img/ (default: docs/, or a temp "
                                                 "folder with --quick)")
    ap.add_argument("--runs-dir", default=None, help="keep the training runs here (default: a temp folder); runs "
                                                     "already finished there are read back, not trained again")
    ap.add_argument("--seeds", type=int, default=None, help="paired seeds per variant (default 5; 2 with --quick)")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only redraw results.md and plots from the "
                                                            "results.json of an earlier run")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else {"cpu": "full", "cuda": "cuda"}[args.device]
    size = dict(SIZES[mode])
    seeds = list(range(args.seeds or size["seeds"]))
    if len(seeds) < 2 or args.jobs < 1:
        ap.error("--seeds must be >= 2 (intervals need two) and --jobs >= 1")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="paper_quick_")) if args.quick
                                           else Path(__file__).resolve().parents[1] / "docs")
    (out / "img").mkdir(parents=True, exist_ok=True)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        size, seeds, meta = raw["size"], raw["seeds"], raw["meta"]
        results = {(r["variant"], r["seed"]): r for r in raw["runs"]}
    else:
        results, meta = train_everything(args, size, seeds, mode)
        runs = [{k: v for k, v in r.items() if k != "checkpoint"} for r in results.values()]  # temp paths
        raw = {"size": size, "seeds": seeds, "meta": meta, "runs": runs}
        (out / "results.json").write_text(json.dumps(raw, indent=1))
    summary = summarize(results, seeds)
    verdict = verdicts(results, seeds, summary)
    for key, title, _, variants, _, _ in COMPARISONS:
        plot_comparison(key, title, variants, results, seeds, summary, out / "img" / f"{key}.png")
    (out / "results.md").write_text(render_markdown(size, seeds, results, summary, verdict, meta))
    for key, *_ in COMPARISONS:
        print(f"{key}: {verdict[key]['verdict']} - " + "; ".join(part_text(p) for p in verdict[key]["parts"]))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'img'}; training took "
          f"{meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
