"""DeepSpeed-MoE's gating (0.19.8 ``sharded_moe.py``: top1gating, top2gating, topkgating), fast path.

Shape legend: S tokens the gate sees, D model dim, E experts (global), K top-k.

The gate always runs in fp32 (DeepSpeed keeps ``wg`` in fp32 and feeds it ``input.float()``), even under
autocast. All random draws of one forward (jitter, gumbel noise, RTS priorities) come from
:func:`draw_router_noise` so the fast path and the dense reference can be fed the very same draws.
:func:`deepspeed_routing` turns logits into a :class:`Routing` (the index-based plan the layer dispatches);
the modern routers (:mod:`raymoe.platform.moe.routers`) return the same type.

Where DeepSpeed draws random numbers (docs/routing.md has the whole table):
- Jitter on the gate input, any k, training only; RSample (Gumbel on the logits) at top-1, training only
  (DeepSpeed passes the policy to top1gating only: with k >= 2 it has no effect);
- top-2's second expert with Gumbel noise whenever ``top2_2nd_expert_sampling``, in training and in eval;
- Random Token Selection at top-1 whenever ``use_rts``, in training and in eval (it only matters in drop mode).
``deterministic`` (set by :meth:`MoE.set_deterministic`, serving and generation) turns the eval-time draws
off: the second expert is the top logit and top-1 drops by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import DispatchPlan, plan_dispatch

JITTER_EPS = 1e-2


@dataclass
class RouterNoise:
    """Random draws of one routing call; a field is None when the options in force do not need it.

    jitter_SD: multiplicative jitter U(1-eps, 1+eps) on the gate input (policy 'Jitter', training).
    gumbel1_SE: gumbel noise on the logits for the top-1 choice (policy 'RSample', training, k=1).
    gumbel2_SE: gumbel noise for the second choice of top-2 (top2_2nd_expert_sampling, training and eval).
    rts_order_KS: Random Token Selection order [1, S] (top-1, use_rts, dropping, training and eval): a random
        permutation of the S tokens; tokens earlier in it win the capacity slots. A random permutation is the
        order of DeepSpeed's uniform priorities, without sorting them.
    """

    jitter_SD: Tensor | None = None
    gumbel1_SE: Tensor | None = None
    gumbel2_SE: Tensor | None = None
    rts_order_KS: Tensor | None = None


@dataclass
class Routing:
    """One routing decision, whatever the router: what the layer dispatches and reports.

    logits_SE: the gate's logits (z-loss). plan: where every kept token-choice goes. weights_KS: combine
    weight of token-choice (c, s), 0 when dropped. l_aux: load-balancing loss. capacity: drop-mode slots per
    expert, None when dropless.
    """

    logits_SE: Tensor
    plan: DispatchPlan
    weights_KS: Tensor
    l_aux: Tensor
    capacity: int | None


def _gumbel(shape, device, generator) -> Tensor:
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def noise_needs(k: int, noisy_gate_policy, use_rts: bool, top2_2nd_expert_sampling: bool,
                drop_tokens: bool, training: bool, deterministic: bool = False,
                router: str = "deepspeed") -> dict[str, bool]:
    """Which draws a routing call with these options consumes (shared by both paths)."""
    ds = router == "deepspeed"
    random_now = training or not deterministic  # DeepSpeed draws in eval too; deterministic turns that off
    return {
        "jitter": ds and training and noisy_gate_policy == "Jitter",
        "gumbel1": ds and training and noisy_gate_policy == "RSample" and k == 1,
        "gumbel2": ds and k == 2 and top2_2nd_expert_sampling and random_now,
        "rts": ds and k == 1 and use_rts and drop_tokens and random_now,
    }


def draw_router_noise(num_tokens: int, num_experts: int, hidden_size: int, *, k: int,
                      noisy_gate_policy=None, use_rts: bool = True, top2_2nd_expert_sampling: bool = True,
                      drop_tokens: bool = True, training: bool = True, deterministic: bool = False,
                      router: str = "deepspeed", device=None,
                      generator: torch.Generator | None = None) -> RouterNoise:
    """Draw every random tensor one routing call needs (torch's global RNG unless ``generator``)."""
    need = noise_needs(k, noisy_gate_policy, use_rts, top2_2nd_expert_sampling, drop_tokens, training,
                       deterministic, router)
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
        if torch.device(device or "cpu").type == "cpu":  # Fisher-Yates: O(S)
            noise.rts_order_KS = torch.randperm(S, generator=generator, device=device).unsqueeze(0)
        else:  # one sort instead of randperm's multi-kernel launch sequence
            u = torch.rand((1, S), device=device, generator=generator, dtype=torch.float32)
            noise.rts_order_KS = u.argsort(dim=1)
    return noise


def _require(t: Tensor | None, name: str) -> Tensor:
    if t is None:
        raise ValueError(f"router noise field {name!r} is required by the options in force but is None")
    return t


def compute_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float,
                     min_capacity: int) -> int:
    """capacity = max(ceil(S / E * (k * cf)), min_capacity), in float32 as DeepSpeed's ``_capacity`` computes
    it (``torch.tensor(cf * k)`` is float32): e.g. S=25, E=1, cf=1.2 gives 31 where float64 gives 30."""
    cf_k = torch.tensor(float(capacity_factor) * k, dtype=torch.float32)
    raw = torch.ceil((num_tokens / num_experts) * cf_k)
    return max(int(raw), int(min_capacity))


def select_experts(logits_SE: Tensor, probs_SE: Tensor, k: int, noise: RouterNoise, *, training: bool,
                   noisy_gate_policy=None, top2_2nd_expert_sampling: bool = True,
                   bias_E: Tensor | None = None, deterministic: bool = False) -> Tensor:
    """Expert ids [S, K], column c = c-th choice (DeepSpeed's top1/top2/topk gating). Noise and the optional
    expert bias only steer selection."""
    need = noise_needs(k, noisy_gate_policy, True, top2_2nd_expert_sampling, True, training, deterministic)

    def biased(score):
        return score if bias_E is None else score + bias_E

    if k == 1:
        score = logits_SE + _require(noise.gumbel1_SE, "gumbel1_SE") if need["gumbel1"] else probs_SE
        return biased(score).argmax(dim=1, keepdim=True)
    i1 = biased(probs_SE).argmax(dim=1, keepdim=True)
    if k == 2:
        s2 = logits_SE + _require(noise.gumbel2_SE, "gumbel2_SE") if need["gumbel2"] else logits_SE
        s2 = biased(s2).scatter(1, i1, float("-inf"))
        return torch.cat([i1, s2.argmax(dim=1, keepdim=True)], dim=1)
    return biased(probs_SE).topk(k, dim=1).indices


def load_balancing_loss(probs_SE: Tensor, idx_SK: Tensor, counts_E: Tensor, k: int) -> Tensor:
    """DeepSpeed's aux loss from pre-drop choices; means over all S tokens the gate saw.

    k=1 (top1gating): E * sum(me * ce), ce = counts_E / S (the routed choices: ``used_token`` removes some);
    k=2 (top2gating): E^2 * mean(me * ce), ce from the first choices; k>2 (topkgating): E^2 / k * mean(me * ce),
    ce = counts_E / S (all k choices).
    """
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0.0
    me_E = probs_SE.mean(dim=0)
    if k == 2:
        ce_E = torch.bincount(idx_SK[:, 0], minlength=E).to(probs_SE.dtype) / S
        return (me_E * ce_E).mean() * E * E
    ce_E = counts_E.to(probs_SE.dtype) / S
    if k == 1:
        return (me_E * ce_E).sum() * E
    return (me_E * ce_E).mean() * E * E / k


def gate_weights(probs_SE: Tensor, idx_SK: Tensor, kept_KS: Tensor) -> Tensor:
    """Combine weights [K, S]: k=1 the raw prob (0 if dropped); k>=2 renormalized over kept choices."""
    g_KS = probs_SE.gather(1, idx_SK).t() * kept_KS
    if idx_SK.shape[1] > 1:
        eps = torch.finfo(g_KS.dtype).eps
        g_KS = g_KS / g_KS.sum(dim=0, keepdim=True).clamp(min=eps)
    return g_KS


def deepspeed_routing(logits_SE: Tensor, noise: RouterNoise, *, k: int, capacity: int | None,
                      training: bool, noisy_gate_policy, use_rts: bool, top2_2nd_expert_sampling: bool,
                      drop_policy: str, deterministic: bool, bias_E: Tensor | None,
                      used_S: Tensor | None = None) -> Routing:
    """DeepSpeed's gating on fp32 logits -> :class:`Routing`. ``used_S`` (top-1 only): DeepSpeed's
    ``used_token``: only those tokens are routed, while capacity and l_aux's means count all S tokens."""
    E = logits_SE.shape[1]
    probs_SE = F.softmax(logits_SE, dim=1)
    idx_SK = select_experts(logits_SE, probs_SE, k, noise, training=training, noisy_gate_policy=noisy_gate_policy,
                            top2_2nd_expert_sampling=top2_2nd_expert_sampling, bias_E=bias_E,
                            deterministic=deterministic)
    if k == 1:
        rts = noise_needs(1, noisy_gate_policy, use_rts, True, capacity is not None, training, deterministic)["rts"]
        order = _require(noise.rts_order_KS, "rts_order_KS") if rts else None
        plan = plan_dispatch(idx_SK, E, capacity, order, valid_S=used_S)
    elif k == 2:
        plan = plan_dispatch(idx_SK, E, capacity)
    elif drop_policy == "probs":
        plan = plan_dispatch(idx_SK, E, capacity, score_SK=probs_SE.gather(1, idx_SK))
    else:
        plan = plan_dispatch(idx_SK, E, capacity, token_major=True)
    l_aux = load_balancing_loss(probs_SE, idx_SK, plan.counts_E, k)
    return Routing(logits_SE, plan, gate_weights(probs_SE, idx_SK, plan.kept_KS), l_aux, capacity)


class TopKRouter(nn.Module):
    """The gate ``wg`` (fp32, no bias) plus the expert bias buffer.

    ``expert_bias`` [E]: added to the selection scores only. With ``expert_bias=True`` (aux-loss-free
    balancing) it steers every router and ``update_expert_bias`` moves it; the sigmoid_group router always
    uses it (DeepSeek-V3's ``e_score_correction_bias``), so there it is saved with the model.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, *, expert_bias: bool = False,
                 router: str = "deepspeed"):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.router = router
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()
        self.use_expert_bias = expert_bias  # updated by MoE.update_expert_bias
        self.selection_bias = expert_bias or router == "sigmoid_group"
        # Non-trainable: moved by update_expert_bias (or loaded), never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32),
                             persistent=self.selection_bias)

    def reset_buffers(self) -> None:
        """The expert bias as built: zeros (a model materialised from the meta device: raymoe.platform.init)."""
        self.expert_bias.zero_()

    def logits(self, x_SD: Tensor, noise: RouterNoise, *, training: bool, noisy_gate_policy) -> Tensor:
        """fp32 logits [S, E]; jitter is applied to the gate's input only."""
        with torch.autocast(device_type=x_SD.device.type, enabled=False):
            x_fp32 = x_SD.float()
            if training and noisy_gate_policy == "Jitter":
                x_fp32 = x_fp32 * _require(noise.jitter_SD, "jitter_SD")
            return F.linear(x_fp32, self.wg.weight.float())

    def bias(self) -> Tensor | None:
        return self.expert_bias if self.selection_bias else None


def z_loss(logits_SE: Tensor, coef: float) -> Tensor:
    """ST-MoE router z-loss: coef * mean(logsumexp(logits)^2)."""
    if coef == 0.0 or logits_SE.shape[0] == 0:
        return logits_SE.float().sum() * 0.0
    return coef * torch.logsumexp(logits_SE.float(), dim=1).square().mean()
