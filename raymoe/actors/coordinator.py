"""Coordinator: the Ray actor that places the expert shards, hands out the rendezvous and drives training.

Per step it plans which windows of the token stream each shard reads (a pure function of seed and step, so a
different world size re-plans the same global batch), sends those offsets to the shards, and gathers their
scalar results. Activations never pass through here or through the object store: the shards exchange them
by all-to-all inside the MoE layers.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from raymoe.config import RaymoeConfig, config_from_dict, moe_layer_ids
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import metrics as M
from raymoe.platform.data import build_dataset, eval_window_starts, global_batch_starts
from raymoe.platform.parallel import choose_ep_size
from raymoe.platform.train_step import lr_at
from raymoe.platform.model_io import gpt_config_from
from raymoe.platform.trainer import MetricsLog, format_step_line, write_plots

from .elastic import SHARD_FAILURES, Elastic
from .expert_shard import remote_class
from .telemetry import RayMetrics


def plan_ep_sizes(cfg: RaymoeConfig, world: int, elastic: bool = False) -> dict[int, int]:
    """Expert-parallel degree per MoE layer from ``cluster.ep_size`` (int, per-layer list or 'auto').

    With ``elastic``, a configured size that does not fit the current world (after shards were lost or added)
    falls back to 'auto' for that world instead of failing.
    """
    layers = moe_layer_ids(cfg)
    experts = gpt_config_from(cfg).experts_per_layer()
    ep = cfg.cluster.ep_size
    fits = lambda lid, e: world % e == 0 and experts[lid] % e == 0  # noqa: E731
    if ep != "auto" and elastic:
        wanted = dict(zip(layers, ep)) if isinstance(ep, list) else {lid: ep for lid in layers}
        if not all(fits(lid, e) for lid, e in wanted.items()):
            ep = "auto"
    if ep == "auto":
        sizes = {lid: choose_ep_size(experts[lid], world) for lid in layers}
    elif isinstance(ep, list):
        sizes = dict(zip(layers, ep))
    else:
        sizes = {lid: ep for lid in layers}
    for lid, e in sizes.items():
        if not fits(lid, e):
            raise ValueError(f"cluster.ep_size={e} for MoE layer {lid}: must divide cluster.num_workers={world} "
                             f"and that layer's num_experts={experts[lid]}")
    return sizes


def rank_order(infos: list[dict]) -> list[int]:
    """Shard indices ordered so that shards on one node get consecutive ranks (node order of first sight)."""
    first_seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        first_seen.setdefault(info["node_id"], i)
    return sorted(range(len(infos)), key=lambda i: (first_seen[infos[i]["node_id"]], i))


class Coordinator(Elastic):
    """Drives distributed training; lifecycle verbs: start, run, check_health, shutdown."""

    def __init__(self, cfg: dict):
        self.cfg: RaymoeConfig = config_from_dict(cfg, source="driver")
        self.cfg_dict = cfg
        self.world = self.cfg.cluster.num_workers
        self.shards: list = []
        self.pg = None
        self.metrics = RayMetrics(M.ALL_METRICS)
        self.run_dir = Path(self.cfg.run.output_dir) / self.cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        ds = build_dataset(self.cfg.data.sources or None, cache_dir=self.cfg.data.cache_dir,
                           jsonl_field=self.cfg.data.jsonl_field)
        self.train_ds, self.val_ds = ds.split(self.cfg.data.val_fraction, block_size=self.cfg.model.block_size)
        self.start_step = 0
        self.model_cfg = gpt_config_from(self.cfg)
        t = self.cfg.train
        # fixed for the whole run: when the world changes, shards run more or fewer micro-batches per step
        self.micro = t.micro_batch_size or t.global_batch_size // self.world
        self._init_elastic()
        self._hold_step: int | None = None
        self._held, self._released = threading.Event(), threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> dict:
        """Reserve a placement group, create the shards, rendezvous, build groups and models; maybe resume."""
        c = self.cfg.cluster
        self.pg = placement_group([self._bundle() for _ in range(self.world)], strategy=c.placement_strategy)
        ray.get(self.pg.ready(), timeout=c.start_timeout_s)
        info = self.configure([self._new_shard(self.pg, i) for i in range(self.world)])
        self.start_step = self._maybe_resume()
        return {**info, "start_step": self.start_step}

    def _bundle(self) -> dict:
        c = self.cfg.cluster
        return {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}

    def _new_shard(self, pg, bundle_index: int):
        c = self.cfg.cluster
        return remote_class(c.cpus_per_worker, c.gpus_per_worker).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle_index)).remote(self.cfg_dict)

    def form_world(self, shards: list, parts_ref=None, step: int = 0, ckpt_path: str | None = None) -> dict:
        """(Re)form the world from ``shards``: ranks ordered by node, EP sizes for this world size, a fresh
        rendezvous; ``parts_ref`` (an ObjectRef of exported checkpoint files) or ``ckpt_path`` restores the
        state. Raises a SHARD_FAILURES error if a shard dies meanwhile (see ``Elastic.configure``)."""
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
        ep_sizes = plan_ep_sizes(self.cfg, world, elastic=c.elastic)
        port = ray.get(shards[0].free_port.remote(), timeout=c.start_timeout_s)
        init_method = f"tcp://{infos[0]['ip']}:{port}"
        self.shards, self.infos, self.world, self.ep_sizes = shards, infos, world, ep_sizes
        started = self.gather([s.start.remote(init_method, r, world, ep_sizes, ranks_per_node, parts_ref, step)
                               for r, s in enumerate(shards)], timeout=c.start_timeout_s)
        if ckpt_path is not None:
            self.gather([s.load.remote(str(ckpt_path)) for s in shards], timeout=c.start_timeout_s)
        self.expert_sets = [{(int(lid), g) for lid, ids in st["experts"].items() for g in ids} for st in started]
        self.metrics.set(M.WORLD_SIZE, world)
        return {"world": world, "ep_sizes": ep_sizes, "ranks_per_node": ranks_per_node,
                "nodes": len(per_node), "shards": started}

    def _maybe_resume(self) -> int:
        resume = self.cfg.checkpoint.resume
        if resume is False:
            return 0
        path = ckpt.latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            return 0
        steps = ray.get([s.load.remote(str(path)) for s in self.shards], timeout=self.cfg.cluster.start_timeout_s)
        return steps[0]

    def shard_info(self) -> list[dict]:
        """Node, IP and PID of each shard in rank order (operators and tests use it to find a process)."""
        return self.infos

    def membership_events(self) -> list[dict]:
        """Recoveries and growths so far (also in metrics.jsonl and the run summary)."""
        return list(self.events)

    def inject_fault(self, rank: int, where: str, step: int) -> None:
        """Test hook: make shard ``rank`` exit abruptly inside ``train_step`` or ``save`` at ``step``."""
        ray.get(self.shards[rank].inject_fault.remote(where, step), timeout=30)

    def hold_before_step(self, step: int) -> None:
        """Test/operations hook: pause ``run`` before ``step`` until :meth:`release` (at most 5 minutes)."""
        self._hold_step = step
        self._held.clear()
        self._released.clear()

    def is_held(self) -> bool:
        return self._held.is_set()

    def release(self) -> None:
        self._released.set()

    def _maybe_hold(self, step: int) -> None:
        if self._hold_step == step:
            self._held.set()
            self._released.wait(timeout=300)
            self._hold_step = None

    def check_health(self) -> bool:
        ray.get([s.check_health.remote() for s in self.shards], timeout=self.cfg.cluster.collective_timeout_s)
        return True

    def shutdown(self) -> None:
        """Tear down the process groups, the shards and the placement group."""
        if self.shards:
            try:
                ray.get([s.shutdown.remote() for s in self.shards], timeout=30)
            except Exception:  # a shard that is already gone cannot tear down; kill it below
                pass
            for s in self.shards:
                ray.kill(s)
            self.shards = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self._remove_extra_pgs()

    # -- planning -----------------------------------------------------------------------------------------
    def plan_step(self, step: int) -> list[list[int]]:
        """Window offsets of each rank's share of the global batch of ``step`` (contiguous slices)."""
        t = self.cfg.train
        starts = global_batch_starts(self.cfg.run.seed, step, t.global_batch_size,
                                     self.train_ds.num_windows(self.cfg.model.block_size), self.train_ds.name)
        return [s.tolist() for s in np.array_split(starts, self.world)]

    def evaluate(self) -> dict[str, float]:
        """Validation cross-entropy over the same windows as local training evaluates, split over the ranks."""
        t = self.cfg.train
        starts = eval_window_starts(self.val_ds, self.cfg.model.block_size, t.global_batch_size, t.eval_batches)
        outs = self.gather([s.eval_step.remote(c.tolist(), self.micro)
                            for s, c in zip(self.shards, np.array_split(starts, self.world))])
        loss = sum(o[0] for o in outs) / sum(o[1] for o in outs)
        return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50.0)))}

    def save(self, step: int) -> str:
        """Every shard writes its part, then the manifest is committed here, last."""
        paths = self.gather([s.save.remote(str(self.ckpt_dir), step) for s in self.shards])
        model_cfg = self.model_cfg
        ckpt.finalize_checkpoint(paths[0], step=step, config=self.cfg.model_dump(mode="json"),
                                 extra={"model_config": model_cfg.to_dict(), "ep_sizes": self.ep_sizes,
                                        "world": self.world},
                                 expected_experts=model_cfg.experts_per_layer())
        for old in ckpt.list_checkpoints(self.ckpt_dir)[:-self.cfg.checkpoint.keep_last]:
            ckpt.remove_checkpoint(old)
        return paths[0]

    # -- the loop -----------------------------------------------------------------------------------------
    def _aggregate(self, outs: list[dict], step: int, wall_s: float) -> dict:
        rec = {"step": step, "loss": float(np.mean([o["loss"] for o in outs])),
               "ce_loss": float(np.mean([o["ce_loss"] for o in outs])),
               "aux_loss": float(np.mean([o["aux_loss"] for o in outs])), "lr": outs[0]["lr"],
               "grad_norm": outs[0]["grad_norm"], "tokens": sum(o["tokens"] for o in outs), "step_s": wall_s,
               "world": self.world}
        rec["tokens_per_s"] = rec["tokens"] / wall_s if wall_s > 0 else 0.0
        if outs[0]["expert_counts"]:
            rec["expert_counts"] = [np.sum([o["expert_counts"][i] for o in outs], axis=0).tolist()
                                    for i in range(len(outs[0]["expert_counts"]))]
            rec["dropped_fraction"] = np.mean([o["dropped_fraction"] for o in outs], axis=0).tolist()
            rec["l_aux"] = np.mean([o["l_aux"] for o in outs], axis=0).tolist()
            rec["all_to_all_s"] = {str(k): max(o["all_to_all_s"][k] for o in outs) for k in outs[0]["all_to_all_s"]}
        return rec

    def _export(self, rec: dict) -> None:
        m = self.metrics
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
        layers = moe_layer_ids(self.cfg)
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

    def run(self) -> dict:
        """Train from ``start_step`` to ``train.steps``; returns a summary (losses, checkpoint path, events).

        A failed step (a shard died, a collective broke) is recovered (see :mod:`raymoe.actors.elastic`) and
        run again; at step boundaries the world may grow.
        """
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        log = MetricsLog(self.run_dir, resume=self.start_step > 0)
        first = last = None
        val: dict = {}
        step = self.start_step
        try:
            while step < t.steps:
                self._maybe_hold(step)
                self.maybe_grow(step)
                lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
                t0 = time.perf_counter()
                try:
                    outs = self.gather([s.train_step.remote(step, p, lr, self.micro)
                                        for s, p in zip(self.shards, self.plan_step(step))])
                except SHARD_FAILURES as err:
                    step = self._recover_and_log(log, step, err)
                    continue
                rec = self._aggregate(outs, step + 1, time.perf_counter() - t0)
                first = rec["loss"] if first is None else first
                last = rec
                done = step + 1
                try:
                    if done % t.eval_interval == 0 or done == t.steps:
                        val = self.evaluate()
                        rec.update(val)
                    if cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done != t.steps:
                        self.save(done)
                    if cfg.cluster.buddy_interval and done % cfg.cluster.buddy_interval == 0:
                        self.snapshot(done)
                except SHARD_FAILURES as err:
                    step = self._recover_and_log(log, done, err)
                else:
                    step = done
                self._export(rec)
                if done % t.log_interval == 0 or "val_loss" in rec or done == t.steps:
                    log.write(rec)
                    print(format_step_line(rec, t.steps), flush=True)
            path = self._save_final(log, t.steps)
        finally:
            log.close()
        summary = {"run_dir": str(self.run_dir), "checkpoint": path, "first_loss": first,
                   "last_loss": last["loss"] if last else None, "world": self.world, "ep_sizes": self.ep_sizes,
                   "events": self.events, **val}
        summary["plots"] = [str(p) for p in write_plots(self.run_dir, print)]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def _recover_and_log(self, log: MetricsLog, step: int, err: BaseException) -> int:
        resume = self.recover(step, err)
        log.write(self.events[-1])
        return resume

    def _save_final(self, log: MetricsLog, step: int) -> str:
        for _ in range(3):
            try:
                return self.save(step)
            except SHARD_FAILURES as err:
                if self._recover_and_log(log, step, err) != step:
                    raise RuntimeError("a shard was lost during the final checkpoint and its experts had no "
                                       "live copy; rerun with checkpoint.resume=true") from err
        raise RuntimeError(f"the final checkpoint of step {step} failed 3 times")


def remote_coordinator():
    """The Coordinator actor class, pinned to the caller's node (the driver's: on a cluster, the head), so
    losing a worker node never takes the coordinator with it. It reserves no CPU so all CPUs go to the shards;
    a second thread answers queries (shard_info, check_health) while ``run`` drives the steps."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=2, scheduling_strategy=here)(Coordinator)
