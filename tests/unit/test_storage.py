"""raymoe.platform.storage: locations from paths and URIs, and the file operations on a local path, a file://
URI and an S3-compatible server (moto, started by the test session: tests/s3_server.py)."""

import os
import pickle
from pathlib import Path

import pytest

from raymoe.config import resolve_output_dir
from raymoe.platform import storage
from raymoe.platform.storage import RemotePath, RunOutputs


def test_locations_from_paths_and_uris(tmp_path):
    assert storage.location("runs/x") == Path("runs/x")
    assert storage.location(f"file://{tmp_path}/a") == tmp_path / "a"
    uri = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9&scheme=http"
    loc = storage.location(uri)
    assert isinstance(loc, RemotePath) and str(loc) == uri and storage.is_remote(uri)
    child = storage.join(uri, "checkpoints", "step_00000002")
    assert str(child) == "s3://bucket/runs/x/checkpoints/step_00000002?endpoint_override=127.0.0.1:9&scheme=http"
    assert child.name == "step_00000002" and child.parent == loc / "checkpoints"
    assert pickle.loads(pickle.dumps(child)) == child  # travels to Ray actors as its URI
    with pytest.raises(TypeError, match="s3://bucket/runs/x"):
        os.fspath(loc)  # a reader that needs a local path says which location it was given
    assert resolve_output_dir("s3://bucket/runs") == "s3://bucket/runs"
    assert resolve_output_dir(f"file://{tmp_path}/runs") == tmp_path / "runs"


def test_file_operations(storage_root):
    root = storage.location(storage_root)
    assert storage.list_files(root) == {} and storage.list_dir(root) == [] and not storage.is_dir(root)
    storage.write_bytes(root / "a" / "one.bin", b"x" * 1000)
    storage.write_bytes(root / "two.txt", b"hello")
    assert storage.read_bytes(root / "a" / "one.bin") == b"x" * 1000
    assert storage.is_file(root / "two.txt") and storage.is_dir(root / "a") and not storage.is_file(root / "a")
    assert storage.list_files(root) == {"a/one.bin": 1000, "two.txt": 5}
    assert storage.list_dir(root) == ["a", "two.txt"]
    size, sha = storage.digest(root / "a" / "one.bin")
    assert size == 1000 and sha == __import__("hashlib").sha256(b"x" * 1000).hexdigest()
    with storage.open_input(root / "a" / "one.bin") as f:
        assert f.read(3) == b"xxx"
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(root / "nope")
    with pytest.raises(RuntimeError), storage.open_output(root / "two.txt") as f:
        f.write(b"partial")
        raise RuntimeError("writer failed mid-write")
    assert not storage.is_file(root / "two.txt") or storage.read_bytes(root / "two.txt") == b"hello"
    storage.remove_file(root / "two.txt")
    storage.remove_file(root / "two.txt")  # missing: fine
    storage.remove_tree(root / "a")
    assert storage.list_files(root) == {}


def test_run_outputs_upload_logs_of_a_remote_run(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMOE_RESULTS_DIR", str(tmp_path / "results"))
    uri = s3_server.uri(s3_server.bucket(), "runs")
    out = RunOutputs(uri, "r1")
    assert out.remote and "testing" not in str(out.local) and str(out.location).startswith("s3://")
    assert str(out.checkpoints) == str(storage.join(uri, "r1", "checkpoints"))
    out.local.mkdir(parents=True)
    (out.local / "metrics.jsonl").write_text('{"step": 1}\n')
    out.push()
    assert storage.read_text(out.location / "metrics.jsonl") == '{"step": 1}\n'
    (out.local / "metrics.jsonl").unlink()  # another machine resumes the run: the logs come back first
    out.pull()
    assert (out.local / "metrics.jsonl").read_text() == '{"step": 1}\n'
    local = RunOutputs(str(tmp_path / "runs"), "r1")
    assert not local.remote and local.local == tmp_path / "runs" / "r1"
