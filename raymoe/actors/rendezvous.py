"""What every shard actor answers before a process group forms: where it runs and a free port for rank 0."""

from __future__ import annotations

import os
import socket

import ray


def node_info() -> dict:
    """Node id, IP, PID and GPU ids of the calling actor (ranks are ordered by node; operators find PIDs)."""
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def free_port() -> int:
    """A free TCP port on this node, for the rendezvous when the caller is rank 0."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
