"""Driver side of distributed training: connect to Ray, start the Coordinator, wait for the summary.

Works the same when run locally (a Ray instance is started if none is running) and under
``ray job submit -- raymoe train --config ...`` (the job's driver connects to its cluster).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray

from raymoe.config import RaymoeConfig, resolve_output_dir
from raymoe.platform.training import resume_source

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


def with_absolute_outputs(cfg: RaymoeConfig) -> RaymoeConfig:
    """``cfg`` with ``run.output_dir`` made absolute here, on the driver (see
    :func:`raymoe.config.resolve_output_dir`), so the coordinator and every shard write to the same folder
    and a job's outputs outlive Ray's copy of its working dir."""
    out = cfg.model_copy(deep=True)
    out.run.output_dir = str(resolve_output_dir(cfg.run.output_dir))
    return out


def check_resume(cfg: RaymoeConfig) -> str | None:
    """Fail now if ``checkpoint.resume: must`` finds no checkpoint; the warning to print if ``true`` finds none."""
    ckpt_dir = Path(cfg.run.output_dir) / cfg.run.name / "checkpoints"
    if cfg.checkpoint.resume is True and resume_source(cfg, ckpt_dir) is None:
        return (f"WARNING: checkpoint.resume=true but there is no checkpoint in {ckpt_dir}: starting at step 0 "
                "(checkpoint.resume=must fails instead)")
    resume_source(cfg, ckpt_dir)  # raises for resume=must without a checkpoint
    return None


def train_on_ray(cfg: RaymoeConfig) -> dict:
    """Run ``cfg`` with a Coordinator actor and ``cluster.num_workers`` ExpertShard actors."""
    cfg = with_absolute_outputs(cfg)
    print(f"outputs: {Path(cfg.run.output_dir) / cfg.run.name}", flush=True)
    warning = check_resume(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
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
