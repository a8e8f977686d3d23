"""`raymoe serve`: argument errors exit 2 without starting Ray; a real run answers and stops cleanly on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from raymoe.cli import main
from serving_helpers import free_port

FAKE = "raymoe.deployments.fake_engine:FakeEngine"


@pytest.mark.parametrize("argv", [
    ["serve"],                                                  # the real engine needs a checkpoint
    ["serve", "--engine", FAKE, "--port", "0"],
    ["serve", "--engine", FAKE, "--num-replicas", "2", "--max-replicas", "1"],
    ["serve", "--checkpoint", "/nonexistent/ckpt", "--engine", FAKE, "--num-replicas", "0"],
    ["serve", "--engine", FAKE, "--address", "auto", "--num-cpus", "2"],
    ["serve", "--engine", "no_such_module:Engine"],                  # checked before Ray starts
    ["serve", "--engine", FAKE, "--max-batch-size", "0"],
    ["serve", "--engine", FAKE, "--reload-policy", "later"],           # EngineConfig validates every engine flag
    ["serve", "--engine", FAKE, "--device", "tpu"],
    ["serve", "--engine", FAKE, "--ep-size", "2"],                   # expert-parallel shards load a checkpoint
    ["serve", "--checkpoint", "/nonexistent/ckpt", "--ep-size", "0"],
    ["serve", "--engine", FAKE, "--address", "auto", "--direct-ingress"],  # set when Ray starts: local only
    ["serve", "--engine", FAKE, "--stream-interval", "-0.1"],
])
def test_cli_serve_argument_errors(argv, capsys):
    assert main(argv) == 2
    assert "raymoe serve: error:" in capsys.readouterr().err


def test_cli_serve_passes_the_expert_parallel_size(monkeypatch, tmp_path):
    import raymoe.deployments.app as app

    seen = {}
    monkeypatch.setattr(app, "run_blocking", lambda sargs, **kw: seen.update(args=sargs, **kw))
    assert main(["serve", "--checkpoint", str(tmp_path), "--ep-size", "2", "--ep-shard-cpus", "0.5"]) == 0
    a = seen["args"]
    assert (a.ep_size, a.ep_shard_cpus, a.engine_cls) == (2, 0.5, app.EP_ENGINE)
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 0
    assert (seen["args"].ep_size, seen["args"].engine_cls) == (1, app.DEFAULT_ENGINE)
    assert seen["args"].stream_interval_s == 0.0
    assert main(["serve", "--checkpoint", str(tmp_path), "--stream-interval", "0.05"]) == 0
    assert seen["args"].stream_interval_s == 0.05


def test_cli_serve_flags_fill_the_engine_config(monkeypatch, tmp_path):
    import raymoe.deployments.app as app
    from raymoe.deployments.engine_config import EngineConfig

    seen = {}
    monkeypatch.setattr(app, "run_blocking", lambda sargs, **kw: seen.update(args=sargs, **kw))
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 0
    assert seen["args"].engine == EngineConfig()  # unset flags: the config's defaults
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-batch-size", "4", "--max-waiting", "6",
                 "--max-prefill-tokens", "512", "--reload-policy", "immediate", "--torch-threads", "2",
                 "--device", "auto", "--max-replicas", "3"]) == 0
    a = seen["args"]
    assert a.engine == EngineConfig(max_batch_size=4, max_waiting=6, max_prefill_tokens=512,
                                    reload_policy="immediate", torch_threads=2, device="auto")
    assert a.max_ongoing_requests == 4 + 6 and a.num_replicas is None
    assert a.autoscaling_config == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert main(["serve", "--checkpoint", str(tmp_path), "--prefix-cache-mb", "64", "--prefix-block-size", "8"]) == 0
    assert seen["args"].engine == EngineConfig(prefix_cache_mb=64, prefix_block_size=8)
    assert main(["serve", "--engine", FAKE, "--max-batch-size", "2"]) == 0
    assert type(seen["args"].engine).__name__ == "FakeEngineConfig" and seen["args"].engine.max_batch_size == 2


KEY = "sk-cli-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _get(url: str, timeout: float = 5.0, headers=AUTH) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.parametrize("direct", [False, True])
def test_cli_serve_answers_then_ctrl_c_shuts_down(tmp_path, direct):
    """A separate Ray instance in a subprocess (its own session), like a user's terminal. With --direct-ingress
    the replica also answers on its own port (Serve's throughput-optimized mode), with the same results. The API
    key (--api-key, or $RAYMOE_API_KEY with --direct-ingress) is enforced on both ports."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if direct:
        env["RAYMOE_API_KEY"] = KEY
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "serve", "--engine", FAKE, "--port", str(port),
                             "--model-id", "cli", "--num-cpus", "2", "--address", "local",
                             *(["--direct-ingress"] if direct else ["--api-key", KEY])], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    ready = "direct ingress" if direct else "serving 'cli' on http://127.0.0.1"
    try:
        deadline = time.monotonic() + 90
        while ready not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert _get(f"http://127.0.0.1:{port}/v1/models")["data"][0]["id"] == "cli"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            _get(f"http://127.0.0.1:{port}/v1/models", headers={})
        if direct:
            line = next(x for x in (tmp_path / "serve.log").read_text().splitlines() if "direct ingress" in x)
            url = line.split(": ", 1)[1].strip()
            # Serve takes the first free port from port + 1 on (another process may hold port + 1)
            direct_port = int(url.removeprefix("http://127.0.0.1:").removesuffix("/v1"))
            assert port < direct_port <= port + 1000, url
            assert _get(f"{url}/models")["data"][0]["id"] == "cli"
            with pytest.raises(urllib.error.HTTPError, match="401"):  # the replica's own port checks the key too
                _get(f"{url}/models", headers={})
            body = json.dumps({"model": "cli", "prompt": "abc", "max_tokens": 4, "temperature": 0}).encode()
            answers = []
            for base in (f"http://127.0.0.1:{port}/v1", url):
                req = urllib.request.Request(f"{base}/completions", data=body,
                                             headers={"Content-Type": "application/json", **AUTH})
                with urllib.request.urlopen(req, timeout=30) as r:
                    answers.append(json.loads(r.read())["choices"][0]["text"])
            assert answers[0] == answers[1] and answers[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "shutting down" in text and "stopped" in text and "Traceback" not in text and KEY not in text


def test_documented_requests_name_the_model_the_server_serves():
    """The README's and serving.md's example requests, copied, reach the model `raymoe serve` and the Serve
    configs serve (they once said raymoe-tiny to a server serving raymoe: 404)."""
    import re
    from pathlib import Path

    import yaml

    from raymoe.deployments.app import ServeArgs

    root = Path(__file__).parents[2]
    served = {ServeArgs.model_fields["model_id"].default}
    for name in ("serve_local.yaml", "serve_ep.yaml"):
        served.add(yaml.safe_load((root / "cluster_configs" / name).read_text())["applications"][0]["args"]
                   .get("model_id", "raymoe"))
    assert served == {"raymoe"}
    for doc in ("README.md", "docs/serving.md"):
        text = (root / doc).read_text()
        named = {a or b for a, b in re.findall(r'"model": "([^"]+)"|model="([^"]+)"', text)}
        assert named == served, (doc, named)
