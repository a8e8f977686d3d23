"""Single-process training driver: `raymoe train` on one device.

Builds data, model and optimizer from a :class:`~raymoe.config.RaymoeConfig`, runs the shared
:func:`~raymoe.platform.train_step.train_step`, evaluates, checkpoints, logs metrics (JSONL + CSV) and
draws the loss curve at the end. The distributed trainer (Ray actors) reuses the same pieces.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from raymoe.config import RaymoeConfig
from raymoe.platform import checkpoint as ckpt
from raymoe.platform.data import (build_dataset, eval_window_starts, sample_batch,
                                  windows_from_starts)
from raymoe.platform.distill import KDSchedule, build_student_config
from raymoe.platform.model import GPT
from raymoe.platform.model_io import gpt_config_from, load_model
from raymoe.platform.parallel import seed_router_noise
from raymoe.platform.train_step import KDSettings, StepResult, build_optimizer, evaluate, lr_at, train_step

CSV_FIELDS = ("step", "loss", "ce_loss", "aux_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_s")




def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; allowed here: 'auto', 'cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPU for 'auto', fp32 (no autocast) on CPU."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class MetricsLog:
    """Appends one JSON record per line to metrics.jsonl and a flat row to metrics.csv."""

    def __init__(self, run_dir: Path, resume: bool):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        mode = "a" if resume else "w"
        self._jf = self.jsonl.open(mode)
        new_csv = not resume or not self.csv.exists()
        self._cf = self.csv.open(mode if not new_csv else "w", newline="")
        self._writer = csv.DictWriter(self._cf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._writer.writeheader()

    def write(self, record: dict) -> None:
        self._jf.write(json.dumps(record) + "\n")
        self._jf.flush()
        self._writer.writerow({k: record.get(k, "") for k in CSV_FIELDS})
        self._cf.flush()

    def close(self) -> None:
        self._jf.close()
        self._cf.close()


def step_record(step: int, res: StepResult, step_s: float) -> dict:
    """The metrics record of one step (also used by the distributed coordinator)."""
    rec = {"step": step, "loss": res.loss, "ce_loss": res.ce_loss, "aux_loss": res.aux_loss, "lr": res.lr,
           "grad_norm": res.grad_norm, "tokens": res.tokens, "step_s": step_s,
           "tokens_per_s": res.tokens / step_s if step_s > 0 else 0.0, "kd": res.kd_active}
    if res.expert_counts:
        rec["expert_counts"] = res.expert_counts
        rec["dropped_fraction"] = res.dropped_fraction
        rec["l_aux"] = res.l_aux
    return rec


class LocalTrainer:
    """Trains one model in this process; see the module docstring."""

    def __init__(self, cfg: RaymoeConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.run.seed)
        dataset = build_dataset(cfg.data.sources or None, cache_dir=cfg.data.cache_dir,
                                jsonl_field=cfg.data.jsonl_field)
        self.train_ds, self.val_ds = dataset.split(cfg.data.val_fraction, block_size=cfg.model.block_size)
        self.teacher, self.kd_schedule = self._build_teacher()
        gpt_cfg = gpt_config_from(cfg)
        if self.teacher is not None:
            layers = cfg.distill.student_layers or max(1, round(self.teacher.config.n_layer * 0.875))
            gpt_cfg = build_student_config(self.teacher.config, layers)
        self.model = GPT(gpt_cfg).to(self.device)
        t = cfg.train
        self.optimizer = build_optimizer(self.model, lr=t.lr, weight_decay=t.weight_decay,
                                         betas=(t.beta1, t.beta2), device_type=self.device.type)
        self.start_step = self._maybe_resume()

    def _build_teacher(self) -> tuple[GPT | None, KDSchedule | None]:
        d = self.cfg.distill
        if not d.teacher_checkpoint:
            return None, None
        teacher = load_model(d.teacher_checkpoint, device=self.device)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, KDSchedule(d.kd_stop_step)

    def _maybe_resume(self) -> int:
        resume = self.cfg.checkpoint.resume
        if resume is False:
            return 0
        source = self.ckpt_dir if resume is True else Path(resume)
        if resume is True and ckpt.latest_checkpoint(self.ckpt_dir) is None:
            self.log(f"checkpoint.resume=true but no checkpoint under {self.ckpt_dir}: starting fresh")
            return 0
        info = ckpt.load_checkpoint(source, self.model, self.optimizer)
        self.log(f"resumed from {source} at step {info['step']}")
        return int(info["step"])

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.cfg.train
        x, y = sample_batch(self.train_ds, seed=self.cfg.run.seed, step=step, rank=0, world=1,
                            global_batch=t.global_batch_size, block_size=self.cfg.model.block_size,
                            device=self.device)
        micro = t.micro_batch_size or t.global_batch_size
        batches = list(zip(x.split(micro), y.split(micro)))
        # router noise (RTS, Jitter, RSample) is seeded per (step, micro-batch): resumed and distributed runs
        # draw exactly what this run draws
        seed_router_noise(self.cfg.run.seed, step, 0, model=self.model, micro_batches=len(batches))
        return batches

    def evaluate(self) -> dict[str, float]:
        t, block = self.cfg.train, self.cfg.model.block_size
        starts = eval_window_starts(self.val_ds, block, t.global_batch_size, t.eval_batches)
        return evaluate_windows(self.model, self.val_ds, starts, block_size=block,
                                micro_batch=t.micro_batch_size or t.global_batch_size, device=self.device,
                                autocast_dtype=self.dtype)

    def save(self, step: int) -> Path:
        path = ckpt.save_checkpoint(self.ckpt_dir, step, self.model, self.optimizer,
                                    config=self.cfg.model_dump(mode="json"),
                                    extra={"model_config": dataclasses.asdict(self.model.config)})
        for old in ckpt.list_checkpoints(self.ckpt_dir)[:-self.cfg.checkpoint.keep_last]:
            ckpt.remove_checkpoint(old)
        return path

    def run(self) -> dict:
        """Train to ``train.steps``; returns a summary dict (first/last loss, val loss, paths)."""
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        params = self.model.num_parameters()
        self.log(f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per "
                 f"token; MoE layers {self.model.config.moe_layer_ids()}; device {self.device}")
        metrics = MetricsLog(self.run_dir, resume=self.start_step > 0)
        bar = _progress(range(self.start_step, t.steps), enabled=t.progress)
        first_loss = last = None
        val = {}
        try:
            for step in bar:
                kd = None
                if self.teacher is not None and self.kd_schedule.active(step):
                    d = self.cfg.distill
                    kd = KDSettings(self.teacher, d.beta, d.temperature, d.kl_direction)
                lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
                t0 = time.perf_counter()
                res = train_step(self.model, self.optimizer, self._micro_batches(step), lr=lr,
                                 grad_clip=t.grad_clip, autocast_dtype=self.dtype, kd=kd)
                rec = step_record(step + 1, res, time.perf_counter() - t0)
                first_loss = res.loss if first_loss is None else first_loss
                last = rec
                done = step + 1
                if done % t.eval_interval == 0 or done == t.steps:
                    val = self.evaluate()
                    rec.update(val)
                if done % t.log_interval == 0 or "val_loss" in rec or done == t.steps:
                    metrics.write(rec)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{res.loss:.3f}", val=f"{val.get('val_loss', float('nan')):.3f}")
                elif done % t.log_interval == 0 or done == t.steps:
                    self.log(format_step_line(rec, t.steps))
                if cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done != t.steps:
                    self.save(done)
        finally:
            metrics.close()
        ckpt_path = self.save(t.steps)
        summary = {"run_dir": str(self.run_dir), "checkpoint": str(ckpt_path), "first_loss": first_loss,
                   "last_loss": last["loss"] if last else None, **val, "parameters": params}
        summary["plots"] = [str(p) for p in write_plots(self.run_dir, self.log)]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def evaluate_windows(model: GPT, split_ds, starts, *, block_size: int, micro_batch: int, device="cpu",
                     autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Validation loss over the windows at ``starts``, in forwards of ``micro_batch`` windows (each forward
    sees the capacity it sees in training). Local training, the shards and ``raymoe eval`` all use this."""
    x, y = windows_from_starts(split_ds, starts, block_size, device)
    return evaluate(model, zip(x.split(micro_batch), y.split(micro_batch)), autocast_dtype=autocast_dtype)








def format_step_line(rec: dict, total: int) -> str:
    line = (f"step {rec['step']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
            f"{rec['tokens_per_s']:.0f} tok/s")
    if "val_loss" in rec:
        line += f" val_loss {rec['val_loss']:.4f}"
    return line


def _progress(it, enabled: bool):
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(it, desc="train", unit="step", dynamic_ncols=True)
    return it


def write_plots(run_dir: Path, log: Callable[[str], None]) -> list[Path]:
    try:
        from raymoe.platform.report import plot_run
    except ImportError as exc:  # matplotlib is a dependency; keep training results even if it is broken
        log(f"plots skipped: {exc}")
        return []
    return plot_run(run_dir)
