"""Failures the HTTP proxy answers itself get OpenAI error bodies (`raymoe.deployments.proxy_errors`): the
middleware on fake ASGI apps, and a replica killed while it holds a unary and a streaming request."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from raymoe.deployments.proxy_errors import OpenAIErrorMiddleware
from serving_helpers import wait_until

T = 30  # seconds: bound on every wait
ERROR_KEYS = {"message", "type", "param", "code"}


def _call(app) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one GET through the middleware around ``app``."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    asyncio.run(asyncio.wait_for(OpenAIErrorMiddleware(app)({"type": "http"}, receive, send), T))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _plain(status: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"Internal details: pid 42", "more_body": False})
    return app


def _error(status_headers_body, status: int, code: str) -> dict:
    got, headers, body = status_headers_body
    assert got == status and headers["content-type"] == "application/json", (got, headers, body)
    err = json.loads(body)["error"]
    assert set(err) == ERROR_KEYS and err["code"] == code and b"pid" not in body
    return headers


def test_the_proxy_answers_its_own_failures_with_openai_errors():
    from ray.exceptions import ActorDiedError

    assert _error(_call(_plain(503)), 503, "replica_unavailable")["retry-after"] == "2"  # no replica
    assert _error(_call(_plain(429)), 429, "rate_limit_exceeded")["retry-after"] == "1"  # the proxy's queue
    _error(_call(_plain(500)), 500, "internal_error")

    async def silent(scope, receive, send):  # the proxy after the replica died: it sends nothing
        return None

    assert "retry-after" in _error(_call(silent), 503, "replica_unavailable")

    async def dead(scope, receive, send):
        raise ActorDiedError()

    _error(_call(dead), 503, "replica_unavailable")

    async def bug(scope, receive, send):
        raise KeyError("internal")

    _error(_call(bug), 500, "internal_error")

    async def fine(scope, receive, send):  # answers of the routes pass unchanged
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {}}', "more_body": False})

    assert _call(fine) == (404, {"content-type": "application/json"}, b'{"error": {}}')


@pytest.mark.slow
def test_a_replica_killed_during_requests_answers_503(serve_url):
    """The replica holding a unary and a streaming request dies: the unary one gets a 503 OpenAI error with
    Retry-After (not the proxy's plain-text 500), the stream ends with an error event."""
    import ray
    import requests
    from ray import serve

    from raymoe.deployments.app import build_app

    serve.run(build_app({"engine_cls": "raymoe.deployments.fake_engine:FakeEngine", "model_id": "k",
                         "ray_actor_options": {"num_cpus": 0}, "engine": {"token_delay_s": 0.05, "block_size": 512}}),
              name="killed", route_prefix="/killed")
    url = f"{serve_url}/killed/v1/completions"
    unary = {}

    def post_unary():
        r = requests.post(url, json={"prompt": "abc", "max_tokens": 400}, timeout=T)
        unary.update(status=r.status_code, headers=r.headers, body=r.json())

    try:
        thread = threading.Thread(target=post_unary, daemon=True)
        thread.start()
        stream = requests.post(url, json={"prompt": "abc", "max_tokens": 400, "stream": True}, stream=True, timeout=T)
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {")
        handle = serve.get_deployment_handle("OpenAIServer", "killed")
        wait_until(lambda: handle.info.remote().result(timeout_s=T)["stats"]["running"] == 2, timeout_s=T)
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::killed#"))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        thread.join(T)
    finally:
        serve.delete("killed")
    assert events[-1]["error"]["code"] == "replica_unavailable", events[-1]
    assert unary["status"] == 503 and unary["headers"]["Retry-After"] == "2", unary
    assert unary["body"]["error"]["code"] == "replica_unavailable"
