"""Causal self-attention of the decoder families.

Shape legend: B batch, T tokens in this call, L key length (cached + new), H query heads, Hk key/value heads,
Dh head dim, R rotary dims, D model dim; MLA: N no-RoPE dims per head, Dv value dims per head, Ck kv latent
rank, Cq q latent rank.

`Attention` is multi-head or grouped-query attention (Hk divides H) with optional q/k/v biases (Qwen2) and
q/k RMSNorm per head (Qwen3) or over all heads (OLMoE). `MLAttention` is DeepSeek-V2/V3's multi-head latent
attention. Both take the RoPE cos/sin of the call's per-row positions (`raymoe.platform.rope.RotaryEmbedding`,
computed once per forward for every layer), so left-padded batches and the KV cache see each row's own
positions, and both append their keys/values to the KV cache (`cache.write`): Hk heads of Dh for `Attention`,
H heads of N + R key dims and Dv value dims for `MLAttention` (`GPTConfig.kv_dims`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from raymoe.platform.layers import RMSNorm
from raymoe.platform.rope import RopeCS, RotaryEmbedding, apply_rope, make_rope, rotate_half, softmax_scale_factor

# RoPE lives in rope.py; its public names stay importable from here (model.py imports make_rope from this module).
__all__ = ["Attention", "MLAttention", "make_attention", "MLA_NORM_EPS", "RopeCS", "RotaryEmbedding", "apply_rope",
           "make_rope", "rotate_half"]

# DeepSeek's q/kv latent norms use this eps whatever the config's rms_norm_eps (their reference code and
# transformers both build them with the RMSNorm default).
MLA_NORM_EPS = 1e-6


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
        self.rope_interleave = bool(cfg.rope_interleave)
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
            q_BHTd = apply_rope(q_BHTd, *rope, interleave=self.rope_interleave)
            k_BHTd = apply_rope(k_BHTd, *rope, interleave=self.rope_interleave)
        if cache is not None:
            k_BHTd, v_BHTd = cache.write(layer_idx, k_BHTd, v_BHTd)  # now [B, Hk, L, Dh]
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=mask_B1TL, is_causal=mask_B1TL is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head,
        )
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, self.q_dim)
        return self.resid_drop(self.c_proj(y_BTD))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), KV-cache aware.

    q = q_b_proj(q_a_norm(q_a_proj(x))) (or q_proj(x) without a q latent), per head [N no-RoPE | R RoPE] dims.
    kv_a_proj(x) = [kv latent (Ck) | one RoPE key (R) shared by all heads]; kv_b_proj(kv_a_norm(latent)) = per
    head [k no-RoPE (N) | v (Dv)]. Keys are [k no-RoPE | shared RoPE key], the softmax scale is
    1/sqrt(N + R), times mscale(factor, mscale_all_dim)^2 under a scaled RoPE with mscale_all_dim. The weight
    layouts are DeepSeek's (head-major rows of q_b_proj / kv_b_proj), so checkpoints load without permuting.
    The cache stores the expanded keys and values (H heads each), not the latent.
    """

    def __init__(self, cfg):
        super().__init__()
        H = cfg.n_head
        self.n_head, self.kv_rank = H, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        self.q_lora_rank = cfg.q_lora_rank
        # Biases as DeepSeek's attention_bias: only on the projections that read x and on the output.
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, self.kv_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = RMSNorm(self.kv_rank, eps=MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.c_proj = nn.Linear(H * self.v_dim, cfg.d_model, bias=cfg.bias)
        self.scale = qk_dim ** -0.5 * softmax_scale_factor(cfg.rope_scaling, cfg.block_size)
        self.rope_interleave = bool(cfg.rope_interleave)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))

    def forward(self, x_BTD: torch.Tensor, mask_B1TL: Optional[torch.Tensor], cache, layer_idx: int,
                rope: RopeCS = None) -> torch.Tensor:
        if rope is None:
            raise ValueError("MLAttention needs RoPE cos/sin (GPTConfig.position='rope')")
        B, T, _ = x_BTD.shape
        H, N, R, Dv = self.n_head, self.nope_dim, self.rope_dim, self.v_dim
        q_BHTQ = self._queries(x_BTD).view(B, T, H, N + R).transpose(1, 2)
        q_nope_BHTN, q_rope_BHTR = q_BHTQ.split([N, R], dim=-1)
        latent_BTC, k_rope_BTR = self.kv_a_proj(x_BTD).split([self.kv_rank, R], dim=-1)
        kv_BHTX = self.kv_b_proj(self.kv_a_norm(latent_BTC)).view(B, T, H, N + Dv).transpose(1, 2)
        k_nope_BHTN, v_BHTV = kv_BHTX.split([N, Dv], dim=-1)
        q_rope_BHTR = apply_rope(q_rope_BHTR, *rope, interleave=self.rope_interleave)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), *rope, interleave=self.rope_interleave)
        q_BHTQ = torch.cat((q_nope_BHTN, q_rope_BHTR), dim=-1)
        k_BHTQ = torch.cat((k_nope_BHTN, k_rope_B1TR.expand(B, H, T, R)), dim=-1)
        if cache is not None:
            k_BHTQ, v_BHTV = cache.write(layer_idx, k_BHTQ, v_BHTV)  # now [B, H, L, N + R] and [B, H, L, Dv]
        y_BHTV = F.scaled_dot_product_attention(
            q_BHTQ, k_BHTQ, v_BHTV, attn_mask=mask_B1TL, is_causal=mask_B1TL is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )
        return self.resid_drop(self.c_proj(y_BHTV.transpose(1, 2).reshape(B, T, H * Dv)))


def make_attention(cfg) -> nn.Module:
    """The attention module a config asks for: `Attention` for 'mha', `MLAttention` for 'mla'."""
    if cfg.attention == "mha":
        return Attention(cfg)
    if cfg.attention == "mla":
        return MLAttention(cfg)
    raise ValueError(f"GPTConfig.attention={cfg.attention!r}; allowed: ['mha', 'mla']")
