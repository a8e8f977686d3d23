"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around the expert-parallel model: sharding changes memory only.

The model stays single-device; :func:`apply_sharding` wraps it after it is built and loaded, as torchtitan's
``parallelize_*`` does, before the optimizer is made:

- ``cluster.expert_sharding: shard``: each MoE layer's ``GroupedExperts`` is one FSDP unit over the layer's
  expert-data-parallel (EDP) group, a 1-D mesh of the ranks that hold the same experts (sharded along the
  experts, or along the model dim when there are fewer local experts than ranks in the group). Its gradients are
  reduce-scattered over that group as a SUM, not FSDP's default average: each rank's gradients are already
  weighted by 1 / the global batch's micro-batches and the all-to-all backward already summed the EP group's
  contributions (see :mod:`raymoe.platform.parallel`), as in the replicated path. A layer with EDP size 1
  (EP = world) has nothing to shard over and stays whole.
- ``cluster.dense_sharding: shard``: every transformer block is a unit over the whole world (its expert
  weights excluded: they are their own unit or stay whole), and the root holds the embeddings, the final norm
  and the head (tied weights stay in one unit). Reduced as a sum over the world, as the replicated path (so a
  world that does not divide the micro-batches, whose ranks run unequal shares, still gets the global mean).

Everything FSDP does not manage (replicated dense or experts, expert-load counters) is still synchronised by
:class:`raymoe.platform.parallel.GradSync`, which skips sharded (DTensor) parameters; the grad norm counts each
sharded element once. A sharded unit reduce-scatters its gradients after every micro-batch's backward and
accumulates them sharded (torchtitan's choice): deferring the reduction to the step's last micro-batch, as the
replicated path does, would hold every unit's whole unsharded gradients (and parameters) between micro-batches,
so a rank running several micro-batches would need the whole dense part's gradients, not its shard.

Checkpoints stay layout-free without whole copies of the state: ``checkpoint.save_checkpoint`` gathers one
sharded tensor at a time where it is written and ``load_checkpoint`` reads each rank's slices straight into
its shards (see :mod:`raymoe.platform.sharded_io`); both first call :func:`reshard`. :func:`gathered` swaps
every sharded parameter and its AdamW state for full tensors at once (a collective: every rank enters it),
for code that needs the whole model on every rank (publishing live weights for serving, tests). Mixed precision
stays what ``train.dtype`` gives the replicated path: fp32 master weights (the shards), fp32 all-gathers and
gradient reductions, bf16 compute by autocast on GPU (the router in fp32), fp32 on CPU.
FSDP's bf16 ``param_dtype`` is not used: it would round the router's weights to bf16 (the gate reads its weight
directly, outside any FSDP hook) and make sharded numerics differ from replicated ones.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # the custom-collective interfaces
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin  # buffers from torch.empty
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


SHARDING_MODES = ("replicate", "shard")

__all__ = ["SHARDING_MODES", "apply_sharding", "gathered", "local_bytes", "reshard"]


def _check_mode(field: str, value: str) -> bool:
    if value not in SHARDING_MODES:
        raise ValueError(f"{field}={value!r}; allowed: {list(SHARDING_MODES)}")
    return value == "shard"


def apply_sharding(model: nn.Module, layout, groups, *, dense: str = "replicate", experts: str = "replicate",
                   device: torch.device | str = "cpu") -> bool:
    """Shard ``model`` (built with ``parallel.make_moe_kwargs(layout, groups)`` and its weights loaded) in
    place with FSDP2 as ``dense`` / ``experts`` ("replicate" | "shard") ask; returns True if anything is
    sharded. A world of one rank is left as it is. Build the optimizer and the gradient hooks afterwards."""
    shard_dense = _check_mode("cluster.dense_sharding", dense)
    shard_experts = _check_mode("cluster.expert_sharding", experts)
    W = layout.world_size
    if W == 1 or not (shard_dense or shard_experts):
        return False
    device = torch.device(device)
    whole: set[nn.Parameter] = set()  # expert weights FSDP must leave alone (replicated, or EDP size 1)
    sharded_any = False
    for moe in model.moe_modules():
        edp = layout.edp_size(moe.layer_id)
        if not (shard_experts and edp > 1):
            whole.update(moe.experts.parameters())
            continue
        mesh = _mesh(groups.edp[layout.ep_size(moe.layer_id)], device)
        fully_shard(moe.experts, mesh=mesh, shard_placement_fn=_expert_placement(edp))
        _configure(moe.experts, device)
        register_fsdp_forward_method(moe.experts, "forward_capacity")  # capacity mode calls it, not forward
        sharded_any = True
    if shard_dense:
        mesh = _mesh(groups.world, device)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, ignored_params=whole & set(block.parameters()))
            _configure(block, device)
        fully_shard(model, mesh=mesh, ignored_params=whole)
        _configure(model, device)
        sharded_any = True
    return sharded_any


def _configure(module: FSDPModule, device: torch.device) -> None:
    """Reduce ``module``'s gradients as a plain sum over its mesh, not FSDP's average (see the module
    docstring): divide factor 1 and sum-only collectives (gloo has no pre-scaled sum). On CPU (gloo), gather
    its parameters with :class:`_InPlaceAllGather` and reduce its gradients with :class:`_InPlaceReduceScatter`."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
    if device.type == "cpu":
        module.set_custom_all_gather(_InPlaceAllGather())
        module.set_custom_reduce_scatter(_InPlaceReduceScatter())


class _InPlaceAllGather(DefaultAllocMixin, AllGather):
    """FSDP's all-gather on gloo as one broadcast per rank, each straight into that rank's chunk of FSDP's
    output buffer. gloo's all_gather_into_tensor gathers into a buffer of its own and copies it over: one more
    whole copy of the unit per gather (memory and bytes moved); the same bytes arrive in the same places. Its
    speed: docs/benchmarks.md, "Memory"."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        chunks = output_tensor.chunk(group.size())  # FSDP pads every rank's shard to the same size
        mine = chunks[group.rank()]
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP usually copies its input into the output already
            mine.copy_(input_tensor)
        for src, chunk in zip(dist.get_process_group_ranks(group), chunks):
            dist.broadcast(chunk, src=src, group=group)
        return None  # done: nothing for FSDP to wait for


class _InPlaceReduceScatter(DefaultAllocMixin, ReduceScatter):
    """FSDP's reduce-scatter on gloo as an all-reduce in place on FSDP's input buffer (a copy of the unit's
    gradients FSDP made for this reduction alone), then this rank's chunk copied out. With gloo's own
    reduce_scatter_tensor the peak of a unit's backward is about one more copy of the unit's gradients higher
    (gloo reduces through a buffer of its own). The same sums land in the same places. Its effect:
    docs/benchmarks.md, "Memory"."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])  # FSDP pads every chunk equally
        return None  # done: nothing for FSDP to wait for


_meshes_made = itertools.count()


def _mesh(group, device: torch.device) -> DeviceMesh:
    """A 1-D mesh over ``group``, named apart from every mesh this process made before: meshes compare equal by
    their ranks and names, and DTensor keeps plans (with the mesh, so this rank's coordinate in it) for equal
    meshes, so a re-formed world's mesh over the same ranks would run on the old world's coordinates."""
    return DeviceMesh.from_group(group, device.type, mesh_dim_names=(f"fsdp{next(_meshes_made)}",))


def _expert_placement(edp: int):
    """Expert weights [E_local, D, F] are sharded along the experts, or (torchtitan's choice) along D when
    there are fewer local experts than ranks to shard over: Shard(0) would leave some ranks nothing."""
    def placement(p: nn.Parameter) -> Shard:
        return Shard(1) if p.shape[0] < edp and p.shape[1] % edp == 0 else Shard(0)
    return placement


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
    return total


def _shard_of(full: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of ``full``, laid out like ``like``, in its own memory (no view keeps ``full`` alive);
    no communication."""
    d = distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return DTensor.from_local(d.to_local().clone(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def reshard(model: nn.Module) -> None:
    """Register ``model``'s sharded parameters as their shards (DTensors), as after a training step: an
    evaluation forward leaves the root unit's gathered. No communication; a no-op if nothing is sharded."""
    for m in _fsdp_modules(model):
        m.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
             write_back: bool = False) -> Iterator[None]:
    """Inside: ``model``'s sharded parameters (and ``optimizer``'s state of them) are full tensors, so
    checkpoint code reads and writes them as for an unsharded model. Collective: every rank enters, in the
    same order. ``write_back``: what was loaded into them is sharded back on exit (else the shards are left as
    they were). No-op if nothing is sharded."""
    if not _fsdp_modules(model):
        yield
        return
    reshard(model)
    slots = [(mod, name, p) for mod in model.modules() for name, p in mod._parameters.items()
             if isinstance(p, DTensor)]
    sharded = {id(p): p for _, _, p in slots}  # tied weights appear twice: gathered once
    full = {k: nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad) for k, p in sharded.items()}
    for mod, name, p in slots:
        mod._parameters[name] = full[id(p)]
    kept = _swap_optimizer(optimizer, sharded, full)
    try:
        yield
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p
        if write_back:
            with torch.no_grad():
                for k, p in sharded.items():
                    p.to_local().copy_(_shard_of(full[k].detach(), p).to_local())
        _restore_optimizer(optimizer, sharded, full, kept, write_back)


def _swap_optimizer(optimizer, sharded: dict, full: dict) -> dict:
    """Point ``optimizer`` at the full parameters with gathered copies of their state; returns the sharded
    state it held, by parameter id."""
    if optimizer is None:
        return {}
    for group in optimizer.param_groups:
        group["params"] = [full.get(id(q), q) for q in group["params"]]
    kept = {k: optimizer.state.pop(p) for k, p in sharded.items() if p in optimizer.state}
    for k, st in kept.items():
        # in one order on every rank (sorted names): each full_tensor is a collective, and a state loaded into
        # a re-formed world may list its entries in another order than AdamW made them on a peer
        optimizer.state[full[k]] = {s: st[s].full_tensor() if isinstance(st[s], DTensor) else st[s]
                                    for s in sorted(st)}
    return kept


def _restore_optimizer(optimizer, sharded: dict, full: dict, kept: dict, write_back: bool) -> None:
    """Point ``optimizer`` back at the sharded parameters: their state as kept, or (``write_back``) sharded
    from what the full parameters' state holds now (a load replaced it)."""
    if optimizer is None:
        return
    back = {id(f): sharded[k] for k, f in full.items()}
    for group in optimizer.param_groups:
        group["params"] = [back.get(id(q), q) for q in group["params"]]
    for k, f in full.items():
        st = optimizer.state.pop(f, None)
        if write_back and st is not None:
            p = sharded[k]
            optimizer.state[p] = {s: _shard_of(v, p) if torch.is_tensor(v) and v.dim() else v for s, v in st.items()}
        elif k in kept:
            optimizer.state[sharded[k]] = kept[k]
