"""Expert-parallel exchange: all-to-all with autograd and the dispatcher that moves rows to their experts.

Shape legend: M kept token-choices of this rank (sorted by GLOBAL expert), R rows received for this rank's
experts, D model dim, E global experts, El experts per rank (E / ep), Q source ranks of the EP group (= ep),
N nodes of the EP group, P ranks per node (ep = N * P).

A *route* is a list of hops: a row permutation or an ``all_to_all_single`` with variable splits. ``dispatch``
runs the route forward; ``combine`` runs the inverse route (hops reversed, permutations inverted, splits
swapped). Both are differentiable: the backward of an all-to-all is the all-to-all with the splits swapped,
the backward of a permutation is the inverse permutation (a gather, not a scatter-add).

Flat route (DeepSpeed-MoE's dispatch): exchange the per-expert counts, exchange the rows, then re-sort the
received rows from (source rank, local expert) order to local-expert-contiguous order.

Source-order route (``exchange="source_order"``, "auto" on CPU): the same two exchanges without the re-sort:
``dispatch`` returns the rows as they arrive with their counts as [Q, El], and the experts run one GEMM per
(source rank, expert) segment (the segment loop, which is what the grouped GEMM does on CPU anyway). On
gloo/CPU the two re-sorting copies (and their backward) cost about a third of the exchange itself
(benchmarks/all_to_all.py). GPUs keep the re-sort: it is cheap there and the grouped GEMM needs
expert-contiguous rows.

Segment route (``exchange="p2p"``): the same counts exchange, then each (source rank, expert) segment is sent
point-to-point straight into its final, expert-contiguous place, so neither side re-sorts (one message per
segment).

Capacity route (``dispatch_capacity``, drop mode): the layer sends DeepSpeed's fixed [E, C, D] slot buffer;
every split is El*C rows, so there is no count exchange and no re-sort (the experts consume the received
[Q, El, C, D] blocks in place): one ``all_to_all_single`` each way, the raw collective itself.

Hierarchical route (DeepSpeed-MoE sec. 5.3, a 2D all-to-all): phase 1 exchanges inside a node so that local
rank j gathers every row its node sends to any rank with local index j; phase 2 exchanges between the ranks
with the same local index across nodes (N peers instead of ep, messages P times larger). Rows arrive in the
same (source rank, local expert) order as with the flat route, so the numerics are identical.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from raymoe.config import require_ep_divides

from .dispatch import DispatchPlan

# Expert parallel, the slots' padding is also sent over the network: the fixed slot exchange only where the
# fill is guaranteed to reach this share, i.e. drop mode with capacity factor <= 1/0.9 (cf 1.0 yes, cf 1.25
# no: its variable splits send 20% less).
EP_MIN_FILL = 0.9


class _Meter:
    """Accumulates seconds and bytes of the collectives of one dispatcher (forward and backward)."""

    def __init__(self, owner: "AllToAllDispatcher"):
        self.owner = owner

    def run(self, fn: Callable[[], None], nbytes: int = 0) -> None:
        clock = self.owner.timer
        t0 = clock()
        fn()
        self.owner.comm_seconds += clock() - t0
        self.owner.comm_bytes += nbytes


def _exchange(x: Tensor, group, out_splits: list[int] | None, in_splits: list[int] | None,
              meter: _Meter | None) -> Tensor:
    """``all_to_all_single`` of the rows of x with variable splits, or equal ones (None: every rank of the
    group must then pass None too - gloo runs a different collective for each); returns the received rows."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))

    def fn():
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)

    if meter is None:
        fn()
    else:
        meter.run(fn, x.numel() * x.element_size())
    return out


class _AllToAll(torch.autograd.Function):
    """Rows -> peers with ``in_splits`` sent / ``out_splits`` received; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits, meter):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.meter = group, out_splits, in_splits, meter
        return _exchange(x, group, out_splits, in_splits, meter)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.group, ctx.in_splits, ctx.out_splits, ctx.meter), None, None, None, None


class _Permute(torch.autograd.Function):
    """y = x[idx] for a bijection idx; backward is the gather by the inverse permutation."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


class _SegmentPlan:
    """Point-to-point copy of row segments: ``sends``/``recvs`` are (group peer, first row, rows, tag),
    ``local`` is (source row, destination row, rows) for this rank's own segments."""

    def __init__(self, group, rows_in: int, rows_out: int, sends, recvs, local):
        self.group, self.rows_in, self.rows_out = group, rows_in, rows_out
        self.sends, self.recvs, self.local = sends, recvs, local

    def reverse(self) -> "_SegmentPlan":
        return _SegmentPlan(self.group, self.rows_out, self.rows_in, self.recvs, self.sends,
                            [(d, s, n) for s, d, n in self.local])

    def run(self, x: Tensor, meter: _Meter | None) -> Tensor:
        x = x.contiguous()
        out = x.new_empty((self.rows_out,) + tuple(x.shape[1:]))
        for src, dst, n in self.local:
            out[dst:dst + n].copy_(x[src:src + n])
        ops = [dist.P2POp(dist.isend, x[a:a + n], group=self.group, group_peer=p, tag=t) for p, a, n, t in self.sends]
        ops += [dist.P2POp(dist.irecv, out[a:a + n], group=self.group, group_peer=p, tag=t)
                for p, a, n, t in self.recvs]

        def fn():
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()

        sent = sum(n for _, _, n, _ in self.sends) * math.prod(x.shape[1:]) * x.element_size()
        if meter is None:
            fn()
        else:
            meter.run(fn, sent)
        return out


class _SegmentExchange(torch.autograd.Function):
    """Rows -> their final places on the peers; backward runs the reverse plan."""

    @staticmethod
    def forward(ctx, x, plan: _SegmentPlan, meter):
        ctx.plan, ctx.meter = plan, meter
        return plan.run(x, meter)

    @staticmethod
    def backward(ctx, g):
        return ctx.plan.reverse().run(g, ctx.meter), None, None


def transpose_segments(counts_AB: Tensor) -> Tensor | None:
    """Gather index that turns rows laid out as segments (a, b) in a-major order into b-major order.

    counts_AB[a, b] is the length of segment (a, b). Returns None when the reorder is the identity.
    The inverse index is ``transpose_segments(counts_AB.t())``.
    """
    A, B = counts_AB.shape
    if A == 1 or B == 1:
        return None
    flat_AB = counts_AB.reshape(-1)
    starts_BA = (torch.cumsum(flat_AB, 0) - flat_AB).view(A, B).t().reshape(-1)
    counts_BA = counts_AB.t().reshape(-1)
    tgt_starts_BA = torch.cumsum(counts_BA, 0) - counts_BA
    total = int(flat_AB.sum())
    shift_R = torch.repeat_interleave(starts_BA - tgt_starts_BA, counts_BA, output_size=total)
    return shift_R + torch.arange(total, device=counts_AB.device)


class _Route:
    """The hops of one dispatch (kept so combine can run them backwards)."""

    def __init__(self):
        self.hops: list[tuple] = []

    def perm(self, counts_AB: Tensor, device=None) -> None:
        """Reorder (a, b)-major segments to b-major; the index lives on ``device`` (default: the counts')."""
        idx = transpose_segments(counts_AB)
        if idx is not None:
            inv = transpose_segments(counts_AB.t())
            if device is not None:
                idx, inv = idx.to(device), inv.to(device)
            self.hops.append(("perm", idx, inv))

    def a2a(self, group, send: list[int] | None, recv: list[int] | None) -> None:
        self.hops.append(("a2a", group, send, recv))

    def segments(self, plan: _SegmentPlan) -> None:
        self.hops.append(("p2p", plan))

    def forward(self, x: Tensor, meter: _Meter) -> Tensor:
        for hop in self.hops:
            x = self._apply(x, hop, meter, inverse=False)
        return x

    def inverse(self, y: Tensor, meter: _Meter) -> Tensor:
        for hop in reversed(self.hops):
            y = self._apply(y, hop, meter, inverse=True)
        return y

    @staticmethod
    def _apply(x: Tensor, hop: tuple, meter: _Meter, inverse: bool) -> Tensor:
        if hop[0] == "perm":
            _, idx, inv = hop
            return _Permute.apply(x, inv, idx) if inverse else _Permute.apply(x, idx, inv)
        if hop[0] == "p2p":
            return _SegmentExchange.apply(x, hop[1].reverse() if inverse else hop[1], meter)
        _, group, send, recv = hop
        return _AllToAll.apply(x, group, send, recv, meter) if inverse else _AllToAll.apply(x, group, recv, send, meter)


class AllToAllDispatcher:
    """Expert-parallel :class:`~raymoe.platform.moe.dispatch.TokenDispatcher`: rows go to the rank that holds
    their expert and come back after.

    ``ep_group``: the process group of this rank's EP group (ranks ordered by EP rank); expert placement is
    contiguous (EP rank r holds global experts r*El .. (r+1)*El - 1). ``hierarchical`` selects the two-phase
    intra-node / inter-node route; it needs ``intra_group`` (the ``ranks_per_node`` ranks of this node inside
    the EP group, ordered by local index) and ``inter_group`` (the ranks with this local index on every node
    of the EP group, ordered by node); with one node or one rank per node it is the flat route.
    ``exchange`` (flat route): "all_to_all" (one ``all_to_all_single`` + re-sort), "source_order" (the same
    without the re-sort: rows reach the experts in (source rank, expert) segments), "p2p" (segments straight
    to their places) or "auto" (source_order on CPU, all_to_all on GPUs; decided by the device, so every
    rank agrees).
    ``uniform_tokens``: the caller promises that every rank of the EP group runs each forward with the same
    number of tokens and no token mask (the trainer's equal micro-batches; DeepSpeed assumes it always).
    Drop mode then sizes the fixed [E, C, D] exchange from the local capacity without asking the peers;
    otherwise ``plan_layout`` first agrees on the slot count with an all-reduce (a mismatched fixed-size
    all-to-all aborts the process rather than raising).
    The layer applies the gate weights after ``combine`` (``folds_gate`` is False): the experts' rows come
    from every rank, in an order the sender's gate weights do not follow.
    ``timer``: a clock (seconds) read around every collective; on CUDA pass one that synchronizes if the
    collective time itself is wanted. ``comm_seconds`` / ``comm_bytes`` accumulate over forward and
    backward exchanges until the caller resets them.
    """

    EXCHANGES = ("auto", "all_to_all", "source_order", "p2p")

    def __init__(self, ep_group, ep_size: int, ep_rank: int, num_experts: int, *, hierarchical: bool = False,
                 ranks_per_node: int | None = None, timer: Callable[[], float] | None = None,
                 intra_group=None, inter_group=None, exchange: str = "auto",
                 uniform_tokens: bool = False):
        if exchange not in self.EXCHANGES:
            raise ValueError(f"exchange={exchange!r}; allowed: {list(self.EXCHANGES)}")
        self.exchange = exchange
        self.uniform_tokens = bool(uniform_tokens)
        self.last_route = None  # "all_to_all", "source_order", "p2p" or "hierarchical" (tests, benchmarks)
        require_ep_divides(ep_size, num_experts)
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank}: must be in [0, ep_size={ep_size})")
        self.group = ep_group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        El = self.num_local_experts
        self.local_expert_ids = list(range(ep_rank * El, (ep_rank + 1) * El))
        self.timer = timer or time.perf_counter
        self.comm_seconds = 0.0
        self.comm_bytes = 0
        self.hierarchical = hierarchical and self._check_hierarchical(ranks_per_node, intra_group, inter_group)
        self.ranks_per_node = ranks_per_node
        self.intra_group, self.inter_group = intra_group, inter_group
        self._meter = _Meter(self)
        self._routes: list[_Route] = []
        self._group_max_count = None  # largest per-expert count in the group, set by every dispatch()

    def _check_hierarchical(self, P, intra_group, inter_group) -> bool:
        """Whether the two-phase route applies: an EP group of several nodes with several ranks each."""
        if P is None or P < 1:
            raise ValueError(f"hierarchical all-to-all needs ranks_per_node >= 1; got {P!r}")
        if P == 1 or P >= self.ep_size:
            return False
        if self.ep_size % P:
            raise ValueError(f"ranks_per_node={P} must divide ep_size={self.ep_size} for the hierarchical "
                             "all-to-all (EP groups made of whole nodes)")
        if intra_group is None or inter_group is None:
            raise ValueError("hierarchical all-to-all needs intra_group and inter_group "
                             "(see raymoe.platform.parallel.build_process_groups)")
        return True

    # -- dispatcher interface -----------------------------------------------------------------------------
    folds_gate = False

    def plan_layout(self, plan: DispatchPlan, capacity: int | None, *, capacity_factor: float,
                    min_fill: float | None, masked: bool) -> int | None:
        """Slots per expert C, or None for variable segments; the same on every rank of the group.

        No rank can see the others' fill, so the choice is static: drop mode with a capacity factor at most
        1/min_fill (the fill can be no higher than 1/cf) sends the fixed slots with C = the capacity, no
        count exchange (DeepSpeed's exchange at cf 1.0); dropless, cf 1.25 or cf 2.0 send variable splits that
        carry only the kept rows. Ranks size their slot buffers alike even if their token counts differ
        (an all-reduce max of the capacity, skipped when ``uniform_tokens`` promises equal unmasked
        forwards); drops still follow each rank's own capacity, as in DeepSpeed."""
        fill = EP_MIN_FILL if min_fill is None else min_fill
        if capacity is None or capacity_factor * fill > 1.0:
            return None
        if masked or not self.uniform_tokens:
            return int(self.all_reduce_max(torch.tensor(capacity, device=plan.counts_E.device)))
        return capacity

    def group_capacity(self, counts_E: Tensor) -> int:
        """Largest per-expert count over the EP group: learned from the count exchange of this forward's
        ``dispatch`` (no collective of its own), else an all-reduce max."""
        group_max, self._group_max_count = self._group_max_count, None
        if group_max is None:
            group_max = self.all_reduce_max(counts_E.max())
        return int(group_max)

    def dispatch(self, x_MD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
        """Rows sorted by global expert + per-global-expert counts -> (rows of the local experts sorted by
        local expert, per-local-expert counts [El]); on the source-order route (rows in (source rank, local
        expert) order) the counts are [Q, El] (`GroupedExperts.forward` takes both)."""
        if counts_E.numel() != self.num_experts:
            raise ValueError(f"counts_E has {counts_E.numel()} entries, expected num_experts={self.num_experts}")
        counts_E = counts_E.to(torch.long)
        if self.hierarchical:
            route, counts_loc = self._plan_hierarchical(counts_E)
        else:
            route, counts_loc = self._plan_flat(counts_E, x_MD)
        self._routes.append(route)
        return route.forward(x_MD, self._meter), counts_loc

    def combine(self, y_RD: Tensor) -> Tensor:
        """Inverse of the last ``dispatch``: expert outputs back to the rows' ranks, in dispatch's order."""
        if not self._routes:
            raise RuntimeError("combine() called without a matching dispatch()")
        return self._routes.pop().inverse(y_RD, self._meter)

    def dispatch_capacity(self, x_ECD: Tensor) -> Tensor:
        """Capacity layout: [E, C, D] slots of all global experts -> [Q, El, C, D], the slots of this rank's
        experts from every EP rank (source-rank-major, the order ``all_to_all_single`` delivers: no re-sort).
        Every split is El*C rows, known to all ranks: no count exchange (DeepSpeed-MoE's drop-mode exchange)."""
        E, C, D = x_ECD.shape
        Q, El = self.ep_size, self.num_local_experts
        if E != self.num_experts:
            raise ValueError(f"x_ECD has {E} experts, expected num_experts={self.num_experts}")
        if self.hierarchical:
            C_QQE = torch.full((Q, Q, El), C, dtype=torch.long, device=x_ECD.device)
            route, _ = self._hierarchical_route(C_QQE, expert_major=False)
        else:
            self.last_route = "all_to_all"
            route = _Route()
            route.a2a(self.group, None, None)  # equal splits on every rank: the plain all-to-all
        self._routes.append(route)
        return route.forward(x_ECD.reshape(E * C, D), self._meter).view(Q, El, C, D)

    def combine_capacity(self, y_QECD: Tensor) -> Tensor:
        """Inverse of the last ``dispatch_capacity``: [Q, El, C, D] -> [E, C, D] in this rank's slot order."""
        if not self._routes:
            raise RuntimeError("combine_capacity() called without a matching dispatch_capacity()")
        Q, El, C, D = y_QECD.shape
        return self._routes.pop().inverse(y_QECD.reshape(Q * El * C, D), self._meter).view(Q * El, C, D)

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """Max of ``t`` over the EP group (the slot count of the capacity layout, the dropless capacity)."""
        out = t.detach().reshape(-1).clone()
        self._meter.run(lambda: dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group))
        return out.reshape(t.shape)

    # -- routes -------------------------------------------------------------------------------------------
    def _plan_flat(self, counts_E: Tensor, x_MD: Tensor) -> tuple[_Route, Tensor]:
        Q, El = self.ep_size, self.num_local_experts
        # One all_to_all_single of the counts; the splits are made from Python lists (two host reads). An
        # extra column carries the largest per-expert count, so dropless layers learn the group's capacity
        # here instead of from an all-reduce of their own (``group_capacity``).
        local_max = counts_E.max() if counts_E.numel() else counts_E.new_zeros(())
        send_QE1 = torch.cat([counts_E.view(Q, El), local_max.expand(Q, 1)], 1).contiguous()
        recv_QE1 = torch.empty_like(send_QE1)
        self._meter.run(lambda: dist.all_to_all_single(recv_QE1, send_QE1, group=self.group))
        recv = recv_QE1.tolist()
        self._group_max_count = max(r[El] for r in recv)
        recv_QE = [r[:El] for r in recv]
        counts = counts_E.tolist()
        route = _Route()
        kind = self.exchange if self.exchange != "auto" else (
            "source_order" if x_MD.device.type == "cpu" else "all_to_all")
        self.last_route = kind
        if kind == "p2p":
            route.segments(self._segment_plan(counts, recv_QE))
        else:
            send_split = [sum(counts[q * El:(q + 1) * El]) for q in range(Q)]
            route.a2a(self.group, send_split, [sum(r) for r in recv_QE])
            if kind == "all_to_all":
                route.perm(torch.tensor(recv_QE, dtype=torch.long), device=x_MD.device)
            elif Q > 1 and El > 1:  # source order differs from expert order: the experts get [Q, El] counts
                return route, torch.tensor(recv_QE, dtype=torch.long, device=counts_E.device)
        counts_loc = torch.tensor([sum(r[e] for r in recv_QE) for e in range(El)], dtype=torch.long)
        return route, counts_loc.to(counts_E.device)

    def _segment_plan(self, counts: list[int], recv_QE: list[list[int]]) -> _SegmentPlan:
        """Segment (me -> q, local expert e) goes to q's row offset of (e, me) in expert-major order."""
        Q, El, me = self.ep_size, self.num_local_experts, self.ep_rank
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        dst_EQ, off = [[0] * Q for _ in range(El)], 0
        for e in range(El):
            for q in range(Q):
                dst_EQ[e][q] = off
                off += recv_QE[q][e]
        sends, recvs, local = [], [], []
        for q in range(Q):
            for e in range(El):
                g, n_out, n_in = q * El + e, counts[q * El + e], recv_QE[q][e]
                if q == me:
                    if n_out:
                        local.append((starts[g], dst_EQ[e][me], n_out))
                    continue
                if n_out:
                    sends.append((q, starts[g], n_out, e))
                if n_in:
                    recvs.append((q, dst_EQ[e][q], n_in, e))
        return _SegmentPlan(self.group, starts[-1], off, sends, recvs, local)

    def _plan_hierarchical(self, counts_E: Tensor) -> tuple[_Route, Tensor]:
        Q, El = self.ep_size, self.num_local_experts
        # Every rank needs the whole count matrix C[src, dst, e] to lay out both phases.
        parts = [torch.empty_like(counts_E) for _ in range(Q)]
        self._meter.run(lambda: dist.all_gather(parts, counts_E.contiguous(), group=self.group))
        C_QQE = torch.stack(parts).view(Q, Q, El)
        self._group_max_count = int(C_QQE.max())
        return self._hierarchical_route(C_QQE, expert_major=True)

    def _hierarchical_route(self, C_QQE: Tensor, expert_major: bool) -> tuple[_Route, Tensor]:
        """Both phases from the count matrix; rows end in (source rank, local expert) order, re-sorted to
        local-expert-contiguous order if ``expert_major``."""
        Q, El, P = self.ep_size, self.num_local_experts, self.ranks_per_node
        N = Q // P
        node, local = divmod(self.ep_rank, P)
        Csum_QQ = C_QQE.sum(2)
        # phase 1 (intra-node): my rows, sorted by destination (n', j), go to local rank j in (j, n') order.
        mine_NP = Csum_QQ[self.ep_rank].view(N, P)
        # rows received from local rank i' of my node, destined to (n', local): R1[i', n']
        src_rows = node * P + torch.arange(P, device=C_QQE.device)
        R1_PN = Csum_QQ[src_rows].view(P, N, P)[:, :, local]
        # phase 2 (inter-node): received from node n'' (all its local ranks i'') for me: C[(n'', i''), me, e]
        mine_QE = C_QQE[:, self.ep_rank, :].contiguous()
        self.last_route = "hierarchical"
        send1, recv1, send2, recv2 = (mine_NP.sum(0).tolist(), R1_PN.sum(1).tolist(), R1_PN.sum(0).tolist(),
                                      mine_QE.view(N, P * El).sum(1).tolist())
        route = _Route()
        route.perm(mine_NP)
        route.a2a(self.intra_group, send1, recv1)
        route.perm(R1_PN)
        route.a2a(self.inter_group, send2, recv2)
        if expert_major:
            route.perm(mine_QE)
        return route, mine_QE.sum(0)
