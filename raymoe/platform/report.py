"""Plots of a run folder (`raymoe report RUN_DIR`): loss curves, the expert-load heatmap and routing health.

Reads only metrics.jsonl, so it works on local and distributed runs alike, and while a run is still going.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_records(run_dir: str | Path) -> list[dict]:
    """The metrics records of a run (metrics.jsonl), in order; a torn last line is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a raymoe run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def step_records(records: list[dict]) -> list[dict]:
    """One record per step, in step order. metrics.jsonl is append-only: steps replayed after a recovery that
    restored an earlier state appear twice, and the later record (the replay, which the run continued from)
    wins. Membership events (records without a loss) are left out."""
    latest: dict[int, dict] = {}
    for rec in records:
        if "loss" in rec:
            latest[rec["step"]] = rec
    return [latest[s] for s in sorted(latest)]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (train/val loss over steps) and, for MoE runs, expert_load.png and routing.png
    (load imbalance, dropped tokens and aux loss per MoE layer); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = step_records(read_records(run_dir))
    if not records:
        return []
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["ce_loss"] for r in records], label="train cross-entropy")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(run_dir / "loss.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    load = [r for r in records if r.get("expert_counts")]
    if load:
        out.append(_plot_expert_load(plt, load, run_dir / "expert_load.png"))
        out.append(_plot_routing(plt, load, run_dir / "routing.png"))
    return out


def _plot_expert_load(plt, records: list[dict], path: Path) -> Path:
    """One heatmap row per MoE layer: fraction of token-choices per expert over logged steps."""
    import numpy as np

    n_layers = len(records[0]["expert_counts"])
    fig, axes = plt.subplots(n_layers, 1, figsize=(7, 1.8 * n_layers + 0.6), squeeze=False)
    steps = [r["step"] for r in records]
    for layer in range(n_layers):
        counts = np.array([r["expert_counts"][layer] for r in records], dtype=float)
        frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax = axes[layer][0]
        first, last = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
        im = ax.imshow(frac.T, aspect="auto", origin="lower", cmap="viridis",
                       extent=(first, last, -0.5, counts.shape[1] - 0.5))
        ax.set_ylabel(f"MoE {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="load")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("expert load (fraction of token-choices)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_routing(plt, records: list[dict], path: Path) -> Path:
    """Per MoE layer over steps: busiest expert / mean load, dropped token-choices, load-balancing loss."""
    steps = [r["step"] for r in records]
    n_layers = len(records[0]["expert_counts"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for layer in range(n_layers):
        imbalance = [max(c) / max(sum(c) / len(c), 1e-9) for c in (r["expert_counts"][layer] for r in records)]
        axes[0].plot(steps, imbalance, label=f"MoE {layer}")
        if all("dropped_fraction" in r for r in records):
            axes[1].plot(steps, [100 * r["dropped_fraction"][layer] for r in records], label=f"MoE {layer}")
        if all("l_aux" in r for r in records):
            axes[2].plot(steps, [r["l_aux"][layer] for r in records], label=f"MoE {layer}")
    titles = ("load max / mean (1 = balanced)", "dropped token-choices (%)", "load-balancing loss l_aux")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
