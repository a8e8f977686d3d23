"""What a training run leaves in its run folder, written by whoever drives the run (the local trainer or
the coordinator): ``config.json``, ``metrics.jsonl`` + ``metrics.csv`` (one record per logged step and per
membership event), a progress bar or step lines on the terminal, ``summary.json`` and the plots.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable

CSV_FIELDS = ("step", "loss", "ce_loss", "aux_loss", "bpb", "val_loss", "val_bpb", "lr", "grad_norm",
              "tokens_per_s", "step_s")


def format_step_line(rec: dict, total: int) -> str:
    """One terminal line for a step record: loss per token (nats) and, where known, bits per byte beside it."""
    line = f"step {rec['step']}/{total} loss {rec['loss']:.4f}"
    if "bpb" in rec:
        line += f" ({rec['bpb']:.3f} bpb)"
    line += f" lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
    if "val_loss" in rec:
        line += f" val_loss {rec['val_loss']:.4f}"
        if "val_bpb" in rec:
            line += f" ({rec['val_bpb']:.3f} bpb)"
    return line


class RunLog:
    """The run folder's log files and the terminal output of one run (see the module docstring).

    ``resume``: append to the files of an earlier run instead of starting them anew. ``progress``: a tqdm bar
    over the steps when stderr is a terminal, else a line every ``log_interval`` steps (and for evaluations).
    """

    def __init__(self, run_dir: Path, *, total_steps: int, log_interval: int, start_step: int = 0,
                 resume: bool = False, progress: bool = True, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total, self.log_interval, self.log = total_steps, log_interval, log
        self.first_loss: float | None = None
        self.last: dict | None = None
        self.val: dict = {}
        mode = "a" if resume else "w"
        self._jf = (self.run_dir / "metrics.jsonl").open(mode)
        csv_path = self.run_dir / "metrics.csv"
        new_csv = not resume or not csv_path.exists()
        self._cf = csv_path.open("w" if new_csv else "a", newline="")
        self._writer = csv.DictWriter(self._cf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._writer.writeheader()
        self._bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write_config(self, config: dict) -> None:
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2))

    def record(self, rec: dict) -> None:
        """A step's record: kept for the summary, written every ``log_interval`` steps, at evaluations and at
        the last step, and shown on the terminal."""
        step = rec["step"]
        self.first_loss = rec["loss"] if self.first_loss is None else self.first_loss
        self.last = rec
        if "val_loss" in rec:
            self.val = {k: rec[k] for k in ("val_loss", "val_ppl", "val_bpb") if k in rec}
        logged = step % self.log_interval == 0 or "val_loss" in rec or step == self.total
        if logged:
            self.event(rec)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", bpb=f"{rec.get('bpb', float('nan')):.3f}",
                                  val=f"{self.val.get('val_loss', float('nan')):.3f}",
                                  val_bpb=f"{self.val.get('val_bpb', float('nan')):.3f}")
        elif logged:
            self.log(format_step_line(rec, self.total))

    def event(self, rec: dict) -> None:
        """Append a record (a step's, or a membership event's) to metrics.jsonl (and metrics.csv)."""
        self._jf.write(json.dumps(rec, default=str) + "\n")
        self._jf.flush()
        if "loss" in rec:
            self._writer.writerow({k: rec.get(k, "") for k in CSV_FIELDS})
            self._cf.flush()

    def finish(self, summary: dict) -> dict:
        """Close the files, draw the plots and write ``summary.json`` (losses, last validation, ``summary``)."""
        self.close()
        out = {"run_dir": str(self.run_dir), "first_loss": self.first_loss,
               "last_loss": self.last["loss"] if self.last else None, **self.val, **summary}
        if self.last and "bpb" in self.last:
            out["last_bpb"] = self.last["bpb"]
        out["plots"] = [str(p) for p in write_plots(self.run_dir, self.log)]
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2, default=str))
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._jf.closed:
            self._jf.close()
            self._cf.close()


def write_plots(run_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Loss and expert-load plots of a run folder (skipped with a message if matplotlib is broken)."""
    try:
        from raymoe.platform.report import plot_run
    except ImportError as exc:  # matplotlib is a dependency; keep the training results even if it is broken
        log(f"plots skipped: {exc}")
        return []
    return plot_run(run_dir)
