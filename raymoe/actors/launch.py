"""Driver side of distributed training: connect to Ray, start the Coordinator, wait for the summary.

Works the same when run locally (a Ray instance is started if none is running) and under
``ray job submit -- raymoe train --config ...`` (the job's driver connects to its cluster).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import ray

from raymoe.config import RaymoeConfig, config_to_dict, resolve_output_dir
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import storage
from raymoe.platform.training import resume_source

from .coordinator import remote_coordinator
from .shard_group import remove_placement_groups


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
    ckpt_dir = storage.RunOutputs(cfg.run.output_dir, cfg.run.name).checkpoints
    if cfg.checkpoint.resume is True and resume_source(cfg, ckpt_dir) is None:
        return (f"WARNING: checkpoint.resume=true but there is no checkpoint in {ckpt_dir}: starting at step 0 "
                "(checkpoint.resume=must fails instead)")
    resume_source(cfg, ckpt_dir)  # raises for resume=must without a checkpoint
    return None


def train_on_ray(cfg: RaymoeConfig, on_start=None) -> dict:
    """Run ``cfg`` with a Coordinator actor and ``cluster.num_workers`` ExpertShard actors.

    If the coordinator's process dies (its shards die with it), a new coordinator starts new shards from the run's
    latest checkpoint, up to ``cluster.coordinator_restarts`` times; the run's summary and metrics.jsonl get a
    recovery event with ``coordinator_lost``. ``on_start(coordinator, info)`` is called each time a coordinator
    has started (tests and operators find its process with ``coordinator.node_info``)."""
    cfg = with_absolute_outputs(cfg)
    print(f"outputs: {storage.RunOutputs(cfg.run.output_dir, cfg.run.name)}", flush=True)
    warning = check_resume(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    started = connect(cfg.cluster.address)
    restart = None
    try:
        for attempt in range(cfg.cluster.coordinator_restarts + 1):
            try:
                return _run_coordinator(cfg, restart, on_start)
            except ray.exceptions.RayActorError as err:
                # RayTaskError: the coordinator raised (e.g. a failure it could not recover from), not lost
                if isinstance(err, ray.exceptions.RayTaskError) or attempt == cfg.cluster.coordinator_restarts:
                    raise
                print(f"coordinator lost ({type(err).__name__}); starting a new one from the latest checkpoint "
                      f"({attempt + 1}/{cfg.cluster.coordinator_restarts})", file=sys.stderr, flush=True)
                restart = {"attempt": attempt + 1, "t0": time.time(), "error": type(err).__name__}
                cfg = _resume_latest(cfg)
        raise AssertionError("unreachable")
    finally:
        if started:
            ray.shutdown()


def _resume_latest(cfg: RaymoeConfig) -> RaymoeConfig:
    """``cfg`` resuming from the run's latest checkpoint, if it has one (else as configured)."""
    if ckpt.latest_checkpoint(storage.RunOutputs(cfg.run.output_dir, cfg.run.name).checkpoints) is None:
        return cfg
    out = cfg.model_copy(deep=True)
    out.checkpoint.resume = True
    return out


def _run_coordinator(cfg: RaymoeConfig, restart: dict | None, on_start) -> dict:
    pg_prefix = f"raymoe/{cfg.run.name}/{uuid.uuid4().hex[:12]}"
    coordinator = remote_coordinator().remote(config_to_dict(cfg), None, restart, pg_prefix)
    try:
        info = ray.get(coordinator.start.remote(), timeout=cfg.cluster.start_timeout_s)
        print(f"coordinator: {info['world']} shards on {info['nodes']} node(s), expert-parallel sizes "
              f"{info['ep_sizes']}, starting at step {info['start_step']}", flush=True)
        if on_start is not None:
            on_start(coordinator, info)
        return ray.get(coordinator.run.remote())
    finally:
        try:
            ray.get(coordinator.shutdown.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass  # the coordinator is gone, and its shards with it
        finally:
            ray.kill(coordinator)
            remove_placement_groups(pg_prefix)  # a dead coordinator's reservations outlive it
