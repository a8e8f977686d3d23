"""The coordinator's view of its shards: placement, forming a world, calling every shard, liveness.

A world is formed (and re-formed after a membership change) by ordering the shards so that shards on one node
get consecutive ranks, planning the expert-parallel size of every MoE layer for that world size (the one place:
`raymoe.platform.parallel.ParallelLayout.plan`), handing out a fresh rendezvous and starting every shard.
"""

from __future__ import annotations

import time

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.config import RaymoeConfig
from raymoe.platform.parallel import ParallelLayout

from .shard_state import memory_limit

SHARD_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError,
                  ray.exceptions.ActorUnavailableError)


def rank_order(infos: list[dict]) -> list[int]:
    """Shard indices ordered so that shards on one node get consecutive ranks (node order of first sight)."""
    first_seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        first_seen.setdefault(info["node_id"], i)
    return sorted(range(len(infos)), key=lambda i: (first_seen[infos[i]["node_id"]], i))


def plan_ep_sizes(cfg: RaymoeConfig, experts_per_layer: dict[int, int], world: int) -> dict[int, int]:
    """Expert-parallel size per MoE layer for ``world`` shards from ``cluster.ep_size``; an elastic run whose
    configured size no longer fits the world falls back to 'auto' for it instead of failing."""
    c = cfg.cluster
    try:
        return ParallelLayout.plan(experts_per_layer, world, c.ep_size, fallback_to_auto=c.elastic).ep_sizes
    except ValueError as exc:
        raise ValueError(f"cluster.ep_size={c.ep_size!r} with cluster.num_workers={world}: {exc}") from None


def remove_placement_groups(prefix: str) -> int:
    """Remove the placement groups named ``<prefix>/...`` that still exist; returns how many. A placement group
    outlives the actor that made it (it belongs to the job), so when a coordinator's process dies the driver
    frees what it reserved; its shards died with it."""
    removed = 0
    for pg_id, info in placement_group_table().items():
        if (info.get("name") or "").startswith(prefix + "/") and info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            removed += 1
    return removed


class ShardGroup:
    """The shards of one run and their placement groups (see the module docstring).

    ``shard_cls``: the actor class factory ``(num_cpus, num_gpus) -> actor class`` (injected: benchmarks pass
    no-op shards); ``coordinator``: the handle the shards report to.
    """

    def __init__(self, cfg: RaymoeConfig, cfg_dict: dict, shard_cls, coordinator=None, pg_prefix: str | None = None):
        self.cfg, self.cfg_dict, self.shard_cls, self.coordinator = cfg, cfg_dict, shard_cls, coordinator
        self.pg_prefix = pg_prefix  # placement groups are named <pg_prefix>/<n>: see remove_placement_groups
        self._pgs_made = 0
        self.shards: list = []
        self.infos: list[dict] = []
        self.world = 0
        self.ep_sizes: dict[int, int] = {}
        self.expert_sets: list[set] = []
        self.world_id: str | None = None  # the rendezvous address the world formed at (shards tag copies with it)
        self.pg = None
        self.extra_pgs: list = []
        self._slot_of: dict[str, tuple] = {}  # actor id -> (placement group, bundle index) it was placed in
        self._used_slots: set[tuple] = set()  # bundles that held a shard of a formed world
        self._inflight: list = []
        self.join_faults = 0  # test hook: this many of the next added shards exit while they join

    # -- placement ----------------------------------------------------------------------------------------
    def _placement_group(self, n: int):
        name = "" if self.pg_prefix is None else f"{self.pg_prefix}/{self._pgs_made}"
        self._pgs_made += 1
        return placement_group([self.bundle() for _ in range(n)], strategy=self.cfg.cluster.placement_strategy,
                               name=name)

    def bundle(self) -> dict:
        """One shard's resources: CPUs, GPUs, and Ray's ``memory`` when ``cluster.memory_per_worker_gb`` is set."""
        c = self.cfg.cluster
        mem = memory_limit(self.cfg)
        return {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {}),
                **({"memory": mem} if mem else {})}

    def _new_shard(self, pg, bundle_index: int):
        c = self.cfg.cluster
        mem = memory_limit(self.cfg)
        shard = self.shard_cls(c.cpus_per_worker, c.gpus_per_worker).options(
            **({"memory": mem} if mem else {}),  # the actor claims its bundle's memory
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle_index)).remote(self.cfg_dict)
        self._slot_of[shard._actor_id.hex()] = (pg, bundle_index)
        return shard

    def free_slots(self) -> list[tuple]:
        """Reserved bundles that hold no live shard of the world (their shard died or was let go): a lost
        shard's replacement goes there, so the run never holds resources it does not use."""
        held = {self._slot_of.get(s._actor_id.hex()) for s in self.shards}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        free = []
        for pg in ([self.pg] if self.pg is not None else []) + self.extra_pgs:
            # only bundles placed on a live node: one whose node is gone waits for Ray to re-place it
            placed = placement_group_table(pg).get("bundles_to_node_id", {})
            free += [(pg, i) for i, node in placed.items() if node in alive and (pg, i) not in held]
        return free

    def is_replacement(self, shard) -> bool:
        """Whether ``shard`` sits in a bundle that held a shard of an earlier world (it replaces one lost or let
        go), rather than on resources the run had not used."""
        return self._slot_of.get(shard._actor_id.hex()) in self._used_slots

    def create(self, n: int) -> list:
        """Reserve one placement group of ``n`` bundles and start a shard in each."""
        self.pg = self._placement_group(n)
        ray.get(self.pg.ready(), timeout=self.cfg.cluster.start_timeout_s)
        return [self._new_shard(self.pg, i) for i in range(n)]

    def add(self, n: int) -> list:
        """Up to ``n`` new shards: first in the reserved bundles no live shard holds, then on free resources
        (one placement group each); fewer if they cannot be placed within seconds."""
        placed = [self._new_shard(pg, i) for pg, i in self.free_slots()[:n]]
        new = self._started(placed, timeout=30)
        for _ in range(n - len(new)):
            pg = self._placement_group(1)
            try:
                ray.get(pg.ready(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                break
            self.extra_pgs.append(pg)
            new.append(self._new_shard(pg, 0))
        for shard in new[:self.join_faults]:
            ray.get(shard.inject_fault.remote("start", 0), timeout=30)
        self.join_faults -= min(self.join_faults, len(new))
        return new

    @staticmethod
    def _started(shards: list, timeout: float) -> list:
        """The ``shards`` that start within ``timeout`` (started together); the others are killed (e.g. their
        bundle's node went away before Ray re-placed it)."""
        refs = [s.node_info.remote() for s in shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        started = []
        for shard, ref in zip(shards, refs):
            try:
                if ref in ready:
                    ray.get(ref)
                    started.append(shard)
                    continue
            except ray.exceptions.RayActorError:
                pass
            ray.kill(shard, no_restart=True)
        return started

    def room(self) -> int:
        """How many more shards fit: the reserved bundles without a shard plus the cluster's free resources."""
        c = self.cfg.cluster
        free = ray.available_resources()
        n = int(free.get("CPU", 0) // c.cpus_per_worker)
        if c.gpus_per_worker:
            n = min(n, int(free.get("GPU", 0) // c.gpus_per_worker))
        if mem := memory_limit(self.cfg):
            n = min(n, int(free.get("memory", 0) // mem))
        return max(n, 0) + len(self.free_slots())

    # -- calling the shards -------------------------------------------------------------------------------
    def gather(self, refs: list, timeout: float | None = None) -> list:
        """ray.get that fails as soon as one shard's call fails (not when the slowest survivor times out)."""
        self._inflight = refs
        timeout = timeout or self.cfg.cluster.collective_timeout_s
        deadline = time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ray.exceptions.GetTimeoutError(f"shards did not answer within {timeout}s")
            ray.get(ready[0])  # raises the shard's failure right away
        return ray.get(refs)

    def track(self, refs: list) -> None:
        """Remember ``refs`` as the calls in flight (``settle`` waits for them after a failure)."""
        self._inflight = refs

    def settle(self, timeout: float) -> None:
        """Wait (bounded) until every call of the failed operation has returned or failed."""
        if self._inflight:
            ray.wait(self._inflight, num_returns=len(self._inflight), timeout=timeout)

    def alive(self, shards: list) -> list:
        """The shards that answer a health check; the others are killed (their bundles freed)."""
        alive = []
        for s in shards:
            try:
                ray.get(s.check_health.remote(), timeout=10)
                alive.append(s)
            except Exception:
                ray.kill(s, no_restart=True)
        return alive

    @staticmethod
    def kill(shards: list) -> None:
        for s in shards:
            ray.kill(s, no_restart=True)

    # -- forming the world --------------------------------------------------------------------------------
    def form(self, shards: list, experts_per_layer: dict[int, int], state_ref=None, step: int = 0,
             ckpt_path: str | None = None) -> dict:
        """(Re)form the world from ``shards``: ranks ordered by node, EP sizes for this world size, a fresh
        rendezvous; ``state_ref`` (an ObjectRef of the old world's published pieces, see
        ``Elastic._publish``: each shard fetches those it needs) or ``ckpt_path`` restores the state. Raises a
        SHARD_FAILURES error if a shard dies meanwhile."""
        c = self.cfg.cluster
        infos = ray.get([s.node_info.remote() for s in shards], timeout=c.start_timeout_s)
        order = rank_order(infos)
        shards, infos = [shards[i] for i in order], [infos[i] for i in order]
        world = len(shards)
        per_node: dict[str, int] = {}
        for info in infos:
            per_node[info["node_id"]] = per_node.get(info["node_id"], 0) + 1
        ranks_per_node = c.ranks_per_node or (min(per_node.values()) if len(set(per_node.values())) == 1
                                              else None)
        ep_sizes = plan_ep_sizes(self.cfg, experts_per_layer, world)
        port = ray.get(shards[0].free_port.remote(), timeout=c.start_timeout_s)
        init_method = f"tcp://{infos[0]['ip']}:{port}"
        self.shards, self.infos, self.world, self.ep_sizes = shards, infos, world, ep_sizes
        self.world_id = init_method
        self._used_slots |= {self._slot_of.get(s._actor_id.hex()) for s in shards}
        buddies = [shards[(r + 1) % world] if c.buddy_interval and world > 1 else None for r in range(world)]
        started = self.gather([s.start.remote(init_method, r, world, ep_sizes, ranks_per_node, state_ref, step,
                                              self.coordinator, buddies[r])
                               for r, s in enumerate(shards)], timeout=c.start_timeout_s)
        if ckpt_path is not None:
            self.gather([s.load.remote(str(ckpt_path)) for s in shards], timeout=c.start_timeout_s)
        self.expert_sets = [{(int(lid), g) for lid, ids in st["experts"].items() for g in ids} for st in started]
        return {"world": world, "ep_sizes": ep_sizes, "ranks_per_node": ranks_per_node,
                "nodes": len(per_node), "shards": started}

    def shutdown(self) -> None:
        """Tear down the process groups, the shards and the placement groups."""
        if self.shards:
            try:
                ray.get([s.shutdown.remote() for s in self.shards], timeout=30)
            except Exception:  # a shard that is already gone cannot tear down; kill it below
                pass
            for s in self.shards:
                ray.kill(s)
            self.shards = []
        for pg in ([self.pg] if self.pg is not None else []) + self.extra_pgs:
            remove_placement_group(pg)
        self.pg, self.extra_pgs = None, []
