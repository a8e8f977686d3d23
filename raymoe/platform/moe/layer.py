"""The MoE layer (DeepSpeed-MoE argument names and semantics, index-based dispatch).

The layer routes, then hands the rows to its :class:`~raymoe.platform.moe.dispatch.TokenDispatcher`, which
decides the expert layout, moves the rows (locally or expert-parallel) and knows the dropless capacity.

Shape legend: T tokens (all leading dims flattened), S routed tokens (token_mask), D model dim, F ffn dim,
E experts (global), K top-k, N = K*S token-choices, M kept token-choices, C capacity, R rows a dispatch
delivers to this rank's experts, Q expert-parallel ranks the slots came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymoe.config import MoEArgs, check_top_k, require_ep_divides

from .dispatch import LocalDispatcher, TokenDispatcher, plan_dispatch, slots
from .experts import ACTIVATIONS, GroupedExperts
from .router import (RouterNoise, TopKRouter, compute_capacity, draw_router_noise,
                     load_balancing_loss, noise_needs, select_experts, z_loss)


@dataclass
class RouterStats:
    """Per-forward routing statistics (``moe.last_stats``).

    z_loss: z_loss_coef * mean(logsumexp(logits)^2), with grad (0 when the coefficient is 0); add to the loss.
    exp_counts: LongTensor [E], token-choices per expert before capacity dropping.
    kept_counts: LongTensor [E], token-choices per expert after dropping.
    capacity: slots per expert (dropless: the max count, all-reduced over the expert-parallel group).
    dropped_fraction: detached float tensor, dropped token-choices / routed token-choices.
    l_aux: the load-balancing loss returned by forward.
    kept_mask: bool [S, K], whether the c-th choice of routed token s was kept (S = routed tokens, in order).
    layout: how the experts ran: "slots" (a padded [E, C] slot buffer, batched GEMMs) or "segments"
        (exactly each expert's rows, grouped GEMM).
    """

    z_loss: Tensor
    exp_counts: Tensor
    kept_counts: Tensor
    capacity: int
    dropped_fraction: Tensor
    l_aux: Tensor | None = None
    kept_mask: Tensor | None = None
    layout: str = ""


def gate_weights(probs_SE: Tensor, idx_SK: Tensor, kept_KS: Tensor) -> Tensor:
    """Combine weights [K, S]: k=1 the raw prob (0 if dropped); k>=2 renormalized over kept choices."""
    g_KS = probs_SE.gather(1, idx_SK).t() * kept_KS
    if idx_SK.shape[1] > 1:
        eps = torch.finfo(g_KS.dtype).eps
        g_KS = g_KS / g_KS.sum(dim=0, keepdim=True).clamp(min=eps)
    return g_KS


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer; ``forward(x, token_mask=None) -> (y, l_aux, exp_counts)``.

    Arguments follow DeepSpeed's ``deepspeed.moe.layer.MoE``; ``expert`` is the ffn size (None: 4*hidden).
    ``dispatcher`` (a :class:`~raymoe.platform.moe.dispatch.TokenDispatcher`; None: the local one) moves
    the rows to the experts. ``capacity_layout_min_fill`` is the share of the E*C slots the kept rows must
    fill for the fixed [E, C, D] slot layout (the dispatcher's ``plan_layout``): 0 always the slots, > 1
    never (variable segments), None the dispatcher's default; results are the same either way
    (``last_stats.layout`` says which ran).
    """

    def __init__(self, hidden_size: int, expert: int | None = None, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: str | None = None,
                 drop_tokens: bool | None = None, use_rts: bool = True, top2_2nd_expert_sampling: bool = True,
                 z_loss_coef: float = 0.0, expert_bias: bool = False, expert_bias_update_rate: float = 1e-3,
                 activation: str = "gelu", dispatcher=None, layer_id: int = 0,
                 global_expert_ids: list[int] | None = None, init_std: float = 0.02,
                 capacity_layout_min_fill: float | None = None, router: str = "deepspeed",
                 norm_topk_prob: bool = False, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, shared_expert_ffn: int = 0, shared_expert_gate: bool = False,
                 drop_policy: str = "probs", *, args: MoEArgs | None = None):
        if args is None:  # DeepSpeed-style keywords: the routing options become the one MoEArgs (validated there)
            given = locals()
            # drop_tokens None: the router's default (DeepSpeed's gating drops, the modern routers do not)
            args = MoEArgs(**{name: given[name] for name in MoEArgs.model_fields
                              if name in given and not (name == "drop_tokens" and drop_tokens is None)})
        super().__init__()
        ffn = self._check_args(hidden_size, expert, num_experts, ep_size, args, activation, dispatcher)
        self.args = args
        self.hidden_size = hidden_size
        self.ffn_size = ffn
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = args.k
        self.capacity_factor = float(args.capacity_factor)
        self.eval_capacity_factor = float(args.eval_capacity_factor)
        self.min_capacity = int(args.min_capacity)
        self.use_residual = args.use_residual
        self.noisy_gate_policy = args.noisy_gate_policy
        self.drop_tokens = bool(args.drop_tokens)  # switched at run time by set_dropless
        self.use_rts = bool(args.use_rts)
        self.top2_2nd_expert_sampling = bool(args.top2_2nd_expert_sampling)
        self.z_loss_coef = float(args.z_loss_coef)
        self.expert_bias_update_rate = float(args.expert_bias_update_rate)
        self.layer_id = int(layer_id)
        self.capacity_layout_min_fill = None if capacity_layout_min_fill is None else float(capacity_layout_min_fill)
        self.dispatcher: TokenDispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        if global_expert_ids is None:
            global_expert_ids = self.dispatcher.local_expert_ids
            if global_expert_ids is None:
                if ep_size > 1:
                    raise ValueError("ep_size>1 needs global_expert_ids (or a dispatcher.local_expert_ids)")
                global_expert_ids = list(range(num_experts))
        self.gate = TopKRouter(hidden_size, num_experts, args.k, expert_bias=args.expert_bias)
        self.experts = GroupedExperts(self.num_local_experts, hidden_size, ffn, activation=activation,
                                      layer_id=layer_id, global_expert_ids=global_expert_ids, init_std=init_std)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        if args.use_residual:
            self.mlp = nn.Sequential(nn.Linear(hidden_size, ffn), _Act(activation), nn.Linear(ffn, hidden_size))
            self.coefficient = nn.Linear(hidden_size, 2)
        self.last_stats: RouterStats | None = None

    @staticmethod
    def _check_args(hidden_size, expert, num_experts, ep_size, args: MoEArgs, activation, dispatcher) -> int:
        """The checks that need the layer's shape; the routing options were validated by MoEArgs."""
        if expert is None:
            ffn = 4 * hidden_size
        elif isinstance(expert, int) and not isinstance(expert, bool) and expert > 0:
            ffn = expert
        else:
            raise TypeError(f"expert={expert!r}: expected None (ffn = 4*hidden_size) or a positive int ffn size")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: must be >= 1")
        require_ep_divides(ep_size, num_experts)
        if ep_size > 1 and dispatcher is None:
            raise ValueError(f"ep_size={ep_size} needs an expert-parallel dispatcher (dispatcher=...); "
                             "only ep_size=1 runs without one")
        check_top_k(args.k, [num_experts], where="k")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; allowed: {sorted(ACTIVATIONS)}")
        return ffn

    # -- run-time switches -------------------------------------------------------------------------------
    def set_dropless(self, dropless: bool) -> None:
        """Dropless routing (capacity = max count, nothing dropped) on or off; generation runs dropless."""
        self.drop_tokens = not dropless

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load) over the loads
        accumulated since the last call; then reset the accumulator. No-op without expert_bias."""
        load = self.expert_load.float()
        if self.gate.use_expert_bias and load.sum() > 0:
            self.gate.expert_bias += self.expert_bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    def draw_noise(self, num_tokens: int, device=None, generator: torch.Generator | None = None) -> RouterNoise:
        """The random draws a forward over ``num_tokens`` routed tokens needs in the current mode (on the
        layer's device unless ``device`` says otherwise)."""
        if device is None:
            device = self.gate.wg.weight.device
        return draw_router_noise(num_tokens, self.num_experts, self.hidden_size, k=self.k,
                                 noisy_gate_policy=self.noisy_gate_policy, use_rts=self.use_rts,
                                 top2_2nd_expert_sampling=self.top2_2nd_expert_sampling,
                                 drop_tokens=self.drop_tokens, training=self.training, device=device,
                                 generator=generator)

    def capacity_for(self, num_tokens: int) -> int:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return compute_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, token_mask: Tensor | None = None, *, noise: RouterNoise | None = None):
        """x [..., D] -> (y [..., D], l_aux, exp_counts [E]); ``noise`` overrides the random draws (tests)."""
        D = self.hidden_size
        if x.shape[-1] != D:
            raise ValueError(f"x.shape[-1]={x.shape[-1]} != hidden_size={D}")
        x_TD = x.reshape(-1, D)
        routed_S = None
        if token_mask is not None:
            if token_mask.shape != x.shape[:-1]:
                raise ValueError(f"token_mask.shape={tuple(token_mask.shape)} != x.shape[:-1]={tuple(x.shape[:-1])}")
            routed_S = token_mask.reshape(-1).nonzero().squeeze(1)
            x_SD = x_TD.index_select(0, routed_S)
        else:
            x_SD = x_TD
        S = x_SD.shape[0]
        if noise is None:
            noise = self.draw_noise(S, device=x.device)
        y_TD, l_aux, stats = self._moe(x_TD, x_SD, routed_S, noise)
        self.last_stats = stats
        if self.training:
            self.expert_load += stats.exp_counts
        if self.use_residual:
            coef = F.softmax(self.coefficient(x_TD), dim=-1)
            y_TD = y_TD * coef[:, 0:1] + self.mlp(x_TD) * coef[:, 1:2]
        return y_TD.view(x.shape), l_aux, stats.exp_counts

    def _moe(self, x_TD: Tensor, x_SD: Tensor, routed_S: Tensor | None, noise: RouterNoise):
        S, E, K = x_SD.shape[0], self.num_experts, self.k
        training = self.training
        logits_SE = self.gate.logits(x_SD, noise, training=training, noisy_gate_policy=self.noisy_gate_policy)
        probs_SE = F.softmax(logits_SE, dim=1)
        idx_SK = select_experts(logits_SE, probs_SE, K, noise, training=training,
                                noisy_gate_policy=self.noisy_gate_policy,
                                top2_2nd_expert_sampling=self.top2_2nd_expert_sampling, bias_E=self.gate.bias())
        use_rts = noise_needs(K, self.noisy_gate_policy, self.use_rts, self.top2_2nd_expert_sampling,
                              self.drop_tokens, training)["rts"]
        capacity = self.capacity_for(S) if self.drop_tokens else None
        if use_rts and noise.rts_order_KS is None:
            raise ValueError("router noise field 'rts_order_KS' is required by the options in force but is None")
        plan = plan_dispatch(idx_SK, E, capacity, noise.rts_order_KS if use_rts else None)
        l_aux = load_balancing_loss(probs_SE, idx_SK, plan.counts_E, K)
        g_KS = gate_weights(probs_SE, idx_SK, plan.kept_KS)
        g_M = g_KS.reshape(-1).index_select(0, plan.choice_M)
        tok_M = plan.token_M if routed_S is None else routed_S.index_select(0, plan.token_M)

        cf = self.capacity_factor if training else self.eval_capacity_factor
        slots_C = self.dispatcher.plan_layout(plan, capacity, capacity_factor=cf,
                                              min_fill=self.capacity_layout_min_fill, masked=routed_S is not None)
        if slots_C is not None:
            y_TD = self._experts_slots(x_TD, tok_M, slots(plan, slots_C), g_M, slots_C)
        else:
            y_TD = self._experts_segments(x_TD, tok_M, plan.kept_counts_E, g_M)
        if capacity is None:  # dropless: the largest count over the group (known after the dispatch)
            capacity = self.dispatcher.group_capacity(plan.counts_E)

        n_choices = max(S * K, 1)
        stats = RouterStats(
            z_loss=z_loss(logits_SE, self.z_loss_coef),
            exp_counts=plan.counts_E,
            kept_counts=plan.kept_counts_E,
            capacity=capacity,
            dropped_fraction=(1.0 - plan.kept_KS.sum().float() / n_choices).detach() if S else
            torch.zeros((), device=x_TD.device),
            l_aux=l_aux,
            kept_mask=plan.kept_KS.t(),
            layout="segments" if slots_C is None else "slots",
        )
        return y_TD, l_aux, stats

    def _experts_segments(self, x_TD: Tensor, tok_M: Tensor, counts_E: Tensor, g_M: Tensor) -> Tensor:
        """Variable segments: exactly each expert's kept rows (grouped GEMM) -> y_TD."""
        T, D = x_TD.shape
        fold = self.dispatcher.folds_gate
        x_RD, counts_R = self.dispatcher.dispatch(x_TD.index_select(0, tok_M), counts_E)
        y_MD = self.dispatcher.combine(self.experts(x_RD, counts_R, g_M if fold else None))
        if not fold:
            y_MD = y_MD * g_M.unsqueeze(1).to(y_MD.dtype)
        # In-place into a fresh buffer: the out-of-place index_add would clone the zeros first.
        return torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device).index_add_(0, tok_M, y_MD.to(x_TD.dtype))

    def _experts_slots(self, x_TD: Tensor, tok_M: Tensor, slot_M: Tensor, g_M: Tensor, C: int) -> Tensor:
        """Slot layout (DeepSpeed's [E, C, D] buffer, batched GEMMs) -> y_TD.

        Every slot has a source token (unused slots point at token 0) and a gate weight (0 for unused slots),
        so dispatch is one gather by the slot table and combine one scatter-add by the same table, and both
        backward passes are the mirror gather/scatter: no [M, D] intermediate, no zero-filled [E*C, D]
        gradient. An unused slot computes a finite row that is scaled by 0 before it is added (exactly 0).
        """
        T, D = x_TD.shape
        E = self.num_experts
        dtype = self.experts.w1.dtype
        if T == 0:
            # An expert-parallel rank without tokens still joins the exchanges, forward and backward: keep its
            # buffer in the autograd graph of x so its backward runs the dispatch's reverse all-to-all too.
            x_ECD = (x_TD.sum(0, keepdim=True) * 0).to(dtype).expand(E * C, D).contiguous()
            src_EC = g_EC = None
        else:
            src_EC = torch.zeros(E * C, dtype=torch.long, device=x_TD.device).index_copy_(0, slot_M, tok_M)
            g_EC = g_M.new_zeros(E * C).index_copy(0, slot_M, g_M)
            x_ECD = x_TD.index_select(0, src_EC).to(dtype)
        x_QECD = self.dispatcher.dispatch_capacity(x_ECD.view(E, C, D))
        scale_QEC = g_EC.view(1, E, C) if self.dispatcher.folds_gate and g_EC is not None else None
        y_ECD = self.dispatcher.combine_capacity(self.experts.forward_capacity(x_QECD, scale_QEC)).reshape(E * C, D)
        if src_EC is None:
            return x_TD.new_zeros(0, D) + 0 * y_ECD.sum().to(x_TD.dtype)
        if scale_QEC is None:
            y_ECD = y_ECD * g_EC.unsqueeze(1).to(y_ECD.dtype)
        return torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device).index_add_(0, src_EC, y_ECD.to(x_TD.dtype))


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)
