"""Membership changes: recover from lost shards, grow when resources appear.

Recovery keeps the survivors' state instead of restarting from disk. Every survivor tells how far the world got
(the last step whose record a rank holds); a survivor that already applied the next step's update undoes it.
The shards re-form a process group with expert-parallel sizes for the new world, and training resumes at that
step with the same global batch (each shard runs more or fewer micro-batches).
When no survivor holds a replica of a lost rank's part (its experts at EP = world, or its FSDP shards with
``cluster.dense_sharding`` / ``expert_sharding``: shard), each rank's buddy (the next rank) holds a copy of that
rank's shards, taken every ``cluster.buddy_interval`` steps right after the update: the survivors' own shards
and the lost ranks' copies, all at one step, are the whole state. With ``buddy_interval: 1`` that loses no step
unless a rank and its buddy are both lost; then, or without copies, the last checkpoint (the event says which
ranks had none).

How state moves, on every membership change (recovery, growth, replacement): the old world's state stays where
it is, as copies of its ranks' parts (a survivor's live state, its own copy, a lost rank's copy at its buddy).
The coordinator only learns which copy of which old rank at which step is where and what pieces each holds
(:meth:`Elastic._publish`): it picks one holder for every distinct piece (replicas once), each holder puts its
pieces into the object store itself (one per tensor, one per expert row of an expert entry), and the
coordinator hands every new shard the pieces' descriptions and references. Each new shard, built at its own
layout, fetches only the pieces that overlap its own tensors (:func:`raymoe.platform.reshard.assemble`). No
process ever holds the whole state, except a new world of one, whose share is the whole.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import ray

from raymoe.config import RaymoeConfig
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import metrics as M
from raymoe.platform.reshard import choose_sources, published

from .shard_group import SHARD_FAILURES, ShardGroup

MAX_RECOVERIES_PER_STEP = 3
GROWTH_RETRY_S = 60.0


def _object_lost(err: BaseException) -> bool:
    """Whether ``err`` (or, for a task's error, its cause) is an object Ray lost."""
    lost = ray.exceptions.ObjectLostError
    return isinstance(err, lost) or isinstance(getattr(err, "cause", None), lost)


def _nodes_gone(node_ids: set[str]) -> bool:
    """Whether any of ``node_ids`` is no longer an alive node of the cluster."""
    return bool(node_ids - {n["NodeID"] for n in ray.nodes() if n.get("Alive")})


class Elastic:
    """Recovery and growth of a :class:`ShardGroup` (see the module docstring).

    ``experts_per_layer``: the model's {layer id: experts}; ``ckpt_dir``: where the last checkpoint is;
    ``metrics``: a RayMetrics; ``on_event``: receives each membership event (the run log and the summary).
    """

    def __init__(self, cfg: RaymoeConfig, group: ShardGroup, experts_per_layer: dict[int, int], ckpt_dir: Path,
                 metrics, on_event: Callable[[dict], None]):
        self.cfg, self.group, self.experts_per_layer = cfg, group, experts_per_layer
        self.ckpt_dir, self.metrics, self.on_event = ckpt_dir, metrics, on_event
        self._recoveries_at: dict[int, int] = {}
        self._no_growth_until = 0.0  # after a growth that placed nobody, wait before trying again
        self._holder_nodes: set[str] = set()  # the nodes whose object stores hold the last published pieces

    def choose_world(self, available: int) -> int:
        """Largest world size <= ``available`` within [min_workers, max_workers]: the fewest shards left out.
        Any size splits the global batch (each shard runs a contiguous run of the step's micro-batches, counts
        differing by at most one, see ``raymoe.platform.data.micro_batch_assignment``) and finds an
        expert-parallel size for every layer (an elastic run's ``cluster.ep_size`` falls back to auto); with
        ``cluster.ranks_per_node`` set, the size is a multiple of it (its EP groups are made of whole nodes)."""
        c = self.cfg.cluster
        per_node = c.ranks_per_node or 1
        for w in range(min(available, c.max_workers or c.num_workers), c.min_workers - 1, -1):
            if w % per_node == 0:
                return w
        raise RuntimeError(f"cannot continue with {available} shard(s): need at least cluster.min_workers="
                           f"{c.min_workers}" + (f", a multiple of cluster.ranks_per_node={per_node}" if per_node > 1
                                                 else ""))

    def configure(self, shards: list, state_ref=None, step: int = 0, ckpt_path: str | None = None,
                  during: str = "start") -> dict:
        """Form the world from ``shards``, surviving shards that die while it forms: the survivors re-form from
        the same published state (:meth:`_publish`; or checkpoint) until it succeeds or too few shards are
        left. ``during`` names the membership change in the "reform" event of such a loss (start, recovery,
        restart, replace, grow). Published pieces lost meanwhile (a node that held some died: the old world's
        shards already dropped their state, so nothing else has it) send the world back to the latest
        checkpoint. Returns the world's info, with "step": the step it starts from, and "fallback":
        "checkpoint" or "scratch" when it had to fall back, else None."""
        g, fallback = self.group, None
        for attempt in range(MAX_RECOVERIES_PER_STEP + 1):
            try:
                info = g.form(shards, self.experts_per_layer, state_ref, step, ckpt_path)
                self.metrics.set(M.WORLD_SIZE, g.world)
                return {**info, "step": step, "fallback": fallback}
            except SHARD_FAILURES as err:
                if not self.cfg.cluster.elastic or attempt == MAX_RECOVERIES_PER_STEP:
                    raise
                g.settle(self.cfg.cluster.start_timeout_s)
                survivors = g.alive(shards)
                pieces_lost = state_ref is not None and (_object_lost(err) or _nodes_gone(self._holder_nodes))
                if len(survivors) == len(shards) and not pieces_lost:
                    raise  # nobody died: a real error, not a membership change
                if not survivors:
                    raise RuntimeError("every shard died while forming the world") from err
                keep = self.choose_world(len(survivors))
                g.kill(survivors[keep:])
                event = {"event": "reform", "during": during, "step": step, "joining": len(shards),
                         "lost_shards": len(shards) - len(survivors), "world": keep, "error": type(err).__name__}
                if pieces_lost:
                    ckpt_path, state_ref = ckpt.latest_checkpoint(self.ckpt_dir), None
                    fallback = "checkpoint" if ckpt_path else "scratch"
                    lost_from, step = step, ckpt.read_manifest(ckpt_path)["step"] if ckpt_path else 0
                    event.update(pieces_lost=True, resume_step=step, lost_steps=lost_from - step)
                    self.metrics.inc(M.LOST_STEPS_TOTAL, lost_from - step)
                self._event(event)
                shards = survivors[:keep]
                self.metrics.inc(M.RECOVERIES_TOTAL)
        raise AssertionError("unreachable")

    def _all_experts(self) -> set:
        return {(lid, g) for lid, n in self.experts_per_layer.items() for g in range(n)}

    def _publish(self, sources: list[tuple]):
        """ObjectRef of an old world's state as the new shards fetch it. ``sources``: (holder, kind, old rank,
        step) of copies that together hold all of it. Each holder describes its copy's pieces; one holder of
        each distinct piece (a replica from the holder with the least to publish so far) yields it, one object
        each, stored on the holder's node; only the descriptions and references come here (and pieces under
        Ray's inline limit, 100 KiB, which travel with their reference). The coordinator owns the pieces
        (returned to it), so they outlive a holder that dies while the new world forms, and go when this
        reference does."""
        g = self.group
        self._holder_nodes = {g.infos[g.shards.index(h)]["node_id"] for h, *_ in sources}
        layouts = g.gather([h.copy_layout.remote(kind, r, at) for h, kind, r, at in sources])
        which = choose_sources([layout["pieces"] for layout in layouts])
        gens = [h.publish_copy.remote(kind, r, at, w) for (h, kind, r, at), w in zip(sources, which)]
        return ray.put([published(layout, w, self._items(gen))
                        for layout, w, gen in zip(layouts, which, gens)])

    def _items(self, gen) -> list:
        """The references a shard's generator call yields, each wait bounded by the collective timeout. The
        pieces stay where they are (``fetch_local=False``): waiting would otherwise copy every one of them
        into this node's object store, the whole state on one node."""
        refs = []
        while True:
            ready, _ = ray.wait([gen], timeout=self.cfg.cluster.collective_timeout_s, fetch_local=False)
            if not ready:
                raise ray.exceptions.GetTimeoutError("a shard publishing its pieces did not answer within "
                                                     f"{self.cfg.cluster.collective_timeout_s}s")
            try:
                refs.append(next(gen))
            except StopIteration:
                return refs

    # -- recovery -----------------------------------------------------------------------------------------
    def recover(self, error: BaseException, logged_step: int) -> tuple[int, dict | None]:
        """Handle a failed run of the shards: returns (the step to run next, the record of the last step every
        survivor completed, which the coordinator may not have received). ``logged_step``: the steps the
        coordinator has records of (where the run was if no shard survived)."""
        c, g = self.cfg.cluster, self.group
        t0 = time.monotonic()
        # survivors blocked in a collective fail when the dead peer's sockets close, else at the timeout
        g.settle(c.collective_timeout_s + 5)
        alive = g.alive(g.shards)
        if len(alive) == len(g.shards):
            raise error  # every shard is alive: a real error (or a hang), not a lost shard
        if not alive:
            return self._restart_all(error, logged_step, t0), None
        states = g.gather([s.sync_state.remote() for s in alive])
        # the first step whose record no survivor holds: a record that reached one rank needed every rank's
        # part, sent after its update, so every survivor applied that step's update
        step = max(st["last_synced"] for st in states) + 1
        record = next((st["record"] for st in states if st["record"] and st["record"]["step"] == step), None)
        self._recoveries_at[step] = self._recoveries_at.get(step, 0) + 1
        if not c.elastic or self._recoveries_at[step] > MAX_RECOVERIES_PER_STEP:
            raise error
        alive_sets = [g.expert_sets[g.shards.index(s)] for s in alive]
        g.gather([s.rollback.remote(step) for s in alive])
        resume, source, state_ref, path, found = step, "replicas", None, None, {}
        # an FSDP-sharded state died in part with the lost shard: no survivor holds a replica of its shards
        sharded = "shard" in (c.dense_sharding, c.expert_sharding)
        if not sharded and self._all_experts() <= set().union(*alive_sets):
            state_ref = self._publish([(s, "live", g.shards.index(s), step) for s in alive])
        elif "sources" in (found := self._from_copies(alive, step)):
            resume, source, state_ref = found.pop("step"), "buddy", self._publish(found.pop("sources"))
        else:
            path = ckpt.latest_checkpoint(self.ckpt_dir)
            resume, source = (ckpt.read_manifest(path)["step"], "checkpoint") if path else (0, "scratch")
        lost_shards = len(g.shards) - len(alive)
        world = self.choose_world(len(alive))
        g.kill(alive[world:])
        info = self.configure(alive[:world], state_ref, resume, path, during="recovery")
        lost_here = step - resume  # (configure counts the steps a fallback to the checkpoint loses on top)
        if info["fallback"]:  # the published pieces were lost while the world formed
            resume, source = info["step"], info["fallback"]
        secs = time.monotonic() - t0
        self._event({"event": "recovery", "step": step, "resume_step": resume, "lost_steps": step - resume,
                     "lost_shards": lost_shards, "source": source, "world": g.world, "ep_sizes": g.ep_sizes,
                     "seconds": secs, "error": type(error).__name__, **found})
        self.metrics.inc(M.RECOVERIES_TOTAL)
        self.metrics.observe(M.RECOVERY_SECONDS, secs)
        self.metrics.inc(M.LOST_STEPS_TOTAL, lost_here)
        return resume, record

    def _restart_all(self, error: BaseException, step: int, t0: float) -> int:
        """Every shard is lost: start a new world (in the bundles the old one left, else on free resources) from
        the latest checkpoint (from scratch without one)."""
        c, g = self.cfg.cluster, self.group
        self._recoveries_at[step] = self._recoveries_at.get(step, 0) + 1
        if not c.elastic or self._recoveries_at[step] > MAX_RECOVERIES_PER_STEP:
            raise error
        lost_shards, g.shards = len(g.shards), []
        new = g.add(c.num_workers)
        if not new:
            raise RuntimeError(f"all {lost_shards} shards lost at step {step} and no replacement could be "
                               "placed") from error
        world = self.choose_world(len(new))
        g.kill(new[world:])
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        resume, source = (ckpt.read_manifest(path)["step"], "checkpoint") if path else (0, "scratch")
        self.configure(new[:world], None, resume, path, during="restart")
        secs = time.monotonic() - t0
        self._event({"event": "recovery", "step": step, "resume_step": resume, "lost_steps": step - resume,
                     "lost_shards": lost_shards, "source": source, "all_lost": True, "world": g.world,
                     "ep_sizes": g.ep_sizes, "seconds": secs, "error": type(error).__name__})
        self.metrics.inc(M.RECOVERIES_TOTAL)
        self.metrics.observe(M.RECOVERY_SECONDS, secs)
        self.metrics.inc(M.LOST_STEPS_TOTAL, step - resume)
        return resume

    def _event(self, event: dict) -> None:
        print(f"membership: {event}", flush=True)
        self.on_event(event)

    def _from_copies(self, alive: list, step: int) -> dict:
        """Where the lost world's state is as copies of its ranks' shards, all at one step: the survivors'
        live shards (at ``step``, after the rollback) and their own copies, the lost ranks' copies at their
        buddies. The newest step with a copy of every rank wins: {"step", "sources" ((holder, kind, rank, step)
        of each rank, for :meth:`_publish`), "copies": which ranks came from where}; without one,
        {"copies_missing": the ranks with no copy at ``step``}."""
        g = self.group
        held = g.gather([s.copies_held.remote() for s in alive])
        by_step: dict[int, dict[int, tuple]] = {}  # step -> rank -> (kind, holder)
        order = ("live", "own", "buddy")  # a rank's own state rather than a copy sent elsewhere
        for s, cp in sorted(((s, cp) for s, copies in zip(alive, held) for cp in copies),
                            key=lambda x: order.index(x[1]["kind"])):
            by_step.setdefault(cp["step"], {}).setdefault(cp["rank"], (cp["kind"], s))
        ranks = set(range(len(g.shards)))
        for at in sorted((s for s in by_step if s <= step), reverse=True):
            if ranks <= by_step[at].keys():
                where = by_step[at]
                kinds = {k: sorted(r for r in ranks if where[r][0] == k) for k in order}
                return {"step": at, "sources": [(where[r][1], where[r][0], r, at) for r in sorted(ranks)],
                        "copies": {"step": at, **{k: v for k, v in kinds.items() if v}}}
        return {"copies_missing": sorted(ranks - by_step.get(step, {}).keys())}

    # -- growth -------------------------------------------------------------------------------------------
    def growth_target(self) -> int:
        """The world size free resources allow now (the current one if none)."""
        c, g = self.cfg.cluster, self.group
        top = c.max_workers or c.num_workers
        if not c.elastic or g.world >= top or time.monotonic() < self._no_growth_until:
            return g.world
        room = g.room()
        return self.choose_world(g.world + min(room, top - g.world)) if room > 0 else g.world

    def maybe_grow(self, step: int) -> int:
        """At a step boundary, add shards (up to max_workers) and redistribute experts: "replace" events for
        shards started in bundles that lost shards left, "grow" for shards on resources the run had not used.
        Shards lost while they join leave only a "reform" event (the world did not change size). Returns the
        step to run next: ``step``, or the latest checkpoint's if the published state was lost meanwhile."""
        g = self.group
        target = self.growth_target()
        if target <= g.world:
            return step
        new = g.add(target - g.world)
        if g.world + len(new) != target:  # fewer bundles than hoped: keep what choose_world allows
            keep = self.choose_world(g.world + len(new)) - g.world
            g.kill(new[keep:])
            new = new[:keep]
        if not new:  # resources looked free but nothing could be placed: keep training, retry later
            self._no_growth_until = time.monotonic() + GROWTH_RETRY_S
            return step
        t0 = time.monotonic()
        kind = "replace" if all(g.is_replacement(s) for s in new) else "grow"
        state_ref = self._publish([(s, "live", r, step) for r, s in enumerate(g.shards)])
        old = g.world
        info = self.configure(g.shards + new, state_ref, step, during=kind)
        if g.world > old:
            self._event({"event": kind, "step": step, "from_world": old, "world": g.world,
                         "ep_sizes": g.ep_sizes, "seconds": time.monotonic() - t0})
        return info["step"]
