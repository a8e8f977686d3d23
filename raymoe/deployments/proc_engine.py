"""`ProcessEngine`: the `Engine` in a child process, so its decode loop does not share a GIL with the server.

Why: a Serve replica runs its request handling (Ray's actor-call machinery, ASGI, FastAPI) in Python threads
of the replica process. The engine's decode loop releases and re-takes the GIL around every torch op (hundreds
per step for a small model), so every burst of request handling makes it wait and its steps get slower. Here
the loop runs in a spawned child process whose only other threads are a command reader and an output flusher;
the replica process keeps the request handling (vLLM's V1 engine separates its engine core from the API server
for the same reason). benchmarks/serve_load.py (``--engine-process`` / ``--no-engine-process``) measures it.

Protocol over one pipe: parent -> child ``("submit", id, prompt_ids, params, stop_strings, stream)``,
``("abort", id)``, ``("call", call_id, method, args)``; child -> parent lists of ``("out", id, item)``
(a `GenerationChunk`, an exception, or None at the end), ``("obs", hook, args)`` (observer calls, replayed
on the parent's observer: metrics are recorded in the Ray process) and ``("reply", call_id, ok, value)``.
Outputs produced while the pipe is busy are sent together (one message per engine step or fewer).
Validation (`RequestError`) and encoding happen in the parent, with the child's block/vocab sizes and the
tokenizer the checkpoint carries (loaded by both); detokenization happens in the child's decode loop. A full
queue comes back as the request's first item (`EngineOverloadedError`, a 429).
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Optional

from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.protocol import (BaseEngine, EngineDeadError, EngineObserver, EngineShutdownError,
                                         Request, SamplingParams, run_thread)
from raymoe.platform.tokenizer import load_tokenizer

_HOOKS = ("on_first_token", "on_tokens", "on_step", "on_finish", "on_expert_load", "on_reload",
          "on_prefix_cache")


class _Outbox(EngineObserver):
    """Child side: collects outputs and observer calls; a flusher thread sends them in batches. Observer calls
    (several per token: metrics) only append and go out at least every ``obs_interval_s``; outputs and
    replies wake the flusher at once. So the decode loop is not interrupted per token or per step."""

    def __init__(self, conn, obs_interval_s: float = 0.05):
        self.conn, self.items, self.lock, self.wake = conn, [], threading.Lock(), threading.Event()
        self.obs_interval_s = obs_interval_s
        for hook in _HOOKS:
            setattr(self, hook, lambda *args, _h=hook: self.put(("obs", _h, args), wake=False))

    def put(self, item, wake: bool = True) -> None:
        if item[0] in ("out", "reply") and isinstance(item[-1], BaseException):
            item = (*item[:-1], _picklable(item[-1]))
        with self.lock:
            self.items.append(item)
        if wake:
            self.wake.set()

    def flush_forever(self) -> None:
        while True:
            self.wake.wait(self.obs_interval_s)
            self.wake.clear()
            with self.lock:
                batch, self.items = self.items, []
            if batch:
                self.conn.send(batch)
            if any(m[0] == "reply" and m[1] == "stop" for m in batch):
                return


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the parent raises the same type), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _child_entry(fd: int) -> None:
    """``python -c`` entry of the child (a plain subprocess: multiprocessing's spawn would re-run the parent's
    main module, which in a Ray worker is the worker itself)."""
    conn = Connection(fd)
    checkpoint, config, model_id = conn.recv()
    _child_main(conn, checkpoint, config, model_id)


def _child_main(conn, checkpoint, config, model_id) -> None:
    """The child process: an Engine, a flusher thread, and this thread reading commands."""
    from raymoe.deployments.engine import Engine

    out = _Outbox(conn)
    try:
        eng = Engine(checkpoint, config=config, model_id=model_id, observer=out)
        eng.start()
    except BaseException as exc:
        conn.send([("reply", "ready", False, exc)])
        return
    conn.send([("reply", "ready", True, {"block_size": eng.block_size, "vocab_size": eng.vocab_size})])
    run_thread(out.flush_forever, "raymoe-engine-outbox")
    reqs: dict[int, Request] = {}
    while True:
        msg = conn.recv()
        if msg[0] == "submit":
            _, rid, ids, params, stop, stream = msg
            req = Request(ids, SamplingParams(**params), stop,
                          lambda item, _r=rid: out.put(("out", _r, item)), stream)
            reqs[rid] = req
            try:
                eng.submit(req)
            except Exception as exc:  # overloaded / shutting down: this request's first and last item
                out.put(("out", rid, exc))
        elif msg[0] == "abort":
            r = reqs.pop(msg[1], None)
            if r is not None:
                r.aborted = True
        elif msg[0] == "call":
            _, cid, method, args = msg
            for rid in [k for k, r in reqs.items() if r.done]:
                del reqs[rid]
            try:
                out.put(("reply", cid, True, getattr(eng, method)(*args)))
            except Exception as exc:
                out.put(("reply", cid, False, exc))
            if method == "shutdown":
                out.put(("reply", "stop", True, None))
                return


class _ParentRequest(Request):
    """A parent-side request: setting ``aborted`` (the client went away) tells the child."""

    engine: "ProcessEngine"

    @property
    def aborted(self) -> bool:
        return self.__dict__.get("_aborted", False)

    @aborted.setter
    def aborted(self, value: bool) -> None:
        first = value and not self.__dict__.get("_aborted", False) and not self.done
        self.__dict__["_aborted"] = value
        if first and "engine" in self.__dict__:
            self.engine._send(("abort", self.id))


class ProcessEngine(BaseEngine):
    """`Engine` (same arguments, ep_size 1 only) running in a child process; see the module docstring."""

    config_cls = EngineConfig

    def __init__(self, checkpoint: Optional[str] = None, *, config: Optional[EngineConfig] = None,
                 model_id: str = "raymoe", observer: Optional[EngineObserver] = None,
                 start_timeout_s: float = 300.0):
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig; got {type(config).__name__}")
        if checkpoint is None:
            raise ValueError("ProcessEngine needs checkpoint=... (the child process loads it)")
        super().__init__(max_waiting=config.max_waiting, observer=observer)
        self.checkpoint, self.config, self.model_id = str(checkpoint), config, model_id
        self.start_timeout_s = start_timeout_s
        self._proc = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._reqs: dict[int, Request] = {}
        self._calls: dict[Any, tuple[threading.Event, list]] = {}
        self._cid = itertools.count()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            return
        mine, theirs = socket.socketpair()
        code = "import sys; from raymoe.deployments.proc_engine import _child_entry; _child_entry(int(sys.argv[1]))"
        self._proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),))
        theirs.close()
        self._conn = Connection(mine.detach())
        ready = self._expect("ready")
        self._conn.send((self.checkpoint, self.config, self.model_id))
        run_thread(self._read_forever, "raymoe-engine-reader")
        info = self._wait("ready", ready, self.start_timeout_s)
        self.block_size, self.vocab_size = info["block_size"], info["vocab_size"]
        self.tokenizer = load_tokenizer(self.checkpoint)
        self._accepting = True

    def check_health(self) -> None:
        if self._proc is None:
            raise RuntimeError("engine process not started")
        if self._proc.poll() is not None:
            raise EngineDeadError("engine process exited")
        self._call("check_health", timeout_s=30.0)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._accepting = False
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._call("shutdown", timeout_s, timeout_s=timeout_s + 15.0)
            except Exception:  # a dead or stuck child: stopped below
                pass
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        for r in list(self._reqs.values()):
            r.fail(EngineShutdownError("engine shut down before the request finished"))
        self._reqs.clear()

    # -- calls into the child ------------------------------------------------------------------------------
    def reload(self, checkpoint, timeout_s: float = 600.0) -> None:
        """`Engine.reload` in the child; `LiveWeights` are fetched here (the child has no Ray) and sent whole."""
        from raymoe.actors.weight_registry import LiveWeights

        source = checkpoint.resolved(timeout_s) if isinstance(checkpoint, LiveWeights) else str(checkpoint)
        self._call("reload", source, timeout_s, timeout_s=timeout_s + 15.0)
        info = self._call("info")  # the child refuses another tokenizer; the sizes may change
        self.block_size, self.vocab_size = info["block_size"], info["vocab_size"]

    def info(self) -> dict:
        return {**self._call("info"), "engine": type(self).__name__, "engine_pid": self._proc.pid}

    def stats(self) -> dict:
        return self._call("stats")

    def num_waiting(self) -> int:
        return 0  # the child's queue enforces max_waiting (its EngineOverloadedError becomes a 429)

    def _call(self, method: str, *args, timeout_s: float = 60.0):
        cid = next(self._cid)
        ev = self._expect(cid)
        self._send(("call", cid, method, args))
        return self._wait(cid, ev, timeout_s)

    def _expect(self, cid):
        ev = (threading.Event(), [])
        self._calls[cid] = ev
        return ev

    def _wait(self, cid, ev, timeout_s: float):
        if not ev[0].wait(timeout_s):
            self._calls.pop(cid, None)
            raise TimeoutError(f"engine process did not answer {cid!r} within {timeout_s}s")
        ok, value = ev[1]
        if not ok:
            raise value
        return value

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # -- requests ------------------------------------------------------------------------------------------
    def make_request(self, prompt, params, deliver, param: str = "prompt", stream: bool = True) -> Request:
        req = super().make_request(prompt, params, deliver, param, stream)
        req.__class__ = _ParentRequest
        req.engine = self
        return req

    def _enqueue(self, req: Request) -> None:
        self._reqs[req.id] = req
        p = req.params
        self._send(("submit", req.id, req.prompt_ids, {**vars(p), "stop": list(p.stop)}, req.stop, req.stream))

    def _read_forever(self) -> None:
        try:
            while True:
                for msg in self._conn.recv():
                    kind = msg[0]
                    if kind == "out":
                        self._deliver(msg[1], msg[2])
                    elif kind == "obs":
                        getattr(self.observer, msg[1])(*msg[2])
                    elif kind == "reply":
                        ev = self._calls.pop(msg[1], None)
                        if ev is not None:
                            ev[1][:] = [msg[2], msg[3]]
                            ev[0].set()
        except (EOFError, OSError):  # the child exited (shutdown stops accepting first: then no request is left)
            err = EngineDeadError("engine process exited")
            for r in list(self._reqs.values()):
                r.fail(err)
            for ev in list(self._calls.values()):
                ev[1][:] = [False, err]
                ev[0].set()

    def _deliver(self, rid: int, item) -> None:
        req = self._reqs.get(rid)
        if req is None:
            return
        if item is None or isinstance(item, BaseException):
            del self._reqs[rid]
            req.done = True
        req._send(item)
