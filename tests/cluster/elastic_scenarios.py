"""Elastic-training scenarios on a multi-node `ray.cluster_utils.Cluster`, one per process.

Run by tests/cluster/test_elastic.py as `python elastic_scenarios.py SCENARIO OUT_DIR`; prints one JSON line
with what happened. A separate process per scenario keeps its Ray cluster apart from the test session's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from raymoe.actors.coordinator import remote_coordinator
from raymoe.config import load_config
from raymoe.platform.trainer import LocalTrainer

TINY = [
    "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
    "moe.num_experts=4", "moe.k=1", "moe.min_capacity=2", "moe.capacity_factor=1.25",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2", "train.eval_interval=100",
    "train.eval_batches=1", "train.log_interval=1", "train.progress=false", "train.steps=8", "train.threads=1",
    "sample.max_new_tokens=0", "cluster.cpus_per_worker=1", "cluster.collective_timeout_s=20",
    "cluster.start_timeout_s=120", "checkpoint.keep_last=10",
]
SCENARIOS = {
    # 2 shards holding the same experts (EP=1); one dies inside the checkpoint write of step 4
    "save_fault": ["cluster.num_workers=2", "cluster.ep_size=1", "checkpoint.interval=2"],
    # 1 shard with room for 2: a node is added (the world grows at a step boundary), then the new shard is
    # killed by PID; the experts are replicated (EP=1), so no step is lost
    # steps enough for the replacement to join before the end even on a loaded machine
    "grow_then_kill": ["cluster.num_workers=1", "cluster.max_workers=2", "cluster.ep_size=1", "train.steps=100"],
    # 2 shards each holding half the experts (EP=2, no replica): one's node is removed; the in-memory copies
    # (own + buddy, every 2 steps) restore its experts
    "remove_node": ["cluster.num_workers=2", "cluster.ep_size=2", "cluster.buddy_interval=2"],
    # remove_node with a modern-family model: GQA + RoPE + RMSNorm, SwiGLU experts, DeepSeek-V3's sigmoid
    # group-limited router with its correction bias (moved by aux-loss-free updates), a shared expert
    "remove_node_family": ["cluster.num_workers=2", "cluster.ep_size=2", "cluster.buddy_interval=2",
                           "model.n_kv_head=1", "model.position=rope", "model.norm=rmsnorm", "model.bias=false",
                           "model.mlp=swiglu", "moe.k=2", "moe.router=sigmoid_group", "moe.n_group=2",
                           "moe.topk_group=1", "moe.norm_topk_prob=true", "moe.shared_expert_ffn=16",
                           "moe.expert_bias=true", "moe.expert_bias_update_rate=0.01"],
    # FSDP2 (dense and experts sharded, EP=1) over 2 shards with room for 3 (12 samples a step: worlds 2 and 3 split
    # it): a node joins while the run is held before step 3 (the sharded world grows 2 -> 3), then shard 1 dies
    # inside the checkpoint write of step 4, after the step's record went round and before anything of the next
    # step: the survivors' shards and the dead shard's copy at its buddy (every step) are at step 4. Its
    # replacement then joins in the bundle it left (2 -> 3 again)
    "sharded_grow_save_fault": ["cluster.num_workers=2", "cluster.max_workers=3", "cluster.ep_size=1",
                                "cluster.buddy_interval=1", "cluster.dense_sharding=shard",
                                "cluster.expert_sharding=shard", "checkpoint.interval=2", "train.global_batch_size=12"],
    # 3 shards (EP auto: 1 at 3 shards, 2 at 2) and 3 micro-batches a step; one's node is removed: the 2 left run
    # 2 and 1 micro-batches (the second a padding pass besides), in lockstep through the EP=2 all-to-alls (more
    # steps: the removed node's shard may keep answering for a few steps before it is gone, and at EP=1 nothing
    # waits for its all-to-alls)
    "remove_node_uneven": ["cluster.num_workers=3", "train.global_batch_size=6", "train.steps=24"],
    # the same loss without in-memory copies: the lost experts come back from the last checkpoint
    # (more steps: the removed node's shard may keep answering for a few steps before it is gone)
    "remove_node_checkpoint": ["cluster.num_workers=2", "cluster.ep_size=2", "cluster.buddy_interval=0",
                               "checkpoint.interval=2", "train.steps=24"],
    # 2 shards holding the same experts (EP=1), one per node; a shard is killed by PID three times: each time
    # the world shrinks to 1 and grows back to 2 in the bundle the dead shard left
    "kill_three_times": ["cluster.num_workers=2", "cluster.ep_size=1", "train.steps=3000", "train.log_interval=50"],
    # 2 shards (EP=1): shard 1 dies inside step 3, and its replacement dies while it joins the world; the next
    # replacement joins
    "kill_replacement": ["cluster.num_workers=2", "cluster.ep_size=1", "train.steps=12"],
    # 2 shards (EP=2) both killed by PID while held before step 6: a new world restarts from the step-4 checkpoint
    "all_lost": ["cluster.num_workers=2", "cluster.ep_size=2", "checkpoint.interval=4", "train.steps=12"],
    # 2 shards (EP=2), one CPU each and no more; the coordinator's process is killed by PID after step 10: the
    # driver starts a new coordinator, whose new shards resume from the latest checkpoint (every 4 steps)
    "coordinator_killed": ["cluster.num_workers=2", "cluster.ep_size=2", "checkpoint.interval=4", "train.steps=40"],
}


def _kill_three_times(coord, result: dict) -> None:
    """Kill the last shard by PID, wait until the world is back to 2, three times; then stop the run early."""
    from ray.util.placement_group import placement_group_table

    worlds = []
    for n in range(1, 4):
        infos = ray.get(coord.shard_info.remote(), timeout=60)
        os.kill(infos[-1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while sum(e["event"] == "replace" for e in ray.get(coord.membership_events.remote(), timeout=60)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the world did not grow back after kill {n}")
            time.sleep(0.2)
        worlds.append(len(ray.get(coord.shard_info.remote(), timeout=60)))
    result["worlds_after_regrow"] = worlds
    result["placement_groups"] = sum(pg["state"] == "CREATED" for pg in placement_group_table().values())


def _last_step(metrics: Path) -> int:
    steps = [0]
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written
                pass
    return max(steps)


def _kill_coordinator(cfg, run_dir: Path, result: dict) -> dict:
    """Train with the driver (train_on_ray) in a thread; kill the coordinator's process once step 10 is logged;
    return the run's summary."""
    from raymoe.actors.launch import train_on_ray

    started: list = []
    box: dict = {}

    def drive():
        try:
            box["summary"] = train_on_ray(cfg, on_start=lambda coordinator, info: started.append(coordinator))
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while _last_step(run_dir / "metrics.jsonl") < 10:
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError(f"the run did not reach step 10: {box}")
        time.sleep(0.05)
    pid = ray.get(started[0].node_info.remote(), timeout=30)["pid"]
    os.kill(pid, signal.SIGKILL)
    result["killed_after_step"] = _last_step(run_dir / "metrics.jsonl")
    thread.join(timeout=300)
    if thread.is_alive():
        raise TimeoutError("the run did not finish after the coordinator was killed")
    if "error" in box:
        raise box["error"]
    result["coordinators"] = len(started)
    return box["summary"]


def main(scenario: str, out: Path) -> dict:
    sets = TINY + SCENARIOS[scenario] + [f"run.output_dir={out}", f"data.cache_dir={out / 'cache'}"]
    ref = ({"last_loss": None} if scenario == "kill_three_times"
           else LocalTrainer(load_config(None, sets + ["run.name=reference"])).run())
    cfg = load_config(None, sets + ["cluster.mode=ray", "run.name=elastic"])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           "health_check_initial_delay_ms": 0}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(cfg.cluster.num_workers)]
    ray.init(address=cluster.address)
    result: dict = {"reference_final_loss": ref["last_loss"]}
    try:
        run_dir = out / "elastic"
        if scenario == "coordinator_killed":
            summary = _kill_coordinator(cfg, run_dir, result)
            return _finish(result, summary, run_dir, out)
        coord = remote_coordinator().remote(cfg.model_dump(mode="json"))
        ray.get(coord.start.remote(), timeout=180)
        infos = ray.get(coord.shard_info.remote(), timeout=30)
        if scenario == "save_fault":
            ray.get(coord.inject_fault.remote(1, "save", 4), timeout=30)
        if scenario == "sharded_grow_save_fault":
            ray.get(coord.inject_fault.remote(1, "save", 4), timeout=30)
        if scenario == "kill_replacement":
            ray.get(coord.inject_fault.remote(1, "train_step", 3), timeout=30)
            ray.get(coord.inject_join_fault.remote(1), timeout=30)
        hold = {"grow_then_kill": 3, "sharded_grow_save_fault": 3, "remove_node": 3, "remove_node_family": 3,
                "remove_node_checkpoint": 3, "remove_node_uneven": 3, "all_lost": 6}.get(scenario)
        if hold is not None:
            # hold the run before a step and change the cluster while it waits: deterministic, not a race
            ray.get(coord.hold_before_step.remote(hold), timeout=30)
        run = coord.run.remote()
        if scenario == "kill_three_times":
            _kill_three_times(coord, result)
            result["events"] = ray.get(coord.membership_events.remote(), timeout=60)
            return result
        if hold is not None:
            deadline = time.monotonic() + 120
            while not ray.get(coord.is_held.remote(), timeout=60):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run did not reach step {hold}")
                time.sleep(0.1)
        if scenario == "sharded_grow_save_fault":
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.get(coord.release.remote(), timeout=30)
        if scenario == "grow_then_kill":
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.get(coord.release.remote(), timeout=30)
            deadline = time.monotonic() + 120
            while not any(e["event"] == "grow" for e in ray.get(coord.membership_events.remote(), timeout=60)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the world did not grow")
                time.sleep(0.2)
            infos = ray.get(coord.shard_info.remote(), timeout=60)
            result["world_before_kill"] = len(infos)
            os.kill(infos[-1]["pid"], signal.SIGKILL)
        elif scenario == "all_lost":
            for info in infos:
                os.kill(info["pid"], signal.SIGKILL)
            ray.get(coord.release.remote(), timeout=30)
        elif scenario in ("remove_node", "remove_node_family", "remove_node_checkpoint", "remove_node_uneven"):
            victim = next(n for n in nodes if n.node_id == infos[1]["node_id"])
            cluster.remove_node(victim, allow_graceful=False)
            _wait_gone(infos[1]["pid"])  # else a loaded machine may finish the run before the shard is gone
            ray.get(coord.release.remote(), timeout=30)
        summary = ray.get(run, timeout=300)
        ray.get(coord.shutdown.remote(), timeout=60)
        return _finish(result, summary, run_dir, out)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _wait_gone(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until the process ``pid`` (a shard on a removed node) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the removed node's shard (pid {pid}) still runs after {timeout_s:.0f} s")
        time.sleep(0.05)


def _finish(result: dict, summary: dict, run_dir: Path, out: Path) -> dict:
    """The run's events, world, per-step losses (a replayed step's last record wins) and checkpoints, with the
    uninterrupted reference's losses."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result.update(events=summary["events"], world=summary["world"], final_loss=summary["last_loss"],
                  losses={r["step"]: r["loss"] for r in records if "loss" in r},
                  reference_losses={r["step"]: r["loss"] for r in (
                      json.loads(x) for x in (out / "reference" / "metrics.jsonl").read_text().splitlines())},
                  checkpoints=sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()))
    return result


if __name__ == "__main__":
    res = main(sys.argv[1], Path(sys.argv[2]))
    print("RESULT " + json.dumps(res, default=str))
