"""Loading Hugging Face folders into raymoe models, streaming tensor by tensor."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from raymoe.platform.reshard import intersect
from raymoe.platform.sharded_io import layout, local

from raymoe.platform.model import GPT, GPTConfig

from .config import HFFormatError, family_of, gpt_config_from_hf, read_hf_config
from .names import TensorMap, ignorable, weight_maps
from .safetensors_io import INDEX, SINGLE, SafetensorsFolder

_CHECKPOINT_MARKERS = ("manifest.json", "latest")


def is_hf_folder(path: str | Path) -> bool:
    """True for a Hugging Face model folder: a ``config.json`` with ``architectures`` and no raymoe
    checkpoint manifest (native checkpoints are never mistaken for one)."""
    p = Path(path)
    if not (p / "config.json").is_file() or any((p / m).exists() for m in _CHECKPOINT_MARKERS):
        return False
    try:
        return "architectures" in read_hf_config(p)
    except HFFormatError:
        return False


def config_from_folder(folder: str | Path) -> GPTConfig:
    """The raymoe model config of a Hugging Face folder (errors name the config file and field)."""
    return gpt_config_from_hf(read_hf_config(folder), where=str(Path(folder) / "config.json"))


def _check_shapes(st: SafetensorsFolder, maps: list[TensorMap], state: dict) -> None:
    missing = []
    for m in maps:
        for name, view in m.pieces(state[m.ours]):
            if name not in st:
                missing.append(name)
                continue
            info = st.info(name)
            if info.shape != m.hf_shape(view):
                raise HFFormatError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                                    f"describes {list(m.hf_shape(view))} (raymoe entry {m.ours!r})")
            if not info.dtype.is_floating_point:
                raise HFFormatError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; supported: "
                                    "float32, bfloat16, float16 (quantized weights are not)")
    if missing:
        raise HFFormatError(f"{st.folder}: tensors missing from the safetensors files: {missing[:6]}"
                            f"{f' (and {len(missing) - 6} more)' if len(missing) > 6 else ''}")


def load_weights(model: nn.Module, folder: str | Path) -> dict:
    """Fill ``model`` (a whole raymoe model or an expert-parallel shard of one) from a Hugging Face folder.

    Every raymoe entry must find its tensors with the right shapes and every tensor in the folder must belong
    to the model (an expert another shard holds counts as belonging); both are checked before anything is
    read. Tensors are read one at a time and converted to the model's dtype; a shard reads only its experts.
    Returns ``{"tensors": read, "bytes_read": tensor bytes read, "family": ...}``.
    """
    folder = Path(folder)
    hf = read_hf_config(folder)
    family = family_of(hf, str(folder / "config.json"))
    cfg = model.config
    maps = weight_maps(model, family)
    state = model.state_dict(keep_vars=True)
    # an FSDP-sharded entry is checked by its whole shape, without touching its shards (no collective)
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, DTensor) else v
              for k, v in state.items()}
    with SafetensorsFolder(folder) as st:
        _check_shapes(st, maps, shapes)
        known = {n for m in maps for n in m.hf_names(all_experts=True)}
        extra = [k for k in st.keys() if k not in known and st.info(k).end > st.info(k).start  # empty: no content
                 and not ignorable(k, family, cfg.n_layer, cfg.tie_embeddings)]
        if extra:
            where = folder / (INDEX if (folder / INDEX).is_file() else SINGLE)
            raise HFFormatError(f"{where}: tensors that config.json does not account for: {extra[:6]}"
                                f"{f' (and {len(extra) - 6} more)' if len(extra) > 6 else ''}")
        count = 0
        with torch.no_grad():
            for m in maps:
                if isinstance(state[m.ours], DTensor):
                    count += _read_shard(st, m, state[m.ours], shapes[m.ours])
                    continue
                for name, view in m.pieces(state[m.ours].detach()):
                    info = st.info(name)
                    if not m.transpose and view.is_contiguous() and view.dtype == info.dtype:
                        st.read(name, out=view)  # straight into the parameter: no temporary
                    else:
                        src = st.read(name)
                        view.copy_(src.t() if m.transpose else src)
                        del src
                    count += 1
        return {"tensors": count, "bytes_read": st.bytes_read, "family": family}


def _box(whole: torch.Tensor, view: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The box (start, stop per dim) that ``view`` covers of the contiguous ``whole`` it was cut from (narrowed,
    or one row of dim 0 unbound: that dim's extent is 1)."""
    start, rest = [], view.storage_offset()
    for stride in whole.stride():
        coord, rest = divmod(rest, stride)
        start.append(coord)
    extent = ([1] if view.dim() < whole.dim() else []) + list(view.shape)
    return tuple((a, a + n) for a, n in zip(start, extent))


def _read_shard(st: SafetensorsFolder, m: TensorMap, param, whole: torch.Tensor) -> int:
    """Fill this rank's part of the FSDP-sharded ``param`` (``whole``: a meta tensor of its whole shape) from
    the blocks of the HF tensors that overlap it, reading only those blocks; returns the tensors touched."""
    part, (shape, offset) = local(param).detach(), layout(param)
    mine = tuple((o, o + n) for o, n in zip(offset, shape))
    touched = 0
    for name, view in m.pieces(whole):
        if (hit := intersect(mine, _box(whole, view))) is None:
            continue  # another rank's part
        dst, src, _ = hit
        src = src[1:] if view.dim() < whole.dim() else src  # an expert row: HF holds it alone
        block = st.read_block(name, src[::-1] if m.transpose else src)
        block = block.t() if m.transpose else block
        part[dst].copy_(block.reshape(part[dst].shape))
        touched += 1
    return touched


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype]):
    """Build modules in ``dtype`` (parameters are created in it, not converted afterwards)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_hf_model(folder: str | Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                  *, moe_kwargs=None) -> GPT:
    """A raymoe model built from a Hugging Face folder's config.json and filled with its weights.

    ``dtype``: the model's floating dtype (default float32; the router weights stay float32); the folder's
    bf16/fp16/fp32 tensors are converted while they are read. ``moe_kwargs`` as for :class:`GPT` (an
    expert-parallel shard: only its experts are built and read).
    """
    cfg = config_from_folder(folder)
    with default_dtype(dtype):
        model = GPT(cfg, moe_kwargs=moe_kwargs)
    load_weights(model, folder)
    return model.to(device)
