"""Building models: from the user's config, from a checkpoint, and loading a checkpoint's weights.

Training (local and on Ray), evaluation, generation and serving all build their model here, so a model is
described in exactly one way: the :class:`~raymoe.platform.model.GPTConfig` stored in every native checkpoint,
or the one a Hugging Face folder's config.json maps to (:mod:`raymoe.platform.hf`). Wherever raymoe takes a
checkpoint it takes either: ``checkpoint_config``, ``checkpoint_step``, ``load_weights`` and ``load_model``
accept both. A native checkpoint may be at a storage URI (``s3://...``, see :mod:`raymoe.platform.storage`); a
Hugging Face folder must be a local path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from raymoe.config import RaymoeConfig, resolved_d_ff
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import fsdp, hf, storage
from raymoe.platform.model import GPT, GPTConfig



def is_hf_folder(checkpoint) -> bool:
    """True for a local Hugging Face model folder (a storage URI is always taken as a native checkpoint)."""
    loc = storage.location(checkpoint)
    return isinstance(loc, Path) and hf.is_hf_folder(loc)


def gpt_config_from(cfg: RaymoeConfig) -> GPTConfig:
    """The model a run trains: the ``model`` and ``moe`` sections; with ``model.init_from``, that folder's
    architecture (and the few fields a run may set beside it); with ``distill.teacher_checkpoint``, the
    Mixture-of-Students student of that teacher (``distill.student_layers`` deep, default 87.5% of it). With
    ``tokenizer.kind: pretrained`` and ``model.vocab_size`` unset, the vocabulary is the tokenizer's."""
    if cfg.model.init_from:
        return _init_from_config(cfg)
    teacher = cfg.distill.teacher_checkpoint
    if teacher:
        t_cfg = checkpoint_config(teacher)
        return t_cfg.student(cfg.distill.student_layers or max(1, round(t_cfg.n_layer * 0.875)))
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    values = {**cfg.model.model_dump(), **cfg.moe.model_dump(), "d_ff": resolved_d_ff(cfg), "moe": cfg.moe.args()}
    if cfg.tokenizer.kind == "pretrained" and "vocab_size" not in cfg.model.model_fields_set:
        from raymoe.platform.bpe import run_tokenizer  # memoised: the run's tokenizer is read once per process

        values["vocab_size"] = run_tokenizer(cfg).vocab_size
    return GPTConfig(**{k: v for k, v in values.items() if k in names})


def _init_from_config(cfg: RaymoeConfig) -> GPTConfig:
    """The architecture of ``model.init_from`` with the few fields a run may set beside it."""
    base = checkpoint_config(cfg.model.init_from)
    if cfg.model.block_size > base.block_size:
        raise ValueError(f"model.block_size={cfg.model.block_size} exceeds the context of model.init_from "
                         f"({base.block_size} positions)")
    ids = {"byte": 257, "bpe": cfg.tokenizer.vocab_size}.get(cfg.tokenizer.kind)
    if ids is not None and ids > base.vocab_size:
        raise ValueError(f"tokenizer.kind={cfg.tokenizer.kind!r} has {ids} ids but model.init_from's vocabulary "
                         f"holds {base.vocab_size}; use the folder's tokenizer (tokenizer.kind: pretrained)")
    changes, moe_changes = {}, {}
    if "dropout" in cfg.model.model_fields_set:
        changes["dropout"] = cfg.model.dropout
    if "aux_loss_coef" in cfg.moe.model_fields_set:
        changes["aux_loss_coef"] = cfg.moe.aux_loss_coef
    if "z_loss_coef" in cfg.moe.model_fields_set:
        moe_changes["z_loss_coef"] = cfg.moe.z_loss_coef
    return dataclasses.replace(base, **changes, moe=base.moe.model_copy(update=moe_changes))


def init_weights(model: nn.Module, cfg: RaymoeConfig) -> bool:
    """Load ``model.init_from``'s weights into ``model`` (whole, an expert-parallel shard, FSDP-sharded: see
    :func:`load_weights`) when the run has one; True if it did."""
    if not cfg.model.init_from:
        return False
    load_weights(model, cfg.model.init_from)
    return True


def model_config_of(info: dict, checkpoint: str | Path) -> GPTConfig:
    """The model config a checkpoint's manifest (``info``, from ``read_manifest``) stores in extra.model_config."""
    extra = info.get("extra") or {}
    if "model_config" not in extra:
        raise ckpt.CheckpointError(f"{checkpoint}: manifest has no extra.model_config; cannot rebuild the model")
    return GPTConfig.from_dict(extra["model_config"])


def checkpoint_config(checkpoint: str | Path) -> GPTConfig:
    """The model config of a native checkpoint (a step dir or a root: its latest) or a Hugging Face folder."""
    if is_hf_folder(checkpoint):
        return hf.config_from_folder(checkpoint)
    try:
        info = ckpt.read_manifest(checkpoint)
    except ckpt.CheckpointError as e:
        hint = "must be a local path" if storage.is_remote(checkpoint) else "needs a config.json"
        raise ckpt.CheckpointError(f"{e}; a Hugging Face model folder {hint}") from None
    return model_config_of(info, checkpoint)


def checkpoint_step(checkpoint: str | Path) -> Optional[int]:
    """The training step of a native checkpoint; None for a Hugging Face folder."""
    return None if is_hf_folder(checkpoint) else ckpt.read_manifest(checkpoint).get("step")


def checkpoint_dir(checkpoint: str | Path) -> storage.Location:
    """The folder that holds the weights: a Hugging Face folder itself, or the resolved step dir (a
    ``RemotePath`` for a checkpoint at a storage URI)."""
    return Path(checkpoint) if is_hf_folder(checkpoint) else ckpt.read_manifest(checkpoint)["path"]


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Fill ``model`` (whole or an expert-parallel shard: only its experts are read) from a native checkpoint
    (no optimizer, no RNG) or a Hugging Face folder (tensors converted to the model's dtype).

    An FSDP-sharded model reads either straight into its shards: each rank only its slices of the files, no
    communication."""
    if is_hf_folder(checkpoint):
        fsdp.reshard(model)  # parameters registered as their shards
        hf.load_weights(model, checkpoint)
    else:
        ckpt.load_checkpoint(checkpoint, model, restore_rng=False)


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> GPT:
    """Build a model from the config stored in a checkpoint (native or Hugging Face) and load its weights."""
    if is_hf_folder(checkpoint):
        return hf.load_hf_model(checkpoint, device=device)
    model = GPT(checkpoint_config(checkpoint))
    ckpt.load_checkpoint(checkpoint, model, restore_rng=False)
    return model.to(device)
