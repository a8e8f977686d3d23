"""Driver side of distributed training: connect to Ray, start the Coordinator, wait for the summary.

Works the same when run locally (a Ray instance is started if none is running) and under
``ray job submit -- raymoe train --config ...`` (the job's driver connects to its cluster).
"""

from __future__ import annotations

import os

import ray

from raymoe.config import RaymoeConfig

from .coordinator import remote_coordinator


def connect(address: str | None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS / a running cluster, else start a local one; True if we started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        ray.init(address="local", include_dashboard=False)
        return True


def train_on_ray(cfg: RaymoeConfig) -> dict:
    """Run ``cfg`` with a Coordinator actor and ``cluster.num_workers`` ExpertShard actors."""
    started = connect(cfg.cluster.address)
    coordinator = remote_coordinator().remote(cfg.model_dump(mode="json"))
    try:
        info = ray.get(coordinator.start.remote(), timeout=cfg.cluster.start_timeout_s)
        print(f"coordinator: {info['world']} shards on {info['nodes']} node(s), expert-parallel sizes "
              f"{info['ep_sizes']}, starting at step {info['start_step']}", flush=True)
        return ray.get(coordinator.run.remote())
    finally:
        try:
            ray.get(coordinator.shutdown.remote(), timeout=60)
        finally:
            ray.kill(coordinator)
            if started:
                ray.shutdown()
