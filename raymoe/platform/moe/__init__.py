"""Mixture-of-Experts layer with DeepSpeed-MoE semantics: gate, index-based dispatch, grouped experts.

``from raymoe.platform.moe import MoE``; see DESIGN.md ("The MoE layer contract").
"""

from .dispatch import DispatchPlan, LocalDispatcher, TokenDispatcher, plan_dispatch
from .experts import GroupedExperts, grouped_mm, iter_expert_params
from .layer import MoE, RouterStats, gate_weights
from .router import RouterNoise, TopKRouter, compute_capacity, draw_router_noise

__all__ = [
    "MoE", "RouterStats", "GroupedExperts", "LocalDispatcher", "TokenDispatcher", "DispatchPlan", "RouterNoise",
    "TopKRouter", "compute_capacity", "draw_router_noise", "gate_weights", "grouped_mm", "iter_expert_params",
    "plan_dispatch",
]
