"""Local training: `raymoe train` with ``cluster.mode: local`` runs the one training loop
(:class:`raymoe.platform.training.Trainer`) as a world of one rank in this process.

It builds data, model and optimizer from a :class:`~raymoe.config.RaymoeConfig`, resumes from a checkpoint if
asked, logs to the run folder (:class:`~raymoe.platform.run_log.RunLog`) and commits each checkpoint itself.
The distributed driver (:mod:`raymoe.actors.coordinator`) runs the same loop inside its shards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from raymoe.config import RaymoeConfig
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import storage
from raymoe.platform.activation_checkpoint import apply_activation_checkpointing
from raymoe.platform.init import materialize, meta_model
from raymoe.platform.model_io import gpt_config_from
from raymoe.platform.run_log import RunLog
from raymoe.platform.train_step import build_optimizer
from raymoe.platform.training import (Trainer, build_splits, commit_checkpoint, load_teacher, resolve_device,
                                      resume_source)


class _LocalReporter:
    """Records go to the run log; checkpoints are committed here (there is no one else)."""

    def __init__(self, trainer: "LocalTrainer"):
        self.owner = trainer
        self.last_checkpoint: Path | None = None

    def record(self, rec: dict) -> None:
        self.owner.run_log.record(rec)

    def checkpoint_written(self, step: int, path: Path) -> None:
        self.last_checkpoint = commit_checkpoint(path, step, self.owner.cfg, self.owner.model.config)

    def step_done(self, step: int) -> None:
        pass


class LocalTrainer:
    """Trains one model in this process; ``run()`` returns the run summary (see the module docstring)."""

    def __init__(self, cfg: RaymoeConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # the run folder may be a storage URI: logs are written to a local copy and uploaded at each commit
        self.outputs = storage.RunOutputs(cfg.run.output_dir, cfg.run.name)
        self.run_dir = self.outputs.local
        torch.manual_seed(cfg.run.seed)
        train_ds, val_ds = build_splits(cfg)
        # built as every shard builds its part (raymoe.platform.init): the same initial weights whatever the
        # layout, or model.init_from's (a resumed checkpoint replaces these below)
        self.model = meta_model(gpt_config_from(cfg))
        apply_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        materialize(self.model, self.device, cfg)
        teacher, kd_schedule = load_teacher(cfg, self.device)
        t = cfg.train
        self.optimizer = build_optimizer(self.model, lr=t.lr, weight_decay=t.weight_decay,
                                         betas=(t.beta1, t.beta2), device_type=self.device.type)
        self.reporter = _LocalReporter(self)
        self.trainer = Trainer(cfg, self.model, self.optimizer, train_ds, val_ds, device=self.device,
                               reporter=self.reporter, teacher=teacher, kd_schedule=kd_schedule)
        self.start_step = self._maybe_resume()
        self.run_log: RunLog | None = None

    @property
    def val_ds(self):
        return self.trainer.val_ds

    def _maybe_resume(self) -> int:
        self.outputs.pull()  # a remote run's logs, if this machine has no copy (resuming it elsewhere)
        source = resume_source(self.cfg, self.trainer.ckpt_dir)
        if source is None:
            if self.cfg.checkpoint.resume is True:
                print(f"WARNING: checkpoint.resume=true but there is no checkpoint in "
                      f"{storage.absolute(self.trainer.ckpt_dir)}: starting at step 0 (checkpoint.resume=must fails "
                      "instead)",
                      file=sys.stderr, flush=True)
            return 0
        info = ckpt.load_checkpoint(source, self.model, self.optimizer)
        self.log(f"resumed from {source} at step {info['step']}")
        return int(info["step"])

    def run(self) -> dict:
        """Train to ``train.steps``; returns a summary dict (first/last loss, val loss, paths)."""
        cfg, t = self.cfg, self.cfg.train
        params = self.model.num_parameters()
        self.log(f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per "
                 f"token; MoE layers {self.model.config.moe_layer_ids()}; device {self.device}")
        self.run_log = RunLog(self.run_dir, total_steps=t.steps, log_interval=t.log_interval,
                              start_step=self.start_step, resume=self.start_step > 0, progress=t.progress,
                              log=self.log)
        self.run_log.write_config(cfg.model_dump(mode="json"))
        try:
            self.trainer.run(self.start_step)
        finally:
            self.run_log.close()
            self.outputs.push()
        summary = self.run_log.finish({"checkpoint": str(self.reporter.last_checkpoint), "parameters": params,
                                       "world": 1})
        self.outputs.push()  # the summary and plots
        return summary
