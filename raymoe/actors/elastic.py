"""Membership changes for the Coordinator: recover from lost shards, grow when resources appear.

Recovery keeps the survivors' state instead of restarting from disk. The step that failed is undone on every
survivor that applied it, the state the new layout needs is exported by the survivors as checkpoint files in
memory (any expert placement loads them), the shards re-form a process group with expert-parallel sizes for
the new world, and training resumes at the failed step with the same global batch (each shard runs more or
fewer micro-batches). Experts with no live replica come from the in-memory copies (own + buddy, every
``cluster.buddy_interval`` steps), else from the last checkpoint.
"""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raymoe.platform import checkpoint as ckpt
from raymoe.platform import metrics as M

SHARD_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError,
                  ray.exceptions.ActorUnavailableError)
MAX_RECOVERIES_PER_STEP = 3


class Elastic:
    """Mixin of the Coordinator (uses its shards, configure(), metrics, config)."""

    def _init_elastic(self) -> None:
        self.events: list[dict] = []
        self._inflight: list = []
        self._recoveries_at: dict[int, int] = {}
        self.extra_pgs: list = []

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

    def _settle(self, timeout: float) -> None:
        """Wait (bounded) until every call of the failed operation has returned or failed."""
        if self._inflight:
            ray.wait(self._inflight, num_returns=len(self._inflight), timeout=timeout)

    def choose_world(self, available: int) -> int:
        """Largest world size <= ``available`` within [min_workers, max_workers] that splits the global batch
        into whole micro-batches per shard (the global batch never changes)."""
        c = self.cfg.cluster
        per_step = self.cfg.train.global_batch_size // self.micro
        for w in range(min(available, c.max_workers or c.num_workers), c.min_workers - 1, -1):
            if per_step % w == 0:
                return w
        raise RuntimeError(f"cannot continue with {available} shard(s): need between cluster.min_workers="
                           f"{c.min_workers} and cluster.max_workers shards that divide the {per_step} "
                           f"micro-batches of a step")

    def _export_state(self, shards: list, expert_sets: list[set], step: int):
        """ObjectRef of the merged checkpoint files of ``shards`` (each expert from its first holder)."""
        holder: dict = {}
        for i, experts in enumerate(expert_sets):
            for e in experts:
                holder.setdefault(e, i)
        parts: dict[str, bytes] = {}
        for p in self.gather([s.export_parts.remote(step, i == 0, [e for e, h in holder.items() if h == i])
                              for i, s in enumerate(shards)]):
            parts.update(p)
        return ray.put(parts)

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

    def configure(self, shards: list, parts_ref=None, step: int = 0, ckpt_path: str | None = None) -> dict:
        """``form_world`` that survives shards dying while it runs: the survivors re-form the world from the
        same exported state (or checkpoint) until it succeeds or too few shards are left."""
        for attempt in range(MAX_RECOVERIES_PER_STEP + 1):
            try:
                return self.form_world(shards, parts_ref, step, ckpt_path)
            except SHARD_FAILURES as err:
                if not self.cfg.cluster.elastic or attempt == MAX_RECOVERIES_PER_STEP:
                    raise
                self._settle(self.cfg.cluster.start_timeout_s)
                survivors = self.alive(shards)
                if len(survivors) == len(shards):
                    raise  # nobody died: a real error, not a membership change
                if not survivors:
                    raise RuntimeError("every shard died while forming the world") from err
                keep = self.choose_world(len(survivors))
                for s in survivors[keep:]:
                    ray.kill(s, no_restart=True)
                shards = survivors[:keep]
                self._record_event({"event": "reform", "step": step, "world": keep, "error": type(err).__name__})
                self.metrics.inc(M.RECOVERIES_TOTAL)
        raise AssertionError("unreachable")

    def _all_experts(self) -> set:
        return {(lid, g) for lid, n in self.model_cfg.experts_per_layer().items() for g in range(n)}

    # -- recovery -----------------------------------------------------------------------------------------
    def recover(self, step: int, error: BaseException) -> int:
        """Handle a failure while running ``step`` (0-based; steps before it are complete); return the step to
        run next (``step`` when no work was lost)."""
        c = self.cfg.cluster
        self._recoveries_at[step] = self._recoveries_at.get(step, 0) + 1
        if not c.elastic or self._recoveries_at[step] > MAX_RECOVERIES_PER_STEP:
            raise error
        t0 = time.monotonic()
        # survivors blocked in a collective fail when the dead peer's sockets close, else at the timeout
        self._settle(c.collective_timeout_s + 5)
        alive = self.alive(self.shards)
        if len(alive) == len(self.shards):
            raise error  # every shard is alive: a real error (or a hang), not a lost shard
        if not alive:
            raise RuntimeError(f"all shards lost at step {step}") from error
        alive_sets = [self.expert_sets[self.shards.index(s)] for s in alive]
        self.gather([s.rollback.remote(step) for s in alive])
        resume, source, parts_ref, path = step, "replicas", None, None
        if self._all_experts() <= set().union(*alive_sets):
            parts_ref = self._export_state(alive, alive_sets, step)
        elif (snap := self._snapshot_parts(alive)) is not None:
            (resume, parts), source = snap, "buddy"
            parts_ref = ray.put(parts)
        else:
            path = ckpt.latest_checkpoint(self.ckpt_dir)
            resume, source = (ckpt.read_manifest(path)["step"], "checkpoint") if path else (0, "scratch")
        lost_shards = len(self.shards) - len(alive)
        world = self.choose_world(len(alive))
        for s in alive[world:]:
            ray.kill(s, no_restart=True)
        self.configure(alive[:world], parts_ref, resume, path)
        secs = time.monotonic() - t0
        self._record_event({"event": "recovery", "step": step, "resume_step": resume, "lost_steps": step - resume,
                            "lost_shards": lost_shards, "source": source, "world": self.world,
                            "ep_sizes": self.ep_sizes, "seconds": secs, "error": type(error).__name__})
        self.metrics.inc(M.RECOVERIES_TOTAL)
        self.metrics.observe(M.RECOVERY_SECONDS, secs)
        self.metrics.inc(M.LOST_STEPS_TOTAL, step - resume)
        return resume

    def _record_event(self, event: dict) -> None:
        self.events.append(event)
        print(f"membership: {event}", flush=True)

    # -- in-memory copies ---------------------------------------------------------------------------------
    def snapshot(self, step: int) -> None:
        """Every shard keeps its own state and a copy of its ring neighbour's, taken after ``step`` steps."""
        refs = [s.export_parts.remote(step, i == 0, None) for i, s in enumerate(self.shards)]
        n = len(self.shards)
        self.gather([s.keep_snapshot.remote("own", step, refs[i]) for i, s in enumerate(self.shards)]
                    + [self.shards[(i + 1) % n].keep_snapshot.remote("buddy", step, refs[i]) for i in range(n)])

    def _snapshot_parts(self, alive: list) -> tuple[int, dict] | None:
        """The newest complete in-memory snapshot among the survivors' own and buddy copies, if any."""
        by_step: dict[int, dict[str, bytes]] = {}
        for snaps in self.gather([s.snapshots.remote() for s in alive]):
            for step, parts in snaps.values():
                by_step.setdefault(step, {}).update(parts)
        needed = {ckpt.expert_file_name(lid, g) for lid, g in self._all_experts()} | {ckpt.DENSE}
        for step in sorted(by_step, reverse=True):
            if needed <= by_step[step].keys():
                return step, by_step[step]
        return None

    # -- growth -------------------------------------------------------------------------------------------
    def maybe_grow(self, step: int) -> None:
        """At a step boundary, add shards on free resources (up to max_workers) and redistribute experts."""
        c = self.cfg.cluster
        top = c.max_workers or c.num_workers
        if not c.elastic or self.world >= top or step % c.grow_check_interval:
            return
        free = ray.available_resources()
        room = int(free.get("CPU", 0) // c.cpus_per_worker)
        if c.gpus_per_worker:
            room = min(room, int(free.get("GPU", 0) // c.gpus_per_worker))
        if room <= 0 or self.choose_world(self.world + min(room, top - self.world)) <= self.world:
            return
        target = self.choose_world(self.world + min(room, top - self.world))
        new = []
        for _ in range(target - self.world):
            pg = placement_group([self._bundle()])
            try:
                ray.get(pg.ready(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                break
            self.extra_pgs.append(pg)
            new.append(self._new_shard(pg, 0))
        if self.world + len(new) != target:  # fewer bundles than hoped: use only what keeps batches whole
            keep = self.choose_world(self.world + len(new)) - self.world
            for s in new[keep:]:
                ray.kill(s, no_restart=True)
            new = new[:keep]
        if not new:
            return
        t0 = time.monotonic()
        parts_ref = self._export_state(self.shards, self.expert_sets, step)
        old = self.world
        self.configure(self.shards + new, parts_ref, step)
        self._record_event({"event": "grow", "step": step, "from_world": old, "world": self.world,
                            "ep_sizes": self.ep_sizes, "seconds": time.monotonic() - t0})

    def _remove_extra_pgs(self) -> None:
        for pg in self.extra_pgs:
            remove_placement_group(pg)
        self.extra_pgs = []
