"""The README's cluster block (`ray start --head` + `ray job submit -- raymoe train ...`), run as written on a fresh
home directory, end to end; then a second head and job resume from the first job's checkpoint.

The commands come from README.md (the fenced bash block that runs `ray job submit`), with these substitutions:

- `ray start --head ...` gets `--block`, free ports and its own temp dir, and runs in its own process group: this
  test may share the machine with other Ray instances;
- the dashboard address `http://127.0.0.1:8265` becomes the port chosen here;
- `raymoe train ...` gets `--set` overrides: a small model, 3 steps, the data cache outside the job;
- `ray stop` (which stops every Ray instance on the machine) is left out: the test ends only the head it started.

HOME is a fresh temporary folder, as on a new machine: no `~/.ray/auth_token` exists before the block runs.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_ADDRESS = "http://127.0.0.1:8265"
SMALL = ["train.steps=3", "train.eval_interval=3", "train.eval_batches=1", "model.n_layer=2", "model.d_model=32",
         "model.n_head=2", "model.d_ff=64", "model.block_size=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "sample.max_new_tokens=8"]


def readme_cluster_commands() -> list[str]:
    """The commands of README.md's bash block that runs `ray job submit`, in order (comment lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    [block] = [b for b in blocks if "ray job submit" in b]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_cluster_block_has_the_commands_this_test_runs():
    cmds = readme_cluster_commands()
    assert cmds[-1] == "ray stop"
    starts = [c for c in cmds if c.startswith("ray start --head")]
    jobs = [c for c in cmds if c.startswith("ray job submit")]
    assert len(starts) == 1 and len(jobs) == 1 and README_ADDRESS in jobs[0] and "#" not in jobs[0]
    # token mode is exported before the head starts, and the token exists before that
    names = [shlex.split(c)[:2] for c in cmds]
    assert names.index(["export", "RAY_AUTH_MODE=token"]) < cmds.index(starts[0])
    assert names.index(["ray", "get-auth-token"]) < names.index(["export", "RAY_AUTH_MODE=token"])


def _wait_http(url: str, timeout: float) -> None:
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


class _Head:
    """A `ray start --head` command from the README, run with --block in its own process group."""

    def __init__(self, line: str, env: dict, free_port):
        self.dash_port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="raymoe-", dir="/tmp")  # Ray's socket paths must stay short
        args = shlex.split(line, comments=True) + [
            "--block", f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash_port}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        self.proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.address = f"http://127.0.0.1:{self.dash_port}"
        _wait_http(f"{self.address}/api/version", timeout=120)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _bash(line: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _submit(line: str, head: _Head, env: dict, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = line.replace(README_ADDRESS, head.address) + "".join(f" --set {shlex.quote(s)}" for s in extra)
    deadline = time.monotonic() + 120
    while True:  # the job agent comes up a little after the dashboard answers
        job = _bash(cmd, env, timeout=400)
        if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
            return job
        time.sleep(3)


@pytest.mark.slow
def test_readme_cluster_block_runs_as_written(tmp_path, free_port):
    home = tmp_path / "home"
    home.mkdir()
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAYMOE_RESULTS_DIR")}
    env.update(HOME=str(home), PATH=f"{bindir}{os.pathsep}{env['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    small = SMALL + [f"data.cache_dir={tmp_path / 'cache'}"]
    run_dir = home / "raymoe_results" / "runs" / "ep_cpu"  # a relative run.output_dir under a job's working dir
    head = job_line = None
    try:
        for line in readme_cluster_commands():
            if line.startswith("export "):
                for assignment in shlex.split(line, comments=True)[1:]:
                    key, value = assignment.split("=", 1)
                    env[key] = value
            elif line.startswith("ray start"):
                head = _Head(line, env, free_port)
            elif line == "ray stop":
                continue  # see the module docstring: the head started here is ended below
            elif line.startswith("ray job submit"):
                job_line = line
                job = _submit(line, head, env, small)
                assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
                assert "succeeded" in job.stdout.lower() and "step 3/3" in job.stdout and "sample:" in job.stdout
                # the run folder outlives the job: absolute, printed at start, not in Ray's working-dir copy
                assert f"outputs: {run_dir}" in job.stdout, job.stdout[-4000:]
                assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()
            else:
                out = _bash(line.replace(README_ADDRESS, head.address) if head else line, env)
                assert out.returncode == 0, (line, out.stdout[-2000:], out.stderr[-2000:])
                if line.startswith("curl"):  # the dashboard API answers with the token; without it, it refuses
                    assert '"status": "SUCCEEDED"' in out.stdout or '"status":"SUCCEEDED"' in out.stdout, out.stdout
                    with pytest.raises(urllib.error.HTTPError) as refused:
                        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)
                    assert refused.value.code in (401, 403)
        assert (home / ".ray" / "auth_token").is_file() and job_line is not None
        # a new head (as after `ray stop` / `ray start`): the next job resumes from the first one's checkpoint
        head.stop()
        head = _Head(next(c for c in readme_cluster_commands() if c.startswith("ray start")), env, free_port)
        job = _submit(job_line, head, env, small + ["train.steps=4", "checkpoint.resume=must"])
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "starting at step 3" in job.stdout and "step 4/4" in job.stdout, job.stdout[-4000:]
    finally:
        if head is not None:
            head.stop()
