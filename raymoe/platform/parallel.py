"""Expert parallelism around the single-device model: layout, process groups, dispatchers, gradient sync.

Every rank is a data-parallel rank (it reads its own slice of the global batch). A layer with ``ep`` experts
-parallel degree splits its experts over the ``ep`` contiguous ranks of an EP group; the ``world / ep``
ranks holding the same experts (strided ranks) form an expert-data-parallel (EDP) group (DeepSpeed's layout).

Equivalence with EP=1 data parallelism (the tests check it to 1e-5):

- Gradients: the step's loss is the mean over the N micro-batches of the global batch, however they are spread
  over the ranks (``data.micro_batch_assignment``: counts differing by at most one). Each rank weights each of
  its micro-batch losses by 1/N (``train_step(total_micro_batches=N)``), so the sum over the ranks is the
  gradient of the mean. Dense grads: all-reduce (sum) over the world, no other factor. Expert grads: the
  all-to-all backward already delivers to the owner of expert e the contributions of every rank of its EP
  group; the all-reduce (sum) over the EDP group (one rank per EP group) completes the sum over all W ranks,
  again with no factor, whatever the EP size.
- Lockstep: each pass (forward + backward) runs collectives on the EP groups (and FSDP's on its meshes), so
  every rank runs the same number of passes, ceil(N / W); a rank with fewer micro-batches runs padding passes
  of weight 0 (``train_step(padding=...)``) that add nothing to gradients, metrics or expert loads. Capacity
  is per source rank and pass, so a peer's padding tokens never change which of a real micro-batch's tokens
  are dropped.
- Gradient norm: dense norm^2 + the norm^2 of every expert counted once (each EDP replica contributes 1/edp).
- Expert-bias buffers (aux-loss-free balancing): ``update_expert_bias`` uses the loads accumulated since the
  last update; the gradient sync all-reduces those loads (``expert_load``, sum over the world) first, so every
  rank applies the same update as an EP=1 run seeing the whole global batch, and the biases stay identical.
- Router noise (jitter, gumbel, RTS priorities) comes from torch's global RNG. :func:`seed_router_noise`
  reseeds it per micro-batch with ``micro_batch_seed(seed, step, first + i)``: ``first`` is the index in the
  global batch of the rank's first micro-batch (``data.micro_batch_assignment``), so a rank of an EP=2 run, an
  EP=1 run, a world of 3 and a world-1 run accumulating the same micro-batches draw the same numbers.

The exchange itself (flat all_to_all_single + re-sort, point-to-point segments, hierarchical two-phase) is
:class:`raymoe.platform.moe.comm.AllToAllDispatcher`. Nothing here imports ray; the actors call these
functions after ``init_process_group``: ``build_process_groups`` -> ``GPT(cfg, moe_kwargs=make_moe_kwargs(..))``
-> ``load_full_state_dict`` (or a checkpoint) -> per step ``seed_router_noise`` and
``train_step(grad_sync=make_grad_sync(..), grad_norm_fn=make_grad_norm(..))``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from raymoe.config import require_ep_divides
from raymoe.platform.moe.comm import AllToAllDispatcher
from raymoe.platform.moe.experts import iter_expert_params

__all__ = [
    "AllToAllDispatcher", "ParallelLayout", "ProcessGroups", "build_process_groups", "choose_ep_size",
    "expert_placement", "gather_full_state_dict", "load_full_state_dict", "make_grad_norm", "make_grad_sync",
    "make_moe_kwargs", "micro_batch_seed", "seed_router_noise", "total_comm_seconds", "reset_comm_stats",
]


# -- placement ---------------------------------------------------------------------------------------------
def expert_placement(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """Global expert ids held by EP rank ``ep_rank``: the contiguous block ep_rank*E/ep .. (ep_rank+1)*E/ep-1."""
    require_ep_divides(ep_size, num_experts)
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank}: must be in [0, {ep_size})")
    n = num_experts // ep_size
    return list(range(ep_rank * n, (ep_rank + 1) * n))


def choose_ep_size(num_experts: int, world: int, max_ep: int | None = None) -> int:
    """Largest divisor of ``world`` that divides ``num_experts`` (and is <= max_ep); 1 at worst."""
    if num_experts < 1 or world < 1:
        raise ValueError(f"num_experts={num_experts}, world={world}: both must be >= 1")
    limit = min(world, num_experts, max_ep if max_ep is not None else world)
    return max(d for d in range(1, max(limit, 1) + 1) if world % d == 0 and num_experts % d == 0)


@dataclass
class ParallelLayout:
    """World size and expert-parallel degree per MoE layer id (layers not listed run with ep 1).

    ``num_experts`` (optional, {layer id: experts}) lets the constructor check divisibility up front.
    """

    world_size: int
    ep_sizes: dict[int, int]
    num_experts: dict[int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size={self.world_size!r}: must be an int >= 1")
        self.ep_sizes = {int(k): int(v) for k, v in self.ep_sizes.items()}
        for layer, ep in self.ep_sizes.items():
            if ep < 1 or self.world_size % ep:
                raise ValueError(f"layer {layer}: ep_size={ep} must be >= 1 and divide world_size={self.world_size}")
            if self.num_experts is not None and layer in self.num_experts:
                self.check_layer(layer, self.num_experts[layer])

    @classmethod
    def plan(cls, experts_per_layer: dict[int, int], world_size: int,
             ep_size: int | list[int] | dict[int, int] | str | None = None, *, max_ep: int | None = None,
             fallback_to_auto: bool = False) -> "ParallelLayout":
        """The expert-parallel degree of every MoE layer: the one place a layout is resolved (training, elastic
        re-forming, resharding, serving).

        ``ep_size``: None or "auto" (per layer the largest degree that divides both ``world_size`` and the
        layer's experts, :func:`choose_ep_size`), an int for every layer, a list with one entry per MoE layer in
        layer order, or a {layer id: degree} dict. ``fallback_to_auto``: a requested degree that does not fit
        this world (an elastic world after losing or gaining ranks) becomes "auto" instead of an error.
        """
        layers = sorted(experts_per_layer)
        if ep_size is None or ep_size == "auto":
            wanted = None
        elif isinstance(ep_size, dict):
            unknown = sorted(set(ep_size) - set(layers))
            if unknown:
                raise ValueError(f"ep_size names layers {unknown} that are not MoE layers; MoE layers: {layers}")
            wanted = {lid: int(ep_size.get(lid, 1)) for lid in layers}
        elif isinstance(ep_size, (list, tuple)):
            if len(ep_size) != len(layers):
                raise ValueError(f"ep_size has {len(ep_size)} entries but there are {len(layers)} MoE layers "
                                 f"{layers}: give one entry per MoE layer, one int, or 'auto'")
            wanted = {lid: int(e) for lid, e in zip(layers, ep_size)}
        else:
            wanted = {lid: int(ep_size) for lid in layers}

        def fits(lid: int, e: int) -> bool:
            return e >= 1 and world_size % e == 0 and experts_per_layer[lid] % e == 0

        if wanted is not None and fallback_to_auto and not all(fits(lid, e) for lid, e in wanted.items()):
            wanted = None
        if wanted is None:
            wanted = {lid: choose_ep_size(experts_per_layer[lid], world_size, max_ep) for lid in layers}
        return cls(world_size, wanted, dict(experts_per_layer))

    @classmethod
    def from_config(cls, config, world_size: int, ep_size: int | dict[int, int] | None = None,
                    max_ep: int | None = None) -> "ParallelLayout":
        """:meth:`plan` for a GPTConfig's MoE layers."""
        return cls.plan(config.experts_per_layer(), world_size, ep_size, max_ep=max_ep)

    def ep_size(self, layer_id: int) -> int:
        return self.ep_sizes.get(layer_id, 1)

    def edp_size(self, layer_id: int) -> int:
        return self.world_size // self.ep_size(layer_id)

    def check_layer(self, layer_id: int, num_experts: int) -> None:
        ep = self.ep_size(layer_id)
        if num_experts % ep:
            raise ValueError(f"layer {layer_id}: ep_size={ep} must divide its num_experts={num_experts} "
                             f"(world_size={self.world_size})")

    def distinct_ep_sizes(self) -> list[int]:
        return sorted(set(self.ep_sizes.values()) | {1})


# -- process groups ----------------------------------------------------------------------------------------
@dataclass
class ProcessGroups:
    """This rank's groups. Group handles are None for single-rank groups (no collective needed) and
    ``dist.group.WORLD`` for whole-world groups. Keys are EP sizes."""

    world_size: int
    rank: int
    ranks_per_node: int | None = None
    ep: dict[int, object] = field(default_factory=dict)
    ep_ranks: dict[int, list[int]] = field(default_factory=dict)
    edp: dict[int, object] = field(default_factory=dict)
    edp_ranks: dict[int, list[int]] = field(default_factory=dict)
    intra: dict[int, object] = field(default_factory=dict)  # hierarchical: my node's ranks in my EP group
    inter: dict[int, object] = field(default_factory=dict)  # hierarchical: my local index on every node
    world: object = None
    expert_replica_index: dict[int, int] = field(default_factory=dict)  # layer id -> index in its EDP group

    def ep_rank(self, ep_size: int) -> int:
        return self.rank % ep_size

    @property
    def is_first_expert_replica(self) -> bool:
        """True when this rank is the first EDP replica for every MoE layer (it may write all its experts)."""
        return all(i == 0 for i in self.expert_replica_index.values())


def _group_lists(layout: ParallelLayout, ranks_per_node: int | None) -> list[tuple[str, int, list[int]]]:
    """Every group of the layout as (kind, ep, ranks), in one deterministic order."""
    W = layout.world_size
    out = []
    for ep in layout.distinct_ep_sizes():
        out += [("ep", ep, list(range(g * ep, (g + 1) * ep))) for g in range(W // ep)]
        out += [("edp", ep, list(range(j, W, ep))) for j in range(ep)]
        P = ranks_per_node
        if P and 1 < P < ep and ep % P == 0:
            for g in range(W // ep):
                base = g * ep
                out += [("intra", ep, [base + n * P + i for i in range(P)]) for n in range(ep // P)]
                out += [("inter", ep, [base + n * P + j for n in range(ep // P)]) for j in range(P)]
    return out


def build_process_groups(layout: ParallelLayout, rank: int, ranks_per_node: int | None = None,
                         timeout=None) -> ProcessGroups:
    """Create the EP / EDP (and hierarchical intra/inter-node) groups of ``layout``.

    ``dist.new_group`` is collective: every rank calls it for every distinct rank list in the same order
    (single-rank and whole-world lists create nothing). World size 1 needs no process group at all.
    """
    W = layout.world_size
    if not 0 <= rank < W:
        raise ValueError(f"rank={rank}: must be in [0, world_size={W})")
    if ranks_per_node is not None and (ranks_per_node < 1 or W % ranks_per_node):
        raise ValueError(f"ranks_per_node={ranks_per_node}: must be >= 1 and divide world_size={W}")
    if W > 1:
        if not dist.is_initialized():
            raise ValueError("build_process_groups needs torch.distributed initialized (init_process_group)")
        if dist.get_world_size() != W:
            raise ValueError(f"layout.world_size={W} != torch.distributed world size {dist.get_world_size()}")
    world = dist.group.WORLD if W > 1 else None
    pg = ProcessGroups(W, rank, ranks_per_node, world=world)
    made: dict[tuple[int, ...], object] = {}
    for kind, ep, ranks in _group_lists(layout, ranks_per_node):
        key = tuple(ranks)
        if key not in made:
            if len(ranks) == 1:
                made[key] = None
            elif len(ranks) == W:
                made[key] = world
            else:
                made[key] = dist.new_group(ranks, timeout=timeout) if timeout else dist.new_group(ranks)
        if rank in ranks:
            getattr(pg, kind)[ep] = made[key]
            if kind in ("ep", "edp"):
                getattr(pg, f"{kind}_ranks")[ep] = ranks
    for layer, ep in layout.ep_sizes.items():
        pg.expert_replica_index[layer] = rank // ep
    return pg


# -- the model's MoE arguments ----------------------------------------------------------------------------
class MoEKwargs:
    """``GPT(moe_kwargs=...)`` callable: per layer the dispatcher, ep_size and global expert ids."""

    def __init__(self, layout: ParallelLayout, groups: ProcessGroups, hierarchical: bool,
                 ranks_per_node: int | None, timer, exchange: str, uniform_tokens: bool = False):
        self.layout, self.groups = layout, groups
        self.uniform_tokens = uniform_tokens
        self.exchange = exchange
        self.hierarchical = hierarchical
        self.ranks_per_node = ranks_per_node if ranks_per_node is not None else groups.ranks_per_node
        self.timer = timer
        self.dispatchers: dict[int, AllToAllDispatcher] = {}

    def __call__(self, layer_id: int, num_experts: int) -> dict:
        self.layout.check_layer(layer_id, num_experts)
        ep = self.layout.ep_size(layer_id)
        if ep == 1:
            return {"ep_size": 1}
        ep_rank = self.groups.ep_rank(ep)
        hier = self.hierarchical and ep in self.groups.intra
        d = AllToAllDispatcher(self.groups.ep[ep], ep, ep_rank, num_experts, hierarchical=hier,
                               ranks_per_node=self.ranks_per_node, timer=self.timer,
                               intra_group=self.groups.intra.get(ep), inter_group=self.groups.inter.get(ep),
                               exchange=self.exchange, uniform_tokens=self.uniform_tokens)
        self.dispatchers[layer_id] = d
        return {"ep_size": ep, "dispatcher": d, "global_expert_ids": expert_placement(num_experts, ep, ep_rank)}


def make_moe_kwargs(layout: ParallelLayout, groups: ProcessGroups, *, hierarchical: bool = False,
                    ranks_per_node: int | None = None, timer: Callable[[], float] | None = None,
                    exchange: str = "auto", uniform_tokens: bool = False) -> MoEKwargs:
    """The ``moe_kwargs`` callable for ``GPT``: ep-1 layers keep the local dispatcher; the others get an
    :class:`AllToAllDispatcher` (hierarchical where the EP group spans several nodes of ``ranks_per_node``
    ranks and ``hierarchical`` is set; ``exchange`` picks the flat route, ``uniform_tokens`` promises equal
    forward sizes on every rank, see the dispatcher). ``.dispatchers`` maps layer id -> dispatcher."""
    if exchange not in AllToAllDispatcher.EXCHANGES:
        raise ValueError(f"exchange={exchange!r}; allowed: {list(AllToAllDispatcher.EXCHANGES)}")
    if hierarchical and not (ranks_per_node or groups.ranks_per_node):
        raise ValueError("hierarchical=True needs ranks_per_node (here or in build_process_groups)")
    if ranks_per_node and groups.ranks_per_node and ranks_per_node != groups.ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} differs from the groups' {groups.ranks_per_node}")
    return MoEKwargs(layout, groups, hierarchical, ranks_per_node, timer, exchange, uniform_tokens)


def total_comm_seconds(model: nn.Module) -> dict[int, float]:
    """{layer id: seconds in collectives} of the model's expert-parallel dispatchers."""
    return {m.layer_id: m.dispatcher.comm_seconds for m in model.moe_modules()
            if isinstance(m.dispatcher, AllToAllDispatcher)}


def reset_comm_stats(model: nn.Module) -> None:
    for m in model.moe_modules():
        if isinstance(m.dispatcher, AllToAllDispatcher):
            m.dispatcher.comm_seconds, m.dispatcher.comm_bytes = 0.0, 0


# -- gradient synchronisation ------------------------------------------------------------------------------
def _split_params(model: nn.Module, layout: ParallelLayout):
    """(dense params, {ep: expert params of layers with that ep}, FSDP-sharded params) in deterministic order;
    the first two hold only unsharded params (FSDP reduces the sharded ones itself)."""
    expert = {}
    by_ep: dict[int, list[nn.Parameter]] = {}
    sharded = [p for p in model.parameters() if p.requires_grad and isinstance(p, DTensor)]
    for _, p, layer, _ in iter_expert_params(model):
        if p.requires_grad and not isinstance(p, DTensor):
            expert[id(p)] = p
            by_ep.setdefault(layout.ep_size(layer), []).append(p)
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in expert and not isinstance(p, DTensor)]
    return dense, dict(sorted(by_ep.items())), sharded


def _buckets(params: list[nn.Parameter], cap_numel: int) -> list[list[nn.Parameter]]:
    out, cur, n = [], [], 0
    for p in params:
        if cur and (n + p.numel() > cap_numel or p.dtype != cur[0].dtype or p.device != cur[0].device):
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p.numel()
    return out + ([cur] if cur else [])


@torch.no_grad()
def _all_reduce_grads(params: list[nn.Parameter], group, cap_numel: int) -> None:
    for bucket in _buckets(params, cap_numel):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if group is not None:
            dist.all_reduce(flat, group=group)
        off = 0
        for p in bucket:
            n = p.numel()
            chunk = flat[off:off + n].view_as(p)
            if p.grad is None:
                if chunk.any():  # unused here but not everywhere; all-None stays None as with EP=1
                    p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            off += n


class GradSync:
    """``train_step(grad_sync=...)``: dense grads summed over the world, expert grads summed over the layer's
    EDP group (each rank's grads are already weighted by 1 / the global batch's micro-batches, see the module
    docstring), expert loads summed over the world. Parameters sharded by FSDP (:mod:`raymoe.platform.fsdp`)
    are reduced by FSDP the same way (a sum)."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, groups: ProcessGroups,
                 bucket_cap_mb: float = 64.0, sync_expert_load: bool = True):
        self.layout, self.groups = layout, groups
        self.model = model
        self.dense, self.expert_by_ep, _ = _split_params(model, layout)
        self.cap_numel = max(1, int(bucket_cap_mb * 2**20 / 4))
        self.sync_expert_load = sync_expert_load

    def __call__(self, model: nn.Module | None = None) -> None:
        W = self.layout.world_size
        if W == 1:
            return
        _all_reduce_grads(self.dense, self.groups.world, self.cap_numel)
        for ep, params in self.expert_by_ep.items():
            _all_reduce_grads(params, self.groups.edp[ep], self.cap_numel)
        if self.sync_expert_load:
            self._sync_loads()

    @torch.no_grad()
    def _sync_loads(self) -> None:
        loads = [m.expert_load for m in self.model.moe_modules() if getattr(m.gate, "use_expert_bias", False)]
        if loads:
            flat = torch.cat(loads)
            dist.all_reduce(flat, group=self.groups.world)
            for buf, part in zip(loads, flat.split([b.numel() for b in loads])):
                buf.copy_(part)


def make_grad_sync(model: nn.Module, layout: ParallelLayout, groups: ProcessGroups, **kw) -> GradSync:
    """The gradient-synchronisation hook for ``train_step`` (build it after the model, once)."""
    return GradSync(model, layout, groups, **kw)


class GradNorm:
    """``train_step(grad_norm_fn=...)``: the global L2 grad norm after :class:`GradSync`, each expert counted
    once: sum over the world of (dense^2 / W + sum_ep expert^2 / edp + this rank's FSDP shards^2), one scalar
    all-reduce (a sharded element lives on one rank of its mesh: counted once, no collective per parameter)."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, groups: ProcessGroups):
        self.layout, self.groups = layout, groups
        self.dense, self.expert_by_ep, self.sharded = _split_params(model, layout)

    @staticmethod
    def _sq(params, device) -> torch.Tensor:
        gs = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        if not gs:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(torch._foreach_norm(gs)).double().square().sum().to(device)

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        W = self.layout.world_size
        device = next((p.device for p in [*self.dense, *self.sharded]), torch.device("cpu"))
        # each rank adds dense^2 / W and its expert replicas' norm^2 / edp: the world sum counts all once
        local = self._sq(self.dense, device) / W + self._sq(self.sharded, device)
        for ep, params in self.expert_by_ep.items():
            local = local + self._sq(params, device) / (W // ep)
        if W > 1:
            local = local.reshape(1)
            dist.all_reduce(local, group=self.groups.world)
        return local.reshape(()).sqrt().float()


def make_grad_norm(model: nn.Module, layout: ParallelLayout, groups: ProcessGroups) -> GradNorm:
    """The global gradient-norm function for ``train_step(grad_norm_fn=...)`` (clipping uses it)."""
    return GradNorm(model, layout, groups)


# -- router noise seeds -------------------------------------------------------------------------------------
def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """RNG seed of global micro-batch ``index`` of ``step``: a hash, independent of world and EP sizes."""
    digest = hashlib.blake2b(f"raymoe-noise:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _NoiseSeeder:
    """Forward pre-hook: reseeds torch's RNG before each training-mode forward of the model."""

    def __init__(self, model: nn.Module):
        self.seed = self.step = self.first = 0
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.training:
            torch.manual_seed(micro_batch_seed(self.seed, self.step, self.first + self.count))
            self.count += 1


def seed_router_noise(seed: int, step: int, rank: int, *, model: nn.Module | None = None,
                      micro_batches: int | None = None, first: int | None = None) -> None:
    """Seed the router noise of this rank for ``step`` (call before each ``train_step``).

    Without ``model``: seeds torch's RNG once with ``micro_batch_seed(seed, step, rank)``; EP=1 and EP=N runs
    of the same world then draw the same numbers on every rank. With ``model`` and ``micro_batches`` (this
    rank's micro-batches per step): forward i of the step is seeded with ``micro_batch_seed(seed, step,
    first + i)``, ``first`` being the index in the global batch of this rank's first micro-batch
    (``data.micro_batch_assignment(...).start``; default ``rank * micro_batches``, the even split), so the draws
    are also independent of the world size (world 1 accumulating the same micro-batches). Padding passes
    after the rank's micro-batches draw from later seeds; their draws change nothing.
    """
    if model is None:
        torch.manual_seed(micro_batch_seed(seed, step, rank))
        return
    if micro_batches is None or micro_batches < 0:
        raise ValueError(f"micro_batches={micro_batches!r}: must be an int >= 0 when model is given")
    seeder = getattr(model, "_raymoe_noise_seeder", None)
    if seeder is None:
        seeder = _NoiseSeeder(model)
        model._raymoe_noise_seeder = seeder
    seeder.seed, seeder.step, seeder.count = seed, step, 0
    seeder.first = rank * micro_batches if first is None else first


# -- full (EP=1) state dicts -------------------------------------------------------------------------------
@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load an EP=1 state dict into a model holding a subset of experts (rows picked by global id)."""
    expert_names = {}
    for name, _, _, gids in iter_expert_params(model):
        expert_names[name] = gids
    sd = {}
    for name, t in model.state_dict().items():
        src = full[name]
        if name in expert_names:
            src = src[torch.as_tensor(expert_names[name], device=src.device)]
        sd[name] = src
    model.load_state_dict(sd)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, layout: ParallelLayout, groups: ProcessGroups) -> dict:
    """The EP=1 state dict (every expert, global order) on every rank; collective over the EP groups."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p, layer, _ in iter_expert_params(model):
        ep = layout.ep_size(layer)
        if ep > 1:
            parts = [torch.empty_like(p) for _ in range(ep)]
            dist.all_gather(parts, p.detach().contiguous(), group=groups.ep[ep])
            sd[name] = torch.cat(parts)
    return sd
