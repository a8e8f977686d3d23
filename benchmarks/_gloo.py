"""Spawned gloo ranks on 127.0.0.1 for the CPU benchmarks that need several processes."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist

from raymoe.platform.distributed import join_world, leave_world


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, timeout_s: float = 300.0):
    """Inside: this process is ``rank`` of a gloo world on 127.0.0.1:``port`` (one intra-op thread per rank,
    as the shards run); the process group is destroyed on the way out."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    join_world(f"tcp://127.0.0.1:{port}", rank, world, backend="gloo", device=torch.device("cpu"),
               timeout_s=timeout_s)  # as an expert shard joins its world
    try:
        yield
    finally:
        leave_world()


def _report(rank: int, world: int, port: int, measure, args: tuple, results) -> None:
    with gloo_rank(rank, world, port):
        results.put((rank, measure(rank, world, *args)))
        dist.barrier()


def run_world(world: int, measure, *args, timeout_s: float = 600.0) -> list:
    """``measure(rank, world, *args)`` (a module-level function) in each rank of a fresh spawned gloo world of
    ``world`` processes; every rank's result, in rank order."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_report, args=(world, free_port(), measure, args, results), nprocs=world,
                               join=False, start_method="spawn")
    got = dict(results.get(timeout=timeout_s) for _ in range(world))
    try:
        procs.join(timeout=60)
    except mp.ProcessExitedException as e:  # every rank reported; a gloo teardown abort changes nothing
        print(f"(world {world}: a worker died during process-group teardown after reporting: {e})")
    return [got[r] for r in range(world)]
