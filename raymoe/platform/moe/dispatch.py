"""Index-based dispatch: mapping tables from (token, choice) to expert slots, and the dispatcher interface
(:class:`TokenDispatcher`) with its no-communication implementation.

Shape legend: S routed tokens, E experts (global), K top-k, N = K*S token-choices (flattened choice-major:
n = c*S + s), M kept token-choices (M <= N), D model dim, C capacity (slots per expert), Q expert-parallel
ranks, El experts per rank, R rows a dispatch delivers to this rank's experts.

No [S, E, C] one-hot tensor is built: a stable sort of the N expert ids (small int tensor) groups the
token-choices by expert while keeping the priority order inside each expert (choice-major, then token
position or a random RTS order), and "position within expert" is arange minus the expert's segment start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


def plan_dispatch(idx_SK: Tensor, num_experts: int, capacity: int | None, order_KS: Tensor | None = None, *,
                  score_SK: Tensor | None = None, token_major: bool = False,
                  valid_S: Tensor | None = None) -> DispatchPlan:
    """Build the mapping tables.

    capacity None means dropless (keep everything). Over capacity, an expert keeps its token-choices in this
    priority order:
    - default: choice rank, then token position (DeepSpeed's top-2: every 1st choice before any 2nd choice);
    - order_KS (Random Token Selection): row c is a permutation of the tokens giving their order inside
      choice rank c; earlier choice ranks still come first;
    - token_major: token position only (DeepSpeed's top-k ``drop_policy="position"``);
    - score_SK: the highest score first (DeepSpeed's top-k ``drop_policy="probs"``: the gate probability of
      each choice, non-negative fp32), equal scores by token position.
    valid_S (bool [S]): only these tokens' choices are routed (DeepSpeed's ``used_token``); the others are
    neither counted nor kept.
    """
    S, K = idx_SK.shape
    N = S * K
    dev = idx_SK.device
    E = num_experts
    assert order_KS is None or score_SK is None, "one drop priority at a time"
    if valid_S is not None:  # sentinel expert E: sorts after every real expert, then cut off
        idx_SK = idx_SK.masked_fill(~valid_S.unsqueeze(1), E)
    bins = E + (valid_S is not None)
    dropping = capacity is not None
    src_N = None  # position n of the sorted order -> flat choice-major index c*S + s (None: identity)
    if dropping and order_KS is not None:
        e_N = idx_SK.t().gather(1, order_KS).reshape(-1)
        src_N = (order_KS + torch.arange(K, device=dev).unsqueeze(1) * S).reshape(-1)
    elif dropping and (token_major or score_SK is not None) and K > 1:
        e_N = idx_SK.reshape(-1)  # token-major: n = s*K + c
        src_N = (torch.arange(S, device=dev).unsqueeze(1) + torch.arange(K, device=dev) * S).reshape(-1)
    else:
        e_N = idx_SK.t().reshape(-1)
    counts = torch.bincount(e_N, minlength=bins)
    if dropping and score_SK is not None:
        # One stable sort by (expert, score descending): a non-negative fp32's bits order like its value
        # (+0.0 turns -0.0 into 0.0). e_N is token-major here (for K == 1 choice-major is token-major too).
        bits_N = (score_SK.float() + 0.0).contiguous().view(torch.int32).reshape(-1).to(torch.int64)
        key_N = (e_N.to(torch.int64) << 31) | (0x7FFFFFFF - bits_N)
        order_N = torch.sort(key_N, stable=True).indices
        sorted_N = e_N.index_select(0, order_N)
    else:
        # Narrow keys: CPU radix sort cost scales with key width (int16 is ~3x faster than int64 here).
        key_dtype = torch.int16 if bins <= torch.iinfo(torch.int16).max else torch.int32
        sorted_N, order_N = torch.sort(e_N.to(key_dtype), stable=True)
    starts_N = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=N)
    pos_N = torch.arange(N, device=dev) - starts_N
    expert_N = sorted_N.to(torch.long)
    counts_E = counts[:E] if valid_S is not None else counts
    if valid_S is not None:
        n_valid = N - int(counts[E])
        order_N, expert_N, pos_N = order_N[:n_valid], expert_N[:n_valid], pos_N[:n_valid]
    if not dropping:
        kept_order_M, expert_M, pos_M = order_N, expert_N, pos_N
        kept_counts_E = counts_E
    else:
        # One nonzero for the three selections (each boolean-mask index runs its own; on a GPU each is a sync).
        keep_M = (pos_N < capacity).nonzero().squeeze(1)
        kept_order_M, expert_M, pos_M = (t.index_select(0, keep_M) for t in (order_N, expert_N, pos_N))
        kept_counts_E = counts_E.clamp(max=capacity)
    choice_M = kept_order_M if src_N is None else src_N[kept_order_M]
    if not dropping and valid_S is None:
        kept_KS = torch.ones(K, S, dtype=torch.bool, device=dev)
    elif not dropping:
        kept_KS = valid_S.unsqueeze(0).expand(K, S).clone()
    else:
        kept_N = torch.zeros(N, dtype=torch.bool, device=dev)
        kept_N[choice_M] = True
        kept_KS = kept_N.view(K, S)
    token_M = choice_M % S if K > 1 else choice_M
    return DispatchPlan(choice_M, token_M, counts_E, kept_counts_E, kept_KS, expert_M, pos_M)


# Local slot layout when the kept rows fill at least this share of the E*C slots. On CPU the slots' batched
# GEMMs run steadier than the segments' small per-expert GEMMs at that fill (benchmarks/moe_layer.py,
# --min-fill 0 vs 2); below it the padding costs more than it saves.
DEFAULT_MIN_FILL = 0.8
# ... and whatever the fill when no expert has more than this many rows (decoding: 1-2 rows per expert). Such
# per-expert GEMMs are bound by reading the expert's weights; the slots' batched GEMM spreads whole experts over
# the threads instead of splitting each tiny product (one layer at benchmarks/hf_models.py's shapes, 32 tokens,
# two runs: E8 k2 5.9-6.0 vs 6.8-9.4 ms, E64 k8 9.2-10.7 vs 13.3-15.1 ms; at 8 tokens about even).
SMALL_SLOT_ROWS = 16


@runtime_checkable
class TokenDispatcher(Protocol):
    """What the MoE layer needs from the component that moves token rows to their experts and back.

    The layer calls every member unconditionally; an implementation decides the expert layout, whether the
    experts can fold the gate weights in, and how the group's dropless capacity is known (Megatron-Core's
    swappable token dispatchers are the model). :class:`LocalDispatcher` (no communication, the reference)
    and :class:`raymoe.platform.moe.comm.AllToAllDispatcher` (expert parallel) implement it.

    Per forward the layer calls ``plan_layout``, then either ``dispatch`` / ``combine`` (variable segments)
    or ``dispatch_capacity`` / ``combine_capacity`` (the fixed [E, C, D] slots, the capacity layout), then,
    dropless, ``group_capacity``.
    """

    @property
    def folds_gate(self) -> bool:
        """True: the experts scale their rows by the gate weights (the rows reach them in the order the
        layer sent them, so the layer's gate weights line up); False: the layer scales the combined rows."""
        ...

    @property
    def local_expert_ids(self) -> list[int] | None:
        """Global ids of the experts this rank holds, or None for all of them."""
        ...

    def plan_layout(self, plan: DispatchPlan, capacity: int | None, *, capacity_factor: float,
                    min_fill: float | None, masked: bool) -> int | None:
        """Slots per expert C of the slot layout for this forward, or None for variable segments.

        ``capacity``: the drop-mode capacity (None: dropless); ``capacity_factor``: the one in force;
        ``min_fill``: the layer's ``capacity_layout_min_fill`` (None: the implementation's default);
        ``masked``: whether a token mask selected the routed tokens."""
        ...

    def group_capacity(self, counts_E: Tensor) -> int:
        """Dropless capacity: the largest per-expert count [E] over the group; called after the experts ran."""
        ...

    def dispatch(self, x_MD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
        """Kept token-choices sorted by global expert + per-global-expert counts [E] -> (rows of this rank's
        experts, their counts: per local expert [El], or [Q, El] for rows in (source rank, expert) order)."""
        ...

    def combine(self, y_RD: Tensor) -> Tensor:
        """Inverse of the last ``dispatch``: the experts' rows back in the order ``dispatch`` received them."""
        ...

    def dispatch_capacity(self, x_ECD: Tensor) -> Tensor:
        """[E, C, D] slots of all global experts (expert-major) -> [Q, El, C, D], the slots of this rank's
        experts from each of the Q ranks; every split is El*C rows, so only the rows are exchanged."""
        ...

    def combine_capacity(self, y_QECD: Tensor) -> Tensor:
        """Inverse of the last ``dispatch_capacity``: [Q, El, C, D] -> [E, C, D] in this rank's slot order."""
        ...


class LocalDispatcher:
    """No-communication :class:`TokenDispatcher` (ep_size=1): all experts are local. The reference for the
    expert-parallel dispatchers.

    Rows stay where they are, so the experts fold the gate weights into their narrower intermediate. The
    layout follows this forward's fill: slots when the kept rows fill at least ``min_fill`` (default
    :data:`DEFAULT_MIN_FILL` on CPU) of E*C slots with C = the largest kept count (no expert needs more; in
    drop mode the capacity is often above it), or on CPU when C is at most :data:`SMALL_SLOT_ROWS` (decoding);
    segments otherwise, and always on a GPU, where the grouped GEMM over segments beat the slots at every
    benchmark shape.
    """

    folds_gate = True
    local_expert_ids = None

    def plan_layout(self, plan: DispatchPlan, capacity: int | None, *, capacity_factor: float,
                    min_fill: float | None, masked: bool) -> int | None:
        if min_fill is None:
            if plan.counts_E.device.type != "cpu":
                return None
            min_fill = DEFAULT_MIN_FILL
        if min_fill > 1.0:
            return None
        kept_E = plan.kept_counts_E
        C = int(kept_E.max())
        if C > 0 and min_fill > 0 and C <= SMALL_SLOT_ROWS and plan.counts_E.device.type == "cpu":
            return C
        return C if C > 0 and int(kept_E.sum()) >= min_fill * kept_E.numel() * C else None

    def group_capacity(self, counts_E: Tensor) -> int:
        return int(counts_E.max())

    def dispatch(self, x_MD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
        return x_MD, counts_E

    def combine(self, y_MD: Tensor) -> Tensor:
        return y_MD

    def dispatch_capacity(self, x_ECD: Tensor) -> Tensor:
        return x_ECD.unsqueeze(0)

    def combine_capacity(self, y_QECD: Tensor) -> Tensor:
        return y_QECD.squeeze(0)
