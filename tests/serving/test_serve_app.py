"""The Serve application over HTTP (local Ray, 127.0.0.1): endpoint shapes, SSE streaming, bad input, backpressure,
per-request failures, health, batching through Serve, and live reload via user_config."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

requests = pytest.importorskip("requests")
serve = pytest.importorskip("ray.serve")

from raymoe.deployments.app import build_app  # noqa: E402
from raymoe.platform.generate import generate  # noqa: E402
from serving_helpers import hf_model_folder, spicy_model, tokenizer_folder, wait_until  # noqa: E402

FAKE = "raymoe.deployments.fake_engine:FakeEngine"
T = 30  # seconds: bound on every HTTP call
ERROR_KEYS = {"message", "type", "param", "code"}


def deploy(serve_url, name, **args):
    args.setdefault("ray_actor_options", {"num_cpus": 0})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"{serve_url}/{name}"


@pytest.fixture(scope="module")
def fake(serve_url):
    url = deploy(serve_url, "fake", engine_cls=FAKE, model_id="fake",
                 engine={"token_delay_s": 0.002, "block_size": 64, "max_batch_size": 8})
    yield url
    serve.delete("fake")


def deploy_config(app: dict) -> None:
    """Deploy one application the declarative way (what `serve run CONFIG` / `serve deploy CONFIG` do), so
    that a changed user_config reconfigures the running replicas instead of replacing them."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=True)


def yaml_app(checkpoint_args: str, user_checkpoint: str) -> dict:
    """cluster_configs/serve_local.yaml's application, pointed at a test checkpoint under /yaml."""
    with open(Path(__file__).parents[2] / "cluster_configs" / "serve_local.yaml") as f:
        app = yaml.safe_load(f)["applications"][0]
    app.update(name="yaml", route_prefix="/yaml")
    app["args"].update(checkpoint=checkpoint_args, model_id="tiny")
    for d in app["deployments"]:
        if d["name"] == "OpenAIServer":
            d["user_config"] = {"checkpoint": user_checkpoint}
            d["ray_actor_options"] = {"num_cpus": 0}
            d["autoscaling_config"].update(max_replicas=1)
    return app


@pytest.fixture(scope="module")
def real(serve_url, checkpoints):
    """The real engine, deployed from the repository's Serve config file."""
    deploy_config(yaml_app(str(checkpoints["a"]), str(checkpoints["a"])))
    yield f"{serve_url}/yaml"
    serve.delete("yaml")


def post(url, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=T, **kw)


def sse_events(resp) -> list:
    """Parsed `data:` payloads of an SSE response; the last must be [DONE]."""
    lines = [ln for ln in resp.iter_lines(decode_unicode=True) if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def greedy_text(model, prompt: str, n: int, stop=()) -> str:
    out = generate(model, [list(prompt.encode())], n, temperature=0.0, eos_id=256,
                   stop_sequences=[list(s.encode()) for s in stop])[0]
    return bytes(t for t in out if t < 256).decode("utf-8", errors="replace")


# -- shapes -------------------------------------------------------------------------------------------------


def test_models_and_health(fake):
    r = requests.get(fake + "/v1/models", timeout=T)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["id"] == "fake" and body["data"][0]["object"] == "model"
    assert requests.get(fake + "/v1/models/fake", timeout=T).json()["id"] == "fake"
    assert_error(requests.get(fake + "/v1/models/other", timeout=T), 404, "model", "model_not_found")
    h = requests.get(fake + "/healthz", timeout=T)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert_error(requests.get(fake + "/v1/nothing", timeout=T), 404)


def test_completion_shape(fake):
    r = post(fake, "/v1/completions", {"model": "fake", "prompt": "abc", "max_tokens": 7, "n": 2, "seed": 1})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "text_completion" and b["model"] == "fake" and b["id"].startswith("cmpl-")
    assert [c["index"] for c in b["choices"]] == [0, 1]
    assert all(c["text"] == "abcabca" and c["finish_reason"] == "length" for c in b["choices"])
    assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 14, "total_tokens": 17}
    r = post(fake, "/v1/completions", {"prompt": ["xy", "z"], "max_tokens": 3, "echo": True, "stop": "zz"})
    assert [c["text"] for c in r.json()["choices"]] == ["xyxyx", "z"]  # "z" stops at once: "zz" held back
    assert r.json()["choices"][1]["finish_reason"] == "stop"


def test_chat_shape(fake):
    r = post(fake, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 5})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    msg = b["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == "<|use"  # the fake echoes the templated prompt
    assert b["usage"]["prompt_tokens"] == len("<|user|>\nhi\n<|assistant|>\n")


def test_streaming_sse(fake):
    r = post(fake, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "stream": True,
                                       "stream_options": {"include_usage": True}}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == "abcab" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 5 and events[-1]["choices"] == []
    r = post(fake, "/v1/chat/completions", {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 4,
                                            "stream": True, "n": 2}, stream=True)
    events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == "<|us"
        assert mine[-1]["finish_reason"] == "length"


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/completions", '["a list"]', 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10 ** 9}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": "x" * 65}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": 12}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "a", "temperature": 3}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "a", "stream": True, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {}, 400, "prompt", "missing_field"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty_messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 80}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     400, "messages.1", "invalid_messages"),  # a role the chat template refuses
    ("/v1/completions", {"prompt": [1, 2, 257]}, 400, "prompt", "invalid_value"),  # outside the vocabulary
])
def test_bad_input_is_a_4xx_with_openai_error(fake, path, body, status, param, code):
    assert_error(post(fake, path, body), status, param, code)


def test_request_failure_is_isolated(fake):
    bad = post(fake, "/v1/completions", {"prompt": "x<<fail>>", "max_tokens": 5})
    assert_error(bad, 503, code="engine_error")  # the engine failed it: a retry may succeed
    assert bad.headers["Retry-After"] == "2" and "injected" not in bad.text  # no internals
    stream = post(fake, "/v1/completions", {"prompt": "x<<fail>>", "max_tokens": 5, "stream": True}, stream=True)
    assert "error" in sse_events(stream)[-1]  # headers were sent: the error is the last event
    assert post(fake, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).json()["choices"][0]["text"] == "ok"


# -- a model's own tokenizer and chat template ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tok(serve_url, tmp_path_factory):
    """The fake engine with a Hugging Face tokenizer folder as its checkpoint: ChatML template, stop <|im_end|>."""
    folder = tokenizer_folder(tmp_path_factory.mktemp("hf_tok"))
    url = deploy(serve_url, "hftok", engine_cls=FAKE, model_id="hftok", checkpoint=str(folder),
                 engine={"token_delay_s": 0.001, "block_size": 256})
    yield url
    serve.delete("hftok")


def test_chat_with_the_model_template_over_http(hf_tok):
    from raymoe.platform.tokenizer import load_tokenizer

    messages = [{"role": "system", "content": "Ünïcode 🙂"}, {"role": "user", "content": "Hi"}]
    r = post(hf_tok, "/v1/chat/completions", {"messages": messages, "max_tokens": 50})
    assert r.status_code == 200, r.text
    b = r.json()  # the fake repeats the rendered prompt: its first <|im_end|> stop token ends the reply
    assert b["choices"][0]["message"]["content"] == "system\nÜnïcode 🙂" and b["choices"][0]["finish_reason"] == "stop"
    tok = load_tokenizer(Path(_replica_info("hftok")["checkpoint"]))
    assert b["usage"]["prompt_tokens"] == len(tok.encode(tok.apply_chat_template(messages)))
    s = post(hf_tok, "/v1/chat/completions", {"messages": messages, "max_tokens": 50, "stream": True}, stream=True)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(s)) == "system\nÜnïcode 🙂"
    assert_error(post(hf_tok, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400,
                 "messages.0", "invalid_messages")
    ids = tok.encode("Hello world")
    echo = post(hf_tok, "/v1/completions", {"prompt": ids, "max_tokens": 2, "echo": True}).json()
    assert echo["choices"][0]["text"] == "Hello world" + tok.decode(ids[:2])  # token ids echoed as text
    assert_error(post(hf_tok, "/v1/completions", {"prompt": [5, tok.vocab_size]}), 400, "prompt", "invalid_value")


@pytest.mark.slow
def test_serve_a_hugging_face_folder_chats_with_its_template(serve_url, tmp_path):
    """The real engine (in its child process) on a Hugging Face model folder: the answer of a chat request is the
    model's greedy reply to the prompt its own template renders."""
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.protocol import Chat, SamplingParams

    folder = hf_model_folder(tmp_path / "qwen")
    url = deploy(serve_url, "hfmodel", checkpoint=str(folder), model_id="qwen")
    try:
        messages = [{"role": "user", "content": "What is a tuple?"}]
        r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        eng = Engine(str(folder))
        eng.start()
        try:
            want = eng.generate_sync(Chat(messages), SamplingParams(max_tokens=12, temperature=0.0))
        finally:
            eng.shutdown(5)
        assert r.json()["choices"][0]["message"]["content"] == want.text
        assert r.json()["usage"]["prompt_tokens"] == want.prompt_tokens
    finally:
        serve.delete("hfmodel")


# -- backpressure -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("single", [True, False])
def test_backpressure_answers_429_with_openai_body(serve_url, single):
    if single:  # one deployment: the engine's queue answers
        limits = {"engine": {"token_delay_s": 0.03, "max_batch_size": 1, "max_waiting": 1}}
    else:  # ingress -> LLMServer: Serve's queue in front of the LLMServer replica answers
        limits = {"max_ongoing_requests": 1, "max_queued_requests": 1,
                  "engine": {"token_delay_s": 0.03, "max_batch_size": 1}}
    url = deploy(serve_url, "busy", engine_cls=FAKE, model_id="busy", single_deployment=single, **limits)
    try:
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda i: post(url, "/v1/completions", {"prompt": "slow", "max_tokens": 10}),
                                  range(8)))
        codes = sorted(r.status_code for r in resps)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        for r in resps:
            if r.status_code == 429:
                assert_error(r, 429, code="rate_limit_exceeded")
                assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        serve.delete("busy")


# -- the real engine through Serve --------------------------------------------------------------------------


@pytest.mark.slow
def test_real_engine_batched_through_serve_equals_single(real):
    model = spicy_model(0)
    prompts = ["hello", "The fox", "abc" * 4, "z", "serving", "MoE!"]

    def one(p):
        return post(real, "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0})

    with ThreadPoolExecutor(len(prompts)) as pool:
        resps = list(pool.map(one, prompts))
    for p, r in zip(prompts, resps):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy_text(model, p, 16)
    s = post(real, "/v1/completions", {"prompt": "hello", "max_tokens": 16, "temperature": 0, "stream": True},
             stream=True)
    assert "".join(e["choices"][0]["text"] for e in sse_events(s)) == greedy_text(model, "hello", 16)
    chat = post(real, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    prompt = "<|user|>\nhi\n<|assistant|>\n"
    expect = greedy_text(model, prompt, 64 - len(prompt) + 1, stop=["\n<|"])
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == expect


def _replica_info(app, deployment="OpenAIServer"):
    return serve.get_deployment_handle(deployment, app).info.remote().result(timeout_s=T)


@pytest.mark.slow
def test_real_engine_sampling_parameters_over_http(real):
    """Through Serve and the engine's child process: logprobs are the in-process engine's, a -100 logit_bias bans
    the token greedy decoding picked first, and repetition_penalty changes a repetitive reply."""
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.engine_config import EngineConfig
    from raymoe.deployments.protocol import SamplingParams

    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0}
    got = post(real, "/v1/completions", {**body, "logprobs": 2}).json()["choices"][0]
    eng = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=1))
    eng.start()
    try:
        want = eng.generate_sync("hello", SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))
    finally:
        eng.shutdown(5)
    assert got["logprobs"]["token_logprobs"] == pytest.approx([e[1] for e in want.logprobs], abs=1e-4)
    assert len(got["logprobs"]["top_logprobs"][0]) == 2
    first = want.token_ids[0]
    banned = post(real, "/v1/completions", {**body, "logit_bias": {str(first): -100}}).json()["choices"][0]
    assert banned["text"] != got["text"] and not banned["text"].startswith(bytes([first]).decode(errors="replace"))
    rep = post(real, "/v1/completions", {**body, "max_tokens": 16, "repetition_penalty": 2.0}).json()
    assert rep["choices"][0]["text"] != post(real, "/v1/completions", {**body, "max_tokens": 16}).json()[
        "choices"][0]["text"]


@pytest.mark.slow
def test_live_reload_via_user_config(real, checkpoints):
    before = _replica_info("yaml")
    assert before["checkpoint"] == str(checkpoints["a"])
    deploy_config(yaml_app(str(checkpoints["a"]), str(checkpoints["b"])))  # only user_config changed
    after = _replica_info("yaml")
    assert after["pid"] == before["pid"]  # same replica: reconfigured, not restarted
    assert after["checkpoint"] == str(checkpoints["b"]) and after["stats"].get("reloads") == 1
    r = post(real, "/v1/completions", {"prompt": "after", "max_tokens": 12, "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy_text(spicy_model(1), "after", 12)


@pytest.mark.slow
def test_reload_does_not_drop_in_flight_streams(serve_url):
    def app(ckpt):
        return {"name": "reload", "route_prefix": "/reload", "import_path": "raymoe.deployments.app:build_app",
                "args": {"engine_cls": FAKE, "model_id": "r", "ray_actor_options": {"num_cpus": 0},
                         "engine": {"token_delay_s": 0.05}},
                "deployments": [{"name": "OpenAIServer", "user_config": {"checkpoint": ckpt}}]}

    deploy_config(app("v1"))
    url = f"{serve_url}/reload"
    try:
        pid = _replica_info("reload")["pid"]
        out = {}

        def stream():
            r = post(url, "/v1/completions", {"prompt": "abcd", "max_tokens": 120, "stream": True}, stream=True)
            out["events"] = sse_events(r)

        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: _replica_info("reload")["stats"].get("generated_tokens", 0) > 0, timeout_s=T)
        deploy_config(app("v2"))  # reconfigure while the stream runs (120 tokens take ~6 s)
        t.join(T)
        text = "".join(e["choices"][0]["text"] for e in out["events"])
        assert text == ("abcd" * 30) and out["events"][-1]["choices"][0]["finish_reason"] == "length"
        info = _replica_info("reload")
        assert info["pid"] == pid and info["checkpoint"] == "v2" and info["reloads"] == 2  # v1 at start, v2
        assert info["stats"]["reloads_while_running"] == 1  # the swap really happened mid-stream
        # a client that goes away mid-stream: its generation is aborted, not run to max_tokens
        before = info["stats"]["generated_tokens"]
        with post(url, "/v1/completions", {"prompt": "gone", "max_tokens": 120, "stream": True}, stream=True) as r:
            next(r.iter_lines())
        wait_until(lambda: _replica_info("reload")["stats"]["running"] == 0, timeout_s=T)
        assert _replica_info("reload")["stats"]["generated_tokens"] - before < 120
    finally:
        serve.delete("reload")


def test_ray_metric_hooks_reach_prometheus_with_their_labels(ray_cluster):
    """Every serving metric hook runs with the label names of its MetricDef (Ray rejects unknown tags) and its
    values reach Ray's Prometheus endpoint (labels unique to this test pick its series out of the session's)."""
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from raymoe.deployments.metrics import RayEngineObserver, RequestCounter
    from raymoe.platform import metrics as M

    obs = RayEngineObserver()
    obs.on_first_token(0.01)
    obs.on_tokens(3, 0.002)
    obs.on_tokens(1, None)
    obs.on_step(4, 2, 4)
    obs.on_step(0, 0, 0)
    obs.on_finish("length", 0.1, 5, 7)
    obs.on_expert_load(99, [0.25, 0.75])
    obs.on_reload()
    obs.on_checkpoint_step(7)
    obs.on_prefix_cache(32, 16)
    RequestCounter().inc("metrics_test", 299)
    wanted = {"ray_" + d.name.removesuffix("_total") for d in M.SERVING_METRICS}
    url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
    deadline, found = time.monotonic() + 60, {}

    def mine():
        load = {s.labels["expert"]: s.value for s in found["ray_raymoe_serve_expert_load_fraction"].samples
                if s.labels.get("layer") == "99"}
        requests_ = [s.value for s in found["ray_raymoe_serve_requests"].samples
                     if s.labels.get("route") == "metrics_test" and s.name.endswith("_total")]
        return load, requests_

    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("ray_raymoe_serve")}
        if wanted <= set(found) and mine()[0] and mine()[1]:
            break
        time.sleep(1)
    assert wanted <= set(found), sorted(wanted - set(found))
    load, requests_ = mine()
    assert load == {"0": 0.25, "1": 0.75}
    assert requests_ == [1.0]
    statuses = {s.labels["status"] for s in found["ray_raymoe_serve_requests"].samples
                if s.labels.get("route") == "metrics_test"}
    assert statuses == {"299"}


def test_direct_ingress_probe_skips_ports_that_speak_another_protocol():
    """A port in the probed range held by another server (a gRPC port answers with binary frames) is skipped,
    not a crash of `raymoe serve --direct-ingress` (http.client.BadStatusLine is no OSError)."""
    import socket
    import threading

    from raymoe.deployments.app import direct_ingress_urls

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def answer_binary():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00 not http\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_binary, daemon=True).start()
    try:
        assert direct_ingress_urls("127.0.0.1", port - 1, replicas=1, timeout_s=0.5) == []
    finally:
        srv.close()
