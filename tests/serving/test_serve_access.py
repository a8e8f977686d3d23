"""Serving for real traffic: the official `openai` client against the served app, API keys, content types, a dead
engine answering 503 and its replica replaced, and the resource check before deploying."""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

requests = pytest.importorskip("requests")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from raymoe.deployments.app import ServeArgs, build_app  # noqa: E402
from raymoe.deployments.resources import check_resources  # noqa: E402

FAKE = "raymoe.deployments.fake_engine:FakeEngine"
KEY = "sk-raymoe-test-4f9c2d"
T = 30  # seconds: bound on every HTTP call
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def guarded(serve_url):
    """The fake engine behind an API key, two replicas (one can die while the other answers)."""
    serve.run(build_app({"engine_cls": FAKE, "model_id": "guarded", "api_key": KEY, "num_replicas": 2,
                         "ray_actor_options": {"num_cpus": 0},
                         "engine": {"token_delay_s": 0.002, "block_size": 128}}),
              name="guarded", route_prefix="/guarded")
    yield f"{serve_url}/guarded"
    serve.delete("guarded")


def post(url, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(url + path, data=json.dumps(body), headers=headers, timeout=T, **kw)


def assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and (code is None or err["code"] == code)
    return err


def test_the_official_openai_client(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0, timeout=T)
    assert [m.id for m in client.models.list().data] == ["guarded"]
    c = client.completions.create(model="guarded", prompt="abc", max_tokens=5, n=2, stop=["ca"], seed=1)
    assert [ch.text for ch in c.choices] == ["ab", "ab"] and c.usage.prompt_tokens == 3
    lp = client.completions.create(model="guarded", prompt="xyz", max_tokens=4, logprobs=2).choices[0].logprobs
    assert lp.tokens == list("xyzx") and lp.token_logprobs == [0.0] * 4 and lp.text_offset == [0, 1, 2, 3]
    assert lp.top_logprobs == [{"x": 0.0}, {"y": 0.0}, {"z": 0.0}, {"x": 0.0}]
    best = client.completions.create(model="guarded", prompt="ab", max_tokens=3, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None and best.usage.completion_tokens == 9
    chat = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, logprobs=True, top_logprobs=1)
    assert chat.choices[0].message.content == "<|u"
    assert [t.token for t in chat.choices[0].logprobs.content] == ["<", "|", "u"]
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].logprob == 0.0
    stream = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True, logprobs=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "<|us"
    assert [t.token for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content] == list("<|us")
    streamed = list(client.completions.create(model="guarded", prompt="xyz", max_tokens=4, logprobs=1, stream=True))
    assert [t for ch in streamed if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == list("xyzx")
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="guarded", prompt="a", suffix="b")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="raymoe-tiny", prompt="a")
    for bad in ("sk-wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{guarded}/v1", api_key=bad or "x", max_retries=0,
                          default_headers={"Authorization": bad}).models.list()


def test_api_key_content_type_and_open_health(guarded):
    for key in (None, "sk-wrong", KEY + "x"):
        r = post(guarded, "/v1/completions", {"prompt": "a"}, key=key)
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["WWW-Authenticate"] == "Bearer" and KEY not in r.text
    assert requests.get(f"{guarded}/v1/models", timeout=T).status_code == 401
    assert requests.get(f"{guarded}/healthz", timeout=T).status_code == 200  # probes need no key
    form = requests.post(f"{guarded}/v1/completions", data={"prompt": "a"}, timeout=T,
                         headers={"Authorization": f"Bearer {KEY}"})
    assert_error(form, 415, "unsupported_media_type")
    assert post(guarded, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).json()["choices"][0]["text"] == "ok"
    # the key is in no log of the session (replica arguments carry its sha256 only)
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    for root, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert KEY.encode() not in fh.read(), f


def _pids(app: str) -> set:
    h = serve.get_deployment_handle("OpenAIServer", app)
    return {h.info.remote().result(timeout_s=T)["pid"] for _ in range(8)}


def test_a_dead_engine_answers_503_and_its_replica_is_replaced(guarded):
    before = _pids("guarded")
    r = post(guarded, "/v1/completions", {"prompt": "x<<die>>", "max_tokens": 20})
    err = assert_error(r, 503, "engine_unavailable")
    assert r.headers["Retry-After"] and err["type"] == "service_unavailable"
    assert not any(s in err["message"] for s in ("pid", "Traceback", "ActorDiedError", "127.0.0.1"))
    # the other replica answers; the dead one stops itself and Serve starts a new one (a new pid)
    deadline = time.monotonic() + 90
    while True:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda i: post(guarded, "/v1/completions", {"prompt": "ok", "max_tokens": 2}),
                                  range(4)))
        assert {c.status_code for c in codes} <= {200, 503}, [c.text for c in codes]  # never a plain 500
        if len(_pids("guarded") - before) >= 1 and all(c.status_code == 200 for c in codes):
            break
        assert time.monotonic() < deadline, "the dead replica was not replaced"
        time.sleep(0.5)


def test_the_server_reports_a_dead_engine_unhealthy_at_once():
    """In-process (no actor to stop): the request that found the engine dead flips health at once, without
    waiting for a health-check period."""
    import asyncio

    from raymoe.deployments.protocol import EngineDeadError
    from raymoe.deployments.server import LLMServer

    async def main():
        srv = LLMServer(FAKE, {}, observer=None)
        try:
            srv.check_health()
            job = {"prompt": "x<<die>>", "params": {"max_tokens": 5}}
            res = await asyncio.wait_for(srv.generate(job), T)
            assert res["status"] == 503
            with pytest.raises(EngineDeadError):
                srv.check_health()
            with pytest.raises(EngineDeadError):
                await srv.health()
            after = await srv.generate({"prompt": "fine", "params": {"max_tokens": 2}})
            assert after["status"] == 503 and "replaced" in after["error"]["message"]
        finally:
            srv.shutdown(1)

    asyncio.run(main())


def test_resources_are_checked_before_deploying(ray_cluster, checkpoints):
    ep = ServeArgs(checkpoint="/x", ep_size=2)  # 1 CPU for the replica + 1 per shard
    with pytest.raises(ValueError, match=r"need \{CPU: 3\} in total; the cluster has \{CPU: 2\}"):
        check_resources(ep, nodes=[{"CPU": 2.0, "memory": 1e9}], available={"CPU": 2.0})
    check_resources(ep, nodes=[{"CPU": 4.0}], available={"CPU": 0.0})  # busy now, but it fits: waits, no error
    big = ServeArgs(checkpoint="/x", ep_size=2, ep_shard_cpus=3, ep_placement_strategy="STRICT_PACK")
    with pytest.raises(ValueError, match=r"needs \{CPU: 7\} on one node"):
        check_resources(big, nodes=[{"CPU": 4.0}, {"CPU": 4.0}])
    gpu = ServeArgs(engine_cls=FAKE, ray_actor_options={"num_cpus": 1, "num_gpus": 1})
    with pytest.raises(ValueError, match="GPU: 1"):
        check_resources(gpu, nodes=[{"CPU": 8.0}])
    check_resources(ServeArgs(checkpoint="/x", ep_size=2, check_resources=False), nodes=[{"CPU": 1.0}])
    # against the session's Ray (8 CPUs): build_app refuses before deploying
    with pytest.raises(ValueError, match="not enough resources"):
        build_app({"checkpoint": str(checkpoints["a"]), "ep_size": 2, "ep_shard_cpus": 5})
