"""Serve a training run's weights without a checkpoint round-trip (`raymoe serve --follow RUN_DIR --live`): the
registry holds complete versions only, the live follower serves the newest step of checkpoints and published
weights, and a Serve app following a run that trains on the same Ray instance serves the published steps,
fails no request, and generates what the training shards' weights at that step generate."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest
import torch

from raymoe.actors.weight_registry import LiveWeights, WeightRegistry, _cpu_copy, model_parts
from raymoe.deployments.follow import LiveFollower, live_run_name
from raymoe.platform.checkpoint import DENSE
from serving_helpers import save_model, spicy_model, wait_until

T = 60  # seconds: bound on every wait


def _published(model, world: int = 2) -> list[dict]:
    """The parts each of ``world`` ranks would publish: rank 0 the dense part, the experts split in order."""
    dense, experts = model_parts(model)
    names = sorted(experts)
    ranks = [{} for _ in range(world)]
    ranks[0][DENSE] = _cpu_copy(dense)
    for i, n in enumerate(names):
        ranks[i * world // len(names)][n] = _cpu_copy(experts[n])
    return ranks


def test_registry_keeps_complete_versions_only():
    model = spicy_model(0)
    cfg = model.config
    reg = WeightRegistry("r", "/runs/r/checkpoints", cfg.to_dict(), cfg.experts_per_layer())
    p0, p1 = _published(model)
    assert not reg.register(1, 0, 2, p0) and reg.latest() is None  # one rank of two: not a version yet
    assert reg.register(1, 1, 2, p1) and reg.latest().step == 1
    assert not reg.register(2, 0, 1, p0) and reg.latest().step == 1  # experts missing: never served
    assert not reg.register(5, 1, 2, p1, world_id="tcp://a") and not reg.register(5, 0, 2, p0, world_id="tcp://b")
    assert reg.latest().step == 1  # a re-formed world (another id) does not complete the old world's step
    for step in (3, 4):
        reg.register(step, 1, 2, p1)
        reg.register(step, 0, 2, p0)
    assert reg.info()["steps"] == [3, 4] and reg.version(1) is None  # the latest two are kept
    reg.register(3, 0, 1, {**p0, **p1})  # training rolled back to step 2 and redid step 3: 4 is stale
    assert reg.info()["steps"] == [3] and reg.latest().parts[DENSE] is p0[DENSE]
    for step in (3, 4):
        reg.register(step, 1, 2, p1)
        reg.register(step, 0, 2, p0)
    assert reg.latest(after=4) is None and reg.latest(checkpoints="/runs/other/checkpoints") is None
    live = reg.latest(checkpoints="/runs/r/checkpoints")
    assert str(live) == "live:r@step_00000004"
    for source in (live, live.resolved()):  # resolved: safetensors bytes, for an engine's child process
        rebuilt = source.build_model().state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(rebuilt[k], v), k
    wrong = LiveWeights("r", 4, cfg.to_dict(), {**live.parts, DENSE: {"wte.weight": torch.zeros(3)}})
    with pytest.raises(ValueError, match="do not match"):
        wrong.build_model()


def test_live_follower_serves_the_newest_step(tmp_path, monkeypatch):
    from raymoe.actors import weight_registry

    root = tmp_path / "run" / "checkpoints"
    first = save_model(root, spicy_model(0), step=2)
    assert live_run_name(str(root)) == "run"
    with pytest.raises(ValueError, match="run's folder"):
        live_run_name(str(tmp_path))
    live = {"version": None, "error": None}

    def latest_version(run, checkpoints, after, timeout_s):
        assert (run, checkpoints) == ("run", str(root))
        if live["error"]:
            raise live["error"]
        v = live["version"]
        return v if v is not None and v.step > after else None

    monkeypatch.setattr(weight_registry, "latest_version", latest_version)
    loaded = []

    async def reload(source):
        loaded.append(str(source))

    def version(step):
        return LiveWeights("run", step, {}, {})

    async def scenario():
        f = LiveFollower(str(root), reload, interval_s=0.01, current=str(first), current_step=2)
        assert not await f.poll_once()  # nothing newer
        live["version"] = version(5)
        assert await f.poll_once() and f.step == 5 and loaded[-1] == "live:run@step_00000005"
        save_model(root, spicy_model(1), step=4)  # an older checkpoint: never back
        assert not await f.poll_once()
        live["version"] = version(6)
        save_model(root, spicy_model(1), step=6)  # a tie: the copy in memory
        assert await f.poll_once() and loaded[-1] == "live:run@step_00000006"
        live["error"] = RuntimeError("the run ended")  # registry gone: checkpoints remain
        eight = save_model(root, spicy_model(0), step=8)
        assert await f.poll_once() and loaded[-1] == str(eight) and f.step == 8

    asyncio.run(asyncio.wait_for(scenario(), T))


TINY = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
        "moe.num_experts=4", "moe.k=1", "tokenizer.kind=byte", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_interval=1000", "train.log_interval=1",
        "train.progress=false", "train.threads=1", "sample.max_new_tokens=0", "cluster.mode=ray",
        "cluster.num_workers=2", "cluster.ep_size=2", "cluster.cpus_per_worker=1", "cluster.collective_timeout_s=60",
        "checkpoint.keep_last=10", "cluster.publish_interval=1", "checkpoint.interval=3", "train.steps=9",
        "cluster.dense_sharding=shard"]  # FSDP: the dense part is gathered to publish it (collective)
HOLD = 7  # training stops before this step until the test releases it


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=T) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def _card(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/models", timeout=T) as r:
        return json.loads(r.read())["data"][0]["raymoe"]


@pytest.mark.slow
def test_serve_follows_a_run_live(serve_url, ray_cluster, tmp_path):
    """Training (2 shards, EP=2, dense part FSDP-sharded, publishing every step, checkpoints every 3) and a Serve
    app (the default engine process) following it live on one Ray instance: the served step goes past the last
    checkpoint (published weights only), requests never fail, the served model generates what the published
    weights generate, and a published version holds the same tensors as the checkpoint of its step."""
    import ray
    from ray import serve

    from raymoe.actors.launch import train_on_ray
    from raymoe.actors.weight_registry import find_registry
    from raymoe.config import load_config
    from raymoe.deployments.app import build_app
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.engine_config import EngineConfig
    from raymoe.deployments.protocol import SamplingParams
    from raymoe.platform.model_io import load_model

    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "run.name=live",
                                    f"data.cache_dir={tmp_path / 'cache'}"])
    coordinator, done = [], {}

    def on_start(coord, info):
        ray.get(coord.hold_before_step.remote(HOLD), timeout=T)
        coordinator.append(coord)

    def train():
        try:
            done["summary"] = train_on_ray(cfg, on_start=on_start)
        except BaseException as exc:  # surfaced by the assertions below
            done["error"] = exc

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    root = tmp_path / "live" / "checkpoints"
    wait_until(lambda: (root / "step_00000003" / "manifest.json").exists() or "error" in done, timeout_s=2 * T)
    assert "error" not in done, done
    app = build_app({"follow": str(tmp_path / "live"), "follow_live": True, "follow_interval_s": 0.1,
                     "model_id": "m", "ray_actor_options": {"num_cpus": 0}, "engine": {"max_batch_size": 4}})
    serve.run(app, name="live", route_prefix="/live")
    url = f"{serve_url}/live"
    statuses, steps, stop = [], [], threading.Event()
    greedy = {"prompt": "def", "max_tokens": 8, "temperature": 0.0}

    def client():  # requests back to back while training publishes and the replica swaps
        while not stop.is_set():
            statuses.append(_post(url + "/v1/completions", greedy)[0])
            steps.append(_card(url)["step"])

    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        wait_until(lambda: _card(url)["step"] == HOLD, timeout_s=T)  # no checkpoint has this step: published
        assert _card(url)["checkpoint"] == f"live:live@step_{HOLD:08d}"
        registry = find_registry("live")
        published = ray.get(registry.version.remote(HOLD), timeout=T)
        status, body = _post(url + "/v1/completions", greedy)
        assert status == 200
        ref = Engine(model=published.build_model(), config=EngineConfig(max_batch_size=1))
        ref.start()
        try:
            expected = ref.generate_sync("def", SamplingParams(max_tokens=8, temperature=0.0), T).text
        finally:
            ref.shutdown(5)
        assert body["choices"][0]["text"] == expected
        six = ray.get(registry.version.remote(6), timeout=T).build_model().state_dict()
        for k, v in load_model(root / "step_00000006").state_dict().items():
            assert torch.equal(six[k], v), k  # the training shards' weights at step 6, as the checkpoint has them
        ray.get(coordinator[0].release.remote(), timeout=T)
        trainer.join(2 * T)
        assert "summary" in done, done
        wait_until(lambda: _card(url)["step"] == 9, timeout_s=T)
        n = len(statuses)
        wait_until(lambda: len(statuses) >= n + 2, timeout_s=T)  # requests keep succeeding after it
    finally:
        stop.set()
        thread.join(T)
        if coordinator and trainer.is_alive():  # a failure while training is held: let it finish
            coordinator[0].release.remote()
        serve.delete("live")
    assert statuses and all(s == 200 for s in statuses), statuses
    assert steps == sorted(steps) and HOLD in steps and steps[-1] == 9


@pytest.mark.slow
def test_an_expert_parallel_replica_swaps_in_published_weights(ray_cluster, tmp_path):
    """An EP=2 replica (LLMServer in this process, shards on the session's Ray) following a run live: each shard
    loads the dense part and its own experts of the published version, and the replica then generates what the
    published model generates."""
    import ray

    from raymoe.actors.weight_registry import start_registry
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.engine_config import EngineConfig
    from raymoe.deployments.protocol import SamplingParams
    from raymoe.deployments.server import LLMServer

    root = tmp_path / "eprun" / "checkpoints"
    first = save_model(root, spicy_model(0), step=1)
    newer = spicy_model(1)
    registry = start_registry("eprun", str(root), newer.config.to_dict(), newer.config.experts_per_layer())
    for rank, parts in enumerate(_published(newer)):  # what two training shards would put and register
        assert ray.get(registry.register.remote(5, rank, 2, {n: ray.put(t) for n, t in parts.items()}),
                       timeout=T) == (rank == 1)
    server = LLMServer("raymoe.deployments.engine:Engine", {"ep_size": 2, "config": EngineConfig(max_batch_size=2)},
                       str(first), observer=None)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)

    async def scenario():
        await server.reconfigure({"follow": str(root), "follow_live": True, "follow_interval_s": 0.1})
        deadline = asyncio.get_running_loop().time() + T
        while server.engine.step != 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return (await server.engine.generate("after", greedy)).token_ids

    try:
        tokens = asyncio.run(asyncio.wait_for(scenario(), T + 5))
        info = server.engine.info()
        assert info["step"] == 5 and info["checkpoint"] == "live:eprun@step_00000005"
    finally:
        server.shutdown(5)
        ray.kill(registry)
    reference = Engine(model=newer, config=EngineConfig(max_batch_size=1))
    reference.start()
    try:
        assert tokens == reference.generate_sync("after", greedy, T).token_ids
    finally:
        reference.shutdown(5)
