"""Serve while training (`raymoe serve --follow`): the follower sees only committed checkpoints and reloads each
newer one; a Serve app following a run that trains at the same time serves an advancing step, exports it as
a metric, and fails no request."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest

from raymoe.deployments.app import ServeArgs
from raymoe.deployments.follow import CheckpointFollower, follow_root, latest_committed
from serving_helpers import save_model, spicy_model, wait_until

T = 60  # seconds: bound on every wait


def test_follower_reloads_committed_checkpoints_only(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    first = save_model(root, spicy_model(0), step=2)
    assert follow_root(str(run)) == str(root) and follow_root(str(root)) == str(root)
    partial = root / "step_00000004"  # being written: files but no manifest yet
    partial.mkdir()
    (partial / "dense.safetensors").write_bytes(b"half")
    loaded, fail = [], set()

    async def reload(step_dir):
        if step_dir in fail:
            raise ValueError("unusable")
        loaded.append(step_dir)

    async def scenario():
        f = CheckpointFollower(str(root), reload, interval_s=0.01, current=str(first))
        assert not await f.poll_once()  # the committed one is served; the partial one is invisible
        second = save_model(root, spicy_model(1), step=4)  # the trainer commits it (manifest last)
        assert await f.poll_once() and loaded == [str(second)] and f.current == str(second)
        assert not await f.poll_once()
        third = save_model(root, spicy_model(0), step=6)
        fail.add(str(third))
        assert not await f.poll_once() and f.current == str(second)  # a failed load: old weights keep serving
        assert not await f.poll_once() and loaded == [str(second)]  # and it is not retried
        f.start()  # the loop picks up the next commit by itself
        fourth = save_model(root, spicy_model(1), step=8)
        deadline = time.monotonic() + 10
        while f.current != str(fourth) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        f.stop()
        return fourth

    fourth = asyncio.run(asyncio.wait_for(scenario(), T))
    assert loaded[-1] == str(fourth) == latest_committed(str(root))


def test_follow_args(tmp_path):
    with pytest.raises(ValueError, match="no committed checkpoint"):
        ServeArgs(follow=str(tmp_path))
    ckpt = save_model(tmp_path / "run" / "checkpoints", spicy_model(0), step=3)
    with pytest.raises(ValueError, match="not both"):
        ServeArgs(follow=str(tmp_path / "run"), checkpoint=str(ckpt))
    args = ServeArgs(follow=str(tmp_path / "run"))
    assert args.checkpoint == str(ckpt) and args.follow == str(tmp_path / "run" / "checkpoints")
    with pytest.raises(ValueError, match="follow_interval_s"):
        ServeArgs(follow=str(tmp_path / "run"), follow_interval_s=0)
    assert ServeArgs(follow=str(tmp_path / "run"), follow_live=True).follow_live
    with pytest.raises(ValueError, match="follow_live needs follow"):
        ServeArgs(checkpoint=str(ckpt), follow_live=True)
    save_model(tmp_path / "ckpts", spicy_model(0), step=1)  # a folder of checkpoints, not a run's: no run name
    with pytest.raises(ValueError, match="training run's folder"):
        ServeArgs(follow=str(tmp_path / "ckpts"), follow_live=True)


TINY = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
        "moe.num_experts=4", "moe.k=1", "tokenizer.kind=byte", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_interval=1000", "train.log_interval=1",
        "train.progress=false", "train.threads=1", "sample.max_new_tokens=0", "checkpoint.interval=2"]


def _train(tmp_path, steps: int) -> None:
    """`raymoe train` of the tiny run to ``steps`` (resuming from its latest checkpoint)."""
    from raymoe.cli import main

    argv = ["train"]
    for s in TINY + [f"run.output_dir={tmp_path}", "run.name=run", f"data.cache_dir={tmp_path / 'cache'}",
                     f"train.steps={steps}"]:
        argv += ["--set", s]
    assert main(argv) == 0


def _get(url: str):
    with urllib.request.urlopen(url, timeout=T) as r:
        return r.read().decode()


def _served_step(url: str):
    return json.loads(_get(url + "/v1/models"))["data"][0]["raymoe"]["step"]


@pytest.mark.slow
def test_serve_follows_a_training_run(serve_url, ray_cluster, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from raymoe.deployments.app import build_app

    _train(tmp_path, 2)  # the first committed checkpoint: serving starts from it
    # the default engine (in a child process of the replica), as `raymoe serve --follow` runs it
    app = build_app({"follow": str(tmp_path / "run"), "follow_interval_s": 0.2, "model_id": "m",
                     "ray_actor_options": {"num_cpus": 0}, "engine": {"max_batch_size": 4}})
    serve.run(app, name="follow", route_prefix="/follow")
    url = f"{serve_url}/follow"
    statuses, steps, stop = [], [], threading.Event()

    def client():  # requests back to back while training commits and the replica reloads
        while not stop.is_set():
            req = urllib.request.Request(url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": "def", "max_tokens": 6}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=T) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
            steps.append(_served_step(url))

    thread = threading.Thread(target=client, daemon=True)
    try:
        assert _served_step(url) == 2
        thread.start()
        wait_until(lambda: len(statuses) >= 2, timeout_s=T)
        _train(tmp_path, 6)  # training resumes and commits steps 4 and 6 while requests are served
        wait_until(lambda: _served_step(url) == 6, timeout_s=T)
        n = len(statuses)
        wait_until(lambda: len(statuses) >= n + 2, timeout_s=T)  # and requests keep succeeding after it
    finally:
        stop.set()
        thread.join(T)
        serve.delete("follow")
    assert statuses and all(s == 200 for s in statuses), statuses
    assert steps == sorted(steps) and steps[-1] == 6  # the served step only advances
    metrics = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"

    def exported():
        fams = {f.name: f for f in text_string_to_metric_families(_get(metrics))}
        fam = fams.get("ray_raymoe_serve_checkpoint_step")
        return fam is not None and any(s.value == 6 for s in fam.samples)

    wait_until(exported, timeout_s=T, interval_s=1.0)


def test_cli_serve_follow_and_replication_flags(monkeypatch, tmp_path):
    from raymoe.cli import main
    from raymoe.deployments import app

    ckpt = save_model(tmp_path / "run" / "checkpoints", spicy_model(0), step=5)
    seen = {}
    monkeypatch.setattr(app, "run_blocking", lambda sargs, **kw: seen.update(args=sargs))
    assert main(["serve", "--follow", str(tmp_path / "run"), "--follow-interval", "0.5", "--ep-size", "2",
                 "--redundant-experts", "1", "--replan-interval", "8", "--no-resource-check"]) == 0
    a = seen["args"]
    assert (a.follow, a.checkpoint, a.follow_interval_s) == (str(tmp_path / "run" / "checkpoints"), str(ckpt), 0.5)
    assert (a.ep_size, a.ep_redundant_experts, a.ep_replan_interval_steps) == (2, 1, 8)
    assert app.engine_args_of(a)["ep_options"]["redundant_experts"] == 1
    assert main(["serve", "--follow", str(tmp_path / "nothing")]) == 2  # no committed checkpoint: one clear line
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "--follow", str(tmp_path / "run"), "--live", "--address", "auto"]) == 0
    assert seen["args"].follow_live and app.llm_server_deployment(seen["args"]).user_config["follow_live"]
    assert main(["serve", "--follow", str(tmp_path / "run"), "--live"]) == 2  # a new local Ray has no training
    assert main(["serve", "--checkpoint", str(ckpt), "--live", "--address", "auto"]) == 2  # --live needs --follow
    assert main(["serve", "--checkpoint", str(ckpt), "--redundant-experts", "1"]) == 2  # needs --ep-size > 1


@pytest.mark.slow
def test_an_expert_parallel_replica_follows_a_run(ray_cluster, tmp_path):
    """The follower of an EP=2 replica (LLMServer in this process, shards on the session's Ray) reloads a newly
    committed checkpoint on every shard: the replica then generates what that checkpoint's model generates."""
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.engine_config import EngineConfig
    from raymoe.deployments.protocol import SamplingParams
    from raymoe.deployments.server import LLMServer

    root = tmp_path / "checkpoints"
    first = save_model(root, spicy_model(0), step=1)
    server = LLMServer("raymoe.deployments.engine:Engine", {"ep_size": 2, "config": EngineConfig(max_batch_size=2)},
                       str(first), observer=None)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)

    async def scenario():
        await server.reconfigure({"follow": str(root), "follow_interval_s": 0.1})
        save_model(root, spicy_model(1), step=2)
        deadline = time.monotonic() + T
        while server.engine.step != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return (await server.engine.generate("after", greedy)).token_ids

    try:
        tokens = asyncio.run(asyncio.wait_for(scenario(), T + 5))
        assert server.engine.info()["step"] == 2
    finally:
        server.shutdown(5)
    reference = Engine(model=spicy_model(1), config=EngineConfig(max_batch_size=1))
    reference.start()
    try:
        assert tokens == reference.generate_sync("after", greedy, T).token_ids
    finally:
        reference.shutdown(5)
