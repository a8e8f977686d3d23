"""Mixture-of-Experts layer: DeepSpeed-MoE's gating and the modern routers, index-based dispatch, grouped experts.

``from raymoe.platform.moe import MoE``; see DESIGN.md ("The MoE layer contract") and docs/routing.md.
"""

from .dispatch import DispatchPlan, LocalDispatcher, TokenDispatcher, plan_dispatch
from .experts import GroupedExperts, grouped_mm, iter_expert_params
from .layer import ExpertMLP, MoE, RouterStats
from .router import RouterNoise, Routing, TopKRouter, compute_capacity, draw_router_noise, gate_weights
from .routers import MODERN_ROUTERS, sigmoid_group_topk, softmax_topk

__all__ = [
    "MoE", "RouterStats", "ExpertMLP", "GroupedExperts", "LocalDispatcher", "TokenDispatcher", "DispatchPlan",
    "RouterNoise", "Routing", "TopKRouter", "compute_capacity", "draw_router_noise", "gate_weights", "grouped_mm",
    "iter_expert_params", "plan_dispatch", "MODERN_ROUTERS", "softmax_topk", "sigmoid_group_topk",
]
