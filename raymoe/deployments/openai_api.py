"""OpenAI request/response shapes and OpenAI-style errors (no Ray, no FastAPI).

Requests are parsed strictly (``"max_tokens": "5"`` is a type error, not 5); unknown fields are ignored
(clients send many optional OpenAI fields), except ones whose non-default values we cannot honour
(``logprobs``, ``tools``...), which are 400s. Errors use OpenAI's body:
``{"error": {"message", "type", "param", "code"}}``.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raymoe.deployments.protocol import RequestError, SamplingParams

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")  # pydantic union branches in error locations
MAX_N = 8
MAX_STOP = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


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
    user: Optional[str] = None
    logprobs: Any = None
    max_completion_tokens: Optional[int] = Field(None, description="newer OpenAI name of max_tokens")

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
                              stop=list(self.stop or []), seed=self.seed)

    def check_supported(self) -> None:
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs is not supported by this server", param="logprobs", code="unsupported")


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, a list of strings (one choice group each) or token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None

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
    role: str = Field(description="system, user, assistant, developer, ...: the chat template decides")
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None

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
    tools: Any = None

    def template_messages(self) -> list[dict]:
        """The messages for the model's chat template (rendered by the engine)."""
        if not self.messages:
            raise RequestError("messages must be a non-empty list", param="messages", code="empty_messages")
        if self.tools:
            raise RequestError("tools are not supported by this server", param="tools", code="unsupported")
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


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"]} for c in choices], "usage": use}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: Optional[str]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: Optional[str]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(model_id: str, info: Optional[dict] = None) -> dict:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "raymoe"}
    if info:
        card["raymoe"] = {k: info.get(k) for k in ("checkpoint", "step", "block_size", "engine")}
    return card
