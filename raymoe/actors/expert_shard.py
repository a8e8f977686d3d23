"""ExpertShard: one Ray actor per worker/GPU, one rank of the training world.

It owns its experts (the global expert ids the layout assigns to its expert-parallel rank), a replica of the
dense part, and its optimizer state, and runs the one training loop (:class:`raymoe.platform.training.Trainer`)
itself from the schedule the coordinator hands out once (``run(start, stop_at)``), in lockstep with the other
shards through their collectives. Hidden states move between shards only by all-to-all inside the MoE layers.
Rank 0 reports each step's record (summed over the world) to the coordinator without waiting for it, and asks
it to commit each checkpoint once every rank wrote its part; the coordinator is off the per-step path.

The actor is threaded: while ``run`` trains, the coordinator can still ask for a stop at the next step
boundary, check health, and peers can hand over their in-memory copies of their shards (``keep_snapshot``).
After a membership change a shard publishes the copies it holds as pieces in the object store
(``copy_layout``, ``publish_copy``) and each shard of the new world fetches only the pieces it needs
(``start``'s ``state``; see :mod:`raymoe.actors.elastic`).
"""

from __future__ import annotations

import gc
import threading

import ray
import torch

from raymoe.config import RaymoeConfig, config_from_dict
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import fsdp
from raymoe.platform import metrics as M
from raymoe.platform.distributed import build_rank, join_world, leave_world, local_experts, shard_device
from raymoe.platform.host_memory import tune_malloc
from raymoe.platform.model_io import gpt_config_from
from raymoe.platform.reshard import describe, piece_data
from raymoe.platform.training import Trainer, build_splits, load_teacher

from . import rendezvous
from .faults import FaultPlan
from .shard_state import ShardState, memory_limit, peak_rss, rss_baseline
from .telemetry import RayMetrics
from .weight_registry import Publisher


class _ShardReporter:
    """Rank 0 sends records to the coordinator (not waiting for them, but all are delivered before ``run``
    returns) and asks it to commit checkpoints; every rank keeps its in-memory copies at the buddy interval."""

    def __init__(self, shard: "ExpertShard"):
        self.shard = shard
        self._sent: list = []

    def record(self, rec: dict) -> None:
        s = self.shard
        if s.rank == 0 and s.coordinator is not None:
            self._sent.append(s.coordinator.report.remote(rec))
            if len(self._sent) > 64:
                _, self._sent = ray.wait(self._sent, num_returns=len(self._sent), timeout=0)

    def checkpoint_written(self, step: int, path) -> None:
        s = self.shard
        if s.rank == 0 and s.coordinator is not None:
            self.flush()
            ray.get(s.coordinator.commit_checkpoint.remote(step, str(path)),
                    timeout=s.cfg.cluster.collective_timeout_s)

    def step_done(self, step: int) -> None:
        s = self.shard
        s.prune_copies(step)
        publish = s.cfg.cluster.publish_interval
        if publish and step % publish == 0:  # live weights for serving (raymoe.actors.weight_registry)
            place = s.trainer.place
            s.publisher.publish(s.trainer.model, step, s.rank, s.world, place.writes_dense, place.writes_experts,
                                s.world_id)

    def flush(self) -> None:
        if self._sent:
            ray.get(self._sent, timeout=self.shard.cfg.cluster.collective_timeout_s)
            self._sent = []


class ExpertShard:
    """A Ray actor (see :func:`remote_class`); lifecycle verbs: start, check_health, shutdown."""

    def __init__(self, cfg: dict):
        tune_malloc()  # this worker process allocates the model's tensors every step
        self.cfg: RaymoeConfig = config_from_dict(cfg, source="coordinator")
        self.rank, self.world = -1, 0
        self.coordinator = None
        self.buddy = None
        self.trainer: Trainer | None = None
        self.state: ShardState | None = None
        self.faults = FaultPlan()
        self._reporter = _ShardReporter(self)
        self.publisher = Publisher(self.cfg.run.name)
        self._run_lock = threading.Lock()
        self._splits = self._teacher = None
        self.world_id: str | None = None  # the rendezvous address of the world this shard is part of
        self._copies: list[dict] = []  # in-memory copies of shards (own and a peer's): see keep_copies
        self._copies_lock = threading.Lock()  # a peer hands its copy over while this shard's loop prunes
        self._copied: tuple | None = None  # (world, step) of the last copy this shard handed over

    # -- placement / rendezvous ---------------------------------------------------------------------------
    def node_info(self) -> dict:
        """Where this shard runs (the coordinator orders ranks by node for the hierarchical all-to-all)."""
        return rendezvous.node_info()

    def free_port(self) -> int:
        """A free TCP port on this node, for the rendezvous when this shard is rank 0."""
        return rendezvous.free_port()

    def start(self, init_method: str, rank: int, world: int, ep_sizes: dict[int, int], ranks_per_node: int | None,
              state: list[dict] | None = None, step: int = 0, coordinator=None, buddy=None) -> dict:
        """Join the process group, build EP/EDP groups, the model with this rank's experts, the optimizer and
        the training loop. Called again after a membership change: ``state`` (the old world's copies as
        pieces, :meth:`publish_copy`) fills this rank's part of the weights and optimizer state, each
        of its tensors from the pieces that overlap it.
        ``coordinator`` receives rank 0's reports; ``buddy`` (the next rank) keeps a copy of this shard's state."""
        c = self.cfg.cluster
        device = shard_device(c.gpus_per_worker)
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(c.cpus_per_worker)))
        self._leave_old_world()
        join_world(init_method, rank, world, backend=c.backend, device=device, timeout_s=c.collective_timeout_s)
        self.faults.after_join()
        self.world_id = init_method
        model_config = gpt_config_from(self.cfg)
        rss_baseline()  # the runtime (Python, torch, Ray, the process group), before this process builds a model
        parts_built = build_rank(self.cfg, model_config, rank, world, ep_sizes, ranks_per_node, device)
        try:
            # the undo copy serves survivors of a lost peer: a world of one has none (losing its shard restarts
            # from the checkpoint), so it skips the copy's cost every step (a world that grows starts anew)
            self.state = ShardState(parts_built.model, parts_built.optimizer, keep_undo=c.elastic and world > 1,
                                    memory_limit=memory_limit(self.cfg), rank=rank,
                                    copies=((c.buddy_interval > 0) + (c.buddy_interval > 1)) * (world > 1))
        except ValueError:  # over the memory limit: leave the world as a healthy shard, so the coordinator
            self.rank = -1  # reports this error instead of recovering from a lost shard
            leave_world()
            raise
        if c.memory_per_worker_gb is not None:  # it fits (the check passed): show by how much
            print(f"shard {rank}: training state {self.state.state_bytes() / 2**30:.3f} GiB of "
                  f"cluster.memory_per_worker_gb={c.memory_per_worker_gb:g}; peak RSS above the process baseline "
                  f"after building {(peak_rss() - rss_baseline()) / 2**30:.3f} GiB (baseline "
                  f"{rss_baseline() / 2**30:.3f} GiB; compared with the limit after the first step)", flush=True)
            gauge = RayMetrics((M.SHARD_PEAK_RSS,), {"run": self.cfg.run.name})
            self.state.on_peak_rss = lambda b, r=rank: gauge.set(M.SHARD_PEAK_RSS, b, shard=r)
        if state:
            got = self.state.assemble(state, lambda refs: ray.get(refs, timeout=c.collective_timeout_s))
            print(f"shard {rank}: state at step {step} assembled from {got['fetched_pieces']} pieces, "
                  f"{got['fetched_bytes'] / 2**20:.1f} MiB fetched for a share of {got['share_bytes'] / 2**20:.1f} "
                  "MiB", flush=True)
        self.state.started_at(step)
        if c.buddy_interval and buddy is not None:  # a world of one has no buddy, and no survivor to help
            self.state.after_update = self._after_update
        if self._splits is None:  # the data and the frozen teacher outlive a re-formed world
            self._splits = build_splits(self.cfg)
            self._teacher = load_teacher(self.cfg, device)
        self.trainer = Trainer(self.cfg, parts_built.model, parts_built.optimizer, *self._splits, device=device,
                               reporter=self._reporter, place=parts_built.place, grad_sync=parts_built.grad_sync,
                               grad_norm_fn=parts_built.grad_norm, teacher=self._teacher[0],
                               kd_schedule=self._teacher[1], hooks=_StepTracker(self))
        self.rank, self.world, self.coordinator, self.buddy = rank, world, coordinator, buddy
        return {"rank": rank, "experts": local_experts(parts_built.model), "device": str(device)}

    def _leave_old_world(self) -> None:
        """Drop the state of the world this shard was part of before it builds its part of a new one: what the
        new world needs of it was published already (``publish_copy``: owned by the coordinator) or comes from
        a checkpoint, so the shard never holds its old and new parts at once. Until ``start`` succeeds it is
        in no world (rank -1), which ``check_health`` takes for a healthy shard without a model."""
        self.rank, self.trainer, self.state = -1, None, None
        with self._copies_lock:
            self._copies = []
        gc.collect()  # the model, its optimizer and their hooks refer to each other

    def load(self, path: str) -> int:
        """Load weights + optimizer state from a checkpoint (any EP layout: experts are keyed by global id;
        FSDP-sharded state: each shard reads only its slices, see ``checkpoint.load_checkpoint``)."""
        t = self.trainer
        info = ckpt.load_checkpoint(path, t.model, t.optimizer, restore_rng=False)
        self.state.started_at(int(info["step"]))
        return int(info["step"])

    # -- training -------------------------------------------------------------------------------------------
    def run(self, start: int, stop_at: int | None = None) -> int:
        """Run the training loop from step ``start`` until the end, ``stop_at`` or a stop request; returns the
        next step. Every rank of the world runs it at once."""
        with self._run_lock:
            try:
                if self.state.after_update is not None and self._copied != (self.world_id, start):
                    self.keep_copies(start)  # the state this world starts from (loaded, not yet copied)
                return self.trainer.run(start, stop_at)
            finally:
                self.trainer.stop_requested = False
                try:
                    self._reporter.flush()
                except Exception:  # a failed run's own error is the one to report
                    pass

    def request_stop(self) -> None:
        """Stop ``run`` at the next step boundary (all ranks stop at the same one: the flag travels with the
        step's metrics)."""
        if self.trainer is not None:
            self.trainer.stop_requested = True

    def sync_state(self) -> dict:
        """After a failed ``run``: the last step every rank completed and reported, its record, and the last
        step whose update this shard applied."""
        t = self.trainer
        return {"last_synced": t.last_synced, "record": t.last_record, "last_completed": self.state.last_completed}

    # -- elasticity -----------------------------------------------------------------------------------------
    def rollback(self, step: int) -> int | None:
        """Undo the update of ``step`` if this shard applied it (the step failed on another shard)."""
        return self.state.rollback(step)

    def _after_update(self, done: int) -> None:
        if done % self.cfg.cluster.buddy_interval == 0:
            self.keep_copies(done)

    def keep_copies(self, step: int) -> None:
        """Copy this shard's state after ``step`` steps (its shards, :meth:`ShardState.shard_copy`) to the buddy
        (the next rank), and keep one itself when copies are taken every few steps (every step, its live
        state is that copy).

        Taken right after the update, before the step's record goes round: a record that reached any rank
        means every rank's copy of that step is at its buddy. So whatever step recovery resumes at (the
        first one whose record no rank holds), a lost shard's copy at that step is at its buddy: the buddy
        keeps the copies it received until its own record of that step went round (:meth:`prune_copies`)."""
        c = self.cfg.cluster
        # every step's copy goes only to the buddy: sent from the live tensors (Ray serialises a call's
        # arguments when it is made, before the next update), without a second copy of the share here
        keep_own = c.buddy_interval > 1
        copy = {**self.state.shard_copy(live=not keep_own), "step": step, "rank": self.rank,
                "world_id": self.world_id}
        if keep_own:
            self.keep_snapshot("own", copy)
        if self.buddy is not None:
            ray.get(self.buddy.keep_snapshot.remote("buddy", copy), timeout=c.collective_timeout_s)
        self._copied = (self.world_id, step)

    def keep_snapshot(self, kind: str, copy: dict) -> int:
        """Hold an in-memory copy of a shard: "own" (this shard's) or "buddy" (the previous rank's). Copies of
        an earlier world are dropped (its ranks are numbered anew)."""
        with self._copies_lock:
            self._copies = [c for c in self._copies if c["world_id"] == copy["world_id"]
                            and (c["kind"], c["step"]) != (kind, copy["step"])] + [{**copy, "kind": kind}]
        return copy["step"]

    def prune_copies(self, step: int) -> None:
        """After ``step`` steps, every rank's record of them went round: of each kind, copies older than the
        newest one taken at or before ``step`` are no longer needed."""
        with self._copies_lock:
            for kind in ("own", "buddy"):
                steps = [c["step"] for c in self._copies if c["kind"] == kind and c["step"] <= step]
                if steps:
                    self._copies = [c for c in self._copies if c["kind"] != kind or c["step"] >= max(steps)]

    def copies_held(self) -> list[dict]:
        """(kind, rank, step) of the copies this shard holds of the world it is part of (they outlive a failed
        run), and of its live state ("live", after :meth:`rollback`)."""
        held = [{"kind": c["kind"], "rank": c["rank"], "step": c["step"]} for c in self._copies
                if c["world_id"] == self.world_id]
        if self.state is not None and self.state.last_completed is not None:
            held.append({"kind": "live", "rank": self.rank, "step": self.state.last_completed + 1})
        return held

    def _copy_of(self, kind: str, rank: int, step: int) -> dict:
        """The copy of ``rank``'s shard at ``step`` this shard holds ("live": its own state now, not copied)."""
        if kind == "live":
            done = self.state.last_completed  # None: no undo kept (a world of one), its state is at ``step``
            assert done is None or done + 1 == step, (done, step)
            return self.state.shard_copy(live=True)
        return next(c for c in self._copies if (c["kind"], c["rank"], c["step"]) == (kind, rank, step))

    def copy_layout(self, kind: str, rank: int, step: int) -> dict:
        """A copy this shard holds (see :meth:`_copy_of`) described: its pieces (key, region, bytes, dtype), its
        scalars and param groups (``reshard.describe``); the coordinator picks which holder publishes each
        piece (``reshard.choose_sources``)."""
        return describe(self._copy_of(kind, rank, step))

    def publish_copy(self, kind: str, rank: int, step: int, which: list[int]):
        """Yield the pieces ``which`` (indices into :meth:`copy_layout`'s) of a copy this shard holds, one at a
        time: each becomes an object of the caller (the coordinator), stored on this node, so the pieces
        outlive this shard if it dies while the new world forms and go when the coordinator drops them."""
        yield from piece_data(self._copy_of(kind, rank, step), which)

    def inject_fault(self, where: str, step: int) -> None:
        """Test hook: exit the process abruptly inside the step (mid all-to-all) or the checkpoint write."""
        self.faults.arm(where, step)

    def full_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters on CPU (tests gather them to compare layouts), whole even when FSDP shards
        them (then every shard must be asked at once)."""
        with fsdp.gathered(self.trainer.model):
            return {k: v.detach().cpu().clone() for k, v in self.trainer.model.state_dict().items()}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def check_health(self) -> dict:
        """Raise if this shard cannot train: its device does not compute, or it was started and lost its model.
        Returns where it stands (rank, world, last applied step)."""
        device = self.trainer.device if self.trainer is not None else shard_device(self.cfg.cluster.gpus_per_worker)
        probe = torch.ones(2, device=device).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if float(probe) != 2.0:
            raise RuntimeError(f"shard {self.rank}: device {device} computed 1+1={float(probe)}")
        if self.rank >= 0 and (self.trainer is None or self.trainer.model is None):
            raise RuntimeError(f"shard {self.rank} was started but holds no model")
        return {"rank": self.rank, "world": self.world,
                "last_completed": None if self.state is None else self.state.last_completed}

    def shutdown(self) -> None:
        leave_world()


class _StepTracker:
    """The loop's hooks in a shard: note the step about to run (for undo), then the armed faults."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def before_step(self, step: int, trainer, micro_batches: int) -> None:
        self.shard.state.begin_step(step)
        self.shard.faults.before_step(step, trainer, micro_batches)

    def before_save(self, step: int, trainer, root) -> None:
        self.shard.faults.before_save(step, trainer, root)


def remote_class(num_cpus: float, num_gpus: float):
    """The ExpertShard actor class with its resource request (threaded: see the module docstring)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=4)(ExpertShard)
