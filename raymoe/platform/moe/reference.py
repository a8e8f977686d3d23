"""Slow GShard/DeepSpeed-style reference: dense one-hot masks, cumsum locations, [S, E, C] einsums.

For tests (fast path == reference) and the benchmark's baseline only; never on a hot path.

Shape legend: T tokens, S routed tokens, D model dim, F ffn dim, E experts, K top-k, C capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .router import RouterNoise, compute_capacity


@dataclass
class ReferenceOutput:
    y: Tensor
    l_aux: Tensor
    exp_counts: Tensor
    kept_mask: Tensor  # bool [S, K]
    capacity: int
    z_loss: Tensor


def _one_hot(idx_S: Tensor, n: int) -> Tensor:
    return F.one_hot(idx_S, num_classes=n).to(torch.float32)


def _choice_masks(logits: Tensor, gates: Tensor, moe, noise: RouterNoise, training: bool) -> list[Tensor]:
    """One-hot [S, E] mask per choice rank, DeepSpeed top1/top2/topk gating selection."""
    E, k = moe.num_experts, moe.k
    bias = moe.gate.expert_bias if moe.gate.use_expert_bias else torch.zeros(E, device=logits.device)
    rsample = training and moe.noisy_gate_policy == "RSample"
    if k == 1:
        score = logits + noise.gumbel1_SE if rsample else gates
        return [_one_hot(torch.argmax(score + bias, dim=1), E)]
    if k == 2:
        score1 = logits + noise.gumbel1_SE if rsample else gates
        mask1 = _one_hot(torch.argmax(score1 + bias, dim=1), E)
        logits2 = logits + noise.gumbel2_SE if training and moe.top2_2nd_expert_sampling else logits
        logits_except1 = (logits2 + bias).masked_fill(mask1.bool(), float("-inf"))
        return [mask1, _one_hot(torch.argmax(logits_except1, dim=1), E)]
    score = logits + noise.gumbel1_SE if rsample else logits
    top = torch.topk(score + bias, k=k, dim=1).indices
    return [_one_hot(top[:, c], E) for c in range(k)]


def reference_gating(logits: Tensor, moe, noise: RouterNoise, training: bool):
    """Returns (l_aux, combine_SEC, dispatch_SEC, exp_counts, kept_SK, capacity)."""
    S, E = logits.shape
    k = moe.k
    gates = F.softmax(logits, dim=1)
    masks = _choice_masks(logits, gates, moe, noise, training)
    exp_counts = sum(m.sum(dim=0) for m in masks).to(torch.int64)
    me = torch.mean(gates, dim=0)
    if S == 0:
        l_aux = gates.sum() * 0.0
    elif k == 1:
        l_aux = torch.sum(me * masks[0].mean(dim=0)) * E
    elif k == 2:
        l_aux = torch.mean(me * masks[0].mean(dim=0)) * E * E
    else:
        l_aux = torch.mean(me * sum(masks).mean(dim=0)) * E * E / k
    if moe.drop_tokens:
        cf = moe.capacity_factor if training else moe.eval_capacity_factor
        capacity = compute_capacity(S, E, k, cf, moe.min_capacity)
    else:
        capacity = moe.dispatcher.group_capacity(exp_counts) if S else 0
    use_rts = training and moe.use_rts and moe.drop_tokens
    prior_E = torch.zeros(E, device=logits.device)
    kept, locs = [], []
    for c, mask in enumerate(masks):
        if use_rts:
            perm = noise.rts_order_KS[c]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(S, device=perm.device)
            loc = (torch.cumsum(mask[perm], dim=0) - 1)[inv]
        else:
            loc = torch.cumsum(mask, dim=0) - 1
        loc = loc + prior_E  # choice-major: every earlier choice (before dropping) goes first
        prior_E = prior_E + mask.sum(dim=0)
        keep = mask * torch.lt(loc, capacity)
        kept.append(keep)
        locs.append(torch.sum(loc * keep, dim=1).to(torch.int64))
    g = [torch.einsum("se,se->s", gates, m) for m in kept]
    if k >= 2:
        denom = torch.clamp(sum(g), min=torch.finfo(gates.dtype).eps)
        g = [gc / denom for gc in g]
    C = max(capacity, 1)
    combine = sum(torch.einsum("s,se,sc->sec", gc, m, _one_hot(lc, C)) for gc, m, lc in zip(g, kept, locs))
    dispatch = sum(torch.einsum("se,sc->sec", m, _one_hot(lc, C)) for m, lc in zip(kept, locs))
    kept_SK = torch.stack([m.sum(dim=1) > 0 for m in kept], dim=1)
    return l_aux, combine, dispatch, exp_counts, kept_SK, capacity


def reference_forward(moe, x: Tensor, token_mask: Tensor | None = None,
                      noise: RouterNoise | None = None) -> ReferenceOutput:
    """Same contract as ``moe(x, token_mask, noise=noise)``, computed the dense DeepSpeed way."""
    D = moe.hidden_size
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    routed_S = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(1)
    x_SD = x_TD if routed_S is None else x_TD[routed_S]
    S = x_SD.shape[0]
    training = moe.training
    if noise is None:
        noise = moe.draw_noise(S, device=x.device)
    x_fp32 = x_SD.float()
    if training and moe.noisy_gate_policy == "Jitter":
        x_fp32 = x_fp32 * noise.jitter_SD
    logits = x_fp32 @ moe.gate.wg.weight.float().t()
    l_aux, combine, dispatch, exp_counts, kept_SK, capacity = reference_gating(logits, moe, noise, training)
    w1, w2 = moe.experts.w1, moe.experts.w2
    dispatched_ECD = torch.einsum("sec,sd->ecd", dispatch.to(x.dtype), x_SD)
    h_ECF = moe.experts.act(torch.bmm(dispatched_ECD, w1))
    out_ECD = torch.bmm(h_ECF, w2)
    y_SD = torch.einsum("sec,ecd->sd", combine.to(x.dtype), out_ECD)
    y_TD = y_SD if routed_S is None else x_TD.new_zeros(T, D).index_put((routed_S,), y_SD)
    if moe.use_residual:
        coef = F.softmax(moe.coefficient(x_TD), dim=-1)
        y_TD = y_TD * coef[:, 0:1] + moe.mlp(x_TD) * coef[:, 1:2]
    zl = (moe.z_loss_coef * torch.logsumexp(logits, dim=1).square().mean() if moe.z_loss_coef and S
          else logits.sum() * 0.0)
    return ReferenceOutput(y_TD.view(x.shape), l_aux, exp_counts, kept_SK, capacity, zl)
