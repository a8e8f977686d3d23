"""Rotary position embeddings: inverse frequencies per scaling type, cos/sin from per-row positions, rotation.

Shape legend: B batch, T tokens, H heads, R rotary dims (even), R2 = R / 2 frequencies.

`rope_scaling` is a Hugging Face config's dict ({"rope_type" (or legacy "type"): "default"|"linear"|"yarn",
"factor", ...}); the numbers are the ones transformers computes for it:

- default: inv_freq_i = theta^(-2i / R).
- linear: inv_freq / factor (equivalent to dividing positions by factor).
- yarn: per frequency a blend of the interpolated (inv_freq / factor) and the extrapolated (inv_freq) value: a
  linear ramp over the dims between the correction dims of ``beta_fast`` (default 32) and ``beta_slow`` (1)
  rotations within ``original_max_position_embeddings`` (default: the model's max positions, block_size), rounded
  outwards unless ``truncate`` is False. ``factor`` None means max positions / original max positions.
  cos and sin are multiplied by ``attention_factor`` (default mscale(factor), or
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set), which scales q.k by its square
  on the rotary dims.

DeepSeek's multi-head latent attention also multiplies its softmax scale by mscale(factor, mscale_all_dim)^2
(`softmax_scale_factor`), i.e. on all dims; the MHA families do not.

Positions are per row (`positions_BT`), so left padding and the KV cache keep each row's own positions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

ROPE_TYPES = ("default", "linear", "yarn")
# Keys of a rope_scaling dict that raymoe understands; anything else could change the math: an error.
_ROPE_KEYS = frozenset({"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                        "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta",
                        "partial_rotary_factor"})

RopeCS = Optional[tuple[torch.Tensor, torch.Tensor]]  # (cos_BTR, sin_BTR) or None (no RoPE)


def rope_type(scaling: Optional[dict]) -> str:
    """The scaling type of a rope_scaling dict ("default" for None)."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(scaling: Optional[dict], theta: Optional[float] = None) -> None:
    """ValueError naming the key when `scaling` asks for something raymoe does not compute."""
    if not scaling:
        return
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be a dict or None; got {type(scaling).__name__}")
    unknown = sorted(set(scaling) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"rope_scaling has unsupported keys {unknown}; allowed: {sorted(_ROPE_KEYS)}")
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r}; allowed: {list(ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_scaling.partial_rotary_factor={scaling['partial_rotary_factor']} is not supported; "
                         "allowed: 1.0")
    if theta is not None and scaling.get("rope_theta", theta) != theta:
        raise ValueError(f"rope_scaling.rope_theta={scaling['rope_theta']} differs from rope_theta={theta}")
    factor = scaling.get("factor")
    if kind == "linear" and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"rope_scaling.factor must be a number > 0 for rope_type 'linear'; got {factor!r}")
    if kind == "yarn" and factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"rope_scaling.factor must be a number > 0 (or null) for rope_type 'yarn'; got {factor!r}")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _factor(scaling: dict, max_positions: Optional[int]) -> float:
    factor = scaling.get("factor")
    if factor is None:  # yarn: the ratio of the extended to the original context
        original = scaling.get("original_max_position_embeddings") or max_positions
        if max_positions is None or not original:
            raise ValueError("yarn RoPE without rope_scaling.factor needs max_positions (the model's block_size)")
        factor = max_positions / original
    return factor


def softmax_scale_factor(scaling: Optional[dict], max_positions: Optional[int] = None) -> float:
    """Factor on MLA's softmax scale: mscale(factor, mscale_all_dim)^2 for a scaled RoPE with mscale_all_dim."""
    if rope_type(scaling) == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    m = yarn_get_mscale(_factor(scaling, max_positions), scaling["mscale_all_dim"])
    return m * m


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _yarn(dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    original = scaling.get("original_max_position_embeddings") or max_positions
    if not original:
        raise ValueError("yarn RoPE needs rope_scaling.original_max_position_embeddings or max_positions")
    factor = _factor(scaling, max_positions)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dim index whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_R2 = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freq_base_R2 = float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated_R2, interpolated_R2 = 1.0 / freq_base_R2, 1.0 / (factor * freq_base_R2)
    # ramp 0 (high-frequency dims): keep the original frequency; ramp 1 (low-frequency dims): interpolate
    keep_R2 = 1 - ramp_R2
    return interpolated_R2 * (1 - keep_R2) + extrapolated_R2 * keep_R2, float(attention_factor)


def rope_inv_freq(dim: int, theta: float, scaling: Optional[dict] = None,
                  max_positions: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [R2] in fp32, factor on cos/sin) for rotary dims `dim` and a rope_scaling dict.
    ``max_positions`` (the model's block_size) is needed by yarn only."""
    check_rope_scaling(scaling)
    kind = rope_type(scaling)
    if kind == "linear":
        return _base_inv_freq(dim, theta) / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, max_positions)
    return _base_inv_freq(dim, theta), 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions, [B, T, R] each with the frequencies repeated
    (``cat(freqs, freqs)``) and multiplied by ``attention_scaling``."""

    def __init__(self, dim: int, theta: float, scaling: Optional[dict] = None, max_positions: Optional[int] = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even number of rotary dims; got {dim}")
        self._freq_args = (dim, theta, scaling, max_positions)
        inv_freq_R2, self.attention_scaling = rope_inv_freq(*self._freq_args)
        self.register_buffer("inv_freq", inv_freq_R2, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (a model materialised from the meta device: raymoe.platform.init)."""
        self.inv_freq.copy_(rope_inv_freq(*self._freq_args)[0])

    @torch.no_grad()
    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BTR2 = positions_BT.float()[..., None] * self.inv_freq.to(positions_BT.device)
        emb_BTR = torch.cat([freqs_BTR2, freqs_BTR2], dim=-1)
        return ((emb_BTR.cos() * self.attention_scaling).to(dtype),
                (emb_BTR.sin() * self.attention_scaling).to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTR: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """Rotate x (any head count, 1 broadcasts) by per-row cos/sin.

    Default pairs dims i and i + R/2 (Llama's rotate-half). ``interleave`` pairs dims 2i and 2i + 1 (DeepSeek's
    checkpoints) and returns the rotated pairs de-interleaved (evens first, then odds): queries and keys get the
    same permutation, so q.k is that of interleaved RoPE, and the layout is the one transformers produces.
    """
    if not interleave:
        cos_B1TR, sin_B1TR = cos_BTR.unsqueeze(1), sin_BTR.unsqueeze(1)
        return x_BHTR * cos_B1TR + rotate_half(x_BHTR) * sin_B1TR
    R2 = cos_BTR.shape[-1] // 2
    cos_B1TR2, sin_B1TR2 = cos_BTR[..., :R2].unsqueeze(1), sin_BTR[..., :R2].unsqueeze(1)
    even, odd = x_BHTR[..., 0::2], x_BHTR[..., 1::2]
    return torch.cat((even * cos_B1TR2 - odd * sin_B1TR2, odd * cos_B1TR2 + even * sin_B1TR2), dim=-1)


def make_rope(cfg) -> Optional[RotaryEmbedding]:
    """The rotary embedding a config asks for (None for learned positions)."""
    if cfg.position != "rope":
        return None
    check_rope_scaling(cfg.rope_scaling, cfg.rope_theta)
    dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
    return RotaryEmbedding(dim, cfg.rope_theta, cfg.rope_scaling, cfg.block_size)
