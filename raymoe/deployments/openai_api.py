"""OpenAI request/response shapes and OpenAI-style errors (no Ray, no FastAPI).

Requests are parsed strictly (``"max_tokens": "5"`` is a type error, not 5) and no parameter is silently
ignored: an unknown field, or an OpenAI field this server does not implement given a value that would change
the answer (``suffix``, ``tools``, a ``response_format`` other than text, ``logprobs`` with ``echo``), is a 400
naming it (code ``unsupported``). Only ``user`` and ``metadata`` are accepted without effect: they label a
request and never change its output. Errors use OpenAI's body: ``{"error": {"message", "type", "param",
"code"}}``.

Logprobs are those of the raw model distribution (`raymoe.platform.logits`): completions ``logprobs: k``
(0..20) and chat ``logprobs: true`` with ``top_logprobs: k``. ``best_of`` (completions) samples ``best_of``
candidates per prompt and returns the ``n`` with the highest cumulative logprob (not with ``stream``).

Chat: the messages go to the engine as they are (text content parts joined into one string), which renders
them with the model's own chat template (`raymoe.platform.chat`, as transformers' ``apply_chat_template`` with
``add_generation_prompt``); a model without one gets role tags (`raymoe.platform.chat.DEFAULT_CHAT_TEMPLATE`),
its reply ending at the next tag. Roles are the template's to accept: a message it refuses is a 400 naming it
(``messages.<i>``).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymoe.deployments.protocol import MAX_LOGPROBS, RequestError, SamplingParams

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")  # pydantic union branches in error locations
MAX_N = 8
MAX_STOP = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


def _unsupported(param: str, what: str) -> RequestError:
    return RequestError(f"{param}: {what} is not supported by this server", param=param, code="unsupported")


class _Sampling(_Strict):
    model: Optional[str] = Field(None, description="model id; optional here (the served model), required by OpenAI")
    max_tokens: Optional[int] = Field(None, description="new tokens; default 16 (completions), the rest of the "
                                                        "context (chat)")
    temperature: float = Field(1.0, description="0 = greedy; in [0, 2]")
    top_p: float = Field(1.0, description="nucleus sampling mass in (0, 1]")
    top_k: Optional[int] = Field(None, description="extension: keep the k most likely tokens")
    n: int = Field(1, description=f"choices per prompt, 1..{MAX_N}")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"up to {MAX_STOP} stop strings")
    seed: Optional[int] = None
    user: Optional[str] = Field(None, description="end-user label (accepted; no effect on the output)")
    metadata: Optional[dict[str, str]] = Field(None, description="request labels (accepted; no effect)")
    max_completion_tokens: Optional[int] = Field(None, description="newer OpenAI name of max_tokens")
    presence_penalty: float = Field(0.0, description="in [-2, 2]: minus this from a token's logit once it occurred")
    frequency_penalty: float = Field(0.0, description="in [-2, 2]: minus this x the times a token occurred")
    repetition_penalty: float = Field(1.0, description="extension, in (0, 2]: multiplicative penalty over prompt "
                                                       "and generated tokens (Hugging Face / vLLM)")
    logit_bias: Optional[dict[str, Union[int, float]]] = Field(None, description="token id (a string) -> bias "
                                                                                 "in [-100, 100]")
    min_tokens: int = Field(0, description="extension: no stop token (EOS) before this many tokens")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return {}
        try:
            return {int(k): float(b) for k, b in v.items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids (integers as strings)") from None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
        return stops

    def sampling(self, default_max_tokens: Optional[int]) -> SamplingParams:
        """The engine's SamplingParams (default_max_tokens None: the rest of the context)."""
        mt = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return SamplingParams(max_tokens=mt if mt is not None else default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              stop=list(self.stop or []), seed=self.seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias=dict(self.logit_bias or {}), min_tokens=self.min_tokens,
                              logprobs=self.top_logprobs_k())

    def top_logprobs_k(self) -> Optional[int]:
        """Alternatives per token the client asked for (None: no logprobs)."""
        raise NotImplementedError

    def candidates(self) -> int:
        """Choices generated per prompt (``best_of`` >= n keeps the n best)."""
        return self.n

    def check_supported(self) -> None:
        """400 naming a parameter whose value this server cannot honour."""


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, a list of strings (one choice group each) or token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = Field(None, description="not supported (insertion): a non-empty value is a 400")
    logprobs: Optional[int] = Field(None, description=f"0..{MAX_LOGPROBS}: logprobs of the sampled tokens and "
                                                      "this many most likely alternatives")
    best_of: Optional[int] = Field(None, description=f"n..{MAX_N} candidates per prompt; the n with the highest "
                                                     "cumulative logprob are returned")

    def top_logprobs_k(self) -> Optional[int]:
        return self.logprobs

    def candidates(self) -> int:
        return self.best_of or self.n

    def check_supported(self) -> None:
        if self.suffix:
            raise _unsupported("suffix", "insertion (suffix)")
        if self.logprobs is not None and self.echo:
            raise _unsupported("echo", "echo with logprobs (prompt logprobs)")
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise RequestError(f"best_of must be in [n, {MAX_N}] (n={self.n}); got {self.best_of}",
                                   param="best_of", code="invalid_value")
            if self.stream and self.best_of > self.n:
                raise RequestError("best_of > n cannot be streamed", param="best_of", code="invalid_value")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", param="prompt", code="empty_prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(_Strict):
    # clients send a previous reply back as it came (refusal, tool_calls... as null): empty extras are fine
    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(description="system, user, assistant, developer, ...: the chat template decides")
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _no_unsupported_fields(self) -> "ChatMessage":
        used = sorted(k for k, v in (self.model_extra or {}).items() if v not in (None, [], {}, ""))
        if used:
            raise ValueError(f"message fields {used} are not supported by this server")
        return self

    def for_template(self, i: int) -> dict:
        """The message as the chat template sees it: role, content as one string, name if given."""
        out = {"role": self.role, "content": self.text(i)}
        return {**out, "name": self.name} if self.name is not None else out

    def text(self, i: int) -> Optional[str]:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("only text content parts ({'type': 'text', 'text': ...}) are supported",
                                   param=f"messages.{i}.content", code="unsupported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool = Field(False, description="return the logprobs of the sampled tokens")
    top_logprobs: Optional[int] = Field(None, description=f"0..{MAX_LOGPROBS} alternatives per token (needs "
                                                          "logprobs)")
    response_format: Optional[dict[str, Any]] = Field(None, description="only {'type': 'text'}")
    tools: Any = Field(None, description="not supported: a non-empty value is a 400")
    tool_choice: Any = Field(None, description="not supported unless 'none'")
    parallel_tool_calls: Optional[bool] = Field(None, description="accepted without tools (no effect)")

    def top_logprobs_k(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if self.tools:
            raise _unsupported("tools", "tool calling")
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool calling")
        if self.response_format not in (None, {"type": "text"}):
            raise _unsupported("response_format", f"response_format {self.response_format!r} (only text)")

    def template_messages(self) -> list[dict]:
        """The messages for the model's chat template (rendered by the engine)."""
        if not self.messages:
            raise RequestError("messages must be a non-empty list", param="messages", code="empty_messages")
        return [m.for_template(i) for i, m in enumerate(self.messages)]


def parse(model_cls: type[BaseModel], body: Any):
    """Validate a JSON body; RequestError (400) naming the first offending field."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not _TYPE_TAG.match(str(x)))
        if err["type"] == "extra_forbidden":
            raise RequestError(f"{loc}: unrecognized request argument (not supported by this server)", param=loc,
                               code="unsupported") from None
        code = "missing_field" if err["type"] == "missing" else "invalid_value"
        raise RequestError(f"{loc or 'body'}: {err['msg']}", param=loc or None, code=code) from None


# -- responses ------------------------------------------------------------------------------------------


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_from(exc: RequestError) -> dict:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: Optional[list], offset: int = 0) -> Optional[dict]:
    """OpenAI's completions ``logprobs`` of token entries ``[token text, logprob, [[text, logprob], ...]]``;
    ``offset``: the text offset of the first token (the echoed prompt's length)."""
    if entries is None:
        return None
    offsets = []
    for tok, _, _ in entries:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [dict((t, lp) for t, lp in e[2]) for e in entries], "text_offset": offsets}


def _chat_token(tok: str, lp: float) -> dict:
    return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(entries: Optional[list]) -> Optional[dict]:
    """OpenAI's chat ``logprobs`` ({"content": [...]}) of token entries (see `completion_logprobs`)."""
    if entries is None:
        return None
    return {"content": [{**_chat_token(tok, lp), "top_logprobs": [_chat_token(t, v) for t, v in top]}
                        for tok, lp, top in entries]}


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"],
                         "logprobs": completion_logprobs(c.get("logprobs"), c.get("offset", 0)),
                         "finish_reason": c["finish_reason"]} for c in choices], "usage": use}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": chat_logprobs(c.get("logprobs")), "finish_reason": c["finish_reason"]}
                        for c in choices],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: Optional[str],
               logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(model_id: str, info: Optional[dict] = None) -> dict:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "raymoe"}
    if info:
        card["raymoe"] = {k: info.get(k) for k in ("checkpoint", "step", "block_size", "engine")}
    return card
