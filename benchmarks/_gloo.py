"""Spawned gloo ranks on 127.0.0.1 for the CPU benchmarks that need several processes."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import torch

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
