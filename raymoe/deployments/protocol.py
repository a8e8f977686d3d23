"""The engine contract every serving engine follows (the real `Engine`, `FakeEngine`, a future EP engine).

Lifecycle verbs (Ray Serve LLM's): ``start()`` (load weights, start the decode loop), ``check_health()``
(raise when unhealthy), ``shutdown(timeout_s)`` (stop admitting, let running requests finish for up to
``timeout_s``, then fail what is left with `EngineShutdownError`). Requests: ``stream(prompt, params)``, an
async iterator of `GenerationChunk`, and ``generate(prompt, params)`` -> `GenerationResult`; ``reload(path)``
swaps weights; ``info()`` describes the model. This module imports neither Ray nor torch.

Errors a request can raise: `RequestError` (the request is wrong: a 4xx with an OpenAI error body),
`EngineOverloadedError` (queue full: 429), `EngineShutdownError` (503; `EngineDeadError` when the engine
cannot recover: the replica stops itself), anything else (a 500 for that
request only: an engine never lets one request's failure stop the others).

Text goes through the model's tokenizer (`raymoe.platform.tokenizer`, loaded from the checkpoint: an engine's
``tokenizer``): a prompt is a string (encoded with the tokenizer's own special tokens, e.g. a BOS), a list of
token ids (checked against the vocabulary), or a `Chat` (rendered with the model's chat template, then encoded
as it is). Replies are detokenized incrementally with stop strings matched on the text
(`raymoe.platform.detokenize.TextStream`); usage and ``max_tokens`` count the model's tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union



@dataclass
class Chat:
    """A conversation as a prompt: OpenAI-style messages ({"role", "content", ...}) for the chat template."""

    messages: list[dict]


Prompt = Union[str, Sequence[int], Chat]


class RequestError(ValueError):
    """A bad request; carries the fields of an OpenAI error body and the HTTP status."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full; retry later (HTTP 429)."""


class EngineShutdownError(RuntimeError):
    """The engine is stopping or stopped (HTTP 503)."""


class EngineDeadError(EngineShutdownError):
    """The engine can serve no more requests: its process or a shard of its expert-parallel group died (HTTP
    503). Its ``check_health`` raises it too; the Serve replica then stops itself, so Serve replaces it at once
    instead of after several failed health checks."""


MAX_LOGPROBS = 20  # most likely alternatives per token (OpenAI's chat limit)


@dataclass
class SamplingParams:
    """Per-request decoding settings. temperature 0 = greedy; stop = stop strings (never returned);
    max_tokens None = as many as fit in the context. Penalties, logit_bias, min_tokens and logprobs:
    `raymoe.platform.logits` (logit_bias keys are token ids; logprobs None = none, k = the sampled token's
    logprob and the k most likely alternatives, from the raw model distribution)."""

    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    logprobs: Optional[int] = None

    def logits_settings(self):
        """The decode loop's `raymoe.platform.logits.LogitsSettings` of these params."""
        from raymoe.platform.logits import LogitsSettings

        return LogitsSettings(self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                              dict(self.logit_bias), self.min_tokens, self.logprobs)

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Raise `RequestError` naming the parameter on a bad value (types included); ``vocab_size``: check
        logit_bias's token ids against it."""
        bias = self.logit_bias
        checks = (
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             "null or an integer >= 1"),
            ("temperature", _is_num(self.temperature) and 0 <= self.temperature <= 2, "a number in [0, 2]"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "null or an integer >= 1"),
            ("seed", self.seed is None or _is_int(self.seed), "null or an integer"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("presence_penalty", _is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2]"),
            ("frequency_penalty", _is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2]"),
            ("repetition_penalty", _is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
             "a number in (0, 2]"),
            ("logit_bias", isinstance(bias, dict) and all(
                _is_int(k) and k >= 0 and (vocab_size is None or k < vocab_size) and _is_num(v) and -100 <= v <= 100
                for k, v in bias.items()) and len(bias) <= 300,
             f"at most 300 token ids in [0, {vocab_size or 'vocab'}) mapped to numbers in [-100, 100]"),
            ("min_tokens", _is_int(self.min_tokens) and self.min_tokens >= 0
             and (not _is_int(self.max_tokens) or self.min_tokens <= self.max_tokens), "an integer in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"null or an integer in [0, {MAX_LOGPROBS}]"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise RequestError(f"{name} must be {allowed}; got {getattr(self, name)!r}", param=name,
                                   code="invalid_value")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass
class GenerationChunk:
    """New output of one request: text/tokens released since the last chunk (may be empty on the last one).

    finish_reason: None while running, then "stop" (EOS or a stop string) or "length" (max_tokens).
    completion_tokens counts sampled tokens so far (a matched stop string's tokens included).
    """

    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: Optional[list] = None  # with params.logprobs: one (token, logprob, top) entry per token_ids item


@dataclass
class GenerationResult:
    """A whole generation (`generate`), plus timings in seconds measured inside the engine."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    latency_s: float
    logprobs: Optional[list] = None


class EngineObserver:
    """Metrics hooks an engine calls (from its loop thread); the default does nothing.

    The Serve replica passes one that writes ray.util.metrics (raymoe.deployments.metrics); tests and
    in-process users may pass their own.
    """

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_tokens(self, n: int, inter_token_s: Optional[float]) -> None: ...
    def on_step(self, batch_size: int, waiting: int, running: int) -> None: ...  # batch_size 0: idle
    def on_finish(self, finish_reason: str, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_expert_load(self, layer: int, fractions: list[float]) -> None: ...
    def on_reload(self) -> None: ...
    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None: ...  # prompt tokens looked up / reused


_ids = itertools.count()


class Request:
    """One request inside an engine: prompt, params, delivery callback and what was delivered so far (the
    engine's decode loop holds the decode state: `raymoe.deployments.engine.RequestRow`)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                 deliver: Callable[[Any], None], stream: bool = True):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop = stop  # stop strings: the request's, plus the chat turn's end for the default chat template
        self.deliver = deliver  # called with a GenerationChunk, an Exception, or None (end of stream)
        self.stream = stream  # False: one chunk at the end (no per-token messages for whole-result callers)
        self._held_text: list[str] = []
        self._held_ids: list[int] = []
        self._held_lps: Optional[list] = [] if params.logprobs is not None else None
        self.t_submit = time.perf_counter()
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.completion_tokens = 0
        self.aborted = False
        self.done = False

    def emit(self, tokens: list[int], text: str, finish_reason: Optional[str], observer: EngineObserver,
             logprobs: Optional[list] = None) -> None:
        """Deliver released tokens and their text (the decode row's `TextStream`: stop strings already cut), and
        their logprob entries when the request asked for logprobs."""
        if self.done:
            return
        now = time.perf_counter()
        final = finish_reason is not None
        if tokens or final:
            if self.t_first is None:
                self.t_first = now
                observer.on_first_token(now - self.t_submit)
            if tokens:
                observer.on_tokens(len(tokens), None if self.t_last is None else now - self.t_last)
            self.t_last = now
            self._held_text.append(text)
            self._held_ids.extend(tokens)
            if self._held_lps is not None:
                self._held_lps.extend(logprobs or [])
            if self.stream or final:
                chunk = GenerationChunk("".join(self._held_text), self._held_ids, finish_reason,
                                        len(self.prompt_ids), self.completion_tokens, self._held_lps)
                self._held_text, self._held_ids = [], []
                self._held_lps = None if self._held_lps is None else []
                self._send(chunk)
        if final:
            self.done = True
            observer.on_finish(finish_reason, now - self.t_submit, len(self.prompt_ids), self.completion_tokens)
            self._send(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self._send(exc)

    def _send(self, item: Any) -> None:
        try:
            self.deliver(item)
        except Exception:  # the consumer is gone (e.g. its event loop closed): drop the request, not the batch
            self.aborted = True


class BaseEngine:
    """Request plumbing shared by engines: validation, async/sync streaming, abort, admission limit.

    Subclasses implement ``_enqueue(request)`` (hand a validated `Request` to the loop), ``start``,
    ``check_health``, ``shutdown``, ``reload`` and ``info``; they set ``block_size``/``vocab_size`` (the
    model's) and ``tokenizer`` (the model's; the byte tokenizer until then).
    """

    block_size: int = 0
    vocab_size: int = 257

    def __init__(self, *, max_waiting: int, observer: Optional[EngineObserver] = None):
        from raymoe.platform.tokenizer import ByteTokenizer

        self.max_waiting = max_waiting
        self.observer = observer or EngineObserver()
        self._accepting = False
        self.tokenizer = ByteTokenizer()

    # -- to implement ----------------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        raise NotImplementedError

    def num_waiting(self) -> int:
        raise NotImplementedError

    # -- requests --------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, param: str = "prompt") -> list[int]:
        """Token ids of a prompt (see the module docstring); RequestError when empty, too long, out of the
        vocabulary, or a conversation the chat template refuses (naming the message)."""
        if isinstance(prompt, Chat):  # errors name "messages.<i>" (the field of a chat request)
            ids = self.tokenizer.encode(self.render_chat(prompt, "messages" if param == "prompt" else param))
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
            ids, vocab = list(prompt), min(self.vocab_size, self.tokenizer.vocab_size)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{param} has token ids outside this model's vocabulary [0, {vocab}): {bad[:5]}",
                                   param=param, code="invalid_value")
        else:
            raise RequestError(f"{param} must be a string or a list of token ids", param=param, code="invalid_type")
        if not ids:
            raise RequestError(f"{param} must not be empty", param=param, code="empty_prompt")
        if len(ids) > self.block_size:
            raise RequestError(f"{param} is {len(ids)} tokens; this model's context is {self.block_size} tokens",
                               param=param, code="context_length_exceeded")
        return ids

    def make_request(self, prompt: Prompt, params: SamplingParams, deliver: Callable[[Any], None],
                     param: str = "prompt", stream: bool = True) -> Request:
        """Validate and build a `Request` (RequestError on bad input); does not enqueue it."""
        if not self._accepting:
            raise EngineShutdownError("engine is not accepting requests (not started or shutting down)")
        params.validate(min(self.vocab_size, self.tokenizer.vocab_size))
        ids = self.encode(prompt, param)
        room = self.block_size - len(ids) + 1  # the last sampled token is never fed back
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise RequestError(f"max_tokens={params.max_tokens} is too large: the prompt has {len(ids)} tokens "
                               f"and the context is {self.block_size}, so at most {room} new tokens fit",
                               param="max_tokens", code="context_length_exceeded")
        stop = list(params.stop) + (list(self.tokenizer.chat_stop_strings) if isinstance(prompt, Chat) else [])
        return Request(ids, params, stop, deliver, stream)

    def render_chat(self, chat: Chat, param: str = "messages") -> str:
        """The prompt text of a conversation: the model's chat template (`DEFAULT_CHAT_TEMPLATE` without one);
        RequestError (400) naming the message the template refuses."""
        from raymoe.platform.chat import ChatTemplateError

        try:
            return self.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            where = param if e.index is None else f"{param}.{e.index}"
            raise RequestError(str(e), param=where, code="invalid_messages") from None

    def prompt_text(self, prompt: Prompt) -> str:
        """A prompt as text (``echo``): token ids decoded with the model's tokenizer, a chat rendered."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Chat):
            return self.render_chat(prompt)
        return self.tokenizer.decode(list(prompt), skip_special_tokens=False)

    def submit(self, req: Request) -> None:
        """Admission control, then hand to the loop. Raises EngineOverloadedError / EngineShutdownError."""
        if not self._accepting:
            raise EngineShutdownError("engine is not accepting requests (not started or shutting down)")
        if self.num_waiting() >= self.max_waiting:
            raise EngineOverloadedError(f"engine queue is full ({self.max_waiting} waiting requests); retry later")
        self._enqueue(req)

    async def stream(self, prompt: Prompt, params: SamplingParams, *, param: str = "prompt",
                     min_interval_s: float = 0.0) -> AsyncIterator[GenerationChunk]:
        """Validate and enqueue (errors raise here), then return an async iterator of chunks.

        Closing the iterator early (the client went away) aborts the request at the next step boundary.
        min_interval_s > 0 batches tokens: chunks are at least that far apart (except the first and last),
        so a stream crossing processes sends fewer, larger messages.
        """
        req, q = self._submit_async(prompt, params, param)
        return self._drain(req, q, min_interval_s)

    def _submit_async(self, prompt: Prompt, params: SamplingParams, param: str,
                      stream: bool = True) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self.make_request(prompt, params, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), param,
                                stream)
        self.submit(req)
        return req, q

    async def _drain(self, req: Request, q: asyncio.Queue, min_interval_s: float = 0.0
                     ) -> AsyncIterator[GenerationChunk]:
        """Yield chunks; chunks that queued up while the consumer was busy are merged into one (fewer
        messages for a slow consumer, e.g. a Serve stream across processes)."""
        try:
            pending: list = []
            last = None
            while True:
                item = pending.pop(0) if pending else await q.get()
                if min_interval_s > 0 and last is not None and isinstance(item, GenerationChunk):
                    wait = last + min_interval_s - time.perf_counter()
                    if wait > 0 and item.finish_reason is None:
                        await asyncio.sleep(wait)  # let more tokens queue up, merged below
                while isinstance(item, GenerationChunk) and item.finish_reason is None and not q.empty():
                    nxt = q.get_nowait()
                    if not isinstance(nxt, GenerationChunk):
                        pending.append(nxt)
                        break
                    item = GenerationChunk(item.text + nxt.text, item.token_ids + nxt.token_ids,
                                           nxt.finish_reason, nxt.prompt_tokens, nxt.completion_tokens,
                                           None if item.logprobs is None else item.logprobs + nxt.logprobs)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                last = time.perf_counter()
        finally:
            req.aborted = True  # no-op when finished; otherwise the loop drops the row at the next step

    async def generate(self, prompt: Prompt, params: SamplingParams, *, param: str = "prompt") -> GenerationResult:
        """The whole generation of one prompt (delivered as one message at the end, not one per token)."""
        req, q = self._submit_async(prompt, params, param, stream=False)
        chunks = [c async for c in self._drain(req, q)]
        return _collect(chunks, time.perf_counter(), req)

    def generate_sync(self, prompt: Prompt, params: SamplingParams, timeout_s: float = 300.0) -> GenerationResult:
        """Blocking `generate` for code without an event loop (scripts, tests)."""
        q: queue.Queue = queue.Queue()
        req = self.make_request(prompt, params, q.put)
        self.submit(req)
        chunks, deadline = [], time.monotonic() + timeout_s
        while True:
            try:
                item = q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                req.aborted = True
                raise TimeoutError(f"generation did not finish within {timeout_s}s") from None
            if item is None:
                return _collect(chunks, time.perf_counter(), req)
            if isinstance(item, BaseException):
                raise item
            chunks.append(item)


def _collect(chunks: list[GenerationChunk], now: float, req: Request) -> GenerationResult:
    last = chunks[-1]
    ttft = (req.t_first - req.t_submit) if req.t_first else 0.0
    lps = None if last.logprobs is None else [e for c in chunks for e in c.logprobs]
    return GenerationResult("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                            last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens, ttft,
                            now - req.t_submit, lps)


def run_thread(target: Callable[[], None], name: str) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t
