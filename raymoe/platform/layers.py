"""Building blocks shared by the decoder's families: norms and the dense feed-forward kinds.

Shape legend: T tokens (any leading dims), D model dim, F ffn dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_KINDS = ("gelu", "swiglu")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as Llama-family models do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """'layernorm' (bias optional) or 'rmsnorm' (never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r}; allowed: ['layernorm', 'rmsnorm']")


class MLP(nn.Module):
    """Dense feed-forward block.

    'gelu': c_proj(gelu(c_fc(x))) (GPT-2). 'swiglu': c_proj(silu(gate) * up) with [gate; up] = c_fc(x), so
    c_fc.weight is [2F, D] (gate rows first): one GEMM for both input projections.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"mlp={kind!r}; allowed: {list(MLP_KINDS)}")
        self.kind = kind
        self.d_ff = d_ff
        self.c_fc = nn.Linear(d_model, (2 if kind == "swiglu" else 1) * d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x_TD)
        if self.kind == "swiglu":
            gate, up = h.split(self.d_ff, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.drop(self.c_proj(h))
