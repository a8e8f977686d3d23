"""Serving fixtures: tiny GPT-MoE checkpoints, and one local Ray + Serve instance for the whole session.

Ray tests deploy their apps under their own route prefix on the shared Serve instance (127.0.0.1, a free
port) and delete them afterwards; every wait is bounded.
"""

import pytest

from serving_helpers import free_port, save_model, spicy_model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same architecture with different weights: {"a": step dir, "b": step dir}."""
    root = tmp_path_factory.mktemp("serve_ckpt")
    return {"a": save_model(root / "a", spicy_model(0)), "b": save_model(root / "b", spicy_model(1))}


@pytest.fixture(scope="session")
def serve_url():
    """Base URL of a Serve instance on a local Ray (started once per session)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()

