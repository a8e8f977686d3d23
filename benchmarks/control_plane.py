"""The coordinator's cost per training step, for 1 to 64 no-op shards: per-step fan-out vs. the shards' own loop.

Each shard's step is a fixed sleep (``--step-ms``), so any time above it is control-plane overhead:

- ``fanout``: the coordinator calls every shard once per step and waits for all of them (how raymoe drove
  training before the loop moved into the shards): one actor call per shard per step.
- ``spmd``: the real :class:`raymoe.actors.coordinator.Coordinator` with no-op shards injected; it hands every
  shard ``run(start, stop_at)`` once, the shards loop by themselves and rank 0 reports each step's record
  (what raymoe does now). The step time is read from rank 0's step timestamps (in its records), so the run's
  fixed costs (placement, the final checkpoint commit, plots) are not counted as per-step cost.

Prints, per shard count, the overhead per step in ms for both and their ratio. Run:

    python benchmarks/control_plane.py                 # 1, 8, 32, 64 shards, 100 steps
    python benchmarks/control_plane.py --shards 1 4 --steps 20   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import ray

from raymoe.platform.checkpoint import record_written


class NoOpShard:
    """The shard interface the coordinator uses, doing nothing but sleeping ``step_s`` per step."""

    step_s = 0.0  # set by noop_shard_class

    def __init__(self, cfg: dict):
        self.cfg, self.rank, self.coordinator = cfg, -1, None

    def node_info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": "127.0.0.1", "pid": os.getpid(), "gpu_ids": []}

    def free_port(self) -> int:
        return 0

    def start(self, init_method, rank, world, ep_sizes, ranks_per_node, parts=None, step=0, coordinator=None,
              buddy=None) -> dict:
        self.rank, self.world, self.coordinator = rank, world, coordinator
        return {"rank": rank, "experts": {}, "device": "cpu"}

    def step(self, step: int) -> dict:  # the fan-out design's per-step call
        time.sleep(self.step_s)
        return {"step": step + 1, "loss": 1.0}

    def run(self, start: int, stop_at: int | None = None) -> int:  # the SPMD design's one call
        steps = self.cfg["train"]["steps"]
        sent = []
        for step in range(start, steps if stop_at is None else min(stop_at, steps)):
            time.sleep(self.step_s)
            if self.rank == 0:
                sent.append(self.coordinator.report.remote({**_record(step + 1, self.world),
                                                            "t": time.perf_counter()}))
        if self.rank == 0:
            ray.get(sent)
            path = os.path.join(self.cfg["run"]["output_dir"], self.cfg["run"]["name"], "checkpoints",
                                f"step_{steps:08d}")
            for rank in range(self.world):  # every rank "wrote" nothing: the commit checks each one's record
                record_written(path, rank, {})
            ray.get(self.coordinator.commit_checkpoint.remote(steps, path))
        return steps

    def check_health(self) -> dict:
        return {"rank": self.rank}

    def shutdown(self) -> None:
        pass


def _record(step: int, world: int) -> dict:
    return {"step": step, "loss": 1.0, "ce_loss": 1.0, "aux_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
            "tokens": 128, "step_s": 0.001, "tokens_per_s": 1.0, "kd": False, "world": world}


def noop_shard_class(step_s: float):
    """The shard class factory the coordinator takes (``shard_cls``), for shards whose step sleeps ``step_s``."""
    cls = type("NoOpShard", (NoOpShard,), {"step_s": step_s})

    def factory(num_cpus: float, num_gpus: float):
        return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=4)(cls)

    return factory


def _config(n: int, steps: int, out: str) -> dict:
    return {"run": {"name": f"cp{n}", "output_dir": out}, "model": {"n_layer": 1, "d_model": 8, "n_head": 1},
            "moe": {"moe_layers": []}, "data": {"cache_dir": os.path.join(out, "cache")},
            "train": {"steps": steps, "global_batch_size": n, "log_interval": 1, "eval_interval": steps,
                      "progress": False},
            "cluster": {"mode": "ray", "num_workers": n, "cpus_per_worker": 0.01, "elastic": False},
            "sample": {"max_new_tokens": 0}}


def measure(n: int, steps: int, step_s: float, out: str) -> tuple[float, float]:
    """(fan-out, SPMD) overhead per step in ms for ``n`` no-op shards."""
    from raymoe.actors.coordinator import remote_coordinator

    cfg = _config(n, steps, out)
    shard_cls = noop_shard_class(step_s)
    shards = [shard_cls(0.01, 0).remote(cfg) for _ in range(n)]
    try:
        ray.get([s.step.remote(0) for s in shards], timeout=300)  # started and warm
        t0 = time.perf_counter()
        for step in range(steps):
            ray.get([s.step.remote(step) for s in shards])
        fanout = (time.perf_counter() - t0) / steps - step_s
    finally:
        for s in shards:
            ray.kill(s)
    coord = remote_coordinator().remote(cfg, shard_cls=shard_cls)
    try:
        ray.get(coord.start.remote(), timeout=300)
        summary = ray.get(coord.run.remote(), timeout=600)
        with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
            stamps = [json.loads(line)["t"] for line in f if '"t"' in line]
        if len(stamps) != steps:
            raise RuntimeError(f"the coordinator logged {len(stamps)} of {steps} steps' records")
        spmd = (stamps[-1] - stamps[0]) / (len(stamps) - 1) - step_s
    finally:
        ray.get(coord.shutdown.remote(), timeout=120)
        ray.kill(coord)
    return fanout * 1e3, spmd * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-ms", type=float, default=5.0, help="each no-op shard's step time")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.shards) or args.steps < 1 or args.step_ms < 0:
        ap.error("--shards and --steps must be >= 1, --step-ms >= 0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"coordinator overhead per step (ms above the shards' {args.step_ms:g} ms step), {args.steps} steps")
    print(f"{'shards':>7} {'fan-out':>9} {'spmd':>9} {'fan-out/spmd':>13}")
    try:
        with tempfile.TemporaryDirectory() as out:
            for n in args.shards:
                fanout, spmd = measure(n, args.steps, args.step_ms / 1e3, out)
                ratio = fanout / spmd if spmd > 0 else float("inf")
                print(f"{n:>7} {fanout:>9.2f} {spmd:>9.2f} {ratio:>13.1f}", flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
