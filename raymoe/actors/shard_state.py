"""An expert shard's recoverable state for elastic training: undoing one step, and what it holds as a copy
(kept for a peer, or published piece by piece after a membership change) or assembles from an old world's
copies.

With FSDP sharding (``cluster.dense_sharding`` / ``expert_sharding``) the undo copy and the shard copy hold this
rank's shards only (the model's state_dict and the optimizer's state are DTensors). After a membership change
each rank of the new world, built at its own layout, fetches only the pieces of the old world's copies that
overlap its tensors (:func:`raymoe.platform.reshard.assemble`; the copies are the survivors' live state and the
lost ranks' copies at their buddies, :mod:`raymoe.actors.elastic`): no process gathers or holds whole tensors.
"""

from __future__ import annotations

import copy
import resource
import sys
from typing import Callable

import torch

from raymoe.platform import checkpoint as ckpt
from raymoe.platform import fsdp
from raymoe.platform.reshard import assemble, local_shards, local_tensor


def memory_limit(cfg) -> int | None:
    """``cluster.memory_per_worker_gb`` in bytes (None: no limit)."""
    gb = cfg.cluster.memory_per_worker_gb
    return None if gb is None else int(gb * 2**30)


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


_rss_baseline: int | None = None


def rss_baseline() -> int:
    """The process's runtime before any model was built (Python, torch, the Ray worker, the process group):
    its peak RSS at the first call, which the shard makes before it builds its first model. The memory check
    compares the peak RSS above it with the limit."""
    global _rss_baseline
    if _rss_baseline is None:
        _rss_baseline = peak_rss()
    return _rss_baseline


class ShardState:
    """Step undo of one shard's model and optimizer, their copies, and their assembly from an old world's."""

    def __init__(self, model, optimizer, *, keep_undo: bool, memory_limit: int | None = None, rank: int = 0,
                 copies: int = 0):
        """``memory_limit``: bytes this rank's training state may take (checked now, projected, and after the
        first optimizer step, measured; see :meth:`check_memory`); ``copies``: how many copies of a shard (about
        this rank's, see :meth:`shard_copy`) this rank holds between steps for elastic recovery."""
        self.model, self.optimizer, self.keep_undo, self.copies = model, optimizer, keep_undo, copies
        self.last_completed: int | None = None  # the last step whose optimizer update this shard applied
        self._undo: dict | None = None
        self._pending_step: int | None = None
        self._limit, self._rank, self._measured, self._warned = memory_limit, rank, False, False
        # called with the number of steps done right after each update, before the step's record goes round
        # (the in-memory copies: see ExpertShard.keep_copies)
        self.after_update: Callable[[int], None] | None = None
        # called with the peak RSS above the process baseline (bytes) after every optimizer step once measured
        # (see check_memory)
        self.on_peak_rss: Callable[[int], None] | None = None
        self.check_memory()
        optimizer.register_step_post_hook(self._applied)

    def started_at(self, step: int) -> None:
        """The state now is that after ``step`` steps (loaded, or built at step 0)."""
        if self.keep_undo:
            self.last_completed = step - 1

    def begin_step(self, step: int) -> None:
        """Step ``step`` is about to run: with ``keep_undo``, copy the state it will change (taken here, not
        at the optimizer step: buffers the step moves outside the optimizer, such as the routers' expert bias
        and load counts, must be copied as they were before the step's forwards)."""
        self._pending_step = step
        if self.keep_undo:  # a state copy per step, only needed to undo a step that failed on another shard
            self._remember()

    def _remember(self) -> None:
        # Copied into buffers kept from the previous step, not a fresh clone + deepcopy of the whole state
        # every step (18-51 vs 9-16 ms a step for benchmarks/ep_scaling.py's model, one thread, loaded box).
        live = self._live()
        old = self._undo["tensors"] if self._undo is not None else {}
        copies = {}
        with torch.no_grad():
            for k, t in live.items():
                buf = old.get(k)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = torch.empty_like(t)
                copies[k] = buf.copy_(t)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        states = self._opt_states()
        present = {i for i, st in enumerate(states) if st is not None}  # AdamW creates its state at the first step
        others = {(i, name): copy.deepcopy(v) for i in present for name, v in states[i].items()
                  if not torch.is_tensor(v)}
        self._undo = {"tensors": copies, "groups": groups, "present": present, "others": others,
                      "step": self._pending_step}

    def _applied(self, optimizer, args, kwargs) -> None:
        if self._limit is not None and not self._measured:  # the state is all there after one step
            self._measured = True
            self.check_memory()
        elif self._limit is not None:
            by = "" if self._pending_step is None else f" by step {self._pending_step + 1}"
            self._report_rss(self._limit, by, first=False)
        if self.keep_undo:
            self.last_completed = self._pending_step
        if self.after_update is not None and self._pending_step is not None:
            self.after_update(self._pending_step + 1)

    def _live(self) -> dict:
        """This rank's local tensors of the model's state (tied entries once) and of the optimizer's state,
        by a stable key; writing into them changes the model and the optimizer."""
        out, seen = {}, set()
        for name, v in self.model.state_dict().items():
            t = local_tensor(v)
            key = ckpt.memory_key(t) if t.numel() else name
            if key not in seen:
                seen.add(key)
                out[("model", name)] = t
        for i, state in enumerate(self._opt_states()):
            for name, v in (state or {}).items():
                if torch.is_tensor(v):
                    out[("opt", i, name)] = local_tensor(v)
        return out

    def _opt_states(self) -> list[dict | None]:
        """The optimizer's state of each parameter in param_groups order (None: not initialised yet)."""
        st = self.optimizer.state
        return [st[p] if p in st else None for g in self.optimizer.param_groups for p in g["params"]]

    def undo_bytes(self) -> int:
        """Bytes of the undo copy this rank holds (its shards when the model is sharded)."""
        return 0 if self._undo is None else fsdp.local_bytes(self._undo["tensors"].values())

    def state_bytes(self) -> int:
        """Bytes of this rank's training state at its peak: parameters and buffers, gradients (one per
        parameter), AdamW state, the undo copy and the shard copies it holds (each the size of its own share).
        Before the first step, what AdamW (two tensors per parameter) and the copies will take."""
        params = list({id(p): p for p in self.model.parameters()}.values())
        param_ids = {id(p) for p in params}
        p_bytes = fsdp.local_bytes(params)
        buffers = fsdp.local_bytes(b for b in self.model.state_dict(keep_vars=True).values() if id(b) not in param_ids)
        adam = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        adam_bytes = fsdp.local_bytes(adam) if adam else 2 * p_bytes
        share = p_bytes + buffers + adam_bytes
        undo = share if self.keep_undo else 0  # (the first step's copy has no AdamW)
        return 2 * p_bytes + buffers + adam_bytes + undo + self.copies * share

    def check_memory(self) -> None:
        """Fail when this rank's training state (:meth:`state_bytes`) exceeds the memory limit, if one is set.
        Once measured (after the first optimizer step), also compare the process's peak RSS above its baseline
        (:func:`rss_baseline`) with the limit: printed, passed to :attr:`on_peak_rss`, and a warning when over
        (not an error: RSS also holds the step's transient buffers and the allocator's slack, 2-3.5x the state
        in docs/benchmarks.md's measurements, and a shard failing inside a step would be taken for a lost one).
        After every later step the peak goes to :attr:`on_peak_rss` again, with one warning the first time it
        is over the limit (later steps, checkpoints and evaluations can raise it)."""
        limit = self._limit
        if limit is None:
            return
        if (need := self.state_bytes()) > limit:
            raise ValueError(
                f"shard {self._rank}: training state {need / 2**30:.3f} GiB (parameters, gradients, AdamW state"
                f"{', elastic undo copy' if self.keep_undo else ''}{', shard copies' if self.copies else ''}) "
                f"exceeds cluster.memory_per_worker_gb={limit / 2**30:g}; shard it (cluster.dense_sharding=shard, "
                "cluster.expert_sharding=shard), use more shards, or raise the limit")
        if self._measured:
            self._report_rss(limit, " after the first step", first=True)

    def _report_rss(self, limit: int, when: str, first: bool) -> None:
        """Hand the peak RSS above the baseline to :attr:`on_peak_rss`; print it after the first step, and warn
        when it is over the limit (once: at the first step, or at the first later step that gets over)."""
        rss = peak_rss() - rss_baseline()
        if self.on_peak_rss is not None:
            self.on_peak_rss(rss)
        if not first and (rss <= limit or self._warned):
            return
        line = (f"shard {self._rank}: peak RSS {rss / 2**30:.3f} GiB above the process baseline "
                f"({rss_baseline() / 2**30:.3f} GiB){when}, training state {self.state_bytes() / 2**30:.3f} GiB, "
                f"cluster.memory_per_worker_gb={limit / 2**30:g}")
        if rss <= limit:
            print(line, flush=True)
            return
        self._warned = True
        print(f"WARNING: {line}: the process is over the limit (the rest is the step's activations, gathered "
              "FSDP units and unsharded gradients, optimizer temporaries, checkpoint writes and allocator slack); "
              "shard it, use more shards, a smaller train.micro_batch_size or activation checkpointing, or raise "
              "the limit", file=sys.stderr, flush=True)

    def rollback(self, step: int) -> int | None:
        """Undo the update of ``step`` if this shard applied it (the step failed on another shard)."""
        if self.last_completed == step and self._undo is not None and self._undo["step"] == step:
            self._restore(self._undo)
            self.last_completed = step - 1
        return self.last_completed

    def _restore(self, undo: dict) -> None:
        """Write the copy back in place; parameters that had no optimizer state before the step lose it again."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i not in undo["present"]:
                self.optimizer.state.pop(p, None)
        with torch.no_grad():
            for k, t in self._live().items():
                t.copy_(undo["tensors"][k])
        for (i, name), v in undo["others"].items():
            self.optimizer.state[params[i]][name] = copy.deepcopy(v)
        for g, saved in zip(self.optimizer.param_groups, undo["groups"]):
            g.update(saved)

    def shard_copy(self, live: bool = False) -> dict:
        """A CPU copy of what this rank holds (its shards; see :func:`raymoe.platform.reshard.local_shards`):
        no communication, its size is this rank's parameters, buffers and AdamW state. ``live``: the local
        tensors themselves, not copied (published piece by piece, each piece copied on its own)."""
        return local_shards(self.model, self.optimizer, live=live)

    def assemble(self, published: list[dict], fetch: Callable[[list], list]) -> dict:
        """Fill this rank's new model and optimizer from an old world's published copies, fetching only the
        pieces that overlap its own tensors (``fetch``: references -> tensors); see
        :func:`raymoe.platform.reshard.assemble`, whose counts it returns."""
        return assemble(self.model, self.optimizer, published, fetch)
