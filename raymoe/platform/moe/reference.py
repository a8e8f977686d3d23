"""Slow reference: dense one-hot masks, cumsum locations, [S, E, C] einsums, written from DeepSpeed 0.19.8's
``top1gating`` / ``top2gating`` / ``topkgating`` formulas and, for the modern routers, from their definitions.

For tests (fast path == reference) and the benchmark's baseline only; never on a hot path. The random draws are
the layer's (:class:`RouterNoise`): DeepSpeed's uniform RTS priorities are replaced by the priorities the
draw's permutation implies (the permutation is the order of such priorities).

Shape legend: T tokens, S tokens the gate sees, D model dim, F ffn dim, E experts, K top-k, C capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .router import RouterNoise, compute_capacity, noise_needs


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


def _priority(S: int, order: Tensor | None, device) -> Tensor:
    """Values whose descending order is ``order`` (RTS) or token position (none): positive, distinct."""
    rank = torch.arange(S, device=device, dtype=torch.float32)
    if order is not None:
        rank = torch.empty_like(rank).index_copy_(0, order, rank)
    return (S - rank) / max(S, 1)


def _keep_top(mask_SE: Tensor, value_SE: Tensor, capacity: int) -> Tensor:
    """DeepSpeed's capacity selection: per expert, the ``capacity`` highest values among its tokens."""
    S = mask_SE.shape[0]
    top = torch.topk(mask_SE * value_SE, k=min(capacity, S), dim=0).indices
    return mask_SE * torch.zeros_like(mask_SE).scatter_(0, top, 1.0)


def _top1(logits, gates, moe, noise, need, capacity_of, used):
    S, E = gates.shape
    bias = moe.gate.bias()
    score = logits + noise.gumbel1_SE if need["gumbel1"] else gates
    idx1 = torch.argmax(score if bias is None else score + bias, dim=1)
    mask1 = _one_hot(idx1, E)
    if used is not None:
        mask1 = mask1 * used.float().unsqueeze(1)
    exp_counts = mask1.sum(0)
    capacity = capacity_of(1, exp_counts)
    l_aux = torch.sum(gates.mean(0) * mask1.mean(0)) * E
    if moe.drop_tokens:
        prio = _priority(S, noise.rts_order_KS[0] if need["rts"] else None, logits.device)
        mask1 = _keep_top(mask1, prio.unsqueeze(1), capacity)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    return l_aux, exp_counts, capacity, [idx1], [mask1], [gates * mask1], [loc1]


def _top2(logits, gates, moe, noise, need, capacity_of):
    E = gates.shape[1]
    bias = moe.gate.bias()
    b = 0.0 if bias is None else bias
    idx1 = torch.argmax(gates + b, dim=1)
    mask1 = _one_hot(idx1, E)
    logits2 = logits + noise.gumbel2_SE if need["gumbel2"] else logits
    idx2 = torch.argmax((logits2 + b).masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = _one_hot(idx2, E)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(0) * mask1.mean(0)) * E * E
    exp_counts = (mask1 + mask2).sum(0)
    capacity = capacity_of(2, exp_counts)
    if moe.drop_tokens:
        mask1, mask2 = mask1 * (loc1 < capacity), mask2 * (loc2 < capacity)
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
    w = [mask1 * (g1 / denom).unsqueeze(1), mask2 * (g2 / denom).unsqueeze(1)]
    return l_aux, exp_counts, capacity, [idx1, idx2], [mask1, mask2], w, [loc1, loc2]


def _topk(logits, gates, moe, capacity_of):
    S, E = gates.shape
    k = moe.k
    bias = moe.gate.bias()
    top_idx = torch.topk(gates if bias is None else gates + bias, k=k, dim=1).indices
    top_gate = gates.gather(1, top_idx)
    mask = torch.zeros_like(gates).scatter_(1, top_idx, 1.0)
    exp_counts = mask.sum(0)
    l_aux = torch.mean(gates.mean(0) * mask.mean(0)) * E * E / k
    capacity = capacity_of(k, exp_counts)
    if moe.drop_tokens and moe.drop_policy == "probs":
        mask = _keep_top(mask, torch.zeros_like(gates).scatter(1, top_idx, top_gate), capacity)
    elif moe.drop_tokens:
        mask = mask * (torch.cumsum(mask, dim=0) - 1 < capacity)
    loc = torch.cumsum(mask, dim=0) - 1
    gm = gates * mask
    gm = gm / torch.clamp(gm.sum(-1, keepdim=True), min=torch.finfo(gm.dtype).eps)
    masks = [_one_hot(top_idx[:, c], E) * mask for c in range(k)]
    return l_aux, exp_counts, capacity, list(top_idx.t()), masks, [gm * m for m in masks], [loc] * k


def _modern(logits, moe, capacity_of, out_dtype):
    """softmax_topk / sigmoid_group from their definitions (group selection by ranking, not topk)."""
    S, E = logits.shape
    k, a = moe.k, moe.args
    bias = moe.gate.bias()
    if moe.router == "softmax_topk":
        probs = torch.softmax(logits.float(), dim=-1)
        idx = torch.topk(probs if bias is None else probs + bias, k, dim=-1).indices
        w = probs.gather(1, idx)
        w = (w / w.sum(-1, keepdim=True) if a.norm_topk_prob else w).to(out_dtype)
    else:
        scores = torch.sigmoid(logits.float())
        choice = scores + bias
        per = E // a.n_group
        g = choice.view(S, a.n_group, per).sort(dim=-1, descending=True).values[..., :2].sum(-1)
        rank = (g.unsqueeze(2) < g.unsqueeze(1)).sum(-1)  # groups with a larger score
        allowed = (rank < a.topk_group).repeat_interleave(per, dim=1)
        idx = torch.topk(choice.masked_fill(~allowed, float("-inf")), k, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if a.norm_topk_prob else w
        probs = scores / scores.sum(-1, keepdim=True)
    w = w * a.routed_scaling_factor
    masks = [_one_hot(idx[:, c], E) for c in range(k)]
    exp_counts = sum(masks).sum(0)
    l_aux = (exp_counts / max(S, 1) * probs.mean(0)).sum() * E if S else probs.sum() * 0.0
    capacity = capacity_of(k, exp_counts)
    prior, locs, kept = torch.zeros(E, device=logits.device), [], []
    for m in masks:  # choice rank, then position
        loc = torch.cumsum(m, dim=0) - 1 + prior
        prior = prior + m.sum(0)
        kept.append(m * (loc < capacity) if moe.drop_tokens else m)
        locs.append(loc)
    return l_aux, exp_counts, capacity, list(idx.t()), kept, [m * w[:, c:c + 1] for c, m in enumerate(kept)], locs


def reference_gating(logits: Tensor, moe, noise: RouterNoise, training: bool, used: Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32):
    """Returns (l_aux, combine_SEC, dispatch_SEC, exp_counts, kept_SK, capacity)."""
    S, E = logits.shape
    cf = moe.capacity_factor if training else moe.eval_capacity_factor

    def capacity_of(k, exp_counts):
        if moe.drop_tokens:
            return compute_capacity(S, E, k, cf, moe.min_capacity)
        return moe.dispatcher.group_capacity(exp_counts.long()) if S else 0

    need = noise_needs(moe.k, moe.noisy_gate_policy, moe.use_rts, moe.top2_2nd_expert_sampling, moe.drop_tokens,
                       training, moe.deterministic, moe.router)
    gates = F.softmax(logits.float(), dim=1)
    if moe.router != "deepspeed":
        out = _modern(logits, moe, capacity_of, out_dtype)
    elif moe.k == 1:
        out = _top1(logits, gates, moe, noise, need, capacity_of, used)
    elif moe.k == 2:
        out = _top2(logits, gates, moe, noise, need, capacity_of)
    else:
        out = _topk(logits, gates, moe, capacity_of)
    l_aux, exp_counts, capacity, idx, kept, weights, locs = out
    # A token picks an expert at most once, so the per-choice masks are disjoint: merge them, then one
    # one-hot of the locations (DeepSpeed topkgating's one_hot(locations * mask)) and combine = gates x it.
    mask_SE = sum(kept)
    w_SE = sum(w.float() * m for w, m in zip(weights, kept))
    loc_SE = sum(loc * m for loc, m in zip(locs, kept)).to(torch.int64)
    dispatch = torch.zeros(S, E, max(capacity, 1), device=logits.device).scatter_(
        2, loc_SE.unsqueeze(2), mask_SE.unsqueeze(2).float())
    combine = torch.einsum("se,sec->sec", w_SE, dispatch)
    kept_SK = torch.stack([m.gather(1, i.unsqueeze(1)).squeeze(1) > 0 for m, i in zip(kept, idx)], dim=1)
    return l_aux, combine, dispatch, exp_counts.to(torch.int64), kept_SK, capacity


def reference_forward(moe, x: Tensor, token_mask: Tensor | None = None, noise: RouterNoise | None = None,
                      used_token: Tensor | None = None) -> ReferenceOutput:
    """Same contract as ``moe(x, token_mask, used_token=used_token, noise=noise)``, computed the dense way."""
    D = moe.hidden_size
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    routed_S = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(1)
    x_SD = x_TD if routed_S is None else x_TD[routed_S]
    used = None
    if used_token is not None and moe.router == "deepspeed" and moe.k == 1:
        used = used_token.reshape(-1) != 0
    S = x_SD.shape[0]
    training = moe.training
    if noise is None:
        noise = moe.draw_noise(S, device=x.device)
    if moe.router == "softmax_topk":
        logits = x_SD @ moe.gate.wg.weight.to(x_SD.dtype).t()
    else:
        x_fp32 = x_SD.float()
        if moe.router == "deepspeed" and training and moe.noisy_gate_policy == "Jitter":
            x_fp32 = x_fp32 * noise.jitter_SD
        logits = x_fp32 @ moe.gate.wg.weight.float().t()
    l_aux, combine, dispatch, exp_counts, kept_SK, capacity = reference_gating(logits, moe, noise, training, used,
                                                                               x_SD.dtype)
    w1, w2 = moe.experts.w1, moe.experts.w2
    dispatched_ECD = torch.einsum("sec,sd->ecd", dispatch.to(x.dtype), x_SD)
    h_ECF = moe.experts.act(torch.bmm(dispatched_ECD, w1))
    out_ECD = torch.bmm(h_ECF, w2)
    y_SD = torch.einsum("sec,ecd->sd", combine.to(x.dtype), out_ECD)
    y_TD = y_SD if routed_S is None else x_TD.new_zeros(T, D).index_put((routed_S,), y_SD)
    if moe.use_residual:
        coef = F.softmax(moe.coefficient(x_TD), dim=-1)
        y_TD = y_TD * coef[:, 0:1] + moe.mlp(x_TD) * coef[:, 1:2]
    elif moe.shared_expert_ffn:
        shared = moe.mlp(x_TD)
        y_TD = y_TD + (shared if moe.shared_gate is None else torch.sigmoid(moe.shared_gate(x_TD)) * shared)
    zl = (moe.z_loss_coef * torch.logsumexp(logits.float(), dim=1).square().mean() if moe.z_loss_coef and S
          else logits.float().sum() * 0.0)
    return ReferenceOutput(y_TD.view(x.shape), l_aux, exp_counts, kept_SK, capacity, zl)
