"""The MoE layer (DeepSpeed-MoE argument names and semantics, index-based dispatch).

The layer routes (DeepSpeed's gating, :mod:`.router`, or a modern router, :mod:`.routers`), then hands the rows
to its :class:`~raymoe.platform.moe.dispatch.TokenDispatcher`, which decides the expert layout, moves the rows
(locally or expert-parallel) and knows the dropless capacity. docs/routing.md compares every option with
DeepSpeed 0.19.8.

Shape legend: T tokens (all leading dims flattened), S tokens the gate sees (token_mask), D model dim, F ffn
dim, E experts (global), K top-k, N = K*S token-choices, M kept token-choices, C capacity, R rows a dispatch
delivers to this rank's experts, Q expert-parallel ranks the slots came from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymoe.config import MoEArgs, check_top_k, require_ep_divides
from raymoe.platform.activation_checkpoint import recomputing
from raymoe.platform.layers import MLP

from .dispatch import LocalDispatcher, TokenDispatcher, slots
from .experts import ACTIVATIONS, GroupedExperts
from .router import RouterNoise, Routing, TopKRouter, compute_capacity, deepspeed_routing, draw_router_noise, z_loss
from .routers import modern_routing

_WARNED: set[str] = set()


def _warn_once(key: str, message: str, stacklevel: int = 4) -> None:
    """One warning per process and key (a model's layers share their options: one line, not one per layer)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)


@dataclass
class RouterStats:
    """Per-forward routing statistics (``moe.last_stats``).

    z_loss: z_loss_coef * mean(logsumexp(logits)^2), with grad (0 when the coefficient is 0); add to the loss.
    exp_counts: LongTensor [E], token-choices per expert before capacity dropping.
    kept_counts: LongTensor [E], token-choices per expert after dropping.
    capacity: slots per expert (dropless: the max count, all-reduced over the expert-parallel group).
    dropped_fraction: detached float tensor, dropped token-choices / routed token-choices.
    l_aux: the load-balancing loss returned by forward.
    kept_mask: bool [S, K], whether the c-th choice of token s was kept (S = the gate's tokens, in order).
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


class ExpertMLP(MLP):
    """The layer's dense MLP: a :class:`raymoe.platform.layers.MLP` without biases that computes what one
    expert computes, ``c_proj(act(c_fc(x)))`` with the experts' activation (SwiGLU: c_fc holds the gate rows,
    then the up rows). Residual-MoE's MLP (a copy of the expert in DeepSpeed) and the modern families'
    shared expert are both this module."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__(d_model, d_ff, "swiglu" if activation == "swiglu" else "gelu", bias=False)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x_TD)))


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer; ``forward(x, token_mask=None) -> (y, l_aux, exp_counts)``.

    Arguments follow DeepSpeed's ``deepspeed.moe.layer.MoE``; ``expert`` is the ffn size (None: 4*hidden).
    ``dispatcher`` (a :class:`~raymoe.platform.moe.dispatch.TokenDispatcher`; None: the local one) moves
    the rows to the experts. ``capacity_layout_min_fill`` is the share of the E*C slots the kept rows must
    fill for the fixed [E, C, D] slot layout (the dispatcher's ``plan_layout``): 0 always the slots, > 1
    never (variable segments), None the dispatcher's default; results are the same either way
    (``last_stats.layout`` says which ran).

    ``router="deepspeed"`` is DeepSpeed 0.19.8's gating, option by option (docs/routing.md), with one
    documented difference: at top-1 in drop mode without RTS, an expert over capacity keeps its first tokens
    by position (DeepSpeed takes ``topk`` over tied values, a set that depends on torch's kernel).
    ``router="softmax_topk"`` / ``"sigmoid_group"`` are the Mixtral/Qwen/OLMoE and DeepSeek-V3 routers.

    The layer's dense MLP ``mlp`` (:class:`ExpertMLP`) is Residual-MoE's (``use_residual``: mixed with the
    routed output by softmax(``coefficient(h)``), DeepSpeed's form) or the shared expert
    (``shared_expert_ffn`` > 0: SwiGLU, added, times sigmoid(``shared_gate(h)``) with ``shared_expert_gate``).
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
        self.router = args.router
        self.capacity_factor = float(args.capacity_factor)
        self.eval_capacity_factor = float(args.eval_capacity_factor)
        self.min_capacity = int(args.min_capacity)
        self.use_residual = args.use_residual
        self.shared_expert_ffn = int(args.shared_expert_ffn)
        self.noisy_gate_policy = args.noisy_gate_policy
        self.drop_tokens = bool(args.drop_tokens)  # switched at run time by set_dropless
        self.deterministic = False  # switched at run time by set_deterministic / set_dropless
        self.use_rts = bool(args.use_rts)
        self.top2_2nd_expert_sampling = bool(args.top2_2nd_expert_sampling)
        self.drop_policy = args.drop_policy
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
        self.gate = TopKRouter(hidden_size, num_experts, args.k, expert_bias=args.expert_bias, router=args.router)
        self.experts = GroupedExperts(self.num_local_experts, hidden_size, ffn, activation=activation,
                                      layer_id=layer_id, global_expert_ids=global_expert_ids, init_std=init_std)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.shared_gate = None
        if args.use_residual:  # a copy of the expert (DeepSpeed: self.mlp = expert), mixed per token
            self.mlp = ExpertMLP(hidden_size, ffn, activation)
            self.coefficient = nn.Linear(hidden_size, 2)
        elif args.shared_expert_ffn:
            self.mlp = ExpertMLP(hidden_size, args.shared_expert_ffn, "swiglu")
            if args.shared_expert_gate:
                self.shared_gate = nn.Linear(hidden_size, 1, bias=False)
        self.last_stats: RouterStats | None = None
        # inference only: hot experts copied to other shards (raymoe.platform.moe.replication), set by serving
        self.replicas = None

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
        if args.router == "sigmoid_group":
            if num_experts % args.n_group:
                raise ValueError(f"n_group={args.n_group} must divide num_experts={num_experts}")
            if args.k > args.topk_group * (num_experts // args.n_group):
                raise ValueError(f"k={args.k} must be <= topk_group * num_experts / n_group = "
                                 f"{args.topk_group * (num_experts // args.n_group)} (the experts a token may choose)")
        if args.router == "deepspeed" and args.noisy_gate_policy == "RSample" and args.k >= 2:
            _warn_once("rsample_k", f"noisy_gate_policy='RSample' has no effect with k={args.k}: DeepSpeed applies "
                       "it to top-1 gating only (Jitter works for every k)")
        return ffn

    def reset_buffers(self) -> None:
        """Zero the expert-load counters, as built (a model materialised from the meta device:
        raymoe.platform.init)."""
        self.expert_load.zero_()

    # -- run-time switches -------------------------------------------------------------------------------
    def set_dropless(self, dropless: bool, *, deterministic: bool | None = None) -> None:
        """Dropless routing (capacity = max count, nothing dropped) on or off. It is the inference switch that
        generation and serving call: ``deterministic`` (default: ``dropless``) is set with it, see
        :meth:`set_deterministic`."""
        self.drop_tokens = not dropless
        self.set_deterministic(dropless if deterministic is None else deterministic)

    def set_deterministic(self, deterministic: bool) -> None:
        """True: no random draws in eval mode (the top-2 second expert is the top remaining logit, top-1 drops
        by position), for greedy generation and serving. False (DeepSpeed's semantics, the default): the
        second expert is sampled and RTS applies in eval too. Training is unaffected."""
        self.deterministic = bool(deterministic)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load) over the loads
        accumulated since the last call; then reset the accumulator. No-op without expert_bias."""
        load = self.expert_load.float()
        if self.gate.use_expert_bias and load.sum() > 0:
            self.gate.expert_bias += self.expert_bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    def draw_noise(self, num_tokens: int, device=None, generator: torch.Generator | None = None) -> RouterNoise:
        """The random draws a forward over ``num_tokens`` gate tokens needs in the current mode (on the
        layer's device unless ``device`` says otherwise)."""
        if device is None:
            device = self.gate.wg.weight.device
        return draw_router_noise(num_tokens, self.num_experts, self.hidden_size, k=self.k,
                                 noisy_gate_policy=self.noisy_gate_policy, use_rts=self.use_rts,
                                 top2_2nd_expert_sampling=self.top2_2nd_expert_sampling,
                                 drop_tokens=self.drop_tokens, training=self.training,
                                 deterministic=self.deterministic, router=self.router, device=device,
                                 generator=generator)

    def capacity_for(self, num_tokens: int) -> int:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return compute_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, token_mask: Tensor | None = None, *, used_token: Tensor | None = None,
                noise: RouterNoise | None = None):
        """x [..., D] -> (y [..., D], l_aux, exp_counts [E]); ``noise`` overrides the random draws (tests).

        ``token_mask`` (bool [...], raymoe's padding mask): only those tokens reach the gate; capacity, l_aux
        and the outputs are those of the masked tokens alone (a padded row equals the row alone); the others
        get 0 from the experts. ``used_token`` (0/1 [...], DeepSpeed's argument, keyword only): at top-1 with
        DeepSpeed's gating the gate sees every token, only the used ones are routed, capacity and l_aux's means
        count all tokens; with k >= 2 or a modern router it is ignored, as DeepSpeed ignores it (one warning).
        """
        D = self.hidden_size
        if x.shape[-1] != D:
            raise ValueError(f"x.shape[-1]={x.shape[-1]} != hidden_size={D}")
        x_TD = x.reshape(-1, D)
        routed_S = used_S = None
        for name, mask in (("token_mask", token_mask), ("used_token", used_token)):
            if mask is not None and mask.shape != x.shape[:-1]:
                raise ValueError(f"{name}.shape={tuple(mask.shape)} != x.shape[:-1]={tuple(x.shape[:-1])}")
        if token_mask is not None and used_token is not None:
            raise ValueError("give token_mask (raymoe's padding mask) or used_token (DeepSpeed's), not both")
        if token_mask is not None:
            routed_S = token_mask.reshape(-1).nonzero().squeeze(1)
            x_SD = x_TD.index_select(0, routed_S)
        else:
            x_SD = x_TD
        if used_token is not None:
            if self.router == "deepspeed" and self.k == 1:
                used_S = used_token.reshape(-1) != 0
            else:
                _warn_once("used_token", "used_token has no effect with k >= 2 or a modern router (DeepSpeed "
                           "passes it to top-1 gating only); token_mask excludes tokens for every router")
        if noise is None:
            noise = self.draw_noise(x_SD.shape[0], device=x.device)
        y_TD, l_aux, stats = self._moe(x_TD, x_SD, routed_S, noise, used_S)
        if not recomputing():  # side effects happen once, not again in an activation-checkpoint recompute
            self.last_stats = stats
            if self.training:
                self.expert_load += stats.exp_counts
        return self._add_shared(x_TD, y_TD).view(x.shape), l_aux, stats.exp_counts

    def _add_shared(self, x_TD: Tensor, y_TD: Tensor) -> Tensor:
        """Residual-MoE's mixing (DeepSpeed layer.py) or the shared expert's sum (DeepSeek, Qwen2-MoE)."""
        if self.use_residual:
            coef = F.softmax(self.coefficient(x_TD), dim=-1)
            return y_TD * coef[:, 0:1] + self.mlp(x_TD) * coef[:, 1:2]
        if self.shared_expert_ffn:
            s_TD = self.mlp(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            return y_TD + s_TD
        return y_TD

    def route(self, x_SD: Tensor, noise: RouterNoise, used_S: Tensor | None = None) -> Routing:
        """The router in force on the gate's tokens -> :class:`~raymoe.platform.moe.router.Routing`."""
        training = self.training
        capacity = self.capacity_for(x_SD.shape[0]) if self.drop_tokens else None
        if self.router == "deepspeed":
            logits_SE = self.gate.logits(x_SD, noise, training=training, noisy_gate_policy=self.noisy_gate_policy)
            return deepspeed_routing(logits_SE, noise, k=self.k, capacity=capacity, training=training,
                                     noisy_gate_policy=self.noisy_gate_policy, use_rts=self.use_rts,
                                     top2_2nd_expert_sampling=self.top2_2nd_expert_sampling,
                                     drop_policy=self.drop_policy, deterministic=self.deterministic,
                                     bias_E=self.gate.bias(), used_S=used_S)
        if self.router == "sigmoid_group":  # fp32 logits, as DeepSeek-V3
            logits_SE = self.gate.logits(x_SD, noise, training=False, noisy_gate_policy=None)
        else:  # logits in the hidden dtype, softmax in fp32, as transformers' Mixtral/Qwen/OLMoE routers
            logits_SE = F.linear(x_SD, self.gate.wg.weight.to(x_SD.dtype))
        a = self.args
        return modern_routing(self.router, logits_SE, k=self.k, capacity=capacity, norm_topk_prob=a.norm_topk_prob,
                              routed_scaling_factor=a.routed_scaling_factor, n_group=a.n_group,
                              topk_group=a.topk_group, bias_E=self.gate.bias(), out_dtype=x_SD.dtype)

    def _moe(self, x_TD: Tensor, x_SD: Tensor, routed_S: Tensor | None, noise: RouterNoise,
             used_S: Tensor | None):
        route = self.route(x_SD, noise, used_S)
        plan, capacity = route.plan, route.capacity
        g_M = route.weights_KS.reshape(-1).index_select(0, plan.choice_M)
        tok_M = plan.token_M if routed_S is None else routed_S.index_select(0, plan.token_M)

        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        via = self.replicas  # None: every row to its logical expert's home shard
        slots_C = None if via is not None else self.dispatcher.plan_layout(
            plan, capacity, capacity_factor=cf, min_fill=self.capacity_layout_min_fill, masked=routed_S is not None)
        if slots_C is not None:
            y_TD = self._experts_slots(x_TD, tok_M, slots(plan, slots_C), g_M, slots_C)
        elif via is not None:  # rows re-sorted by physical slot: a replicated expert's rows split among copies
            tok_P, g_P, counts_P = via.route(plan, tok_M, g_M)
            y_TD = self._experts_segments(x_TD, tok_P, counts_P, g_P, via)
        else:
            y_TD = self._experts_segments(x_TD, tok_M, plan.kept_counts_E, g_M)
        if capacity is None:  # dropless: the largest count over the group (known after the dispatch; with
            # replicas, of a physical slot)
            capacity = (self.dispatcher if via is None else via.dispatcher).group_capacity(plan.counts_E)

        routed = plan.counts_E.sum()
        stats = RouterStats(
            z_loss=z_loss(route.logits_SE, self.z_loss_coef),
            exp_counts=plan.counts_E,
            kept_counts=plan.kept_counts_E,
            capacity=capacity,
            dropped_fraction=((routed - plan.kept_counts_E.sum()).float() / routed.clamp(min=1)).detach(),
            l_aux=route.l_aux,
            kept_mask=plan.kept_KS.t(),
            layout="segments" if slots_C is None else "slots",
        )
        return y_TD, route.l_aux, stats

    def _experts_segments(self, x_TD: Tensor, tok_M: Tensor, counts_E: Tensor, g_M: Tensor, via=None) -> Tensor:
        """Variable segments: exactly each expert's kept rows (grouped GEMM) -> y_TD. ``via``: the
        replicas' dispatcher and experts (counts per physical slot) instead of the layer's."""
        T, D = x_TD.shape
        disp, experts = (self.dispatcher, self.experts) if via is None else (via.dispatcher, via.experts)
        fold = disp.folds_gate
        x_RD, counts_R = disp.dispatch(x_TD.index_select(0, tok_M), counts_E)
        y_MD = disp.combine(experts(x_RD, counts_R, g_M if fold else None))
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
