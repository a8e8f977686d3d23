"""`OpenAIIngress`: the FastAPI app of the OpenAI-compatible endpoints, as a Serve ingress deployment.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` -> Server-Sent Events ``data: {...}`` chunks ending with ``data: [DONE]``), ``GET /healthz``.
Each choice (prompt x n) is one call to an `LLMServer` replica through a DeploymentHandle, so choices spread
over replicas and join their continuous batches. Text never gets tokenized here: prompts, chat messages and
``echo`` go to the engine, which holds the model's tokenizer and chat template.

Status codes, all with an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: 400 bad
request (malformed JSON, wrong types, empty or too-long prompt, bad max_tokens, a parameter this server does
not implement...), 401 missing or wrong API key (with ``api_key_sha256`` set: every route but ``/healthz``
needs ``Authorization: Bearer <key>``, compared in constant time; the key itself never reaches the replica),
404 unknown model or route, 415 a body that is not declared ``application/json``, 429 overloaded (the engine
queue is full, or more than ``max_queued_requests`` calls wait for LLMServer replicas: Serve's
BackPressureError), 503 no healthy replica, a replica or expert-parallel shard that died, shutting down, or
the engine failed that request (retrying may succeed), 500 a bug in these routes. 429 and 503 carry
``Retry-After``. Messages never carry internals (exception text, pids, addresses): those go to the replica's
log. Failures the HTTP proxy answers itself (the replica holding the request died, no replica, the proxy's
queue full) get the same bodies from `raymoe.deployments.proxy_errors`.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.deployments import openai_api as oa
from raymoe.deployments.protocol import RequestError

logger = logging.getLogger("ray.serve")
app = FastAPI(title="raymoe OpenAI-compatible API", version="1")


RETRY_AFTER_S = {429: 1, 503: 2}  # seconds: a full queue drains fast; a replaced replica takes longer


def _error(status: int, body: dict, headers: Optional[dict] = None) -> JSONResponse:
    if status in RETRY_AFTER_S:
        headers = {"Retry-After": str(RETRY_AFTER_S[status]), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def api_key_digest(key: Optional[str]) -> Optional[str]:
    """What the ingress holds of an API key: its SHA-256 (hex), so the key is in no deployment argument."""
    return None if not key else hashlib.sha256(key.encode()).hexdigest()


def check_api_key(request: Request, digest: Optional[str]) -> None:
    """RequestError 401 unless ``Authorization: Bearer <key>`` matches ``digest`` (no key configured: open).
    Digests are compared with hmac.compare_digest: the time taken does not depend on where they differ."""
    if digest is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise RequestError("missing API key: send the header 'Authorization: Bearer <key>'", status=401,
                           code="invalid_api_key")
    if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).hexdigest(), digest):
        raise RequestError("incorrect API key", status=401, code="invalid_api_key")


def check_json_body(request: Request) -> None:
    """RequestError 415 unless the body is declared JSON (a form post is not parsed as JSON anyway)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(f"Content-Type must be application/json; got {ctype or 'none'}", status=415,
                           code="unsupported_media_type")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(exc.status_code, oa.error_body(str(exc.detail), "invalid_request_error", None, code))


def _exception_result(exc: BaseException) -> dict:
    """Serve/Ray failures of a handle call -> {"status", "error"}."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return {"status": 429, **oa.error_body("server is overloaded (too many queued requests); retry later",
                                               "rate_limit_error", None, "rate_limit_exceeded")}
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        logger.warning(f"model replica unavailable: {exc!r}")
        return {"status": 503, **oa.error_body("model replica unavailable; retry later", "service_unavailable",
                                               None, "replica_unavailable")}
    logger.exception("request failed", exc_info=exc)
    return {"status": 500, **oa.error_body("internal error (details in the server log)", "server_error", None,
                                           "internal_error")}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _merge(gens) -> AsyncIterator[tuple[int, dict]]:
    """Items of several streams as (stream index, item), in arrival order; a stream that raises (e.g. its
    replica died) yields an error item instead."""
    if len(gens) == 1:
        try:
            async for item in gens[0]:
                yield 0, item
        except Exception as exc:  # noqa: BLE001
            yield 0, _exception_result(exc)
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for item in g:
                await q.put((i, item))
        except Exception as exc:  # noqa: BLE001
            r = _exception_result(exc)
            await q.put((i, r))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        live = len(gens)
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@serve.ingress(app)
class OpenAIIngress:
    """OpenAI routes over a handle to the `LLMServer` deployment (see the module docstring)."""

    def __init__(self, server, model_id: str, default_max_tokens: int = 16,
                 api_key_sha256: Optional[str] = None):
        self._server = server
        self._key = api_key_sha256
        self._stream_server = server.options(stream=True)
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        try:
            from raymoe.deployments.metrics import RequestCounter

            self._requests = RequestCounter()
        except Exception:  # outside a Ray worker (no metrics agent): count nothing
            self._requests = None

    def _count(self, route: str, status: int) -> None:
        if self._requests is not None:
            self._requests.inc(route, status)

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            res = await asyncio.wait_for(self._server.health.remote(), timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy (details in the log only)
            logger.warning(f"health check failed: {exc!r}")
            return _error(503, oa.error_body("unhealthy", "service_unavailable", None, "unhealthy"))
        return JSONResponse({"status": "ok", "model": self.model_id, "engine": res.get("engine")})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        if (denied := self._denied(request, "models")) is not None:
            return denied
        self._count("models", 200)
        return JSONResponse({"object": "list", "data": [oa.model_card(self.model_id, await self._info())]})

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> JSONResponse:
        if (denied := self._denied(request, "models")) is not None:
            return denied
        if model_id != self.model_id:
            return self._model_404(model_id, "models")
        self._count("models", 200)
        return JSONResponse(oa.model_card(self.model_id, await self._info()))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    # -- helpers -------------------------------------------------------------------------------------------
    def _denied(self, request: Request, route: str) -> Optional[JSONResponse]:
        try:
            check_api_key(request, self._key)
        except RequestError as e:
            self._count(route, e.status)
            return _error(e.status, oa.error_from(e), {"WWW-Authenticate": "Bearer"})
        return None

    async def _info(self) -> Optional[dict]:
        try:
            return await asyncio.wait_for(self._server.info.remote(), timeout=10.0)
        except Exception:  # the card without details is still a valid answer
            return None

    def _model_404(self, name: str, route: str) -> JSONResponse:
        self._count(route, 404)
        return _error(404, oa.error_body(f"The model '{name}' does not exist; this server serves "
                                         f"'{self.model_id}'", "invalid_request_error", "model", "model_not_found"))

    async def _handle(self, request: Request, route: str):
        if (denied := self._denied(request, route)) is not None:
            return denied
        try:
            check_json_body(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None
            req = oa.parse(oa.CompletionRequest if route == "completions" else oa.ChatCompletionRequest, body)
            req.check_supported()
            if req.model is not None and req.model != self.model_id:
                return self._model_404(req.model, route)
            jobs = self._jobs(req, route)
            resp = await (self._stream(req, route, jobs) if req.stream else self._unary(req, route, jobs))
        except RequestError as e:
            resp = _error(e.status, oa.error_from(e))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            r = _exception_result(exc)
            resp = _error(r.pop("status"), r)
        self._count(route, resp.status_code)
        return resp

    def _jobs(self, req, route: str) -> list[dict]:
        if route == "completions":
            prompts, param, default = [{"prompt": p} for p in req.prompts()], "prompt", self.default_max_tokens
            echo = req.echo
        else:
            prompts, param, default, echo = [{"messages": req.template_messages()}], "messages", None, False
        base = req.sampling(default)
        ranked = req.candidates() > req.n  # best_of: every candidate needs its cumulative logprob
        lps = base.logprobs if base.logprobs is not None or not ranked else 0
        jobs = []
        for k, p in enumerate(prompts):
            for j in range(req.candidates()):
                seed = None if base.seed is None else base.seed + j
                params = {**vars(base), "seed": seed, "stop": list(base.stop), "logprobs": lps}
                jobs.append({**p, "params": params, "param": param, "echo": echo, "index": len(jobs),
                             "prompt_index": k})
        return jobs

    @staticmethod
    def _best(req, jobs: list[dict], results: list[dict]) -> list[tuple[dict, dict]]:
        """(job, result) of the returned choices: per prompt, the n candidates with the highest cumulative
        logprob (``best_of``), else all; indices renumbered prompt by prompt."""
        pairs = list(zip(jobs, results))
        if req.candidates() > req.n:
            keep = []
            for k in sorted({j["prompt_index"] for j in jobs}):
                mine = [pr for pr in pairs if pr[0]["prompt_index"] == k]
                mine.sort(key=lambda pr: -sum(e[1] for e in pr[1].get("logprobs", [])))
                keep += mine[:req.n]
            pairs = keep
            if req.top_logprobs_k() is None:  # asked for by best_of only
                pairs = [(j, {k: v for k, v in r.items() if k != "logprobs"}) for j, r in pairs]
        return [({**j, "index": i}, r) for i, (j, r) in enumerate(pairs)]

    @staticmethod
    def _echo(job: dict, first: dict) -> str:
        """The prompt as text when the request asked for ``echo`` (the engine decoded it: ``prompt_text``)."""
        return first.get("prompt_text", "") if job.get("echo") else ""

    async def _unary(self, req, route: str, jobs: list[dict]) -> JSONResponse:
        results = await asyncio.gather(*(self._server.generate.remote(j) for j in jobs), return_exceptions=True)
        results = [_exception_result(r) if isinstance(r, BaseException) else r for r in results]
        for r in results:
            if "error" in r:
                return _error(r.pop("status"), r)
        choices = [{"index": j["index"], "text": self._echo(j, r) + r["text"], "finish_reason": r["finish_reason"],
                    "logprobs": r.get("logprobs"), "offset": len(self._echo(j, r))}
                   for j, r in self._best(req, jobs, results)]
        per_prompt = req.candidates()
        prompt_tokens = sum(r["prompt_tokens"] for i, r in enumerate(results) if i % per_prompt == 0)
        use = oa.usage(prompt_tokens, sum(r["completion_tokens"] for r in results))
        if route == "completions":
            return JSONResponse(oa.completion_response(oa.new_id("cmpl"), self.model_id, choices, use))
        return JSONResponse(oa.chat_response(oa.new_id("chatcmpl"), self.model_id, choices, use))

    async def _stream(self, req, route: str, jobs: list[dict]):
        gens = [self._stream_server.generate_stream.remote(j) for j in jobs]
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        firsts = [_exception_result(f) if isinstance(f, BaseException) else f for f in firsts]
        bad = next((f for f in firsts if "error" in f), None)
        if bad is not None:
            for g in gens:
                g.cancel()
            return _error(bad.pop("status"), bad)
        body = self._sse_body(req, route, jobs, gens, firsts)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse_body(self, req, route: str, jobs, gens, firsts: list[dict]) -> AsyncIterator[bytes]:
        rid = oa.new_id("cmpl" if route == "completions" else "chatcmpl")
        prompt_tokens = [f["prompt_tokens"] for f in firsts]
        created, completion = int(time.time()), [0] * len(jobs)

        offsets = [len(self._echo(j, f)) for j, f in zip(jobs, firsts)]

        def chunk(i: int, text: str, finish: Optional[str], first: bool, lps: Optional[list] = None) -> dict:
            if route == "completions":
                out = oa.completion_chunk(rid, self.model_id, created, i, text, finish,
                                          oa.completion_logprobs(lps, offsets[i]))
                offsets[i] += sum(len(e[0]) for e in lps or [])
                return out
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return oa.chat_chunk(rid, self.model_id, created, i, delta, finish, oa.chat_logprobs(lps))

        try:
            for j, f in zip(jobs, firsts):  # chat: the role first; completions with echo: the prompt first
                if route == "chat" or self._echo(j, f):
                    yield _sse(chunk(j["index"], self._echo(j, f), None, True))
            async for i, item in _merge(gens):
                if "error" in item:  # headers are sent: the error becomes the last event
                    item.pop("status", None)
                    yield _sse(item)
                    break
                completion[i] = item["completion_tokens"]
                if item["text"] or item["finish_reason"] or item.get("logprobs"):
                    yield _sse(chunk(jobs[i]["index"], item["text"], item["finish_reason"], False,
                                     item.get("logprobs")))
            if req.stream_options is not None and req.stream_options.include_usage:
                use = oa.usage(sum(p for k, p in enumerate(prompt_tokens) if k % req.n == 0), sum(completion))
                obj = "text_completion" if route == "completions" else "chat.completion.chunk"
                yield _sse(oa.usage_chunk(rid, self.model_id, created, obj, use))
            yield b"data: [DONE]\n\n"
        finally:
            for g in gens:  # client disconnected or error: stop generating
                g.cancel()



# -- ingress and engine in one replica -------------------------------------------------------------------------
class _LocalStream:
    """An async generator with the two things the ingress uses of a streaming DeploymentResponseGenerator."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        async def close():
            try:
                await self._agen.aclose()
            except RuntimeError:  # still running in a task being cancelled: the cancellation closes it
                pass

        asyncio.ensure_future(close())


class _LocalMethod:
    def __init__(self, fn, stream: bool):
        self._fn, self._stream = fn, stream

    def remote(self, *args, **kwargs):
        if self._stream:
            return _LocalStream(self._fn(*args, **kwargs))
        return asyncio.ensure_future(self._fn(*args, **kwargs))


class LocalHandle:
    """What `OpenAIIngress` uses of a DeploymentHandle (``.options(stream=True)``, ``.method.remote(...)``),
    calling an object in this process: no serialization, no hop."""

    def __init__(self, target, stream: bool = False):
        self._target, self._stream = target, stream

    def options(self, *, stream: bool = False, **_ignored) -> "LocalHandle":
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name), self._stream)


class OpenAIServer(OpenAIIngress):
    """The OpenAI routes and an `LLMServer` (one engine) in the same replica: a request takes one hop (HTTP
    proxy -> replica) instead of two (proxy -> ingress -> engine replica). Same arguments as LLMServer plus
    the ingress's; lifecycle (user_config reloads, health checks, graceful shutdown) is LLMServer's."""

    async def __init__(self, engine_cls, engine_args=None, checkpoint=None, stream_interval_s: float = 0.0,
                       model_id: str = "raymoe", default_max_tokens: int = 16, observer="ray",
                       api_key_sha256: Optional[str] = None):
        from raymoe.deployments.server import LLMServer

        self.llm = LLMServer(engine_cls, engine_args, checkpoint, stream_interval_s, observer)
        await super().__init__(LocalHandle(self.llm), model_id, default_max_tokens, api_key_sha256)

    async def reconfigure(self, user_config) -> None:
        await self.llm.reconfigure(user_config)

    async def info(self) -> dict:
        """LLMServer.info (for a DeploymentHandle: ``handle.info.remote()``)."""
        return await self.llm.info()

    def check_health(self) -> None:
        self.llm.check_health()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (running requests get up to timeout_s); Serve's __del__ below does the same."""
        await asyncio.to_thread(self.llm.shutdown, timeout_s)

    async def __del__(self):
        try:
            await asyncio.to_thread(self.llm.shutdown)  # lets running requests finish; the loop keeps streaming
        finally:
            await super().__del__()
