"""Top-k gating with DeepSpeed-MoE semantics (fast path).

Shape legend: S routed tokens, D model dim, E experts (global), K top-k.

The gate always runs in fp32 (DeepSpeed keeps ``wg`` in fp32 and feeds it ``input.float()``), even under
autocast. All random draws of one forward (jitter, gumbel noise, RTS priorities) come from
:func:`draw_router_noise` so the fast path and the dense reference can be fed the very same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

JITTER_EPS = 1e-2


@dataclass
class RouterNoise:
    """Random draws of one routing call; a field is None when the options in force do not need it.

    jitter_SD: multiplicative jitter U(1-eps, 1+eps) on the gate input (policy 'Jitter', training).
    gumbel1_SE: gumbel noise for the first choice (k=1, 2) or for all choices (k>2) (policy 'RSample', training).
    gumbel2_SE: gumbel noise for the second choice of top-2 (top2_2nd_expert_sampling, training).
    rts_order_KS: Random Token Selection order (use_rts, training, dropping): row c is a random permutation
        of the S routed tokens; inside choice rank c, tokens earlier in it win the capacity slots. A random
        permutation is the order of DeepSpeed's uniform priorities, without sorting them.
    """

    jitter_SD: Tensor | None = None
    gumbel1_SE: Tensor | None = None
    gumbel2_SE: Tensor | None = None
    rts_order_KS: Tensor | None = None


def _gumbel(shape, device, generator) -> Tensor:
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def noise_needs(k: int, noisy_gate_policy, use_rts: bool, top2_2nd_expert_sampling: bool,
                drop_tokens: bool, training: bool) -> dict[str, bool]:
    """Which draws a routing call with these options consumes (shared by both paths)."""
    return {
        "jitter": training and noisy_gate_policy == "Jitter",
        "gumbel1": training and noisy_gate_policy == "RSample",
        "gumbel2": training and k == 2 and top2_2nd_expert_sampling,
        "rts": training and use_rts and drop_tokens,
    }


def draw_router_noise(num_tokens: int, num_experts: int, hidden_size: int, *, k: int,
                      noisy_gate_policy=None, use_rts: bool = True, top2_2nd_expert_sampling: bool = True,
                      drop_tokens: bool = True, training: bool = True, device=None,
                      generator: torch.Generator | None = None) -> RouterNoise:
    """Draw every random tensor one routing call needs (torch's global RNG unless ``generator``)."""
    need = noise_needs(k, noisy_gate_policy, use_rts, top2_2nd_expert_sampling, drop_tokens, training)
    S, E = num_tokens, num_experts
    noise = RouterNoise()
    if need["jitter"]:
        u = torch.rand((S, hidden_size), device=device, generator=generator, dtype=torch.float32)
        noise.jitter_SD = u * (2 * JITTER_EPS) + (1.0 - JITTER_EPS)
    if need["gumbel1"]:
        noise.gumbel1_SE = _gumbel((S, E), device, generator)
    if need["gumbel2"]:
        noise.gumbel2_SE = _gumbel((S, E), device, generator)
    if need["rts"]:
        if torch.device(device or "cpu").type == "cpu":  # Fisher-Yates: O(S) per row
            noise.rts_order_KS = torch.stack([torch.randperm(S, generator=generator, device=device)
                                              for _ in range(k)])
        else:  # one batched sort instead of k randperm launches (each a multi-kernel sort on a GPU)
            u = torch.rand((k, S), device=device, generator=generator, dtype=torch.float32)
            noise.rts_order_KS = u.argsort(dim=1)
    return noise


def _require(t: Tensor | None, name: str) -> Tensor:
    if t is None:
        raise ValueError(f"router noise field {name!r} is required by the options in force but is None")
    return t


def compute_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float,
                     min_capacity: int) -> int:
    """capacity = max(ceil(k * S / E * cf), min_capacity) (DeepSpeed ``_capacity``).

    A 1e-9 relative slack keeps binary rounding (e.g. cf=1.1) from adding a spurious slot.
    """
    raw = k * num_tokens * float(capacity_factor) / num_experts
    return max(int(math.ceil(raw - 1e-9 * max(1.0, raw))), int(min_capacity))


def select_experts(logits_SE: Tensor, probs_SE: Tensor, k: int, noise: RouterNoise, *, training: bool,
                   noisy_gate_policy=None, top2_2nd_expert_sampling: bool = True,
                   bias_E: Tensor | None = None) -> Tensor:
    """Expert ids [S, K], column c = c-th choice. Noise and bias only steer selection."""
    rsample = training and noisy_gate_policy == "RSample"

    def biased(score):
        return score if bias_E is None else score + bias_E

    if k == 1:
        score = logits_SE + _require(noise.gumbel1_SE, "gumbel1_SE") if rsample else probs_SE
        return biased(score).argmax(dim=1, keepdim=True)
    if k == 2:
        s1 = logits_SE + _require(noise.gumbel1_SE, "gumbel1_SE") if rsample else probs_SE
        i1 = biased(s1).argmax(dim=1, keepdim=True)
        second = training and top2_2nd_expert_sampling
        s2 = logits_SE + _require(noise.gumbel2_SE, "gumbel2_SE") if second else logits_SE
        s2 = biased(s2).scatter(1, i1, float("-inf"))
        i2 = s2.argmax(dim=1, keepdim=True)
        return torch.cat([i1, i2], dim=1)
    score = logits_SE + _require(noise.gumbel1_SE, "gumbel1_SE") if rsample else logits_SE
    return biased(score).topk(k, dim=1).indices


def load_balancing_loss(probs_SE: Tensor, idx_SK: Tensor, counts_E: Tensor, k: int) -> Tensor:
    """DeepSpeed's aux loss (k=1: top1gating, k=2: top2gating, k>2: topkgating), from pre-drop choices."""
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0.0
    me_E = probs_SE.mean(dim=0)
    if k <= 2:
        # top-1 and top-2 both use the first choice only.
        ce_E = torch.bincount(idx_SK[:, 0], minlength=E).to(probs_SE.dtype) / S
        if k == 1:
            return (me_E * ce_E).sum() * E
        return (me_E * ce_E).mean() * E * E
    ce_E = counts_E.to(probs_SE.dtype) / S
    return (me_E * ce_E).mean() * E * E / k


class TopKRouter(nn.Module):
    """The gate ``wg`` (fp32, no bias) plus the optional aux-loss-free selection bias."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, *, expert_bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()
        self.use_expert_bias = expert_bias
        # Non-trainable: moved by update_expert_bias, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32),
                             persistent=expert_bias)

    def logits(self, x_SD: Tensor, noise: RouterNoise, *, training: bool, noisy_gate_policy) -> Tensor:
        """fp32 logits [S, E]; jitter is applied to the gate's input only."""
        with torch.autocast(device_type=x_SD.device.type, enabled=False):
            x_fp32 = x_SD.float()
            if training and noisy_gate_policy == "Jitter":
                x_fp32 = x_fp32 * _require(noise.jitter_SD, "jitter_SD")
            return F.linear(x_fp32, self.wg.weight.float())

    def bias(self) -> Tensor | None:
        return self.expert_bias if self.use_expert_bias else None


def z_loss(logits_SE: Tensor, coef: float) -> Tensor:
    """ST-MoE router z-loss: coef * mean(logsumexp(logits)^2)."""
    if coef == 0.0 or logits_SE.shape[0] == 0:
        return logits_SE.sum() * 0.0
    return coef * torch.logsumexp(logits_SE, dim=1).square().mean()
