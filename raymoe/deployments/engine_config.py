"""`EngineConfig`: the serving engine's settings, one typed object for every way of starting it.

``raymoe serve`` flags, ``ServeArgs.engine`` (the ``args.engine`` mapping of a Serve config file) and
in-process use (``Engine(checkpoint, config=EngineConfig(max_batch_size=8))``) all build this object, so the
values are validated here and nowhere else. An engine class says which config it takes with a ``config_cls``
attribute (a subclass adds that engine's own settings, e.g. `FakeEngineConfig`). This module imports neither
Ray nor torch.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class EngineConfig(BaseModel):
    """Settings of `raymoe.deployments.engine.Engine` (and `ProcessEngine`, which runs it in a child process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(16, ge=1, description="running rows of the decode batch (continuous batching); "
                                "with ep_size > 1, rows of the whole expert-parallel group")
    max_waiting: int = Field(64, ge=1, description="queued requests per engine before new ones are refused "
                             "(HTTP 429)")
    max_model_len: Optional[int] = Field(
        4096, ge=2, description="longest sequence (prompt + generated tokens) a request may use, capped at the "
        "model's context (block_size); it sizes the KV cache allocated up front (rows x layers x this many "
        "slots). None: the model's whole context (a RoPE model's can be 131072)")
    max_prefill_tokens: int = Field(2048, ge=1, description="padded prompt tokens admitted per step: bounds how "
                                    "long running rows wait while new prompts are prefilled")
    reload_policy: Literal["drain", "immediate"] = Field("drain", description="weight reload: 'drain' lets "
                                                         "running requests finish on the old weights first; "
                                                         "'immediate' swaps at the next step (same architecture)")
    device: str = Field("cpu", description="where the model runs: 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when "
                        "available)")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads of the engine process "
                                         "(None: torch's default)")
    prefix_cache_mb: float = Field(
        0.0, ge=0, description="memory (MiB) for prefix caching: prompts that start with the same blocks of "
        "tokens as an earlier prompt (a system prompt, a chat history) reuse their keys/values instead of "
        "prefilling them; least recently used blocks are evicted. 0 = off (the default: it holds memory beside "
        "the batch KV cache, and outputs equal the uncached ones up to floating-point rounding, not bitwise). "
        "ep_size > 1 rejects it (expert-parallel replicas have no prefix cache)")
    prefix_block_size: int = Field(16, ge=1, description="tokens per prefix-cache block: prefixes are reused in "
                                   "whole blocks (smaller: finer reuse, more lookups)")
    expert_load_interval_s: float = Field(1.0, ge=0, description="seconds between expert-load metric updates")
    stall_timeout_s: float = Field(120.0, gt=0, description="check_health fails when a busy engine made no step "
                                   "for this long")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {v!r}")
        return v


def config_cls_of(engine_cls: type) -> type[EngineConfig]:
    """The config class an engine class takes (its ``config_cls``; `EngineConfig` when it names none)."""
    cls = getattr(engine_cls, "config_cls", EngineConfig)
    if not (isinstance(cls, type) and issubclass(cls, EngineConfig)):
        raise TypeError(f"{engine_cls.__name__}.config_cls must be an EngineConfig subclass; got {cls!r}")
    return cls
