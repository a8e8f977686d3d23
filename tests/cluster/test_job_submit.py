"""`ray start --head` + `ray job submit -- raymoe train ...` end to end, as a user on a cluster would run it.

The head is started by this test in its own process group with `--block`, and only that group is stopped
at the end (never a machine-wide `ray stop`, which would also end other Ray instances of this test run).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:  # answering at all (e.g. 401 without a token) means it is up
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not up after {timeout}s")
            time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_trains(tmp_path, free_port):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Ray 2.5x+ enables token auth on `ray start --head`; the CLI then needs token mode to send ~/.ray/auth_token
    env["RAY_AUTH_MODE"] = "token"
    gcs_port, dash_port = free_port(), free_port()
    # a short temp dir: Ray's unix socket paths under pytest's long tmp_path would exceed the 107-byte limit
    temp_dir = tempfile.mkdtemp(prefix="raymoe-", dir="/tmp")
    head = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=3",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # this test session may already run another Ray instance: give every listening port a free one
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_http(f"{address}/api/version", timeout=120)
        out_dir = tmp_path / "runs"
        cmd = [str(bindir / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
               "raymoe", "train", "--config", "cluster_configs/ep_cpu.yaml",
               "--set", f"run.output_dir={out_dir}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
               "--set", "train.steps=3", "--set", "train.eval_interval=3", "--set", "train.eval_batches=1",
               "--set", "model.n_layer=2", "--set", "model.d_model=32", "--set", "model.n_head=2",
               "--set", "model.d_ff=64", "--set", "model.block_size=32", "--set", "train.global_batch_size=4",
               "--set", "train.micro_batch_size=2", "--set", "sample.max_new_tokens=8",
               "--set", "checkpoint.interval=0"]
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a little after the dashboard answers
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout.lower(), job.stdout[-4000:]
        assert "step 3/3" in job.stdout and "sample:" in job.stdout
        assert (out_dir / "ep_cpu" / "checkpoints").is_dir()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
