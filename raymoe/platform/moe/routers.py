"""The modern routers beside DeepSpeed's gating (which stays in :mod:`raymoe.platform.moe.router`).

- ``softmax_topk`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): probs = softmax(logits over all E) in fp32;
  top-k of the probs; weights = the top-k probs, renormalised to sum 1 with ``norm_topk_prob`` (Mixtral's
  softmax over the top-k logits is the same numbers: HF Mixtral is norm_topk_prob=True), cast to the hidden
  dtype (as transformers' Qwen/OLMoE routers), times ``routed_scaling_factor``. The logits are computed in the
  hidden dtype, as transformers does.
- ``sigmoid_group`` (DeepSeek-V3): scores = sigmoid(fp32 logits); selection on scores + the score-correction
  bias (``gate.expert_bias``); with n_group > 1 a group's score is the sum of its two best biased scores, the
  topk_group best groups stay and the others are masked; top-k; weights = the unbiased scores of the chosen
  experts, renormalised with ``norm_topk_prob`` (denominator sum + 1e-20, as transformers), times
  ``routed_scaling_factor`` (kept in fp32, as transformers).

Both are dropless unless ``drop_tokens`` is set; then an expert over capacity keeps its token-choices by
choice rank, then token position (:func:`plan_dispatch`'s default) and a dropped choice's weight is 0 (the
token's other weights are not renormalised). No noise. l_aux is the Switch / Mixtral form (transformers'
``load_balancing_loss_func`` for one layer): E * sum_e(count_e / S * mean_s p_e), count_e over all k choices
before dropping, p = the softmax probs; for sigmoid_group p = the sigmoid scores normalised to sum 1 per token
(DeepSeek-V3's normalised affinities; DeepSeek-V3 itself trains with the bias instead, ``expert_bias``).

Shape legend: S tokens, E experts, K top-k, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import plan_dispatch
from .router import Routing

MODERN_ROUTERS = ("softmax_topk", "sigmoid_group")


def softmax_topk(logits_SE: Tensor, k: int, *, norm_topk_prob: bool, routed_scaling_factor: float = 1.0,
                 bias_E: Tensor | None = None, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> (expert ids [S, K], weights [S, K], probs [S, E] fp32). ``bias_E`` (aux-loss-free balancing) only
    steers the selection."""
    probs_SE = F.softmax(logits_SE, dim=-1, dtype=torch.float32)
    if bias_E is None:
        w_SK, idx_SK = torch.topk(probs_SE, k, dim=-1)
    else:
        idx_SK = torch.topk(probs_SE + bias_E, k, dim=-1).indices
        w_SK = probs_SE.gather(1, idx_SK)
    if norm_topk_prob:
        w_SK = w_SK / w_SK.sum(dim=-1, keepdim=True)
    w_SK = w_SK.to(out_dtype or logits_SE.dtype)
    if routed_scaling_factor != 1.0:
        w_SK = w_SK * routed_scaling_factor
    return idx_SK, w_SK, probs_SE


def sigmoid_group_topk(logits_SE: Tensor, k: int, *, bias_E: Tensor, n_group: int, topk_group: int,
                       norm_topk_prob: bool, routed_scaling_factor: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """-> (expert ids [S, K], weights [S, K] fp32, sigmoid scores [S, E] fp32)."""
    scores_SE = logits_SE.float().sigmoid()
    choice_SE = scores_SE + bias_E
    S, E = choice_SE.shape
    if n_group > 1:
        per = E // n_group
        group_SG = choice_SE.view(S, n_group, per).topk(min(2, per), dim=-1).values.sum(dim=-1)
        keep_SG = torch.zeros(S, n_group, dtype=torch.bool, device=choice_SE.device)
        keep_SG.scatter_(1, group_SG.topk(topk_group, dim=-1).indices, True)
        choice_SE = choice_SE.masked_fill(~keep_SG.repeat_interleave(per, dim=1), float("-inf"))
    idx_SK = choice_SE.topk(k, dim=-1).indices
    w_SK = scores_SE.gather(1, idx_SK)
    if norm_topk_prob:
        w_SK = w_SK / (w_SK.sum(dim=-1, keepdim=True) + 1e-20)
    return idx_SK, w_SK * routed_scaling_factor, scores_SE


def switch_aux_loss(probs_SE: Tensor, counts_E: Tensor) -> Tensor:
    """E * sum_e(count_e / S * mean_s probs[s, e]) (Switch Transformer; transformers' load_balancing_loss_func)."""
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0.0
    return (counts_E.to(probs_SE.dtype) / S * probs_SE.mean(dim=0)).sum() * E


def modern_routing(router: str, logits_SE: Tensor, *, k: int, capacity: int | None, norm_topk_prob: bool,
                   routed_scaling_factor: float, n_group: int, topk_group: int, bias_E: Tensor | None,
                   out_dtype: torch.dtype) -> Routing:
    """Route with ``softmax_topk`` or ``sigmoid_group`` -> :class:`Routing` (capacity None: dropless)."""
    E = logits_SE.shape[1]
    if router == "softmax_topk":
        idx_SK, w_SK, probs_SE = softmax_topk(logits_SE, k, norm_topk_prob=norm_topk_prob,
                                              routed_scaling_factor=routed_scaling_factor, bias_E=bias_E,
                                              out_dtype=out_dtype)
    elif router == "sigmoid_group":
        idx_SK, w_SK, scores_SE = sigmoid_group_topk(logits_SE, k, bias_E=bias_E, n_group=n_group,
                                                     topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                                                     routed_scaling_factor=routed_scaling_factor)
        probs_SE = scores_SE / scores_SE.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"router={router!r}; allowed: ['deepspeed', {', '.join(map(repr, MODERN_ROUTERS))}]")
    plan = plan_dispatch(idx_SK, E, capacity)
    weights_KS = w_SK.t() if capacity is None else w_SK.t() * plan.kept_KS
    return Routing(logits_SE, plan, weights_KS, switch_aux_loss(probs_SE, plan.counts_E), capacity)
