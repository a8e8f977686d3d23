"""Spawned gloo worlds on 127.0.0.1 for tests that need several processes; every wait is bounded.

``spawn(world, run_job, jobs)`` starts ``world`` processes that join one gloo process group and call
``run_job(rank, world, job)`` (a module-level function, so the spawned processes can import it) for each job in
order; it returns every rank's results, ``results[rank][job]``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
SPAWN_TIMEOUT_S = 75


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, run_job: Callable, jobs: list[dict], out_dir: str,
           collective_timeout_s: float) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout_s))
    try:
        results = [run_job(rank, world, job) for job in jobs]
        dist.barrier()
        # saved before the teardown: gloo occasionally aborts a process while destroying its groups
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, run_job: Callable, jobs: list[dict], timeout: float = SPAWN_TIMEOUT_S,
          collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> list[list]:
    """Run ``jobs`` in a fresh gloo world of ``world`` processes; results[rank][job]."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), run_job, jobs, out_dir, collective_timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"world of {world} processes did not finish within {timeout} s")
        except mp.ProcessExitedException:
            if not all(os.path.exists(f) for f in files):  # a failure before the results, not the teardown
                raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(f, weights_only=True) for f in files]
