"""Jobs of tests/distributed/test_sharded_checkpoint.py, run in spawned gloo worlds (tests/gloo_world.py) on the
models of tests/distributed/ep_harness.py.

``save`` trains a (sharded) run two steps, writes checkpoint 2 and trains two more (the uninterrupted run);
``resume`` loads checkpoint 2 into another world, layout and sharding, writes it again elsewhere (its files
must be byte-identical: the same state) and trains the same two steps; ``init_from`` builds a sharded rank with
``build_rank`` from it as ``model.init_from`` and writes its weights again. Both count what a rank holds and reads
meanwhile: the whole tensors gathered at once while saving (``DTensor.full_tensor`` and
``sharded_io.gather_to`` results alive together), the shards sent to another rank's gather, the bytes read from
the files while loading; ``fsdp.gathered`` must not be entered.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist

import ep_harness as H

STEP = 2


class _Probe:
    """What one rank gathers (whole tensors alive at once, at most) and reads (bytes of tensors and slices)."""

    def __init__(self):
        self.live: list = []
        self.gathers = self.sends = self.max_live = self.reads = self.max_read = 0

    def gathered(self, t: torch.Tensor) -> None:
        self.live = [r for r in self.live if r() is not None] + [weakref.ref(t)]
        self.gathers += 1
        self.max_live = max(self.max_live, sum(_nbytes(r()) for r in self.live if r() is not None))

    def read(self, t: torch.Tensor) -> torch.Tensor:
        self.reads += _nbytes(t)
        self.max_read = max(self.max_read, _nbytes(t))
        return t

    def stats(self) -> dict:
        return {"gathers": self.gathers, "sends": self.sends, "max_live": self.max_live, "reads": self.reads,
                "max_read": self.max_read}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Slice:
    def __init__(self, inner, probe):
        self._inner, self._probe = inner, probe

    def __getitem__(self, index):
        return self._probe.read(self._inner[index])

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _File:
    def __init__(self, inner, probe):
        self._inner, self._probe = inner, probe

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def get_slice(self, name):
        return _Slice(self._inner.get_slice(name), self._probe)

    def get_tensor(self, name):
        return self._probe.read(self._inner.get_tensor(name))

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def probed():
    """Inside: every ``DTensor.full_tensor`` and ``sharded_io.gather_to`` result (or a shard only sent) and every
    tensor read from a checkpoint file is counted; ``fsdp.gathered`` raises (checkpoints must not need it)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from raymoe.platform import checkpoint as ckpt
    from raymoe.platform import fsdp, sharded_io

    probe, full_tensor, gathered, gather_to = _Probe(), DTensor.full_tensor, fsdp.gathered, sharded_io.gather_to

    def counted_full_tensor(self, *a, **kw):
        out = full_tensor(self, *a, **kw)
        probe.gathered(out)
        return out

    def counted_gather_to(t, dst):
        out = gather_to(t, dst)
        if out is None:
            probe.sends += 1
        else:
            probe.gathered(out)
        return out

    def refused(*a, **kw):
        raise AssertionError("fsdp.gathered entered by a checkpoint")

    DTensor.full_tensor, fsdp.gathered, sharded_io.gather_to = counted_full_tensor, refused, counted_gather_to
    ckpt.safe_open = lambda *a, **kw: _File(safe_open(*a, **kw), probe)
    try:
        yield probe
    finally:
        DTensor.full_tensor, fsdp.gathered, ckpt.safe_open = full_tensor, gathered, safe_open
        sharded_io.gather_to = gather_to


def _held(run) -> dict:
    """Bytes of this rank's part of every state entry (tied names each) and of its AdamW state; the largest
    whole tensor of the model and its AdamW state."""
    from raymoe.platform.fsdp import local_bytes

    state = list(run.model.state_dict().values())
    opt = [v for st in run.opt.state.values() for v in st.values()]
    return {"state": local_bytes(state), "optim": local_bytes(opt),
            "largest": max(_nbytes(t) for t in state + opt)}  # a DTensor's numel is the whole tensor's


def _save(run, rank: int, root: str) -> dict:
    from raymoe.platform import checkpoint as ckpt

    writes = {"dense": rank == 0, "experts": run.groups.is_first_expert_replica}
    with probed() as probe:
        path = ckpt.save_checkpoint(root, STEP, run.model, run.opt, rng=False, write_manifest=False,
                                    write_dense=writes["dense"], write_experts=writes["experts"], rank=rank)
    _barrier(run.world)
    if rank == 0:
        ckpt.finalize_checkpoint(path, step=STEP, expected_experts=run.cfg.experts_per_layer(),
                                 extra={"model_config": run.cfg.to_dict()}, writer_ranks=range(run.world))
    _barrier(run.world)
    return {**probe.stats(), "writes": any(writes.values())}


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def save(rank: int, world: int, job: dict) -> dict:
    """Two steps, checkpoint 2 under ``job["dir"]``, two more steps (the uninterrupted run)."""
    run = H._Run(rank, world, job)
    run.steps(0, STEP)
    saved = _save(run, rank, job["dir"])
    held = _held(run)
    run.steps(STEP, STEP + 2)
    return {"losses": run.losses[STEP:], "save": saved, "held": held}


def resume(rank: int, world: int, job: dict) -> dict:
    """Load checkpoint 2 of ``job["dir"]`` (weights and AdamW state), write it again under ``job["out"]``, then
    train the two steps the uninterrupted run trained after it."""
    from raymoe.platform import checkpoint as ckpt
    from raymoe.platform import storage

    run = H._Run(rank, world, job)
    with probed() as probe:  # job["dir"] may be a storage URI (its query after the path)
        ckpt.load_checkpoint(storage.join(job["dir"], ckpt.step_dir_name(STEP)), run.model, run.opt,
                             restore_rng=False)
    loaded, held = probe.stats(), _held(run)
    saved = _save(run, rank, job["out"])
    run.steps(STEP, STEP + 2)
    return {"losses": run.losses, "load": loaded, "save": saved, "held": held}


def init_from(rank: int, world: int, job: dict) -> dict:
    """``build_rank`` of a run with ``model.init_from`` = checkpoint 2 of ``job["dir"]``, dense and experts
    sharded at EP ``job["ep"]``: the weights written again (no optimizer) under ``job["out"]``."""
    from raymoe.config import load_config
    from raymoe.platform import checkpoint as ckpt
    from raymoe.platform.distributed import build_rank
    from raymoe.platform.fsdp import local_bytes
    from raymoe.platform.model_io import gpt_config_from

    cfg = load_config(None, ["model.block_size=16", "tokenizer.kind=byte", "cluster.dense_sharding=shard",
                             "cluster.expert_sharding=shard", f"model.init_from={job['dir']}/step_{STEP:08d}"])
    model_config = gpt_config_from(cfg)
    ep_sizes = {layer: job["ep"] for layer in model_config.experts_per_layer()}
    with probed() as probe:
        parts = build_rank(cfg, model_config, rank, world, ep_sizes, None, torch.device("cpu"))
    path = ckpt.save_checkpoint(job["out"], STEP, parts.model, None, rng=False, write_manifest=False,
                                write_dense=rank == 0, write_experts=parts.place.writes_experts, rank=rank)
    _barrier(world)
    if rank == 0:
        ckpt.finalize_checkpoint(path, step=STEP, writer_ranks=range(world))
    _barrier(world)
    return {"load": probe.stats(), "state": local_bytes(parts.model.state_dict().values())}


JOBS = {"save": save, "resume": resume, "init_from": init_from}


def run_job(rank: int, world: int, job: dict):
    """One job of this module (for ``ep_harness.spawn`` / ``run_local``)."""
    return JOBS[job["kind"]](rank, world, job)
