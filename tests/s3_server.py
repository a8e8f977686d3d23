"""An S3-compatible server for the storage tests: moto's standalone server as a real subprocess on 127.0.0.1.

Why moto (``python -m moto.server``, the ``moto[server]`` dev extra): it installs from the package registry like
every other test dependency and speaks the S3 REST API over HTTP, so pyarrow's S3 client talks to it exactly as
to S3 (MinIO is a Go binary that cannot be installed from the registry). It starts in about a second.

The server runs once per test session (the ``s3_server`` fixture; this module is a plugin of tests/conftest.py);
each test makes its own bucket. ``storage_root`` runs a test on a path, a file:// URI and an s3:// URI. Locations carry the endpoint and the (dummy) credentials in the URI
(``s3://testing:testing@bucket/path?endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1``), so Ray
workers need no environment of their own.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid

import pytest


class S3Server:
    """A running moto server: ``uri(bucket, path)`` names a location on it, ``bucket()`` makes a new bucket."""

    def __init__(self, port: int, proc: subprocess.Popen):
        self.port, self.proc = port, proc
        self.endpoint = f"http://127.0.0.1:{port}"

    def uri(self, bucket: str, path: str = "") -> str:
        return (f"s3://testing:testing@{bucket}/{path.strip('/')}"
                f"?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1")

    def bucket(self) -> str:
        """Create a bucket with a fresh name; returns the name."""
        name = f"raymoe-{uuid.uuid4().hex[:12]}"
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=10)
        return name


def start_s3_server(timeout_s: float = 30.0) -> S3Server:
    """Start moto's server on a free port of 127.0.0.1; returns once it answers (RuntimeError after
    ``timeout_s``)."""
    from gloo_world import free_port  # (imports torch: not at plugin load)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before answering")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return S3Server(port, proc)
        except OSError:
            time.sleep(0.1)
    stop_s3_server(S3Server(port, proc))
    raise RuntimeError(f"moto server on 127.0.0.1:{port} did not answer within {timeout_s:.0f}s")


def stop_s3_server(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the test session (killed at teardown)."""
    pytest.importorskip("moto.server")
    server = start_s3_server()
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture(params=["path", "file_uri", "s3"])
def storage_root(request, tmp_path):
    """A fresh folder as a config names it: a plain path, a file:// URI, or an s3:// URI on the session's
    server (its own bucket)."""
    if request.param == "path":
        return str(tmp_path / "store")
    if request.param == "file_uri":
        return f"file://{tmp_path}/store"
    server = request.getfixturevalue("s3_server")
    return server.uri(server.bucket(), "run/store")
