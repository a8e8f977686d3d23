"""Coordinator: the Ray actor that places the expert shards, hands out the rendezvous and drives training.

Per step it plans which windows of the token stream each shard reads (a pure function of seed and step, so a
different world size re-plans the same global batch), sends those offsets to the shards, and gathers their
scalar results. Activations never pass through here or through the object store: the shards exchange them
by all-to-all inside the MoE layers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.config import RaymoeConfig, config_from_dict, moe_layer_ids
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import metrics as M
from raymoe.platform.data import build_dataset, eval_window_starts, global_batch_starts
from raymoe.platform.parallel import choose_ep_size
from raymoe.platform.train_step import lr_at
from raymoe.platform.trainer import MetricsLog, format_step_line, write_plots, gpt_config_from

from .expert_shard import remote_class
from .telemetry import RayMetrics


def plan_ep_sizes(cfg: RaymoeConfig, world: int) -> dict[int, int]:
    """Expert-parallel degree per MoE layer from ``cluster.ep_size`` (int, per-layer list or 'auto')."""
    layers = moe_layer_ids(cfg)
    experts = gpt_config_from(cfg).experts_per_layer()
    ep = cfg.cluster.ep_size
    if ep == "auto":
        sizes = {lid: choose_ep_size(experts[lid], world) for lid in layers}
    elif isinstance(ep, list):
        sizes = dict(zip(layers, ep))
    else:
        sizes = {lid: ep for lid in layers}
    for lid, e in sizes.items():
        if world % e or experts[lid] % e:
            raise ValueError(f"cluster.ep_size={e} for MoE layer {lid}: must divide cluster.num_workers={world} "
                             f"and that layer's num_experts={experts[lid]}")
    return sizes


def rank_order(infos: list[dict]) -> list[int]:
    """Shard indices ordered so that shards on one node get consecutive ranks (node order of first sight)."""
    first_seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        first_seen.setdefault(info["node_id"], i)
    return sorted(range(len(infos)), key=lambda i: (first_seen[infos[i]["node_id"]], i))


class Coordinator:
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

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> dict:
        """Reserve a placement group, create the shards, rendezvous, build groups and models; maybe resume."""
        c = self.cfg.cluster
        bundle = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=c.placement_strategy)
        ray.get(self.pg.ready(), timeout=c.start_timeout_s)
        cls = remote_class(c.cpus_per_worker, c.gpus_per_worker)
        shards = [cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=i)).remote(self.cfg_dict)
            for i in range(self.world)]
        infos = ray.get([s.node_info.remote() for s in shards], timeout=c.start_timeout_s)
        order = rank_order(infos)
        self.shards = [shards[i] for i in order]
        self.infos = [infos[i] for i in order]
        per_node: dict[str, int] = {}
        for info in self.infos:
            per_node[info["node_id"]] = per_node.get(info["node_id"], 0) + 1
        ranks_per_node = c.ranks_per_node or (min(per_node.values()) if len(set(per_node.values())) == 1
                                              else None)
        self.ep_sizes = plan_ep_sizes(self.cfg, self.world)
        port = ray.get(self.shards[0].free_port.remote(), timeout=c.start_timeout_s)
        init_method = f"tcp://{self.infos[0]['ip']}:{port}"
        started = ray.get([s.start.remote(init_method, r, self.world, self.ep_sizes, ranks_per_node)
                           for r, s in enumerate(self.shards)], timeout=c.start_timeout_s)
        self.start_step = self._maybe_resume()
        self.metrics.set(M.WORLD_SIZE, self.world)
        return {"world": self.world, "ep_sizes": self.ep_sizes, "ranks_per_node": ranks_per_node,
                "nodes": len(per_node), "shards": started, "start_step": self.start_step}

    def _maybe_resume(self) -> int:
        resume = self.cfg.checkpoint.resume
        if resume is False:
            return 0
        path = ckpt.latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            return 0
        steps = ray.get([s.load.remote(str(path)) for s in self.shards], timeout=self.cfg.cluster.start_timeout_s)
        return steps[0]

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

    # -- planning -----------------------------------------------------------------------------------------
    def plan_step(self, step: int) -> list[list[int]]:
        """Window offsets of each rank's share of the global batch of ``step`` (contiguous slices)."""
        t = self.cfg.train
        starts = global_batch_starts(self.cfg.run.seed, step, t.global_batch_size,
                                     self.train_ds.num_windows(self.cfg.model.block_size), self.train_ds.name)
        return [s.tolist() for s in np.array_split(starts, self.world)]

    def micro_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size or t.global_batch_size // self.world

    def evaluate(self) -> dict[str, float]:
        """Validation cross-entropy over the same windows as local training evaluates, split over the ranks."""
        t = self.cfg.train
        starts = eval_window_starts(self.val_ds, self.cfg.model.block_size, t.global_batch_size, t.eval_batches)
        outs = ray.get([s.eval_step.remote(c.tolist(), self.micro_batch())
                        for s, c in zip(self.shards, np.array_split(starts, self.world))],
                       timeout=self.cfg.cluster.collective_timeout_s)
        loss = sum(o[0] for o in outs) / sum(o[1] for o in outs)
        return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50.0)))}

    def save(self, step: int) -> str:
        """Every shard writes its part, then the manifest is committed here, last."""
        paths = ray.get([s.save.remote(str(self.ckpt_dir), step) for s in self.shards],
                        timeout=self.cfg.cluster.collective_timeout_s)
        model_cfg = gpt_config_from(self.cfg)
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
        """Train from ``start_step`` to ``train.steps``; returns a summary (losses, checkpoint path)."""
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        log = MetricsLog(self.run_dir, resume=self.start_step > 0)
        first = last = None
        val: dict = {}
        try:
            for step in range(self.start_step, t.steps):
                lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
                plan = self.plan_step(step)
                t0 = time.perf_counter()
                outs = ray.get([s.train_step.remote(step, p, lr, self.micro_batch())
                                for s, p in zip(self.shards, plan)], timeout=cfg.cluster.collective_timeout_s)
                rec = self._aggregate(outs, step + 1, time.perf_counter() - t0)
                first = rec["loss"] if first is None else first
                last = rec
                done = step + 1
                if done % t.eval_interval == 0 or done == t.steps:
                    val = self.evaluate()
                    rec.update(val)
                self._export(rec)
                if done % t.log_interval == 0 or "val_loss" in rec or done == t.steps:
                    log.write(rec)
                    print(format_step_line(rec, t.steps), flush=True)
                if cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done != t.steps:
                    self.save(done)
        finally:
            log.close()
        path = self.save(t.steps)
        summary = {"run_dir": str(self.run_dir), "checkpoint": path, "first_loss": first,
                   "last_loss": last["loss"] if last else None, "world": self.world, "ep_sizes": self.ep_sizes,
                   **val}
        summary["plots"] = [str(p) for p in write_plots(self.run_dir, print)]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def remote_coordinator():
    """The Coordinator actor class; it reserves no CPU so all CPUs go to the shards."""
    return ray.remote(num_cpus=0)(Coordinator)
