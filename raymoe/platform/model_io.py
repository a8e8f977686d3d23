"""Building models: from the user's config, from a checkpoint's manifest, and loading a checkpoint's weights.

Training (local and on Ray), evaluation, generation and serving all build their model here, so a model is
described in exactly one way: the :class:`~raymoe.platform.model.GPTConfig` stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from raymoe.config import RaymoeConfig, resolved_d_ff
from raymoe.platform import checkpoint as ckpt
from raymoe.platform.model import GPT, GPTConfig


def gpt_config_from(cfg: RaymoeConfig) -> GPTConfig:
    """The model a run trains: the ``model`` and ``moe`` sections, or, with ``distill.teacher_checkpoint``, the
    Mixture-of-Students student of that teacher (``distill.student_layers`` deep, default 87.5% of it)."""
    teacher = cfg.distill.teacher_checkpoint
    if teacher:
        t_cfg = model_config_of(ckpt.read_manifest(teacher), teacher)
        return t_cfg.student(cfg.distill.student_layers or max(1, round(t_cfg.n_layer * 0.875)))
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    values = {**cfg.model.model_dump(), **cfg.moe.model_dump(), "d_ff": resolved_d_ff(cfg), "moe": cfg.moe.args()}
    return GPTConfig(**{k: v for k, v in values.items() if k in names})


def model_config_of(info: dict, checkpoint: str | Path) -> GPTConfig:
    """The model config a checkpoint's manifest (``info``, from ``read_manifest``) stores in extra.model_config."""
    extra = info.get("extra") or {}
    if "model_config" not in extra:
        raise ckpt.CheckpointError(f"{checkpoint}: manifest has no extra.model_config; cannot rebuild the model")
    return GPTConfig.from_dict(extra["model_config"])


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> GPT:
    """Build a model from the config stored in a checkpoint and load its weights (no optimizer)."""
    model = GPT(model_config_of(ckpt.read_manifest(checkpoint), checkpoint))
    ckpt.load_checkpoint(checkpoint, model, restore_rng=False)
    return model.to(device)
