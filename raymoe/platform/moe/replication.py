"""Hot-expert replication for expert-parallel inference (as DeepSeek's EPLB, decided from observed load).

Routing is skewed: a few experts take most token-choices, and the shard holding them sets every step's pace.
Each of the ``ep`` shards gets ``redundant`` extra *physical slots* besides its ``El`` own experts; a slot
holds a copy of a hot *logical* expert of another shard. The token-choices of a replicated expert are split
evenly among its copies, so the busiest shard's load drops towards the mean.

Layout of the physical slots (``P = ep * (El + redundant)``): slot ``r * (El + redundant) + i`` lives on shard
``r``; for ``i < El`` it is shard r's own expert ``r * El + i`` (where the checkpoint put it), the others are
redundant slots (logical expert id, or -1 when empty). A *placement* is that list of P logical ids.

Two parts:
- :func:`plan_placement` (pure Python, no torch state): a greedy that minimises the busiest shard's load
  from per-expert loads (EPLB's idea - replicate what is hot, place copies on the least-loaded shards -
  adapted to fixed home slots: the checkpoint's layout never moves, only the redundant slots change).
- :class:`ReplicatedExperts`: one MoE layer's runtime (inference only): the physical expert weights (the
  own experts share storage with the layer's parameters; copies are fetched from their owners point-to-point
  when the placement changes) and the map from (token, choice) to one physical copy: the j-th row of a
  logical expert on shard r goes to copy (j + r) mod copies, deterministic and balanced. Copies hold the
  owner's weights bit for bit, so outputs equal those without replication (up to the order of float sums).

Shape legend: M kept token-choices (sorted by logical expert), E logical experts, P physical slots, D model
dim, F ffn dim.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

EMPTY = -1  # a redundant slot that holds no copy


def home_placement(num_experts: int, ep_size: int, redundant: int) -> list[int]:
    """The placement without copies: every shard's own experts, redundant slots empty."""
    _check(num_experts, ep_size, redundant)
    El = num_experts // ep_size
    return [r * El + i if i < El else EMPTY for r in range(ep_size) for i in range(El + redundant)]


def _check(num_experts: int, ep_size: int, redundant: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide num_experts={num_experts}")
    if not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"redundant_experts={redundant!r}: must be an int >= 0")


def copies_of(placement: Sequence[int], num_experts: int) -> list[int]:
    """Number of physical copies of each logical expert."""
    n = [0] * num_experts
    for e in placement:
        if e != EMPTY:
            n[e] += 1
    return n


def shard_loads(placement: Sequence[int], load: Sequence[float], ep_size: int) -> list[float]:
    """Expected load of each shard when every expert's load is split evenly among its copies."""
    n = copies_of(placement, len(load))
    per = len(placement) // ep_size
    return [sum(load[e] / n[e] for e in placement[r * per:(r + 1) * per] if e != EMPTY) for r in range(ep_size)]


def plan_placement(load: Sequence[float], ep_size: int, redundant: int) -> list[int]:
    """Placement (P logical ids, see the module docstring) that greedily minimises the busiest shard's load.

    ``load[e]``: observed token-choices of logical expert e (a window or a moving average). The
    ``ep_size * redundant`` redundant slots are filled one copy at a time (:func:`_one_more_copy`) for as
    long as a copy lowers the busiest shard's load; the rest stay empty (no weights to fetch).
    """
    E = len(load)
    _check(E, ep_size, redundant)
    placement = home_placement(E, ep_size, redundant)
    for _ in range(ep_size * redundant):
        better = _one_more_copy(placement, load, ep_size, E // ep_size + redundant)
        if better is None:
            break
        placement = better
    return placement


def replan_placement(current: Sequence[int] | None, load: Sequence[float], ep_size: int, redundant: int,
                     min_gain: float = 0.05) -> list[int]:
    """:func:`plan_placement` for ``load``, unless it lowers the busiest shard's expected load by less than
    ``min_gain`` (a fraction) against ``current`` (None: no copies): then ``current``. Moving copies costs a
    weight transfer, and small load changes between plans would otherwise move them back and forth."""
    current = home_placement(len(load), ep_size, redundant) if current is None else list(current)
    plan = plan_placement(load, ep_size, redundant)
    if max(shard_loads(plan, load, ep_size)) < (1.0 - min_gain) * max(shard_loads(current, load, ep_size)):
        return plan
    return current


def _one_more_copy(placement: list[int], load: Sequence[float], ep_size: int, per: int) -> list[int] | None:
    """Take the busiest shard and its experts by load per copy, largest first; the first one whose extra
    copy, on the least-loaded shard with an empty slot and no copy of it yet, lowers the busiest shard's load
    gives the new placement (ties: lowest shard, lowest expert id). None when no copy helps."""
    loads = shard_loads(placement, load, ep_size)
    n = copies_of(placement, len(load))
    busiest = max(range(ep_size), key=lambda r: (loads[r], -r))
    on_busiest = {e for e in placement[busiest * per:(busiest + 1) * per] if e != EMPTY}
    for e in sorted(on_busiest, key=lambda e: (-load[e] / n[e], e)):
        holders = {p // per for p, x in enumerate(placement) if x == e}
        targets = [r for r in range(ep_size) if r not in holders and EMPTY in placement[r * per:(r + 1) * per]]
        if not targets:
            continue
        r = min(targets, key=lambda r: (loads[r], r))
        trial = list(placement)
        trial[placement.index(EMPTY, r * per)] = e
        if max(shard_loads(trial, load, ep_size)) < max(loads):
            return trial
    return None


class ReplicatedExperts:
    """One MoE layer's physical slots on this rank (see the module docstring); set as ``moe.replicas``.

    Built from the layer (its ``experts`` and expert-parallel ``dispatcher``): the own experts' weights move
    into the first El rows of a [El + redundant, ...] tensor and the layer's parameters become views of them
    (no second copy). ``set_placement`` fetches the weights of new copies from their owners (point-to-point,
    collective over the group: every rank calls it with the same placement).
    """

    def __init__(self, moe, redundant: int):
        from .comm import AllToAllDispatcher
        from .experts import GroupedExperts

        d = moe.dispatcher
        if not isinstance(d, AllToAllDispatcher):
            raise ValueError(f"layer {moe.layer_id}: expert replication needs an expert-parallel layer "
                             f"(ep_size > 1); it has {type(d).__name__}")
        _check(moe.num_experts, d.ep_size, redundant)
        self.num_experts, self.ep_size, self.rank, self.redundant = moe.num_experts, d.ep_size, d.ep_rank, redundant
        self.El = moe.num_local_experts
        self.per = self.El + redundant
        own = moe.experts
        self.experts = GroupedExperts(self.per, own.w1.shape[1], own.ffn_size, activation=own.activation,
                                      layer_id=moe.layer_id).to(own.w1.device, own.w1.dtype).requires_grad_(False)
        with torch.no_grad():
            for name in ("w1", "w2"):
                phys = getattr(self.experts, name)
                phys[:self.El].copy_(getattr(own, name))
                getattr(own, name).data = phys.data[:self.El]  # one copy of the own experts' weights
        self.dispatcher = AllToAllDispatcher(d.group, d.ep_size, d.ep_rank, self.ep_size * self.per,
                                             exchange=d.exchange)
        self.placement = home_placement(self.num_experts, self.ep_size, redundant)
        self._set_tables()
        self.load_P = torch.zeros(len(self.placement), dtype=torch.long)  # rows this rank sent to each slot

    def _set_tables(self) -> None:
        """copies_E [E] and phys_EC [E, max copies] (the physical slot of each copy) from the placement."""
        n = copies_of(self.placement, self.num_experts)
        table = torch.zeros(self.num_experts, max(n), dtype=torch.long)
        seen = [0] * self.num_experts
        for p, e in enumerate(self.placement):
            if e != EMPTY:
                table[e, seen[e]] = p
                seen[e] += 1
        dev = self.experts.w1.device
        self.copies_E, self.phys_EC = torch.tensor(n, device=dev), table.to(dev)

    @torch.no_grad()
    def set_placement(self, placement: Sequence[int]) -> None:
        """Install ``placement`` (collective: every rank of the group calls it with the same list)."""
        placement = [int(e) for e in placement]
        home = home_placement(self.num_experts, self.ep_size, self.redundant)
        if len(placement) != len(home) or any(h != EMPTY and h != e for h, e in zip(home, placement)):
            raise ValueError(f"placement must keep every shard's own experts in its first {self.El} slots and "
                             f"have {len(home)} entries; got {placement}")
        if any(not EMPTY <= e < self.num_experts for e in placement):
            raise ValueError(f"placement entries must be logical expert ids or {EMPTY}; got {placement}")
        self._fetch([(p, e) for p, (e, old) in enumerate(zip(placement, self.placement)) if e != old and e != EMPTY])
        self.placement = placement
        self._set_tables()

    def _fetch(self, moves: list[tuple[int, int]]) -> None:
        """Copy logical expert e's weights from its owner into physical slot p, for every (p, e)."""
        ops, group = [], self.dispatcher.group
        for i, (p, e) in enumerate(moves):
            owner, dest = e // self.El, p // self.per
            for j, w in enumerate((self.experts.w1, self.experts.w2)):
                tag = 2 * i + j  # both sides walk the same list: unique, matching tags
                if owner == dest == self.rank:
                    w[p % self.per].copy_(w[e % self.El])
                elif owner == self.rank:
                    ops.append(dist.P2POp(dist.isend, w[e % self.El], group=group, group_peer=dest, tag=tag))
                elif dest == self.rank:
                    ops.append(dist.P2POp(dist.irecv, w[p % self.per], group=group, group_peer=owner, tag=tag))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def to_physical(self, expert_M: Tensor, pos_M: Tensor) -> Tensor:
        """Physical slot of each kept row: the j-th row of logical expert e goes to copy (j + rank) mod copies."""
        copy_M = (pos_M + self.rank) % self.copies_E.index_select(0, expert_M)
        return self.phys_EC[expert_M, copy_M]

    def route(self, plan, tok_M: Tensor, g_M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tok_M, g_M, counts_P) of the kept rows re-sorted by physical slot (the layer's segments path)."""
        phys_M = self.to_physical(plan.expert_M, plan.pos_M)
        order = torch.argsort(phys_M, stable=True)
        counts_P = torch.bincount(phys_M, minlength=len(self.placement))
        self.load_P += counts_P.cpu()
        return tok_M.index_select(0, order), g_M.index_select(0, order), counts_P
