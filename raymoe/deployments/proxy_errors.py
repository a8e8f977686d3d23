"""OpenAI error bodies for the failures Ray Serve's HTTP proxy answers itself.

The routes answer every failure they see with an OpenAI error body (`raymoe.deployments.ingress`). A few never
reach them: the replica that holds the request dies (the proxy's ASGI call raises: uvicorn would answer a
plain-text ``500 Internal Server Error``, or cut a stream short), no replica is available, the proxy's queue
is full, or the request timed out (the proxy answers plain text). `OpenAIErrorMiddleware` wraps the proxy's
ASGI app and turns each into a JSON OpenAI error: a dead or unavailable replica is a 503 with ``Retry-After``,
an error the proxy raised for another reason a 500 with no internals (the details stay in the proxy's log);
a plain-text error status keeps its status; a stream cut by a dead replica ends with an error event.

Ray Serve installs proxy middlewares from the callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(:data:`PROXY_ERRORS_ENV`), read when the proxy process starts: ``raymoe serve`` sets it before it starts Ray;
on a cluster put it in every node's environment before ``ray start``.
"""

from __future__ import annotations

import json
import logging

from raymoe.deployments.openai_api import error_body

logger = logging.getLogger("ray.serve")
PROXY_ERRORS_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "raymoe.deployments.proxy_errors:middlewares"}
RETRY_AFTER_S = {429: 1, 503: 2}  # the ingress's values (a full queue drains fast; a replaced replica is slower)
_KINDS = {400: ("invalid_request_error", "bad_request"), 404: ("invalid_request_error", "not_found"),
          408: ("timeout_error", "request_timeout"), 429: ("rate_limit_error", "rate_limit_exceeded"),
          503: ("service_unavailable", "replica_unavailable")}


def middlewares() -> list:
    """The proxy callback (see the module docstring): Starlette middlewares for Ray Serve's HTTP proxy."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorMiddleware)]


def failure_status(exc: BaseException) -> int:
    """503 for a replica that died or cannot be reached (a retry goes to another or a new one), else 500."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    if isinstance(exc, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return 503
    return 500


def _error(status: int, message: str) -> dict:
    kind, code = _KINDS.get(status, ("server_error", "internal_error"))
    return error_body(message, kind, None, code)


def error_json(status: int, message: str) -> tuple[bytes, list]:
    """(body, headers) of an OpenAI error answer with ``status`` (``Retry-After`` on 429 and 503)."""
    body = json.dumps(_error(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in RETRY_AFTER_S:
        headers.append((b"retry-after", str(RETRY_AFTER_S[status]).encode()))
    return body, headers


_MESSAGES = {503: "model replica unavailable; retry later", 500: "internal error (details in the server log)"}


class OpenAIErrorMiddleware:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False, "stream": False, "plain": None}

        async def relay(msg):
            if msg["type"] == "http.response.start":
                headers = dict(msg.get("headers") or [])
                ctype = headers.get(b"content-type", b"").decode().lower()
                if msg["status"] >= 400 and not ctype.startswith("application/json"):
                    state["plain"] = msg["status"]  # the proxy's own plain-text answer: sent as JSON instead
                    return
                state["started"], state["stream"] = True, ctype.startswith("text/event-stream")
            elif msg["type"] == "http.response.body" and state["plain"] is not None:
                if not msg.get("more_body", False):
                    await _send_error(send, state["plain"], _plain_message(state["plain"]))
                    state["started"] = state["ended"] = True
                return
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                state["ended"] = True
            await send(msg)

        failure = None
        try:
            await self.app(scope, receive, relay)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            failure = exc
        if state["ended"]:
            return
        # not answered, or cut short: the proxy's call to the replica failed (it logs why and sends nothing
        # when the replica died), or the proxy itself raised
        status = 503 if failure is None else failure_status(failure)
        logger.warning(f"request not answered by a replica ({status}): {failure!r}")
        try:
            if not state["started"]:
                await _send_error(send, status, _MESSAGES[status])
            elif state["stream"]:  # headers are sent: the error is the last event
                event = json.dumps(_error(status, _MESSAGES[status]))
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(),
                            "more_body": False})
        except OSError:  # the client is gone
            pass


def _plain_message(status: int) -> str:
    return {408: "request timed out", 429: "server is overloaded (too many queued requests); retry later",
            503: "no model replica available; retry later", 404: "no route for this path"}.get(
        status, _MESSAGES[500] if status >= 500 else "bad request")


async def _send_error(send, status: int, message: str) -> None:
    body, headers = error_json(status, message)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
