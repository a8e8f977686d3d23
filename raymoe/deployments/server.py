"""`LLMServer`: the Serve deployment that hosts one engine per replica (the class is plain; app.py wraps it).

The engine class is injected (``engine_cls``: a class or ``"module:Class"``), as in Ray Serve LLM, so tests
and load tests can pass `FakeEngine`; ``engine_args`` are its keyword arguments (``config``: an
`EngineConfig`, and the expert-parallel settings; see `raymoe.deployments.app.engine_args_of`).
Lifecycle: the constructor builds and starts the engine; ``check_health`` (called by Serve every
``health_check_period_s``) asks the engine; ``reconfigure`` (Serve's ``user_config``: ``{"checkpoint": DIR}``)
swaps weights live; ``__del__`` (Serve calls it after draining the replica for ``graceful_shutdown_wait_loop_s``)
shuts the engine down, letting running requests finish.

Calls from the ingress carry one "job" (one choice): ``{"prompt": str | [ids]}`` or ``{"messages": [...]}``
(a chat, rendered by the engine with the model's chat template), plus ``"params": {...}``, ``"param": "prompt" |
"messages"`` and ``"echo"`` (the result then carries ``prompt_text``, the prompt as text). Results are plain
dicts; failures are returned (not raised) as ``{"status": http_status, "error": {OpenAI error}}`` so the ingress
can answer with the right code (`error_result`: a request the engine failed is a 503, as is a dead engine).

Expert-parallel replicas (``ep_size`` > 1 in `raymoe.deployments.app.ServeArgs`): the engine's runner starts
``ep_size`` `InferenceShard` actors in the last bundles of this replica's placement group (the deployment's
``placement_group_bundles``), so a whole EP group starts, scales and stops with its replica.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from raymoe.deployments.openai_api import error_body, error_from
from raymoe.deployments.protocol import (Chat, EngineDeadError, EngineOverloadedError, EngineShutdownError,
                                         GenerationChunk, RequestError, SamplingParams)

logger = logging.getLogger("ray.serve")
USER_CONFIG_KEYS = ("checkpoint", "reload_timeout_s", "follow", "follow_interval_s", "follow_live")


def resolve_engine_cls(engine_cls: Union[str, type]) -> type:
    """A class, or ``"package.module:ClassName"`` imported here (in the replica)."""
    if isinstance(engine_cls, type):
        return engine_cls
    if not isinstance(engine_cls, str) or ":" not in engine_cls:
        raise ValueError(f"engine_cls must be a class or 'module:Class'; got {engine_cls!r}")
    mod, _, name = engine_cls.partition(":")
    return getattr(importlib.import_module(mod), name)


def error_result(exc: BaseException) -> dict:
    """Map an engine exception to {"status", "error"} (OpenAI body)."""
    if isinstance(exc, RequestError):
        return {"status": exc.status, **error_from(exc)}
    if isinstance(exc, EngineOverloadedError):
        return {"status": 429, **error_body(str(exc), "rate_limit_error", None, "rate_limit_exceeded")}
    if isinstance(exc, EngineShutdownError):  # our own messages: no internals
        return {"status": 503, **error_body(str(exc), "service_unavailable", None, "engine_unavailable")}
    # the engine failed this request (a failed step, an engine process that did not answer): a 503 the client
    # may retry (Retry-After); the details go to the log, not the client
    logger.exception("request failed in the engine", exc_info=exc)
    return {"status": 503, **error_body("the engine failed to run this request; retry later (details in the "
                                        "server log)", "service_unavailable", None, "engine_error")}


def _resolved(path: Optional[str]) -> Optional[str]:
    """The committed step dir a checkpoint path points at (a root's latest), or the path itself."""
    if path is None:
        return None
    try:
        from raymoe.platform.checkpoint import read_manifest

        found = read_manifest(path)["path"]  # a Path, or a RemotePath for a storage URI (already absolute)
        return str(found.resolve() if isinstance(found, Path) else found)
    except Exception:
        return str(path)


class LLMServer:
    """Hosts one engine (see the module docstring).

    A dead engine (`EngineDeadError`: its process or an expert-parallel shard died), seen by a request or by a
    watchdog thread that asks the engine's health every ``watch_interval_s``, makes the replica stop itself
    ``dead_exit_delay_s`` later (time for the failed requests' 503 answers to leave): Serve sees the actor die
    and replaces it at once, and routes no more requests to it, instead of after 3 failed health checks
    ``health_check_period_s`` apart. Outside a Ray actor the server only reports unhealthy.
    """

    watch_interval_s = 1.0
    dead_exit_delay_s = 0.25

    def __init__(self, engine_cls: Union[str, type] = "raymoe.deployments.engine:Engine",
                 engine_args: Optional[dict] = None, checkpoint: Optional[str] = None,
                 stream_interval_s: float = 0.0, observer: Optional[Any] = "ray"):
        if observer == "ray":
            from raymoe.deployments.metrics import RayEngineObserver

            observer = RayEngineObserver()
        cls = resolve_engine_cls(engine_cls)
        self.engine = cls(checkpoint, **dict(engine_args or {}), observer=observer)
        self.engine.start()
        self._loaded = _resolved(checkpoint)
        self._observer, self._follower = observer, None
        self._export_step()
        self.stream_interval_s = stream_interval_s
        self._reload_lock = asyncio.Lock()
        self._dead: Optional[EngineDeadError] = None
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="raymoe-engine-watchdog", daemon=True).start()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def reconfigure(self, user_config: Optional[dict]) -> None:
        """Serve calls this with the deployment's ``user_config`` (on start and on every change)."""
        cfg = dict(user_config or {})
        unknown = sorted(set(cfg) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"user_config has unknown keys {unknown}; allowed: {list(USER_CONFIG_KEYS)}")
        if cfg.get("follow"):  # serve while training: the follower reloads each newer committed checkpoint
            self._follow(cfg["follow"], float(cfg.get("follow_interval_s", 2.0)),
                         float(cfg.get("reload_timeout_s", 600.0)), bool(cfg.get("follow_live", False)))
            return
        target = cfg.get("checkpoint")
        if target is None or _resolved(target) == self._loaded:
            return
        async with self._reload_lock:
            logger.info(f"reloading weights from {target}")
            await asyncio.to_thread(self.engine.reload, target, float(cfg.get("reload_timeout_s", 600.0)))
            self._loaded = _resolved(target)
        self._export_step()

    def _follow(self, root: str, interval_s: float, timeout_s: float, live: bool = False) -> None:
        """Poll ``root`` for newer committed checkpoints (`raymoe.deployments.follow`) and reload each; ``live``:
        also the weights the training run publishes in memory (`LiveFollower`)."""
        from raymoe.deployments.follow import CheckpointFollower, LiveFollower

        async def reload(source) -> None:  # a step dir, or LiveWeights
            key = _resolved(source) if isinstance(source, str) else str(source)
            async with self._reload_lock:
                if key == self._loaded:
                    return
                logger.info(f"following {root}: reloading weights from {source}")
                await asyncio.to_thread(self.engine.reload, source, timeout_s)
                self._loaded = key
            self._export_step()

        if self._follower is not None:
            self._follower.stop()
        if live:
            self._follower = LiveFollower(root, reload, interval_s=interval_s, current=self._loaded,
                                          current_step=self.engine.info().get("step"))
        else:
            self._follower = CheckpointFollower(root, reload, interval_s=interval_s, current=self._loaded)
        self._follower.start()

    def _export_step(self) -> None:
        """The served checkpoint's training step as a metric (raymoe_serve_checkpoint_step)."""
        export = getattr(self._observer, "on_checkpoint_step", None)
        step = self.engine.info().get("step") if export is not None else None  # info: any engine, any process
        if step is not None:
            export(step)

    def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead
        self.engine.check_health()

    def _watch(self) -> None:
        while not self._stopped.wait(self.watch_interval_s):
            engine = self.engine
            if engine is None:
                return
            try:
                engine.check_health()
            except EngineDeadError as exc:
                self._on_dead(exc)
                return
            except Exception:  # other failures: Serve's own health checks decide
                pass

    def _on_dead(self, exc: EngineDeadError) -> None:
        """Report unhealthy from now on and stop this replica shortly (see the class docstring)."""
        if self._dead is not None:
            return
        self._dead = exc
        logger.error(f"engine is dead ({exc}); stopping this replica so that Serve replaces it")
        threading.Timer(self.dead_exit_delay_s, _exit_actor).start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._stopped.set()
        if getattr(self, "_follower", None) is not None:
            self._follower.stop()
            self._follower = None
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown(timeout_s)
            self.engine = None

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: nothing useful left to do
            pass

    # -- requests ----------------------------------------------------------------------------------------
    async def info(self) -> dict:
        stats = self.engine.stats() if hasattr(self.engine, "stats") else {}
        return {**self.engine.info(), "stats": stats, "pid": os.getpid()}

    async def health(self) -> dict:
        self.check_health()
        return {"status": "ok", "engine": type(self.engine).__name__}

    def _failed(self, exc: BaseException) -> dict:
        if isinstance(exc, EngineDeadError):
            self._on_dead(exc)
        elif self._dead is not None and isinstance(exc, EngineShutdownError):
            exc = self._dead  # not accepting because dead: say why
        return error_result(exc)

    def _params(self, job: dict) -> SamplingParams:
        return SamplingParams(**job["params"])

    @staticmethod
    def _prompt(job: dict):
        return Chat(job["messages"]) if "messages" in job else job["prompt"]

    def _echo(self, job: dict) -> dict:
        return {"prompt_text": self.engine.prompt_text(self._prompt(job))} if job.get("echo") else {}

    def _logprobs(self, entries: Optional[list]) -> dict:
        """Logprob entries with token texts: {"logprobs": [[text, logprob, [[text, logprob], ...]], ...]}."""
        if entries is None:
            return {}
        tok = self.engine.tokenizer

        def text(t: int) -> str:
            return tok.decode([t], skip_special_tokens=False)

        return {"logprobs": [[text(t), lp, [[text(a), v] for a, v in top]] for t, lp, top in entries]}

    async def generate(self, job: dict) -> dict:
        """One whole choice: {"text", "finish_reason", "prompt_tokens", "completion_tokens"[, "prompt_text"]} or
        an error."""
        try:
            res = await self.engine.generate(self._prompt(job), self._params(job), param=job.get("param", "prompt"))
            echo = self._echo(job)
        except Exception as exc:
            return self._failed(exc)
        return {"text": res.text, "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.completion_tokens, **echo, **self._logprobs(res.logprobs)}

    async def generate_stream(self, job: dict) -> AsyncIterator[dict]:
        """First item: {"prompt_tokens"[, "prompt_text"]} (accepted) or an error; then {"text", "finish_reason",
        "completion_tokens"} chunks; an error mid-stream is a last {"status", "error"} item."""
        try:
            it = await self.engine.stream(self._prompt(job), self._params(job), param=job.get("param", "prompt"),
                                          min_interval_s=self.stream_interval_s)
            echo = self._echo(job)
        except Exception as exc:
            yield self._failed(exc)
            return
        first = True
        try:
            async for ch in it:
                ch: GenerationChunk
                if first:
                    yield {"prompt_tokens": ch.prompt_tokens, **echo}
                    first = False
                yield {"text": ch.text, "finish_reason": ch.finish_reason, "completion_tokens": ch.completion_tokens,
                       **self._logprobs(ch.logprobs)}
        except Exception as exc:
            yield self._failed(exc)
        finally:
            await it.aclose()  # client went away: abort the request in the engine


def _exit_actor() -> None:
    """Stop the Ray actor this runs in (a Serve replica); nothing outside an actor."""
    try:
        import ray

        actor = ray.get_runtime_context().current_actor
    except Exception:  # not in a Ray actor (in-process use, tests): the server just stays unhealthy
        return
    ray.kill(actor, no_restart=True)
