"""Which Hugging Face tensors make up each raymoe parameter, per family (both directions use one table).

raymoe packs some projections HF keeps apart: ``attn.c_attn`` = [q; k; v] rows, a SwiGLU ``c_fc`` = [gate; up]
rows, and the experts of a layer are stacks ``w1`` [E_local, D, 2F] (row e = [gate_e^T, up_e^T]) and ``w2``
[E_local, F, D] (down_e^T). A :class:`TensorMap` says how one raymoe entry splits into HF tensors; its
``pieces`` pairs each HF name with the view of the raymoe tensor it fills (loading) or comes from (export).
Row j of an expert stack is global expert ``global_expert_ids[j]``, so an expert-parallel shard maps only
the experts it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .config import HFFormatError

_TOP = {"wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
        "ln_f.weight": "model.norm.weight"}
_BLOCK = {
    "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    # multi-head latent attention (DeepSeek-V3)
    "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorMap:
    """raymoe entry ``ours`` = HF tensors ``hf`` concatenated along ``dim`` with extents ``sizes`` (one part:
    None), each stored transposed in HF when ``transpose``. Expert stacks (``experts`` = global id of each
    row, ``num_experts`` in the layer) apply this per row; their HF names hold ``{e}``."""

    ours: str
    hf: tuple[str, ...]
    sizes: Optional[tuple[int, ...]] = None
    dim: int = 0
    transpose: bool = False
    experts: Optional[tuple[int, ...]] = None
    num_experts: int = 0

    def hf_names(self, all_experts: bool = False) -> list[str]:
        """The HF tensors this entry reads (every expert of the layer with ``all_experts``)."""
        if self.experts is None:
            return list(self.hf)
        ids = range(self.num_experts) if all_experts else self.experts
        return [name.format(e=g) for g in ids for name in self.hf]

    def pieces(self, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, view of ``tensor`` it corresponds to, in raymoe's orientation) for every HF tensor."""
        rows = [(None, tensor)] if self.experts is None else list(zip(self.experts, tensor.unbind(0)))
        for g, row in rows:
            off = 0
            for name, size in zip(self.hf, self.sizes or (row.shape[self.dim],)):
                yield (name if g is None else name.format(e=g)), row.narrow(self.dim, off, size)
                off += size

    def hf_shape(self, view: torch.Tensor) -> tuple[int, ...]:
        return tuple(view.shape[::-1]) if self.transpose else tuple(view.shape)


def _moe_prefix(family: str) -> str:
    return "block_sparse_moe." if family == "mixtral" else "mlp."


def _expert_names(family: str) -> tuple[tuple[str, str], str]:
    if family == "mixtral":
        return ("experts.{e}.w1.weight", "experts.{e}.w3.weight"), "experts.{e}.w2.weight"
    return ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"), "experts.{e}.down_proj.weight"


def _block_map(model: nn.Module, family: str, i: int, rest: str, t: torch.Tensor) -> Optional[TensorMap]:
    cfg = model.config
    ours, pre = f"blocks.{i}.{rest}", f"model.layers.{i}."
    if rest in _BLOCK:
        return TensorMap(ours, (pre + _BLOCK[rest],))
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        q, kv, kind = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, rest.rsplit(".", 1)[1]
        return TensorMap(ours, tuple(f"{pre}self_attn.{p}_proj.{kind}" for p in "qkv"), (q, kv, kv))
    block = model.blocks[i]
    if not block.is_moe:
        if rest == "mlp.c_fc.weight":
            half = t.shape[0] // 2
            return TensorMap(ours, (pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"), (half, half))
        return TensorMap(ours, (pre + "mlp.down_proj.weight",)) if rest == "mlp.c_proj.weight" else None
    moe = pre + _moe_prefix(family)
    shared = moe + ("shared_experts." if family == "deepseek_v3" else "shared_expert.")
    simple = {"mlp.gate.wg.weight": moe + "gate.weight", "mlp.shared_gate.weight": moe + "shared_expert_gate.weight",
              "mlp.mlp.c_proj.weight": shared + "down_proj.weight"}
    if family == "deepseek_v3":
        simple["mlp.gate.expert_bias"] = moe + "gate.e_score_correction_bias"
    if rest in simple:
        return TensorMap(ours, (simple[rest],))
    if rest == "mlp.mlp.c_fc.weight":
        half = t.shape[0] // 2
        return TensorMap(ours, (shared + "gate_proj.weight", shared + "up_proj.weight"), (half, half))
    if rest in ("mlp.experts.w1", "mlp.experts.w2"):
        experts = block.mlp.experts
        ids, n = tuple(int(g) for g in experts.global_expert_ids), int(block.mlp.num_experts)
        (gate, up), down = _expert_names(family)
        if rest == "mlp.experts.w2":
            return TensorMap(ours, (moe + down,), transpose=True, experts=ids, num_experts=n)
        half = t.shape[2] // 2  # row e is [D, 2F] = [gate_e^T | up_e^T]
        return TensorMap(ours, (moe + gate, moe + up), (half, half), dim=1, transpose=True, experts=ids,
                         num_experts=n)
    return None


def weight_maps(model: nn.Module, family: str) -> list[TensorMap]:
    """One :class:`TensorMap` per entry of ``model.state_dict()`` (the tied ``lm_head`` excepted); an entry
    with no HF counterpart in ``family`` is a ValueError naming it."""
    maps, unmapped = [], []
    for name, t in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        m = None
        if name in _TOP:
            m = TensorMap(name, (_TOP[name],))
        elif (hit := _BLOCK_RE.match(name)) is not None:
            m = _block_map(model, family, int(hit.group(1)), hit.group(2), t)
        if m is None:
            unmapped.append(name)
        else:
            maps.append(m)
    if unmapped:
        raise HFFormatError(f"raymoe entries with no Hugging Face counterpart in {family}: {unmapped[:8]}"
                            f"{' ...' if len(unmapped) > 8 else ''}")
    return maps


def ignorable(name: str, family: str, n_layer: int, tied: bool) -> bool:
    """HF tensors that may sit in a folder without being part of the model: the tied ``lm_head``, RoPE tables
    written by old versions, DeepSeek-V3's multi-token-prediction layers (after the last decoder layer)."""
    if (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
        return True
    hit = re.match(r"^model\.layers\.(\d+)\.", name)
    return family == "deepseek_v3" and hit is not None and int(hit.group(1)) >= n_layer
