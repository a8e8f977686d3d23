"""Membership changes: recover from lost shards, grow when resources appear.

Recovery keeps the survivors' state instead of restarting from disk. Every survivor tells how far the world got
(the last step whose record a rank holds); a survivor that already applied the next step's update undoes it.
The state the new layout needs is exported by the survivors as checkpoint files in memory (any expert
placement loads them), the shards re-form a process group with expert-parallel sizes for the new world, and
training resumes at that step with the same global batch (each shard runs more or fewer micro-batches).
When no survivor holds a replica of a lost rank's part (its experts at EP = world, or its FSDP shards with
``cluster.dense_sharding`` / ``expert_sharding``: shard), each rank's buddy (the next rank) holds a copy of that
rank's shards, taken every ``cluster.buddy_interval`` steps right after the update: the survivors' own shards
and the lost ranks' copies, all at one step, are put back together into the whole state
(:func:`raymoe.platform.reshard.full_parts`). With ``buddy_interval: 1`` that loses no step unless a rank and
its buddy are both lost; then, or without copies, the last checkpoint (the event says which ranks had none).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import ray

from raymoe.config import RaymoeConfig
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import metrics as M
from raymoe.platform.reshard import full_parts

from .shard_group import SHARD_FAILURES, ShardGroup

MAX_RECOVERIES_PER_STEP = 3
GROWTH_RETRY_S = 60.0


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

    def configure(self, shards: list, parts_ref=None, step: int = 0, ckpt_path: str | None = None,
                  during: str = "start") -> dict:
        """Form the world from ``shards``, surviving shards that die while it forms: the survivors re-form from
        the same exported state (or checkpoint) until it succeeds or too few shards are left. ``during`` names
        the membership change in the "reform" event of such a loss (start, recovery, restart, replace, grow)."""
        g = self.group
        for attempt in range(MAX_RECOVERIES_PER_STEP + 1):
            try:
                info = g.form(shards, self.experts_per_layer, parts_ref, step, ckpt_path)
                self.metrics.set(M.WORLD_SIZE, g.world)
                return info
            except SHARD_FAILURES as err:
                if not self.cfg.cluster.elastic or attempt == MAX_RECOVERIES_PER_STEP:
                    raise
                g.settle(self.cfg.cluster.start_timeout_s)
                survivors = g.alive(shards)
                if len(survivors) == len(shards):
                    raise  # nobody died: a real error, not a membership change
                if not survivors:
                    raise RuntimeError("every shard died while forming the world") from err
                keep = self.choose_world(len(survivors))
                g.kill(survivors[keep:])
                self._event({"event": "reform", "during": during, "step": step, "joining": len(shards),
                             "lost_shards": len(shards) - len(survivors), "world": keep,
                             "error": type(err).__name__})
                shards = survivors[:keep]
                self.metrics.inc(M.RECOVERIES_TOTAL)
        raise AssertionError("unreachable")

    def _all_experts(self) -> set:
        return {(lid, g) for lid, n in self.experts_per_layer.items() for g in range(n)}

    def _export_state(self, shards: list, expert_sets: list[set], step: int):
        """ObjectRef of the merged checkpoint files of ``shards`` (each expert from its first holder)."""
        holder: dict = {}
        for i, experts in enumerate(expert_sets):
            for e in experts:
                holder.setdefault(e, i)
        parts: dict[str, bytes] = {}
        for p in self.group.gather([s.export_parts.remote(step, i == 0, [e for e, h in holder.items() if h == i])
                                    for i, s in enumerate(shards)]):
            parts.update(p)
        return ray.put(parts)

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
        resume, source, parts_ref, path, found = step, "replicas", None, None, {}
        # an FSDP-sharded state died in part with the lost shard: no survivor holds a replica of its shards
        sharded = "shard" in (c.dense_sharding, c.expert_sharding)
        if not sharded and self._all_experts() <= set().union(*alive_sets):
            parts_ref = self._export_state(alive, alive_sets, step)
        elif "parts" in (found := self._from_copies(alive, step)):
            resume, source, parts_ref = found.pop("step"), "buddy", ray.put(found.pop("parts"))
        else:
            path = ckpt.latest_checkpoint(self.ckpt_dir)
            resume, source = (ckpt.read_manifest(path)["step"], "checkpoint") if path else (0, "scratch")
        lost_shards = len(g.shards) - len(alive)
        world = self.choose_world(len(alive))
        g.kill(alive[world:])
        self.configure(alive[:world], parts_ref, resume, path, during="recovery")
        secs = time.monotonic() - t0
        self._event({"event": "recovery", "step": step, "resume_step": resume, "lost_steps": step - resume,
                     "lost_shards": lost_shards, "source": source, "world": g.world, "ep_sizes": g.ep_sizes,
                     "seconds": secs, "error": type(error).__name__, **found})
        self.metrics.inc(M.RECOVERIES_TOTAL)
        self.metrics.observe(M.RECOVERY_SECONDS, secs)
        self.metrics.inc(M.LOST_STEPS_TOTAL, step - resume)
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
        """The lost world's state rebuilt from copies of its ranks' shards, all at one step: the survivors'
        live shards (at ``step``, after the rollback) and their own copies, the lost ranks' copies at their
        buddies. The newest step with a copy of every rank wins: {"step", "parts" (checkpoint files), "copies":
        which ranks came from where}; without one, {"copies_missing": the ranks with no copy at ``step``}."""
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
                copies = dict(zip(sorted(ranks), g.gather([where[r][1].copy_of.remote(where[r][0], r, at)
                                                           for r in sorted(ranks)])))
                kinds = {k: sorted(r for r in ranks if where[r][0] == k) for k in order}
                return {"step": at, "parts": full_parts(copies, at),
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

    def maybe_grow(self, step: int) -> None:
        """At a step boundary, add shards (up to max_workers) and redistribute experts: "replace" events for
        shards started in bundles that lost shards left, "grow" for shards on resources the run had not used.
        Shards lost while they join leave only a "reform" event (the world did not change size)."""
        g = self.group
        target = self.growth_target()
        if target <= g.world:
            return
        new = g.add(target - g.world)
        if g.world + len(new) != target:  # fewer bundles than hoped: keep what choose_world allows
            keep = self.choose_world(g.world + len(new)) - g.world
            g.kill(new[keep:])
            new = new[:keep]
        if not new:  # resources looked free but nothing could be placed: keep training, retry later
            self._no_growth_until = time.monotonic() + GROWTH_RETRY_S
            return
        t0 = time.monotonic()
        kind = "replace" if all(g.is_replacement(s) for s in new) else "grow"
        parts_ref = self._export_state(g.shards, g.expert_sets, step)
        old = g.world
        self.configure(g.shards + new, parts_ref, step, during=kind)
        if g.world > old:
            self._event({"event": kind, "step": step, "from_world": old, "world": g.world,
                         "ep_sizes": g.ep_sizes, "seconds": time.monotonic() - t0})
