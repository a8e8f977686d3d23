"""Live weights: a training run's weights in Ray's object store, expert by expert, for serving without a
checkpoint round-trip (``cluster.publish_interval`` in training, ``raymoe serve --follow RUN_DIR --live``).

Publish. Every ``cluster.publish_interval`` steps each `ExpertShard` (:class:`Publisher`) puts its part into
the object store: one object per expert it holds, named as the checkpoint names that expert's file
(``experts/layer001_expert0003.safetensors``: the expert's rows of every expert entry), and, on the rank that
writes a checkpoint's dense part, one object with the dense state (``dense.safetensors``). FSDP-sharded
parameters are gathered first (collective: every rank publishes at the same step boundary). Then it registers
the refs with the run's `WeightRegistry` under the step. Only refs move between actors; no tensor passes
through the driver or the coordinator.

The registry is a named actor, one per run (:func:`registry_name`, namespace :data:`NAMESPACE`), started by
the coordinator and dying with it. A step becomes a version (`LiveWeights`) once every rank of the world
registered it and the dense part and every expert of every layer are there: never a partial version, and
never one mixed from two formations of the world (a recovery re-forms it). It keeps the latest :data:`KEEP`
versions and drops the refs of older ones, so the store holds at most KEEP versions of the weights plus one
being registered; a step completed again after a recovery rolled training back drops the newer versions.

Owner semantics: an object belongs to the shard that put it and may be lost when that shard dies (Ray does not
reconstruct ``ray.put`` objects; a copy still in the store of the consumer's node was readable in a trial on
one node, Ray 2.60). A consumer that cannot fetch a version keeps what it serves and falls back
to the previous version or to the run's checkpoints (`raymoe.deployments.follow.LiveFollower` does both).

Consumers: `LiveWeights.load_into` fills a whole model or an expert-parallel shard (only its own experts are
fetched: each `InferenceShard` gets the dense part and its experts, nothing else). This module imports Ray
only inside functions, so an engine's child process can unpickle a `LiveWeights` that the replica resolved
(:meth:`LiveWeights.resolved`) without Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raymoe.platform import checkpoint as ckpt
from raymoe.platform import fsdp

NAMESPACE = "raymoe"
KEEP = 2  # versions kept in the store: the newest, and the one a consumer may still be fetching


def registry_name(run: str) -> str:
    """The registry actor's name for run ``run`` (``run.name``; namespace :data:`NAMESPACE`)."""
    return f"weights:{run}"


def model_parts(model) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(dense state entries, {expert file name: {entry: that expert's row}}) of ``model`` (whole or a shard);
    the same split and names as a checkpoint (`raymoe.platform.checkpoint`)."""
    dense, containers = ckpt.split_state(model)
    experts = {ckpt.expert_file_name(lid, int(g)): {ln: t[i] for ln, t in entries.items()}
               for lid, (_, mod, entries) in containers.items() for i, g in enumerate(mod.global_expert_ids)}
    return dense, experts


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a copy, not a view: a view pickles its whole storage (every expert of the layer) and aliases the model
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}


@dataclass
class LiveWeights:
    """One published version: ``step``, the model's config (``GPTConfig.to_dict()``) and ``parts`` {name: an
    ObjectRef, or once resolved its tensors (a dict, or safetensors bytes)}: ``dense.safetensors`` {entry:
    tensor} and one ``experts/layer{L}_expert{G}.safetensors`` {entry: row} per expert."""

    run: str
    step: int
    config: dict
    parts: dict[str, Any] = field(repr=False)

    def __str__(self) -> str:  # what the engine reports as its "checkpoint"
        return f"live:{self.run}@step_{self.step:08d}"

    def gpt_config(self):
        from raymoe.platform.model import GPTConfig

        return GPTConfig.from_dict(self.config)

    def fetch(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of ``names``; refs are fetched (in this process, straight from the owners' stores)."""
        missing = [n for n in names if n not in self.parts]
        if missing:
            raise ValueError(f"{self}: no part {missing[:4]}; it has {len(self.parts)} parts")
        refs = {n: self.parts[n] for n in names if not isinstance(self.parts[n], (dict, bytes))}
        got = dict(zip(refs, _ray_get(list(refs.values()), timeout_s))) if refs else {}
        for n in names:
            if n not in got:
                part = self.parts[n]
                got[n] = st_load(part) if isinstance(part, bytes) else part
        return {n: got[n] for n in names}

    def resolved(self, timeout_s: float = 300.0) -> "LiveWeights":
        """A copy with every part fetched, as safetensors bytes: it pickles without Ray and without torch's
        shared-memory handles (for an engine in a child process that Ray did not start)."""
        return replace(self, parts={n: st_save(t) for n, t in self.fetch(list(self.parts), timeout_s).items()})

    def load_into(self, model, timeout_s: float = 300.0) -> None:
        """Fill ``model`` (the whole model, or an expert-parallel shard: only its experts are fetched).
        ValueError when an entry is missing or has another shape."""
        dense, experts = model_parts(model)
        got = self.fetch([ckpt.DENSE, *experts], timeout_s)
        with torch.no_grad():
            _copy_entries(f"{self} {ckpt.DENSE}", got[ckpt.DENSE], dense)
            for name, entries in experts.items():
                _copy_entries(f"{self} {name}", got[name], entries)

    def build_model(self, moe_kwargs: Optional[dict] = None, timeout_s: float = 300.0):
        """A model of this version's config (``moe_kwargs``: an expert-parallel shard's) with its weights."""
        from raymoe.platform.model import GPT

        model = GPT(self.gpt_config(), moe_kwargs=moe_kwargs)
        self.load_into(model, timeout_s)
        return model


def _copy_entries(where: str, src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    if src.keys() != dst.keys():
        raise ValueError(f"{where}: entries do not match the model: missing {sorted(dst.keys() - src.keys())[:8]}, "
                         f"unexpected {sorted(src.keys() - dst.keys())[:8]}")
    for k, t in dst.items():
        if src[k].shape != t.shape:
            raise ValueError(f"{where}: {k!r} has shape {list(src[k].shape)}; the model has {list(t.shape)}")
        t.copy_(src[k])


def _ray_get(refs: list, timeout_s: float) -> list:
    import ray

    return ray.get(refs, timeout=timeout_s)


class WeightRegistry:
    """The run's published versions (see the module docstring); a Ray actor (:func:`start_registry`).

    ``checkpoints``: the run's checkpoint folder (consumers check they follow the same run);
    ``experts_per_layer``: {layer id: experts}, what a complete version holds."""

    def __init__(self, run: str, checkpoints: str, config: dict, experts_per_layer: dict[int, int],
                 keep: int = KEEP):
        self.run, self.checkpoints, self.config, self.keep = run, checkpoints, config, keep
        self.expected = {ckpt.DENSE} | {ckpt.expert_file_name(int(lid), g)
                                        for lid, n in experts_per_layer.items() for g in range(n)}
        self._pending: dict[int, tuple[str, dict[int, dict]]] = {}  # step -> (world id, rank -> parts)
        self._versions: dict[int, LiveWeights] = {}  # complete versions, oldest first
        self.published_at: dict[int, float] = {}  # held step -> wall time it completed (benchmarks)

    def register(self, step: int, rank: int, world: int, parts: dict, world_id: str = "") -> bool:
        """Rank ``rank`` of ``world`` published its ``parts`` {name: ObjectRef} of ``step``; True once the step
        is a complete version. ``world_id`` names the world's formation: after a recovery re-formed it, the
        parts an earlier world registered for that step are not mixed in."""
        if self._pending.get(step, (world_id,))[0] != world_id:
            del self._pending[step]
        ranks = self._pending.setdefault(step, (world_id, {}))[1]
        ranks[rank] = parts
        if len(ranks) < world:
            return False
        del self._pending[step]
        merged = {n: ref for p in ranks.values() for n, ref in p.items()}
        if merged.keys() != self.expected:  # never serve a partial version
            print(f"weight registry {self.run}: step {step} is incomplete (missing "
                  f"{sorted(self.expected - merged.keys())[:4]}); dropped", flush=True)
            return False
        # versions after this step come from before a recovery rolled training back: their weights were
        # replaced (and their owners may be gone)
        for stale in [s for s in self._versions if s >= step]:
            self._drop(stale)
        self._versions[step] = LiveWeights(self.run, step, self.config, merged)
        self.published_at[step] = time.time()
        for old in sorted(self._versions)[:-self.keep]:
            self._drop(old)
        for old in [s for s in self._pending if s < step]:  # a world that re-formed never completes these
            del self._pending[old]
        return True

    def _drop(self, step: int) -> None:
        del self._versions[step]  # its refs go: the owners free the objects
        del self.published_at[step]

    def latest(self, after: int = -1, checkpoints: Optional[str] = None) -> Optional[LiveWeights]:
        """The newest complete version if its step is > ``after``, else None; None as well when
        ``checkpoints`` is given and is not this run's checkpoint folder (a consumer of another run)."""
        if not self._versions or (checkpoints is not None and not _same_folder(checkpoints, self.checkpoints)):
            return None
        step = max(self._versions)
        return self._versions[step] if step > after else None

    def version(self, step: int) -> Optional[LiveWeights]:
        """The complete version of ``step`` if it is still held, else None."""
        return self._versions.get(step)

    def info(self) -> dict:
        """The run, its checkpoint folder, the steps held, and when each held one completed (wall time)."""
        return {"run": self.run, "checkpoints": self.checkpoints, "steps": sorted(self._versions),
                "published_at": dict(self.published_at)}

    def check_health(self) -> bool:
        return True


def start_registry(run: str, checkpoints: str, config: dict, experts_per_layer: dict[int, int],
                   timeout_s: float = 30.0):
    """Start the run's registry as a named actor owned by the caller (the coordinator: it dies with it). A
    registry left under the same name (a previous coordinator of this run that died) is replaced."""
    import ray

    cls = ray.remote(num_cpus=0)(WeightRegistry)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return cls.options(name=registry_name(run), namespace=NAMESPACE).remote(
                run, checkpoints, config, experts_per_layer)
        except ValueError:  # the name is taken
            old = find_registry(run)
            if old is not None:
                ray.kill(old)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def find_registry(run: str):
    """The registry of run ``run`` on this Ray cluster, or None."""
    import ray

    try:
        return ray.get_actor(registry_name(run), namespace=NAMESPACE)
    except ValueError:
        return None


def latest_version(run: str, checkpoints: str, after: int = -1, timeout_s: float = 30.0) -> Optional[LiveWeights]:
    """The newest version of run ``run`` after step ``after``, or None: none newer, no registry, or a registry
    of another run of that name (its checkpoint folder is not ``checkpoints``). Raises when the registry
    does not answer within ``timeout_s``."""
    import ray

    registry = find_registry(run)
    if registry is None:
        return None
    return ray.get(registry.latest.remote(after, checkpoints), timeout=timeout_s)


def _same_folder(a: str, b: str) -> bool:
    local = "://" not in a and "://" not in b
    return os.path.realpath(a) == os.path.realpath(b) if local else a.rstrip("/") == b.rstrip("/")


class Publisher:
    """A shard's side of publishing (see the module docstring): :meth:`publish` after a step, on every rank."""

    def __init__(self, run: str):
        self.run = run
        self._registry = None

    def publish(self, model, step: int, rank: int, world: int, dense: bool, experts: bool, world_id: str) -> None:
        """Put this rank's parts of ``model`` (the dense part if ``dense``, its experts if ``experts``) and
        register them under ``step`` (not waiting for the registry); ``world_id`` names the formation of the
        world (its rendezvous address: a new one after every re-formation). Collective when the model is
        FSDP-sharded. Best effort: a failure to put or register is printed and training goes on (that step
        is then never complete in the registry; consumers keep the previous version)."""
        with fsdp.gathered(model):  # every rank, whatever happens after
            dense_t, expert_t = model_parts(model)
            tensors = {ckpt.DENSE: _cpu_copy(dense_t)} if dense else {}
            if experts:
                tensors.update({name: _cpu_copy(t) for name, t in expert_t.items()})
        try:
            self._register(step, rank, world, tensors, world_id)
        except Exception as exc:  # noqa: BLE001 - serving fresh weights must never stop training
            print(f"shard {rank}: publishing step {step} failed ({exc!r}); training goes on", flush=True)

    def _register(self, step: int, rank: int, world: int, tensors: dict, world_id: str) -> None:
        import ray

        if self._registry is None:
            self._registry = find_registry(self.run)
        if self._registry is None:
            raise RuntimeError(f"run {self.run!r} has no weight registry")
        self._registry.register.remote(step, rank, world, {name: ray.put(t) for name, t in tensors.items()},
                                       world_id)
