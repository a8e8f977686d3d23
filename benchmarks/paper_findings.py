"""DeepSpeed-MoE's findings in miniature: small models trained side by side on the embedded corpus.

Mirrors the comparisons of Rajbhandari et al., "DeepSpeed-MoE" (ICML 2022) with the ordinary training path
(`raymoe.config.load_config` + `LocalTrainer`), equal token budgets and fixed seeds:

* fig1   dense base vs the same base + top-1 MoE on every other block (equal active parameters)   (Fig. 1)
* phen1  MoE on the first half vs the second half of the blocks                                 (Phenomenon-I)
* phen2  top-2 MoE vs Residual-MoE (dense MLP + top-1 expert)                                   (Phenomenon-II)
* fig4   MoE vs Pyramid-MoE vs Residual-MoE vs PR-MoE, with parameter counts                    (Fig. 4)
* mos    a 12.5%-shallower student (8 -> 7 blocks): no KD, KD for the whole run, staged KD      (Figs. 5-6, Tab. 5)
         the teacher is the MoE model of fig1 (seed 0)

Writes <out>/results.md (validation loss as mean and spread over seeds, paired differences, total/active
parameters, tokens/s) and <out>/img/*.png (validation-loss curves per comparison). Runs go to a temporary
folder unless --runs-dir is given. Trainings run in --jobs processes with one thread each.

    python benchmarks/paper_findings.py                 # the full comparison (~20-30 min on 2 idle cores)
    python benchmarks/paper_findings.py --quick         # pipeline check in about a minute (numbers meaningless)
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

# model, schedule and budget of each mode; every run of one mode trains on the same number of tokens
SIZES = {
    "full": dict(d_model=128, n_head=4, d_ff=512, n_layer=8, block=64, batch=16, steps=500, warmup=30,
                 eval_interval=50, eval_batches=8, final_eval_batches=1000, experts=8, seeds=2),
    "quick": dict(d_model=32, n_head=2, d_ff=64, n_layer=8, block=32, batch=4, steps=6, warmup=2,
                  eval_interval=3, eval_batches=2, final_eval_batches=4, experts=4, seeds=1),
}

LABELS = {
    "dense": "Dense", "moe": "MoE (top-1)", "first_half": "First-half MoE", "second_half": "Second-half MoE",
    "top2": "Top-2 MoE", "residual": "Residual-MoE", "pyramid": "Pyramid-MoE", "pr_moe": "PR-MoE",
    "student_nokd": "Student, no KD", "student_kd": "Student, KD all run", "student_staged": "Student, staged KD",
}

# (key, title, paper claim, variants, baseline)
COMPARISONS = [
    ("fig1", "Dense vs MoE at equal active compute (paper Fig. 1)",
     "adding top-1 experts to every other block of the dense base, with the same active parameters per token, "
     "reaches a clearly lower validation loss at the same token budget", ["dense", "moe"], "dense"),
    ("phen1", "MoE in the first vs the second half of the blocks (Phenomenon-I)",
     "with the same number of MoE layers, putting them in the second (deeper) half gives the lower loss",
     ["first_half", "second_half", "moe"], "first_half"),
    ("phen2", "Top-2 vs Residual-MoE (Phenomenon-II)",
     "Residual-MoE (a dense MLP plus one expert) matches top-2 gating's loss while routing half the "
     "token-choices (top-1 communication); both beat top-1", ["moe", "top2", "residual"], "top2"),
    ("fig4", "MoE vs Pyramid vs Residual vs PR-MoE (paper Fig. 4)",
     "PR-MoE (fewer experts in the early MoE layers + residual) reaches the standard MoE's loss with fewer "
     "parameters", ["moe", "pyramid", "residual", "pr_moe"], "moe"),
    ("mos", "Mixture-of-Students: a 12.5%-shallower student (paper Figs. 5-6, Table 5)",
     "staged KD (KD early, switched off later) gives the student a lower loss than no KD and than KD for "
     "the whole run, close to the teacher", ["moe", "student_nokd", "student_kd", "student_staged"],
     "student_nokd"),
]

SIMILAR_NATS = 0.02  # "similar loss": |difference| <= this many nats/token (about 2% perplexity)


def variant_overrides(name: str, size: dict, teacher: str | None) -> list[str]:
    """Dotted config overrides that turn the base model into variant ``name``."""
    n, e = size["n_layer"], size["experts"]
    half = list(range(n // 2))
    n_moe = len(range(1, n, 2))
    pyramid = [max(1, e // 2)] * (n_moe // 2) + [e] * (n_moe - n_moe // 2)
    table = {
        "dense": ["moe.moe_layers=[]"],
        "moe": [],
        "first_half": [f"moe.moe_layers={half}"],
        "second_half": [f"moe.moe_layers={[i + n // 2 for i in half]}"],
        "top2": ["moe.k=2"],
        "residual": ["moe.use_residual=true"],
        "pyramid": [f"moe.num_experts={pyramid}"],
        "pr_moe": [f"moe.num_experts={pyramid}", "moe.use_residual=true"],
    }
    if name in table:
        return table[name]
    # students: teacher loaded (same RNG use in all three), the student shape comes from the teacher
    stop = {"student_nokd": 0, "student_kd": "null", "student_staged": size["steps"] // 2}[name]
    return [f"distill.teacher_checkpoint={teacher}", f"distill.student_layers={n - n // 8}",
            f"distill.kd_stop_step={stop}", "distill.kl_direction=teacher_student", "distill.beta=1.0",
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
        f"train.steps={s['steps']}", f"train.global_batch_size={s['batch']}", "train.lr=3e-3", "train.min_lr=3e-4",
        f"train.warmup_steps={s['warmup']}", f"train.eval_interval={s['eval_interval']}",
        f"train.eval_batches={s['eval_batches']}", "train.log_interval=10", "train.progress=false",
        f"train.threads={threads}", "train.device=cpu", "checkpoint.keep_last=1", "sample.max_new_tokens=0",
    ]


def train_one(job: dict) -> dict:
    """Train one (variant, seed) run; returns its curve, final validation loss, parameters and throughput."""
    os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    from raymoe.config import load_config
    from raymoe.platform.data import eval_window_starts
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
    final = val_metrics(total, val_tokens)["val_loss"]
    records = read_records(summary["run_dir"])
    speeds = [r["tokens_per_s"] for r in records if r["step"] > 1]  # step 1 pays for warm-up
    moe = trainer.model.moe_modules()
    return {
        "variant": job["variant"], "seed": job["seed"], "final_val": final, "val_tokens": val_tokens,
        "curve": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
        "params": summary["parameters"], "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
        "wall_s": wall, "cpu_s": time.process_time() - cpu0, "checkpoint": summary["checkpoint"],
        "n_layer": trainer.model.config.n_layer,
        "moe_layers": trainer.model.config.moe_layer_ids(),
        "experts": list(trainer.model.config.experts_per_layer().values()),
        "k": trainer.model.config.moe.k if moe else 0, "residual": bool(moe) and trainer.model.config.moe.use_residual,
    }


def run_all(size: dict, seeds: list[int], runs_dir: Path, jobs: int, log) -> dict[tuple[str, int], dict]:
    """Train every variant for every seed; the students start once the teacher (MoE, first seed) is done."""
    from raymoe.platform.data import build_dataset

    build_dataset(None, cache_dir=runs_dir / "cache")  # tokenize once, before workers race for it
    threads = 1 if jobs > 1 else 2
    plain = ["moe", "dense", "first_half", "second_half", "top2", "residual", "pyramid", "pr_moe"]
    students = ["student_kd", "student_staged", "student_nokd"]

    def job(variant, seed, teacher=None):
        over = base_overrides(size, runs_dir, variant, seed, threads) + variant_overrides(variant, size, teacher)
        return {"variant": variant, "seed": seed, "threads": threads, "overrides": over,
                "final_eval_batches": size["final_eval_batches"]}

    order = [job("moe", seeds[0])] + [job(v, s) for s in seeds for v in plain if (v, s) != ("moe", seeds[0])]
    results: dict[tuple[str, int], dict] = {}
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) if jobs > 1 else None
    try:
        submit = (lambda j: pool.submit(train_one, j)) if pool else (lambda j: _Done(train_one(j)))
        futures = [(j, submit(j)) for j in order]
        teacher = futures[0][1].result()
        log(_line(teacher))
        futures += [(j, submit(j)) for s in seeds for j in [job(v, s, teacher["checkpoint"]) for v in students]]
        for j, fut in futures:
            res = fut.result()
            res["load_after"] = os.getloadavg()[0]  # how busy the machine was (other jobs included)
            results[(res["variant"], res["seed"])] = res
            if j is not futures[0][0]:
                log(_line(res))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


class _Done:
    """A finished 'future' for --jobs 1 (no process pool)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _line(r: dict) -> str:
    return (f"  {r['variant']:15s} seed {r['seed']}: val_loss {r['final_val']:.4f}  "
            f"{r['params']['total'] / 1e6:.2f}M total / {r['params']['active'] / 1e6:.2f}M active  "
            f"{r['tokens_per_s']:.0f} tok/s  {r['wall_s']:.0f}s")


# ----------------------------------------------------------------------------------------------- summaries
def _stats(values: list[float]) -> tuple[float, float, float, float]:
    return statistics.fmean(values), min(values), max(values), (max(values) - min(values)) / 2


def summarize(results: dict, seeds: list[int]) -> dict[str, dict]:
    """Per variant: mean/min/max/half-range of the final loss, params, tokens/s; paired deltas come later."""
    out = {}
    for v in LABELS:
        runs = [results[(v, s)] for s in seeds if (v, s) in results]
        if not runs:
            continue
        mean, lo, hi, half = _stats([r["final_val"] for r in runs])
        out[v] = {"mean": mean, "min": lo, "max": hi, "half": half, "per_seed": [r["final_val"] for r in runs],
                  "params": runs[0]["params"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                  "describe": _describe(runs[0])}
    return out


def paired_delta(results: dict, seeds: list[int], v: str, base: str) -> tuple[float, float, float]:
    """Mean, min and max over seeds of loss(v) - loss(base) with the same seed (same init seed, data order)."""
    d = [results[(v, s)]["final_val"] - results[(base, s)]["final_val"] for s in seeds]
    return statistics.fmean(d), min(d), max(d)


def _describe(r: dict) -> str:
    if not r["moe_layers"]:
        return f"{r['n_layer']} blocks, dense"
    experts = r["experts"]
    e = str(experts[0]) if len(set(experts)) == 1 else "/".join(map(str, experts))
    kind = "residual + top-1" if r["residual"] else f"top-{r['k']}"
    return f"{r['n_layer']} blocks, MoE on {r['moe_layers']}, {e} experts, {kind}"


def verdicts(results: dict, seeds: list[int]) -> dict[str, tuple[str, str]]:
    """(verdict, one-line evidence) per comparison. A direction counts only when every seed agrees with it;
    "similar" = mean difference within ±SIMILAR_NATS and no seed beyond twice that."""
    def d(v, base):
        return paired_delta(results, seeds, v, base)

    def lower(v, base):  # True: lower on every seed; False: not lower on average; None: mixed
        m, lo, hi = d(v, base)
        return True if hi < 0 else False if m >= 0 else None

    def similar(v, base):
        m, lo, hi = d(v, base)
        return abs(m) <= SIMILAR_NATS and max(abs(lo), abs(hi)) <= 2 * SIMILAR_NATS

    def not_worse(v, base):
        return d(v, base)[2] <= SIMILAR_NATS

    def ev(v, base, name):
        m, lo, hi = d(v, base)
        return f"{name} = {m:+.4f} nats" + (f" (seeds {lo:+.4f} .. {hi:+.4f})" if len(seeds) > 1 else "")

    def word(flag):
        return {True: "held", False: "not reproduced", None: "mixed"}[flag]

    params = {v: results[(v, seeds[0])]["params"]["total"] / 1e6 for v in ("moe", "pyramid", "pr_moe")}
    out = {"fig1": (word(lower("moe", "dense")), ev("moe", "dense", "MoE - dense")),
           "phen1": (word(lower("second_half", "first_half")),
                     ev("second_half", "first_half", "second half - first half"))}
    top2_gain = lower("top2", "moe")
    if not not_worse("residual", "top2"):
        phen2 = "not reproduced"
    else:
        phen2 = "held" if top2_gain else "partly held: Residual-MoE is at least as good as top-2, but top-2 " \
                                           "did not beat top-1 here"
    out["phen2"] = (phen2, "; ".join([ev("residual", "top2", "Residual - top-2"), ev("top2", "moe", "top-2 - top-1"),
                                      ev("residual", "moe", "Residual - top-1")]))
    pr_ok = (similar("pr_moe", "moe") or lower("pr_moe", "moe")) and params["pr_moe"] < params["moe"]
    pyr_ok = similar("pyramid", "moe") and params["pyramid"] < params["moe"]
    fig4 = "held" if pr_ok else ("partly held: Pyramid-MoE matches MoE with fewer parameters, PR-MoE does not"
                                 if pyr_ok else "not reproduced")
    out["fig4"] = (fig4, "; ".join([
        ev("pyramid", "moe", f"Pyramid ({params['pyramid']:.2f}M) - MoE ({params['moe']:.2f}M)"),
        ev("pr_moe", "moe", f"PR-MoE ({params['pr_moe']:.2f}M) - MoE")]))
    a, b = lower("student_staged", "student_nokd"), lower("student_staged", "student_kd")
    teacher = results[("moe", seeds[0])]["final_val"]
    gap = statistics.fmean(results[("student_staged", s)]["final_val"] for s in seeds) - teacher
    out["mos"] = (word(False if False in (a, b) else None if None in (a, b) else True),
                  "; ".join([ev("student_staged", "student_nokd", "staged KD - no KD"),
                             ev("student_staged", "student_kd", "staged KD - KD all run"),
                             ev("student_kd", "student_nokd", "KD all run - no KD"),
                             f"staged-KD student - teacher = {gap:+.4f} nats"]))
    return out


def verdict_word(verdict: str) -> str:
    return f"**{verdict}**" if ":" not in verdict else "**{}**:{}".format(*verdict.split(":", 1))


# ------------------------------------------------------------------------------------------------- output
def plot_comparison(key: str, title: str, variants: list[str], results: dict, seeds: list[int],
                    summary: dict, path: Path) -> None:
    """Validation loss over steps: mean over seeds, shaded between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in variants:
        runs = [results[(v, s)] for s in seeds]
        if key == "mos" and v == "moe":
            runs = runs[:1]  # the teacher is the first seed's MoE
        steps = [st for st, _ in runs[0]["curve"]]
        per_step = list(zip(*[[loss for _, loss in r["curve"]] for r in runs]))
        mean = [statistics.fmean(p) for p in per_step]
        label = f"{_label(key, v)} ({summary[v]['params']['total'] / 1e6:.2f}M params)"
        line, = ax.plot(steps, mean, "o-", ms=3, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, [min(p) for p in per_step], [max(p) for p in per_step],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    # the first evaluations are far above the rest: zoom on the last two thirds of training
    tail = [loss for v in variants for s in seeds for st, loss in results[(v, s)]["curve"]
            if st >= results[(v, s)]["curve"][-1][0] // 3]
    if tail:
        pad = 0.1 * (max(tail) - min(tail) + 1e-3)
        ax.set_ylim(min(tail) - pad, max(tail) + pad)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(key: str, v: str) -> str:
    return "Teacher: MoE, seed 0" if key == "mos" and v == "moe" else LABELS[v]


def render_markdown(size: dict, seeds: list[int], results: dict, summary: dict, verdict: dict,
                    meta: dict) -> str:
    s = size
    tokens = s["steps"] * s["batch"] * s["block"]
    loads = [meta["load_start"], meta["load_end"], *meta.get("load_samples", []),
             *(r["load_after"] for r in results.values() if "load_after" in r)]
    walls = [r["wall_s"] for r in results.values()]
    lines = [
        "# DeepSpeed-MoE's findings in miniature",
        "",
        f"Generated by `python benchmarks/paper_findings.py{' --quick' if meta['quick'] else ''}` "
        f"({meta['date']}). Every number below was measured in that one run.",
        "",
        "## Setup",
        "",
        f"- Base model: GPT, {s['n_layer']} blocks, d_model {s['d_model']}, {s['n_head']} heads, FFN "
        f"{s['d_ff']}, context {s['block']} bytes; MoE variants use {s['experts']} experts of FFN {s['d_ff']} "
        "(so top-1 MoE has the dense model's active parameters), capacity factor 1.25 (2.0 in eval), "
        "aux-loss coefficient 0.01, Random Token Selection.",
        "- Data: the embedded default corpus (Python's `pydoc_data.topics`, byte tokenizer), 10% held out.",
        f"- Budget: {s['steps']} steps x {s['batch']} sequences x {s['block']} tokens = {tokens:,} tokens per run "
        f"for every variant (AdamW, lr 3e-3 -> 3e-4 cosine, {s['warmup']} warmup steps).",
        f"- Seeds: {seeds} (seed = init, data order and routing noise; runs with the same seed see the same "
        "batches, so differences are paired). Spread = half the range across seeds.",
        f"- Validation loss: mean cross-entropy (nats/token) on {meta['val_tokens']:,} held-out tokens (the same "
        f"windows for every run) after the last step; curves use {s['eval_batches']} batches every "
        f"{s['eval_interval']} steps on the first {s['eval_batches'] * s['batch'] * s['block']:,} of those tokens, "
        "a harder stretch of the text, so the curves end above the table's values.",
        f"- Machine: {meta['machine']}; {meta['jobs']} training processes at a time, "
        f"{'one thread' if meta['jobs'] > 1 else 'two threads'} each. 1-minute load average {min(loads):.1f} to "
        f"{max(loads):.1f} (mean {statistics.fmean(loads):.1f}) during the run"
        + (": other jobs shared the cores, so tokens/s are noisy; compare them only within a table."
           if statistics.fmean(loads) > meta["jobs"] + 0.5 else " (the training processes themselves: the "
           "machine was otherwise nearly idle)."),
        f"- Wall time of the whole script: {meta['wall_s'] / 60:.1f} min; one run took {min(walls):.0f} to "
        f"{max(walls):.0f} s (median {statistics.median(walls):.0f} s).{_idle_estimate(results, meta['jobs'])}",
        "",
        "## Summary",
        "",
        "| comparison | paper | here | verdict |",
        "|---|---|---|---|",
    ]
    for key, title, claim, _, _ in COMPARISONS:
        held, evidence = verdict[key]
        lines.append(f"| {title} | {claim} | {evidence} | {verdict_word(held)} |")
    for key, title, claim, variants, base in COMPARISONS:
        lines += ["", f"## {title}", "", f"Paper: {claim}.", "",
                  f"| variant | shape | total params | active params | val loss (mean ± spread) | per seed "
                  f"| vs {LABELS[base]} (paired) | tokens/s | tokens/s vs {LABELS[base]} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in variants:
            r = summary[v]
            per_seed = ", ".join(f"{x:.4f}" for x in r["per_seed"])
            if v == base:
                delta = "-"
            else:
                m, lo, hi = paired_delta(results, seeds, v, base)
                delta = f"{m:+.4f} ({lo:+.4f} .. {hi:+.4f})" if len(seeds) > 1 else f"{m:+.4f}"
            ratio = r["tokens_per_s"] / summary[base]["tokens_per_s"]
            name = "Teacher (MoE; seed 0 is the teacher)" if key == "mos" and v == "moe" else LABELS[v]
            lines.append(f"| {name} "
                         f"| {r['describe']} | {r['params']['total'] / 1e6:.3f}M | {r['params']['active'] / 1e6:.3f}M "
                         f"| {r['mean']:.4f} ± {r['half']:.4f} | {per_seed} | {delta} | {r['tokens_per_s']:.0f} "
                         f"| {ratio:.2f} |")
        held, evidence = verdict[key]
        lines += ["", f"Verdict: {verdict_word(held)}. {evidence}.", "", f"![{key}](img/{key}.png)"]
        if key in NOTES:
            lines += ["", NOTES[key]]
    lines += ["", "## Caveats", "", CAVEATS]
    return "\n".join(lines) + "\n"


def _idle_estimate(results: dict, jobs: int) -> str:
    """Wall time on idle cores estimated from the runs' CPU time (one thread per run: CPU time ~ wall time)."""
    cpu = [r["cpu_s"] for r in results.values() if "cpu_s" in r]
    if len(cpu) != len(results) or jobs < 2:
        return ""
    return (f" The runs used {sum(cpu) / 60:.1f} CPU-minutes in all, about {sum(cpu) / jobs / 60:.0f} min of "
            f"wall time with {jobs} idle cores.")


NOTES = {
    "phen2": "Residual-MoE routes one token-choice per token (top-1 all-to-all volume and capacity) against "
             "two for top-2, at the same FFN FLOPs per token; in this single-process run there is no "
             "all-to-all, so its saving does not show in tokens/s. Top-2 uses DeepSpeed's top-2 gating as is "
             "(capacity 2 x tokens / experts x 1.25, a Gumbel-sampled second expert, aux loss on the first "
             "choice).",
    "fig4": "Pyramid-MoE uses half the experts in the first half of the MoE layers; PR-MoE adds Residual-MoE's "
            "dense MLP to every MoE layer (so its active parameters are Residual-MoE's).",
    "mos": "The students have 7 blocks (MoE on blocks 1, 3, 5) and distil from the first seed's 8-block MoE "
           "(its row shows the MoE over all seeds). Staged KD switches the KD term off at half the steps. "
           "All three students load the teacher, so their initialisation is identical per seed; 'no KD' "
           "just never runs it. The KD term is beta 1 x temperature^2 x KL(teacher || student) at temperature "
           "1 (`distill.kl_direction=teacher_student`, the direction of DeepSpeed's MoS: Megatron-DeepSpeed's "
           "`calculate_mos_loss` is `KLDivLoss(log_softmax(student / T), softmax(teacher / T))`). An earlier "
           "run of this script (2026-11-25), when raymoe's KD term was the reverse KL(student || teacher), gave "
           "the opposite result: validation loss 2.086 ± 0.054 with KD for the whole run and 2.126 ± 0.048 with "
           "staged KD against 1.744 without KD (same seeds and teacher). The direction of the KL term decides "
           "whether KD helps a small byte-level student.",
}

CAVEATS = (
    "These are models of ~1-5M parameters trained for minutes on a few hundred thousand bytes, against the "
    "paper's 350M-52B parameter models trained on hundreds of billions of tokens. Differences of a few "
    "hundredths of a nat are within what seeds and the short schedule can move; a verdict counts as held "
    "only when every seed agrees with the paper's direction. Where a finding does not hold here, that is "
    "reported as it came out, not tuned away; the settings (DeepSpeed's defaults where it has them) were "
    "fixed before the first run and are the same for every variant."
)


def train_everything(args, size: dict, seeds: list[int]) -> tuple[dict, dict]:
    """Train all runs (in a temp folder unless --runs-dir); returns the results and the run's metadata."""
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="paper_runs_"))
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    print(f"training {len(seeds) * len(LABELS)} runs ({size['steps']} steps each) under {runs_dir}", flush=True)
    try:
        results = run_all(size, seeds, runs_dir, args.jobs, log=lambda m: print(m, flush=True))
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    meta = {"quick": args.quick, "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "load_start": load_start, "load_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t0,
            "val_tokens": results[("moe", seeds[0])]["val_tokens"]}
    return results, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps: checks the pipeline only")
    ap.add_argument("--out", default=None, help="folder for results.md and img/ (default: docs/, or a temp "
                                                 "folder with --quick)")
    ap.add_argument("--runs-dir", default=None, help="keep the training runs here (default: a temp folder)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 2; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only redraw results.md and plots from the "
                                                            "results.json of an earlier run")
    args = ap.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.steps:
        size["steps"] = args.steps
        size["eval_interval"] = max(1, min(size["eval_interval"], args.steps // 4))
    seeds = list(range(args.seeds or size["seeds"]))
    if not seeds or args.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="paper_quick_")) if args.quick
                                           else Path(__file__).resolve().parents[1] / "docs")
    (out / "img").mkdir(parents=True, exist_ok=True)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        size, seeds, meta = raw["size"], raw["seeds"], raw["meta"]
        results = {(r["variant"], r["seed"]): r for r in raw["runs"]}
    else:
        results, meta = train_everything(args, size, seeds)
        runs = [{k: v for k, v in r.items() if k != "checkpoint"} for r in results.values()]  # temp paths
        raw = {"size": size, "seeds": seeds, "meta": meta, "runs": runs}
        (out / "results.json").write_text(json.dumps(raw, indent=1))
    summary = summarize(results, seeds)
    verdict = verdicts(results, seeds)
    for key, title, _, variants, _ in COMPARISONS:
        plot_comparison(key, title, variants, results, seeds, summary, out / "img" / f"{key}.png")
    (out / "results.md").write_text(render_markdown(size, seeds, results, summary, verdict, meta))
    for key, title, *_ in COMPARISONS:
        print(f"{key}: {verdict_word(verdict[key][0])} - {verdict[key][1]}")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'img'}; training took "
          f"{meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
