"""Layout-free initialisation: a model built on the meta device, materialised where it runs, then filled.

Every parameter's initial value is a function of (``run.seed``, the parameter's name and, for expert weights,
the GLOBAL expert id) only, so any world size, expert-parallel size and FSDP sharding, and the single-process
trainer, start from identical weights, and each rank draws only what it holds: expert weights one expert at a
time (never another rank's experts), a dense tensor at most one whole tensor at a time (an FSDP-sharded rank
then keeps its shard). The distributions are those of ``GPT``'s constructor (GPT-2's): normal(0, 0.02) for
linear and embedding weights, 0.02 / sqrt(2 * n_layer) for the projections that write into the residual stream
(``c_proj`` and the experts' ``w2``), zero biases, unit norms.

The flow (torchtitan's): :func:`meta_model` builds the module tree without memory, the caller applies
activation checkpointing and FSDP2 to it, and :func:`materialize` allocates this rank's part on its device
(``to_empty``), recomputes the buffers (``reset_buffers`` of the modules that hold any: RoPE frequencies, the
routers' expert bias, the expert-load counters) and initialises the parameters (:func:`init_parameters`), or
loads ``model.init_from`` through :func:`raymoe.platform.model_io.init_weights`.

Generation runs on the CPU with a generator per tensor (or per expert), so CPU and GPU runs agree too.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from raymoe.platform.layers import RMSNorm
from raymoe.platform.model import GPT, GPTConfig, MoEKwargs
from raymoe.platform.moe.experts import GroupedExperts

__all__ = ["meta_model", "materialize", "init_parameters", "reset_buffers", "param_seed"]

INIT_STD = 0.02

# (what to fill) per parameter: ("normal", std), ("zeros", None) or ("ones", None)
Spec = tuple[str, float | None]


def meta_model(config: GPTConfig, *, moe_kwargs: MoEKwargs = None) -> GPT:
    """``GPT(config, moe_kwargs=...)`` on the meta device: the module tree, no parameter memory, no RNG draws."""
    with torch.device("meta"):
        return GPT(config, moe_kwargs=moe_kwargs)


def materialize(model: GPT, device: torch.device | str, cfg) -> None:
    """Allocate ``model``'s parameters (only this rank's shards and experts) on ``device``, recompute its
    buffers, then fill its weights: from the run's ``model.init_from`` if it has one (through
    :func:`raymoe.platform.model_io.init_weights`: a sharded model reads only its slices of a native checkpoint
    or a Hugging Face folder), else :func:`init_parameters` from ``run.seed``. ``cfg``: the run's
    :class:`~raymoe.config.RaymoeConfig`."""
    from raymoe.platform.model_io import init_weights

    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties plain parameters (FSDP2 keeps its shared DTensor tied)
    reset_buffers(model)
    if cfg.model.init_from:
        init_weights(model, cfg)
    else:
        init_parameters(model, cfg.run.seed)


def reset_buffers(model: nn.Module) -> None:
    """Recompute every buffer (``reset_buffers()`` of each module that registers one): after ``to_empty`` they
    hold whatever the memory held. A module with buffers and no ``reset_buffers`` is an error, not garbage."""
    for name, mod in model.named_modules():
        if not mod._buffers:
            continue
        reset = getattr(mod, "reset_buffers", None)
        if reset is None:
            raise TypeError(f"{name or 'model'} ({type(mod).__name__}) has buffers {sorted(mod._buffers)} but no "
                            "reset_buffers() to recompute them after to_empty")
        with torch.no_grad():
            reset()


def param_seed(seed: int, name: str, expert: int | None = None) -> int:
    """The generator seed of parameter ``name`` (and of global expert ``expert`` of an expert weight): a stable
    hash (not Python's salted ``hash``), the same in every process."""
    key = f"{int(seed)}/{name}" + ("" if expert is None else f"/expert{int(expert)}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_parameters(model: GPT, seed: int) -> None:
    """Fill every parameter of ``model`` (whole, expert-parallel, FSDP-sharded) as a function of (``seed``,
    its name, the global expert id) only; see the module docstring."""
    resid_std = INIT_STD / math.sqrt(2 * model.config.n_layer)
    for name, mod, leaf, p in _named_parameters(model):
        kind, std = _spec(name, mod, leaf, resid_std)
        if isinstance(mod, GroupedExperts):
            _fill_experts(p, mod.global_expert_ids, seed, name, std)
        else:
            _fill(p, _draw(tuple(p.shape), kind, std, param_seed(seed, name)))


def _named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, leaf name, parameter), each parameter once (tied weights: the first name)."""
    seen = set()
    for mod_name, mod in model.named_modules():
        for leaf, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{leaf}" if mod_name else leaf), mod, leaf, p


def _spec(name: str, mod: nn.Module, leaf: str, resid_std: float) -> Spec:
    """GPT's constructor init for this parameter; a kind it does not know is an error (add it here)."""
    if isinstance(mod, GroupedExperts):
        return "normal", resid_std if leaf == "w2" else INIT_STD
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        if leaf == "bias":
            return "zeros", None
        # GPT-2: projections that write into the residual stream (attention, dense MLP, residual-MoE / shared MLP)
        residual = name.startswith("blocks.") and name.endswith("c_proj.weight")
        return "normal", resid_std if residual else INIT_STD
    if isinstance(mod, (nn.LayerNorm, RMSNorm)):
        return ("ones", None) if leaf == "weight" else ("zeros", None)
    raise TypeError(f"no initialisation rule for parameter {name} of {type(mod).__name__}: add one to "
                    "raymoe.platform.init._spec")


def _draw(shape: tuple[int, ...], kind: str, std: float | None, seed: int) -> torch.Tensor:
    """A whole tensor of ``shape`` (fp32, CPU) drawn from its own generator (every tensor a rank generates
    passes here: tests count them)."""
    if kind == "ones":
        t = torch.ones(shape)
    elif kind == "zeros":
        t = torch.zeros(shape)
    else:
        t = torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
    return t


def _local_range(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the slice of ``p``'s global shape this rank holds; None when it holds it whole.
    FSDP2 shards as ``torch.chunk`` over a 1-D mesh: ceil(n / W) rows per rank, the last ones maybe fewer or none."""
    if not isinstance(p, DTensor):
        return None
    (placement,) = p.placements  # raymoe's meshes are 1-D (raymoe.platform.fsdp)
    if isinstance(placement, Replicate):
        return None
    assert isinstance(placement, Shard), placement
    dim, n = placement.dim, p.shape[placement.dim]
    chunk = -(-n // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * chunk, n)
    return dim, start, min(start + chunk, n)


def _fill(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor ``full`` into ``p`` (a plain tensor or an FSDP shard)."""
    part = _local_range(p)
    local = p.to_local() if isinstance(p, DTensor) else p
    if part is not None:
        dim, start, stop = part
        full = full.narrow(dim, start, stop - start)
    local.copy_(full)


def _fill_experts(p: torch.Tensor, global_ids: list[int], seed: int, name: str, std: float) -> None:
    """Expert weights [E_local, ...], one expert at a time from its own generator: only the experts (or, sharded
    along the model dim, the slice of each expert) this rank holds."""
    local = p.to_local() if isinstance(p, DTensor) else p
    part = _local_range(p)
    rows, inner = range(len(global_ids)), None
    if part is not None:
        dim, start, stop = part
        if dim == 0:
            rows = range(start, stop)
        else:  # sharded inside each expert: draw the expert whole, keep the slice
            inner = (dim - 1, start, stop - start)
    for i, row in enumerate(rows):
        w = _draw(tuple(p.shape[1:]), "normal", std, param_seed(seed, name, global_ids[row]))
        local[i].copy_(w if inner is None else w.narrow(*inner))
