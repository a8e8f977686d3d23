"""Index-based dispatch: mapping tables from (token, choice) to expert slots, and the dispatcher interface.

Shape legend: S routed tokens, E experts (global), K top-k, N = K*S token-choices (flattened choice-major:
n = c*S + s), M kept token-choices (M <= N), D model dim, C capacity (slots per expert), Q expert-parallel
ranks, El experts per rank.

No [S, E, C] one-hot tensor is built: a stable sort of the N expert ids (small int tensor) groups the
token-choices by expert while keeping the priority order inside each expert (choice-major, then token
position or a random RTS order), and "position within expert" is arange minus the expert's segment start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Where every kept token-choice goes.

    choice_M: flat token-choice index (c*S + s) of each kept token-choice, sorted by expert (expert-contiguous).
    token_M: its token index s (choice_M % S).
    counts_E: token-choices per expert before dropping.
    kept_counts_E: token-choices per expert after dropping (segment lengths of the sorted kept rows).
    kept_KS: bool, whether token-choice (c, s) is kept.
    expert_M, pos_M: its expert and its position inside the expert's kept rows; slot ``expert*C + pos`` in
    a capacity layout [E, C] with C >= max(kept_counts_E) (see :func:`slots`).
    """

    choice_M: Tensor
    token_M: Tensor
    counts_E: Tensor
    kept_counts_E: Tensor
    kept_KS: Tensor
    expert_M: Tensor
    pos_M: Tensor


def slots(plan: DispatchPlan, capacity: int) -> Tensor:
    """Slot index expert*C + position of every kept row in an [E, C] capacity layout (C >= the kept counts)."""
    return plan.expert_M * capacity + plan.pos_M


def plan_dispatch(idx_SK: Tensor, num_experts: int, capacity: int | None,
                  order_KS: Tensor | None = None) -> DispatchPlan:
    """Build the mapping tables.

    capacity None means dropless (keep everything). order_KS (RTS): row c is a permutation of the tokens giving
    their priority order inside choice rank c; otherwise token position order. Earlier choice ranks always
    come first.
    """
    S, K = idx_SK.shape
    N = S * K
    dev = idx_SK.device
    e_KS = idx_SK.t()
    if order_KS is not None and capacity is not None:
        e_N = e_KS.gather(1, order_KS).reshape(-1)
        src_N = (order_KS + torch.arange(K, device=dev).unsqueeze(1) * S).reshape(-1)
    else:
        e_N = e_KS.reshape(-1)
        src_N = None  # identity
    counts_E = torch.bincount(e_N, minlength=num_experts)
    # Narrow keys: CPU radix sort cost scales with key width (int16 is ~3x faster than int64 here).
    key_dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
    sorted_N, order_N = torch.sort(e_N.to(key_dtype), stable=True)
    starts_N = torch.repeat_interleave(torch.cumsum(counts_E, 0) - counts_E, counts_E, output_size=N)
    pos_N = torch.arange(N, device=dev) - starts_N
    expert_N = sorted_N.to(torch.long)
    if capacity is None:
        kept_order_M, expert_M, pos_M = order_N, expert_N, pos_N
        kept_counts_E = counts_E
    else:
        # One nonzero for the three selections (each boolean-mask index runs its own; on a GPU each is a sync).
        keep_M = (pos_N < capacity).nonzero().squeeze(1)
        kept_order_M, expert_M, pos_M = (t.index_select(0, keep_M) for t in (order_N, expert_N, pos_N))
        kept_counts_E = counts_E.clamp(max=capacity)
    choice_M = kept_order_M if src_N is None else src_N[kept_order_M]
    if capacity is None:
        kept_KS = torch.ones(K, S, dtype=torch.bool, device=dev)
    else:
        kept_N = torch.zeros(N, dtype=torch.bool, device=dev)
        kept_N[choice_M] = True
        kept_KS = kept_N.view(K, S)
    token_M = choice_M % S if K > 1 else choice_M
    return DispatchPlan(choice_M, token_M, counts_E, kept_counts_E, kept_KS, expert_M, pos_M)


class LocalDispatcher:
    """No-communication dispatcher (ep_size=1): all experts are local. The reference for EP dispatchers.

    An expert-parallel dispatcher implements the same three methods: ``dispatch`` receives the kept
    token-choices sorted by global expert with per-global-expert counts and returns the rows for this rank's
    experts (sorted by local expert) with per-local-expert counts; ``combine`` is its inverse (rows back in
    the order ``dispatch`` received them); ``all_reduce_max`` reduces over the expert-parallel group.
    The capacity layout (``MoE._use_capacity_layout``) uses the fixed-size pair: ``dispatch_capacity`` takes
    the [E, C, D] slot buffer (global experts, expert-major) and returns [Q, El, C, D] (Q = EP ranks the rows
    came from, El = local experts); ``combine_capacity`` is its inverse. Equal splits: no count exchange, no
    re-sort.
    """

    def dispatch(self, x_MD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
        return x_MD, counts_E

    def combine(self, y_MD: Tensor) -> Tensor:
        return y_MD

    def dispatch_capacity(self, x_ECD: Tensor) -> Tensor:
        return x_ECD.unsqueeze(0)

    def combine_capacity(self, y_QECD: Tensor) -> Tensor:
        return y_QECD.squeeze(0)

    def all_reduce_max(self, t: Tensor) -> Tensor:
        return t
