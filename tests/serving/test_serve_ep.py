"""Expert-parallel serving: an engine over 2 ExpertShard actors (gloo, local Ray) gives the same greedy output
as the whole model; the shards hold only their experts, run in the replica's placement group and die with it;
bad ep settings are rejected before anything starts."""

import asyncio
import json
import os

import pytest

requests = pytest.importorskip("requests")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from raymoe.deployments.app import ServeArgs, build_app  # noqa: E402
from raymoe.deployments.engine import Engine  # noqa: E402
from raymoe.deployments.engine_config import EngineConfig  # noqa: E402
from raymoe.deployments.protocol import SamplingParams  # noqa: E402
from serving_helpers import save_model, spicy_model, wait_until  # noqa: E402

T = 60  # seconds: bound on every call
PROMPTS = ["hello", "a", "The quick brown fox", "xyz" * 6, "q", "Mixture of experts", "0123456789"]
N_TOKENS = [20, 7, 30, 12, 25, 3, 18]  # rows leave at different steps, so shards lose rows unevenly
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def staggered(engine) -> list[list[int]]:
    """Greedy tokens of PROMPTS sent a few ms apart (they join a running batch)."""
    async def one(i, p):
        await asyncio.sleep(0.003 * i)
        return await engine.generate(p, SamplingParams(max_tokens=N_TOKENS[i], temperature=0.0))

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    return [r.token_ids for r in asyncio.run(asyncio.wait_for(main(), T))]


def reload_and_compare(ep, checkpoint) -> None:
    """Live reload of ``checkpoint`` (spicy_model(1)'s weights): the engine then generates as that model does."""
    ep.reload(str(checkpoint), timeout_s=T)
    new_model = Engine(model=spicy_model(1), config=EngineConfig(max_batch_size=1))
    new_model.start()
    try:
        assert ep.generate_sync("after", GREEDY, T).token_ids == new_model.generate_sync("after", GREEDY, T).token_ids
    finally:
        new_model.shutdown(5)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def pg_state(pg_id: str) -> str:
    return ray.util.placement_group_table().get(pg_id, {}).get("state", "REMOVED")


@pytest.mark.slow
def test_ep_engine_in_process_equals_whole_model(ray_cluster, checkpoints):
    plain = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=4))
    ep = Engine(str(checkpoints["a"]), ep_size=2, config=EngineConfig(max_batch_size=4))
    plain.start()
    ep.start()
    try:
        assert staggered(ep) == staggered(plain)
        info = ep.info()
        assert [s["experts"] for s in info["shards"]] == [{1: [0, 1]}, {1: [2, 3]}]  # each its own experts
        stats = ep.stats()
        assert stats["max_batch_size_seen"] > 1 and sum(stats["expert_counts"][1]) > 0
        # live reload: every shard loads its part of the new checkpoint, swapped in between steps
        reload_and_compare(ep, checkpoints["b"])
        ep.check_health()  # asks every shard (started, in its process group, no failed step)
        # a shard that dies fails the running requests and the health check (Serve then replaces the replica)
        ray.kill(ep.runner.shards[1])
        from raymoe.deployments.protocol import EngineDeadError

        with pytest.raises(EngineDeadError) as ei:  # a 503 for clients, and the replica stops itself
            ep.generate_sync("dead", GREEDY, T)
        assert "ActorDiedError" not in str(ei.value) and "pid" not in str(ei.value)  # no internals for clients
        with pytest.raises(EngineDeadError, match="broken"):
            ep.check_health()
    finally:
        plain.shutdown(5)
        ep.shutdown(5)
    # no Serve replica here: the runner reserved a placement group of its own and removes it with the shards
    wait_until(lambda: all(process_gone(s["pid"]) for s in info["shards"]), timeout_s=T)
    wait_until(lambda: pg_state(info["placement_group_id"]) == "REMOVED", timeout_s=T)


@pytest.mark.slow
def test_ep_hot_expert_replication_keeps_outputs(ray_cluster, checkpoints):
    """Copies of experts on the other shard (placed by hand, then re-planned by the engine from the observed
    load) change no logit and no greedy token, also when the placement changes between two decode steps of
    running rows, and a reload re-installs the copies on the new weights."""
    import torch

    from raymoe.deployments.ep_runner import EPRunner

    idx = torch.tensor([[0, 0, 5, 9, 33], [7, 1, 4, 4, 2], [0, 60, 61, 62, 63], [11, 3, 40, 2, 2]])
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[0, :2] = mask[2, :1] = False
    runner = EPRunner(str(checkpoints["a"]), 2, max_rows=4, redundant_experts=1)
    try:
        def run(placement_mid_decode):
            runner.reset()
            out = [runner.prefill(idx, mask)]
            for i in range(3):
                if i == 1 and placement_mid_decode is not None:  # rows are running: their caches stay
                    runner.set_placement(placement_mid_decode)
                out.append(runner.decode(out[-1].argmax(-1, keepdim=True)))
            return out

        plain = run(None)
        load = runner.physical_load()[1]
        assert load[2] == load[5] == 0  # the redundant slots are empty: nothing routed there
        copied = run({1: [0, 1, 3, 2, 3, 0]})  # expert 3 onto shard 0, expert 0 onto shard 1
        for a, b in zip(plain, copied):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        load = runner.physical_load()[1]
        assert load[2] > 0 or load[5] > 0  # rows went to a copy
        assert runner.info()["placements"] == {1: [0, 1, 3, 2, 3, 0]}
    finally:
        runner.shutdown()

    plain_engine = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=4))
    ep = Engine(str(checkpoints["a"]), ep_size=2, config=EngineConfig(max_batch_size=4),
                ep_options={"redundant_experts": 1, "replan_interval_steps": 2})
    plain_engine.start()
    ep.start()
    try:
        assert staggered(ep) == staggered(plain_engine)
        # the engine planned copies from the observed load, and rows went to them (slots 2 and 5: redundant)
        assert ep.info()["replans"] >= 1 and ep.runner.physical_load()[1][[2, 5]].sum() > 0
        reload_and_compare(ep, checkpoints["b"])  # the shards fetch the copies of the new weights
    finally:
        plain_engine.shutdown(5)
        ep.shutdown(5)


def _post(url, prompt, n, **kw):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, **kw}
    return requests.post(url + "/v1/completions", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=T, stream=kw.get("stream", False))


def _texts(url) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        resps = list(pool.map(lambda i: _post(url, PROMPTS[i], N_TOKENS[i]), range(len(PROMPTS))))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    return [r.json()["choices"][0]["text"] for r in resps]


@pytest.mark.slow
def test_ep_replica_equals_plain_replica_and_in_process(serve_url, checkpoints):
    ckpt = str(checkpoints["a"])
    common = {"checkpoint": ckpt, "model_id": "m", "ray_actor_options": {"num_cpus": 0},
              "engine": {"max_batch_size": 4}}
    # the EP replica in the default one-deployment layout (as serve_ep.yaml), the plain one in the split layout
    serve.run(build_app({**common, "ep_size": 2}), name="ep", route_prefix="/ep")
    try:
        serve.run(build_app({**common, "single_deployment": False}), name="plain", route_prefix="/plain")
        try:
            plain = _texts(f"{serve_url}/plain")
        finally:
            serve.delete("plain")
        eng = Engine(ckpt, config=EngineConfig(max_batch_size=4))
        eng.start()
        try:
            local = [bytes(t for t in toks if t < 256).decode("utf-8", errors="replace") for toks in staggered(eng)]
        finally:
            eng.shutdown(5)
        assert _texts(f"{serve_url}/ep") == plain == local
        stream = _post(f"{serve_url}/ep", PROMPTS[2], 16, stream=True)
        lines = [ln for ln in stream.iter_lines(decode_unicode=True) if ln]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) == local[2][:16]

        info = serve.get_deployment_handle("OpenAIServer", "ep").info.remote().result(timeout_s=T)
        pg = info["placement_group_id"]
        assert info["ep_size"] == 2 and info["runner"] == "expert_parallel"
        assert pg is not None and all(s["placement_group_id"] == pg for s in info["shards"])  # the replica's group
        assert len(ray.util.placement_group_table()[pg]["bundles"]) == 3  # replica + 2 shards
        assert info["pid"] not in {s["pid"] for s in info["shards"]}
    finally:
        serve.delete("ep")
    # the replica stopped: its placement group is removed and its shards are gone with it (no leak)
    wait_until(lambda: all(process_gone(s["pid"]) for s in info["shards"]), timeout_s=T)
    wait_until(lambda: pg_state(pg) == "REMOVED", timeout_s=T)


def test_bad_ep_settings_are_rejected_before_deploying(checkpoints, tmp_path):
    from raymoe.platform.model import GPT, GPTConfig

    with pytest.raises(ValueError, match="ep_size=2.*checkpoint"):
        ServeArgs(ep_size=2, engine_cls="raymoe.deployments.fake_engine:FakeEngine")
    with pytest.raises(ValueError, match="ep_size"):
        ServeArgs(checkpoint="/x", ep_size=0)
    with pytest.raises(ValueError, match="ep_shard_cpus"):
        ServeArgs(checkpoint="/x", ep_shard_cpus=2)
    with pytest.raises(ValueError, match="placement_group_bundles"):
        ServeArgs(checkpoint="/x", ep_size=2, llm_server_options={"placement_group_bundles": [{"CPU": 1}]})
    with pytest.raises(ValueError, match="ep_size=3 must divide"):
        build_app({"checkpoint": str(checkpoints["a"]), "ep_size": 3})  # 4 experts
    with pytest.raises(ValueError, match="engine.ep_size"):  # set at the top level, not in the engine's config
        build_app({"checkpoint": str(checkpoints["a"]), "ep_size": 2, "engine": {"ep_size": 2}})
    with pytest.raises(ValueError, match="engine_kwargs was replaced by engine"):
        build_app({"checkpoint": str(checkpoints["a"]), "engine_kwargs": {"max_batch_size": 2}})
    with pytest.raises(ValueError, match="expert-parallel support"):
        build_app({"checkpoint": str(checkpoints["a"]), "ep_size": 2,
                   "engine_cls": "raymoe.deployments.fake_engine:FakeEngine"})
    proc = "raymoe.deployments.proc_engine:ProcessEngine"
    with pytest.raises(ValueError, match="expert-parallel support"):
        build_app({"checkpoint": str(checkpoints["a"]), "ep_size": 2, "engine_cls": proc})
    with pytest.raises(ValueError, match="max_bach_size"):  # checked against the Engine it wraps
        build_app({"checkpoint": str(checkpoints["a"]), "engine_cls": proc, "engine": {"max_bach_size": 2}})
    dense = save_model(tmp_path / "dense", GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1,
                                                         d_model=8, num_experts=1, expert_interval=99)))
    with pytest.raises(ValueError, match="ep_size=2"):
        build_app({"checkpoint": str(dense), "ep_size": 2})
    with pytest.raises(ValueError, match="ep_size"):
        Engine(model=spicy_model(0), ep_size=2)
    with pytest.raises(ValueError, match="ep_options"):
        Engine(model=spicy_model(0), ep_options={"num_cpus": 1})


def test_inference_shard_arguments_and_health_before_start(ray_cluster):
    from raymoe.actors.inference_shard import InferenceShard

    with pytest.raises(ValueError, match="max_rows"):
        InferenceShard(max_rows=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        InferenceShard(max_rows=2, backend="mpi")
    with pytest.raises(ValueError, match="device must be"):
        InferenceShard(max_rows=2, device="tpu")
    with pytest.raises(RuntimeError, match="not started"):
        InferenceShard(max_rows=2).check_health()


@pytest.mark.parametrize("name", ["serve_local.yaml", "serve_ep.yaml"])
def test_serve_config_files_build(name, checkpoints):
    """The repository's Serve configs validate and build against a test checkpoint (4 experts: ep 2 fits)."""
    import yaml
    from pathlib import Path

    with open(Path(__file__).parents[2] / "cluster_configs" / name) as f:
        app = yaml.safe_load(f)["applications"][0]
    args = {**app["args"], "checkpoint": str(checkpoints["a"])}
    build_app(args)
    names = {d["name"] for d in app["deployments"]}
    assert names == ({"OpenAIServer"} if args.get("single_deployment", True) else {"OpenAIIngress", "LLMServer"})

