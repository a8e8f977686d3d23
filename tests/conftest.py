"""Shared test setup: small CPU thread count so tests behave the same on 2-core CI machines."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import socket

import pytest

pytest_plugins = ["s3_server"]  # the s3_server fixture (tests/s3_server.py): a moto S3 server per session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a free TCP port on 127.0.0.1."""
    return _free_port


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs Ray (a session fixture; ray.shutdown at the end).

    Logical CPUs exceed the 2 physical cores on purpose: shards and replicas are mostly idle waiting on each
    other. Metrics are exported on a free port every second so tests can scrape them.
    """
    ray = pytest.importorskip("ray")
    port = _free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=True)
    try:
        yield {"metrics_port": port}
    finally:
        ray.shutdown()
