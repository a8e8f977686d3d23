"""`FakeEngine`: the engine contract without a model, for tests and for load-testing the serving stack.

Output is deterministic: the prompt's tokens (bytes: the byte tokenizer), cycled (prompt "ab" -> "abab..."),
one token per step of
``token_delay_s`` seconds, with the same max_tokens / stop-string / finish-reason rules as `Engine`; its
logprobs say it is certain of every token (logprob 0, that token as the only alternative); penalties and
logit_bias do not change its output. A prompt
containing ``fail_marker`` fails with RuntimeError after its first token (a per-request error); the other
requests are unaffected. A prompt containing ``die_marker`` kills the fake engine after its first token, as a
dead engine process or expert-parallel shard would: every running and later request fails with
`EngineDeadError` and so does ``check_health``. ``reload`` only records the checkpoint. It needs no model: ``checkpoint``, when given,
only provides the tokenizer (a raymoe checkpoint or a Hugging Face folder: its tokenizer and chat template,
its stop tokens ending the cycle), as does ``tokenizer``; default the byte tokenizer. Its settings:
`FakeEngineConfig` (`EngineConfig`'s fields, of which it uses max_batch_size and max_waiting, plus its own).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional

from pydantic import Field

from raymoe.deployments.engine import RequestRow
from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.protocol import (BaseEngine, EngineDeadError, EngineObserver, EngineShutdownError, Request,
                                         run_thread)


class FakeEngineConfig(EngineConfig):
    """`EngineConfig` plus the fake engine's own settings."""

    block_size: int = Field(128, ge=1, description="context length the fake model reports (prompt limit)")
    token_delay_s: float = Field(0.005, ge=0, description="seconds per decode step")
    fail_marker: str = Field("<<fail>>", description="a prompt containing it fails after its first token "
                             "('' = never)")
    die_marker: str = Field("<<die>>", description="a prompt containing it kills the engine after its first "
                            "token, as a dead shard would ('' = never)")


class FakeEngine(BaseEngine):
    """See the module docstring."""

    config_cls = FakeEngineConfig

    def __init__(self, checkpoint: Optional[str] = None, *, config: Optional[FakeEngineConfig] = None,
                 model_id: str = "raymoe", observer: Optional[EngineObserver] = None, tokenizer=None):
        config = FakeEngineConfig() if config is None else config
        if not isinstance(config, FakeEngineConfig):
            raise TypeError(f"config must be a FakeEngineConfig; got {type(config).__name__}")
        super().__init__(max_waiting=config.max_waiting, observer=observer)
        self.config, self.checkpoint, self.model_id, self.block_size = config, checkpoint, model_id, config.block_size
        self.max_batch_size, self.token_delay_s, self.fail_marker = (config.max_batch_size, config.token_delay_s,
                                                                     config.fail_marker)
        self.die_marker = config.die_marker
        self._waiting: collections.deque[RequestRow] = collections.deque()
        self._rows: list[RequestRow] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._dead: Optional[EngineDeadError] = None
        self.counters = collections.Counter()
        if tokenizer is not None or checkpoint is not None:
            from raymoe.platform.tokenizer import load_tokenizer

            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint)
            self.vocab_size = self.tokenizer.vocab_size

    def start(self) -> None:
        if self._thread is None:
            self._thread = run_thread(self._loop, "raymoe-fake-engine")
            self._accepting = True

    def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("fake engine loop is not running")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while (self._rows or self._waiting) and time.monotonic() < deadline:
            time.sleep(0.005)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for r in list(self._waiting) + self._rows:
            r.fail(EngineShutdownError("engine shut down before the request finished"))

    def reload(self, checkpoint: str, timeout_s: float = 600.0) -> None:
        self.checkpoint = str(checkpoint)
        self.counters["reloads"] += 1
        self.counters["reloads_while_running"] += bool(self._rows)
        self.observer.on_reload()

    def info(self) -> dict:
        return {"model_id": self.model_id, "engine": "FakeEngine", "checkpoint": self.checkpoint, "step": None,
                "block_size": self.block_size, "vocab_size": self.vocab_size,
                "max_batch_size": self.max_batch_size, "reloads": self.counters["reloads"]}

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), **self.counters}

    def num_waiting(self) -> int:
        return len(self._waiting)

    def _enqueue(self, req: Request) -> None:
        with self._lock:
            self._waiting.append(RequestRow(req, self.tokenizer, self.observer))

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while self._waiting and len(self._rows) < self.max_batch_size:
                    self._rows.append(self._waiting.popleft())
            rows = [r for r in self._rows if not r.gone()]
            for r in rows:
                self._step(r)
            self._rows = [r for r in self._rows if not r.gone()]
            if rows:
                self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(rows))
                self.observer.on_step(len(rows), len(self._waiting), len(rows))
            time.sleep(self.token_delay_s if rows else 0.002)

    def _step(self, r: RequestRow) -> None:
        prompt = self.tokenizer.decode(r.prompt_ids) if r.completion_tokens == 1 else ""
        if self.die_marker and self.die_marker in prompt:
            self._dead = EngineDeadError("FakeEngine: injected death; this replica is being replaced")
        if self._dead is not None:
            r.fail(self._dead)
            return
        if self.fail_marker and self.fail_marker in prompt:
            r.fail(RuntimeError("FakeEngine: injected failure"))
            return
        token = r.prompt_ids[r.completion_tokens % len(r.prompt_ids)]
        self.counters["generated_tokens"] += 1
        k = r.req.params.logprobs  # the fake model is certain of its next token: logprob 0, no alternative
        r.take(token, None if k is None else (token, 0.0, [(token, 0.0)][:k]))
