"""Causal self-attention of the decoder families, and rotary position embeddings.

Shape legend: B batch, T tokens in this call, L key length (cached + new), H query heads, Hk key/value heads,
Dh head dim, R rotary dims, D model dim.

`Attention` is multi-head or grouped-query attention (Hk divides H) with optional q/k/v biases (Qwen2) and
q/k RMSNorm per head (Qwen3) or over all heads (OLMoE). RoPE is applied to queries and keys from per-row
positions (`RotaryEmbedding` computes cos/sin once per forward for every layer), so left-padded batches and
the KV cache see each row's own positions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from raymoe.platform.layers import RMSNorm

RopeCS = Optional[tuple[torch.Tensor, torch.Tensor]]  # (cos_BTR, sin_BTR) or None (no RoPE)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions (rotate-half convention: dims i and i + R/2 form a pair)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        inv_freq_R2 = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq_R2, persistent=False)
        self.attention_scaling = 1.0

    @torch.no_grad()
    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BTR2 = positions_BT.float()[..., None] * self.inv_freq.to(positions_BT.device)
        emb_BTR = torch.cat([freqs_BTR2, freqs_BTR2], dim=-1)
        return ((emb_BTR.cos() * self.attention_scaling).to(dtype),
                (emb_BTR.sin() * self.attention_scaling).to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTR: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTR.unsqueeze(1), sin_BTR.unsqueeze(1)
    return x_BHTR * cos + rotate_half(x_BHTR) * sin


def make_rope(cfg) -> Optional[RotaryEmbedding]:
    """The rotary embedding a config asks for (None for learned positions)."""
    if cfg.position != "rope":
        return None
    dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
    return RotaryEmbedding(dim, cfg.rope_theta)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention via F.scaled_dot_product_attention, KV-cache aware.

    c_attn packs the q, k and v projections ([H*Dh + 2*Hk*Dh, D], that order) into one GEMM.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.c_attn = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim, eps=cfg.norm_eps)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, mask_B1TL: Optional[torch.Tensor], cache, layer_idx: int,
                rope: RopeCS = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split([self.q_dim, self.kv_dim, self.kv_dim], dim=2)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHd = q.view(B, T, self.n_head, self.head_dim)
        k_BTHd = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm == "head":
            q_BTHd, k_BTHd = self.q_norm(q_BTHd), self.k_norm(k_BTHd)
        q_BHTd, k_BHTd = q_BTHd.transpose(1, 2), k_BTHd.transpose(1, 2)
        v_BHTd = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q_BHTd, k_BHTd = apply_rope(q_BHTd, *rope), apply_rope(k_BHTd, *rope)
        if cache is not None:
            k_BHTd, v_BHTd = cache.write(layer_idx, k_BHTd, v_BHTd)  # now [B, Hk, L, Dh]
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=mask_B1TL, is_causal=mask_B1TL is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head,
        )
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, self.q_dim)
        return self.resid_drop(self.c_proj(y_BTD))


def make_attention(cfg) -> nn.Module:
    """The attention module a config asks for."""
    if cfg.attention == "mha":
        return Attention(cfg)
    raise ValueError(f"GPTConfig.attention={cfg.attention!r} is not implemented yet; allowed: ['mha']")
