"""Coordinator: the Ray actor that owns a distributed run's membership, checkpoint commits and recovery.

It places the shards, forms the world and hands every shard its schedule once: ``run(start, stop_at)``. The
shards run the training loop themselves in lockstep (SPMD); rank 0 reports each step's record here without
waiting, and asks for each checkpoint to be committed once every rank wrote its part. So the coordinator is off
the per-step path: its cost per step is one report, whatever the number of shards
(``benchmarks/control_plane.py``). It comes back on the path only at membership changes: a failed run
(recovery, :mod:`raymoe.actors.elastic`), a stop it asked for to grow the world, or an operator's hold.
Activations never pass through here or through the object store.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.config import RaymoeConfig, config_from_dict
from raymoe.platform import metrics as M
from raymoe.platform import storage
from raymoe.platform.model_io import gpt_config_from
from raymoe.platform.run_log import RunLog
from raymoe.platform.training import commit_checkpoint, resume_source

from . import rendezvous
from .elastic import Elastic
from .expert_shard import remote_class
from .shard_group import SHARD_FAILURES, ShardGroup
from .telemetry import RayMetrics
from .weight_registry import start_registry


class Coordinator:
    """Drives distributed training; lifecycle verbs: start, run, check_health, shutdown.

    ``shard_cls``: the shard actor class factory ``(num_cpus, num_gpus) -> actor class`` (default: ExpertShard);
    benchmarks inject no-op shards. ``restart``: set by the driver when the previous coordinator's process died
    (see :func:`raymoe.actors.launch.train_on_ray`); ``pg_prefix``: names this coordinator's placement groups, so
    the driver can remove them if it dies.
    """

    def __init__(self, cfg: dict, shard_cls=None, restart: dict | None = None, pg_prefix: str | None = None):
        self.cfg: RaymoeConfig = config_from_dict(cfg, source="driver")
        # set when the driver starts this coordinator because the previous one's process died:
        # {"attempt": n, "t0": wall time the loss was seen, "error": its exception's name}
        self.restart = restart
        self.metrics = RayMetrics(M.ALL_METRICS, default_tags={"run": self.cfg.run.name})
        # the run folder may be a storage URI: logs are written to a local copy and uploaded at each commit
        self.outputs = storage.RunOutputs(self.cfg.run.output_dir, self.cfg.run.name)
        self.run_dir, self.ckpt_dir = self.outputs.local, self.outputs.checkpoints
        self.model_cfg = gpt_config_from(self.cfg)
        me = ray.get_runtime_context().current_actor
        self.group = ShardGroup(self.cfg, cfg, shard_cls or remote_class, coordinator=me, pg_prefix=pg_prefix)
        self.events: list[dict] = []
        self._pending_events: list[dict] = []  # events from before the run log opened
        self.elastic = Elastic(self.cfg, self.group, self.model_cfg.experts_per_layer(), self.ckpt_dir,
                               self.metrics, self._on_event)
        self.start_step = 0
        self.run_log: RunLog | None = None
        self._committed: dict[int, str] = {}
        self._last_logged = 0
        self._last_report = time.monotonic()
        self._stop_sent = False
        self._hold_step: int | None = None
        self._held, self._released = threading.Event(), threading.Event()
        self.registry = None  # the run's WeightRegistry with cluster.publish_interval > 0 (owned: dies with us)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> dict:
        """Reserve a placement group, create the shards, form the world; maybe resume."""
        if self.cfg.cluster.publish_interval:  # before the shards: they register their weights with it
            self.registry = start_registry(self.cfg.run.name, str(self.ckpt_dir), self.model_cfg.to_dict(),
                                           self.model_cfg.experts_per_layer())
        info = self.elastic.configure(self.group.create(self.cfg.cluster.num_workers))
        self.outputs.pull()  # a remote run's logs, if this machine has no copy (resuming it elsewhere)
        self.start_step = self._maybe_resume()
        if self.restart is not None:
            self._note_restart()
        return {**{k: v for k, v in info.items() if k != "shards"}, "start_step": self.start_step}

    def _note_restart(self) -> None:
        """The previous coordinator died (its shards with it): keep its events from the run folder and add a
        recovery event for the steps between the last one it logged and the checkpoint this one resumes at."""
        earlier, last_step = _logged_history(self.run_dir / "metrics.jsonl")
        self.events = earlier
        r = self.restart
        secs = max(0.0, time.time() - r["t0"])
        event = {"event": "recovery", "coordinator_lost": True, "restart": r["attempt"], "step": last_step,
                 "resume_step": self.start_step, "lost_steps": max(0, last_step - self.start_step),
                 "source": "checkpoint" if self.start_step else "scratch", "world": self.group.world,
                 "ep_sizes": self.group.ep_sizes, "seconds": secs, "error": r["error"]}
        print(f"membership: {event}", flush=True)
        self.events.append(event)
        self._pending_events.append(event)
        self.metrics.inc(M.RECOVERIES_TOTAL)
        self.metrics.observe(M.RECOVERY_SECONDS, secs)
        self.metrics.inc(M.LOST_STEPS_TOTAL, event["lost_steps"])

    def _maybe_resume(self) -> int:
        path = resume_source(self.cfg, self.ckpt_dir)
        if path is None:
            return 0
        return self.group.gather([s.load.remote(str(path)) for s in self.group.shards],
                                 timeout=self.cfg.cluster.start_timeout_s)[0]

    def check_health(self) -> bool:
        """Raise unless every shard answers its health check."""
        self.group.gather([s.check_health.remote() for s in self.group.shards])
        return True

    def shutdown(self) -> None:
        """Tear down the process groups, the shards and the placement groups."""
        self.group.shutdown()

    # -- queries and operator hooks ---------------------------------------------------------------------
    def node_info(self) -> dict:
        """Where the coordinator runs (node, IP, PID): operators and tests find its process with it."""
        return rendezvous.node_info()

    def shard_info(self) -> list[dict]:
        """Node, IP and PID of each shard in rank order (operators and tests use it to find a process)."""
        return self.group.infos

    def membership_events(self) -> list[dict]:
        """Membership events so far: recovery, replace, grow, reform (also in metrics.jsonl and the summary)."""
        return list(self.events)

    def inject_fault(self, rank: int, where: str, step: int) -> None:
        """Test hook: make shard ``rank`` exit abruptly inside the step or the checkpoint write at ``step``."""
        ray.get(self.group.shards[rank].inject_fault.remote(where, step), timeout=30)

    def inject_join_fault(self, count: int = 1) -> None:
        """Test hook: the next ``count`` shards added to the world (replacements or growth) exit while they join."""
        self.group.join_faults = count

    def hold_before_step(self, step: int) -> None:
        """Operations hook: have the shards stop before ``step`` and wait there until :meth:`release` (at most
        5 minutes); set it before ``run``."""
        self._hold_step = step
        self._held.clear()
        self._released.clear()

    def is_held(self) -> bool:
        return self._held.is_set()

    def release(self) -> None:
        self._released.set()

    # -- reports from rank 0 (one thread, in order) ------------------------------------------------------
    @ray.method(concurrency_group="reports")
    def report(self, rec: dict) -> None:
        """A step's record from rank 0: log it, export the metrics, and ask for a stop if the world can grow."""
        self._last_report = time.monotonic()
        self._log(rec)
        c = self.cfg.cluster
        if (c.elastic and not self._stop_sent and rec["step"] % c.grow_check_interval == 0
                and self.elastic.growth_target() > self.group.world):
            self._stop_sent = True
            for s in self.group.shards:
                s.request_stop.remote()

    @ray.method(concurrency_group="reports")
    def commit_checkpoint(self, step: int, path: str) -> str:
        """Every shard wrote its part of checkpoint ``step``: check every file in the storage, commit the
        manifest (last), prune old ones."""
        self._last_report = time.monotonic()
        commit_checkpoint(path, step, self.cfg, self.model_cfg,
                          extra={"ep_sizes": self.group.ep_sizes, "world": self.group.world},
                          writers=self.group.world)
        self._committed[step] = path
        return path

    def _log(self, rec: dict) -> None:
        self.run_log.record(rec)
        self._last_logged = max(self._last_logged, rec["step"])
        self._export(rec)

    def _on_event(self, event: dict) -> None:
        self.events.append(event)
        if self.run_log is not None:
            self.run_log.event(event)

    def _export(self, rec: dict) -> None:
        m = self.metrics
        m.set(M.WORLD_SIZE, self.group.world)  # re-set with every report: Ray drops gauges left unset
        m.set(M.TRAIN_LOSS, rec["loss"])
        m.set(M.TRAIN_CE_LOSS, rec["ce_loss"])
        m.set(M.LEARNING_RATE, rec["lr"])
        m.set(M.GRAD_NORM, rec["grad_norm"])
        m.set(M.TOKENS_PER_SECOND, rec["tokens_per_s"])
        m.inc(M.TOKENS_TOTAL, rec["tokens"])
        m.inc(M.STEPS_TOTAL, 1)
        m.observe(M.STEP_SECONDS, rec["step_s"])
        if "val_loss" in rec:
            m.set(M.VAL_LOSS, rec["val_loss"])
        layers = self.model_cfg.moe_layer_ids()  # the model's (model.init_from: the folder's, not the YAML's)
        for i, counts in enumerate(rec.get("expert_counts", [])):
            layer = layers[i]
            total = max(sum(counts), 1)
            for e, c in enumerate(counts):
                m.set(M.EXPERT_LOAD, c / total, layer=layer, expert=e)
            m.set(M.EXPERT_LOAD_MAX_OVER_MEAN, max(counts) / (total / len(counts)), layer=layer)
            m.set(M.DROPPED_FRACTION, rec["dropped_fraction"][i], layer=layer)
            m.set(M.AUX_LOSS, rec["l_aux"][i], layer=layer)
        for layer, secs in rec.get("all_to_all_s", {}).items():
            m.observe(M.ALL_TO_ALL_SECONDS, secs, layer=layer)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from ``start_step`` to ``train.steps``; returns a summary (losses, checkpoint path, events).

        The shards run the loop; this waits for them, recovers a failed run (see :mod:`raymoe.actors.elastic`)
        and runs the schedule again from where the recovery puts it; between runs the world may grow.
        """
        t = self.cfg.train
        self.run_log = RunLog(self.run_dir, total_steps=t.steps, log_interval=t.log_interval,
                              start_step=self.start_step, resume=self.start_step > 0 or self.restart is not None,
                              progress=False)
        self.run_log.write_config(self.cfg.model_dump(mode="json"))
        for event in self._pending_events:
            self.run_log.event(event)
        self._pending_events = []
        step = self.start_step
        try:
            while step < t.steps or t.steps not in self._committed:
                self._maybe_hold(step)
                step = self.elastic.maybe_grow(step)
                self._stop_sent = False
                try:
                    step = self._run_shards(step)
                except SHARD_FAILURES as err:
                    step, record = self.elastic.recover(err, self._last_logged)
                    if record is not None and record["step"] > self._last_logged:
                        self._log(record)  # rank 0 died before reporting a step every survivor completed
        finally:
            self.run_log.close()
            self.outputs.push()
        summary = self.run_log.finish({"checkpoint": self._committed[t.steps], "world": self.group.world,
                                       "ep_sizes": self.group.ep_sizes, "events": self.events})
        self.outputs.push()  # the summary and plots
        return summary

    def _run_shards(self, step: int) -> int:
        """Hand every shard the schedule from ``step`` and wait until they return (the next step); raises the
        first failure at once, or GetTimeoutError when no step finished for too long (a hang)."""
        hold = self._hold_step if self._hold_step is not None and self._hold_step > step else None
        refs = [s.run.remote(step, hold) for s in self.group.shards]
        self.group.track(refs)
        stall_s = max(60.0, 2 * self.cfg.cluster.collective_timeout_s)
        self._last_report = time.monotonic()
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                ray.get(ref)  # a shard's failure surfaces right away
            if pending and time.monotonic() - self._last_report > stall_s:
                raise ray.exceptions.GetTimeoutError(f"no step finished in {stall_s:.0f}s")
        nexts = ray.get(refs)
        assert len(set(nexts)) == 1, f"shards stopped at different steps: {nexts}"
        return nexts[0]

    def _maybe_hold(self, step: int) -> None:
        if self._hold_step == step:
            self._held.set()
            self._released.wait(timeout=300)
            self._hold_step = None


def _logged_history(path: Path) -> tuple[list[dict], int]:
    """(membership events, last step) that a run folder's metrics.jsonl records; a line cut short by a killed
    writer is skipped."""
    events, last = [], 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" in rec:
                events.append(rec)
            elif "step" in rec:
                last = max(last, int(rec["step"]))
    return events, last


def remote_coordinator():
    """The Coordinator actor class, pinned to the caller's node (the driver's: on a cluster, the head), so
    losing a worker node never takes the coordinator with it. It reserves no CPU so all CPUs go to the shards.
    Reports run on a thread of their own, in order; queries (shard_info, check_health) are answered while
    ``run`` waits."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"reports": 1},
                      scheduling_strategy=here)(Coordinator)
