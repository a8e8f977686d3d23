"""Serving fixtures: tiny GPT-MoE checkpoints, and one local Ray + Serve instance for the whole session.

Ray tests use the session's Ray (tests/conftest.py) and one Serve instance (127.0.0.1, a free port); each
deploys its apps under its own route prefix and deletes them afterwards; every wait is bounded.
"""

import os

import pytest

from raymoe.deployments.proxy_errors import PROXY_ERRORS_ENV
from serving_helpers import free_port, save_model, spicy_model

# the session's Ray (tests/conftest.py) starts after collection: its Serve proxy answers its own failures with
# OpenAI error bodies, as `raymoe serve` sets it up
os.environ.update(PROXY_ERRORS_ENV)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same architecture with different weights: {"a": step dir, "b": step dir}."""
    root = tmp_path_factory.mktemp("serve_ckpt")
    return {"a": save_model(root / "a", spicy_model(0)), "b": save_model(root / "b", spicy_model(1))}


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Base URL of a Serve instance on the session's local Ray (tests/conftest.py: ray_cluster)."""
    serve = pytest.importorskip("ray.serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
