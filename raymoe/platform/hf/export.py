"""Writing raymoe models as Hugging Face folders (config.json + safetensors + generation/tokenizer files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .config import HFFormatError, family_for, hf_config_from_gpt
from .names import weight_maps
from .safetensors_io import INDEX, parse_size, write_sharded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_KEEP_FP32 = ("e_score_correction_bias",)  # HF keeps DeepSeek-V3's correction bias in float32


def _check_whole(model: nn.Module) -> None:
    for m in model.moe_modules():
        ids = list(m.experts.global_expert_ids)
        if ids != list(range(m.num_experts)):
            raise HFFormatError(f"layer {m.layer_id} holds experts {ids} of {m.num_experts}: export a whole "
                                "model (e.g. load the checkpoint with model_io.load_model), not an expert shard")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HFFormatError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in out.iterdir() if p.name in ("config.json", INDEX) or p.suffix == ".safetensors"]
    if old and not overwrite:
        raise HFFormatError(f"{out}: already holds a model ({sorted(p.name for p in old)[:3]}); pass "
                            "overwrite=True (--overwrite) to replace it")
    for p in old:
        p.unlink()


def _token_ids(sources: Sequence[Path]) -> dict:
    """bos/eos/pad token ids from a source folder's config.json or generation_config.json."""
    for src in sources:
        for name in ("config.json", GENERATION_CONFIG):
            try:
                data = json.loads((src / name).read_text())
            except (OSError, ValueError):
                continue
            ids = {k: data[k] for k in _TOKEN_KEYS if data.get(k) is not None}
            if ids:
                return ids
    return {}


def _copy_side_files(out: Path, sources: Sequence[Path], token_ids: dict) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES + (GENERATION_CONFIG,):
        src = next((s / name for s in sources if (s / name).is_file()), None)
        if src is not None:
            shutil.copyfile(src, out / name)
            copied.append(name)
    if GENERATION_CONFIG not in copied:
        gen = {"_from_model_config": True, **token_ids}
        (out / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return copied


def export_model(model: nn.Module, out: str | Path, *, dtype: Optional[torch.dtype] = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, sources: Iterable[str | Path] = (),
                 overwrite: bool = False) -> Path:
    """Write ``model`` (a whole raymoe model of a supported family) as a Hugging Face folder ``out``.

    Writes config.json (transformers 5 keys), model.safetensors (or shards of at most ``max_shard_size``
    plus model.safetensors.index.json) in ``dtype`` (default: the model's), generation_config.json, and
    copies the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja, ...) and generation_config.json from the first of ``sources`` that has them.
    A model with no HF family (DeepSpeed gating, learned positions, ...) is a ValueError saying why.
    """
    cfg = model.config
    family = family_for(cfg)  # fails before anything is written
    _check_whole(model)
    dtype = dtype or model.wte.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype}; supported: {list(_DTYPE_NAMES.values())}")
    limit = parse_size(max_shard_size)
    out, sources = Path(out), [Path(s) for s in sources]
    maps = weight_maps(model, family)
    state = model.state_dict()
    _prepare_out(out, overwrite)

    def items():
        for m in maps:
            for name, view in m.pieces(state[m.ours]):
                dt = torch.float32 if name.endswith(_KEEP_FP32) else dtype

                def make(view=view, transpose=m.transpose, dt=dt):
                    return (view.t() if transpose else view).to(dt)
                yield name, view.numel() * dt.itemsize, make

    write_sharded(out, items(), limit)
    token_ids = _token_ids(sources)
    hf_cfg = hf_config_from_gpt(cfg, dtype=_DTYPE_NAMES[dtype], extra=token_ids)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    _copy_side_files(out, sources, token_ids)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, **kwargs) -> Path:
    """Export a raymoe checkpoint (native or a Hugging Face folder) as a Hugging Face folder; the tokenizer
    files travel from the checkpoint (its folder or its ``tokenizer/`` subfolder). kwargs: as ``export_model``."""
    from raymoe.platform import model_io  # lazy: model_io imports this package

    model = model_io.load_model(checkpoint)
    src = model_io.checkpoint_dir(checkpoint)
    if isinstance(src, Path):
        return export_model(model, out, sources=[*kwargs.pop("sources", ()), src, src / "tokenizer"], **kwargs)
    import tempfile

    from raymoe.platform.checkpoint import fetch_files

    with tempfile.TemporaryDirectory() as tmp:  # a checkpoint at a storage URI: its side files, verified, here
        local = fetch_files(src, TOKENIZER_FILES + (GENERATION_CONFIG,), tmp)
        return export_model(model, out, sources=[*kwargs.pop("sources", ()), local], **kwargs)
