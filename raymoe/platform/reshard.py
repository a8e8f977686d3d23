"""Any layout from any other: plan loading a checkpoint at another expert-parallel layout (`raymoe checkpoint
reshard`), and rebuild the layout-free state of a world from its ranks' shards (elastic recovery).

Checkpoints store one file per global expert (weights and their optimizer rows), so any layout loads any
checkpoint without rewriting it: each rank of the new layout reads the files of the experts it owns.
:func:`reshard_plan` computes that assignment for a target world size and EP degree and verifies every file it
needs (size, sha256, optimizer state present), so a resize is known to work before a cluster is started.

A rank's in-memory copy (:func:`local_shards`) is what it holds: its FSDP shards of the dense part and of its
experts' weights and AdamW state, or whole replicas where nothing is sharded, with how they fit together.
:func:`full_parts` puts every rank's copy of one step back together into the same files a checkpoint has, no
process group needed: a world that lost a rank rebuilds its state from the survivors' shards and the lost
rank's copy at its buddy (:mod:`raymoe.actors.elastic`), then any new layout loads the files.
"""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from raymoe.platform import checkpoint as ckpt
from raymoe.platform.checkpoint import CheckpointError, expert_file_name, inspect_checkpoint
from raymoe.platform.parallel import ParallelLayout, expert_placement


def reshard_plan(path, world: int, ep_size: int | None = None) -> dict:
    """Per-rank expert ids and files of ``path`` for ``world`` ranks (``ep_size`` None = the largest valid).

    Raises CheckpointError if a file is missing or corrupted, ValueError if ``ep_size`` does not fit.
    """
    if world < 1:
        raise ValueError(f"world={world}: must be >= 1")
    info = inspect_checkpoint(path, verify=True)
    layers = {int(k): list(v) for k, v in info["expert_ids"].items()}
    plan: dict = {"path": info["path"], "step": info["step"], "world": world, "ep_sizes": {}, "ranks": []}
    for lid, ids in layers.items():
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{info['path']}: layer {lid} has experts {ids}, expected 0..{len(ids) - 1}")
    try:
        layout = ParallelLayout.plan({lid: len(ids) for lid, ids in layers.items()}, world, ep_size)
    except ValueError as exc:
        raise ValueError(f"--ep-size {ep_size} does not fit --workers {world}: {exc}") from None
    plan["ep_sizes"] = dict(layout.ep_sizes)
    if info["has_optimizer"] is False:
        plan["warning"] = "checkpoint has no optimizer state: training resumes with fresh AdamW moments"
    for rank in range(world):
        experts = {lid: expert_placement(len(ids), plan["ep_sizes"][lid], rank % plan["ep_sizes"][lid])
                   for lid, ids in layers.items()}
        files = [expert_file_name(lid, g) for lid, gids in experts.items() for g in gids]
        plan["ranks"].append({"rank": rank, "experts": experts, "files": files})
    return plan


# -- a rank's shards as a copy, and the layout-free files rebuilt from every rank's copy ---------------------
def _placement(v) -> dict | None:
    """How ``v``'s local part sits in the whole tensor: None when this rank holds it whole, else the mesh's
    global ranks in order, the sharded dim and the whole shape (FSDP2 splits as ``torch.chunk``: the local
    parts concatenated in mesh order are the whole tensor)."""
    if not isinstance(v, DTensor):
        return None
    (placement,) = v.placements
    if not isinstance(placement, Shard):
        return None  # replicated: every rank of the mesh holds it whole
    return {"ranks": v.device_mesh.mesh.flatten().tolist(), "dim": placement.dim, "shape": list(v.shape)}


def local_tensor(v) -> torch.Tensor:
    """This rank's part of ``v`` (a DTensor's local shard, else ``v``), detached."""
    return (v.to_local() if isinstance(v, DTensor) else v).detach()


def local_shards(model: nn.Module, optimizer) -> dict:
    """A CPU copy of what this rank holds of ``model`` and ``optimizer`` (its FSDP shards, its experts, its
    replicas; tied weights once) and how the parts fit together; no communication (peers of a lost rank keep
    it, see :func:`full_parts`)."""
    for m in model.modules():  # parameters registered as their shards (after a step that failed midway too)
        if isinstance(m, FSDPModule):
            m.reshard()
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"tensors": {}, "layout": {}, "order": [], "aliases": {}, "params": [], "opt": {}, "opt_layout": {},
           "groups": [], "experts": {}}
    seen: dict = {}
    for name, v in model.state_dict(keep_vars=True).items():
        t = local_tensor(v)
        key = ckpt.memory_key(t) if t.numel() else name
        out["order"].append(name)
        if key in seen:
            out["aliases"][name] = seen[key]
            continue
        seen[key] = name
        out["tensors"][name], out["layout"][name] = t.to("cpu", copy=True), _placement(v)
        if isinstance(v, nn.Parameter):
            out["params"].append(name)
    for g in optimizer.param_groups:
        for p in g["params"]:
            for s, v in optimizer.state.get(p, {}).items():
                key = (names[id(p)], s)
                out["opt"][key] = local_tensor(v).to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                out["opt_layout"][key] = _placement(v)
        out["groups"].append({**{k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", "param_names")},
                              "params": [names[id(p)] for p in g["params"]]})
    for name, mod in model.named_modules():
        if hasattr(mod, "global_expert_ids") and hasattr(mod, "layer_id"):
            out["experts"][name] = (int(mod.layer_id), [int(g) for g in mod.global_expert_ids])
    return out


def _whole(copies: dict[int, dict], rank: int, tensors: str, layout: str, key) -> torch.Tensor:
    """The whole tensor ``key`` of rank ``rank``: its own, or the parts of every rank of its mesh."""
    own = copies[rank]
    lay = own[layout][key]
    if lay is None or not torch.is_tensor(own[tensors][key]):
        return own[tensors][key]
    whole = torch.cat([copies[q][tensors][key] for q in lay["ranks"]], dim=lay["dim"])
    assert list(whole.shape) == lay["shape"], (key, list(whole.shape), lay["shape"])
    return whole


def _module_at(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in filter(None, path.split(".")):
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def _rank_state(copies: dict[int, dict], rank: int):
    """(a module with rank ``rank``'s whole state under the model's names and expert containers, an optimizer
    stand-in with its whole state): what :func:`checkpoint_parts` reads from a live model and optimizer."""
    own, root, values = copies[rank], nn.Module(), {}
    for name in own["tensors"]:
        t = _whole(copies, rank, "tensors", "layout", name)
        values[name] = nn.Parameter(t, requires_grad=False) if name in own["params"] else t
    for name in own["order"]:
        path, _, leaf = name.rpartition(".")
        v = values[own["aliases"].get(name, name)]
        mod = _module_at(root, path)
        (mod.register_parameter if isinstance(v, nn.Parameter) else mod.register_buffer)(leaf, v)
    for path, (layer_id, ids) in own["experts"].items():
        mod = _module_at(root, path)
        mod.layer_id, mod.global_expert_ids = layer_id, ids
    params = dict(root.named_parameters())
    state: dict = {}
    for (name, s) in own["opt"]:
        state.setdefault(params[name], {})[s] = _whole(copies, rank, "opt", "opt_layout", (name, s))
    groups = [{**g, "params": [params[n] for n in g["params"]]} for g in own["groups"]]
    return root, SimpleNamespace(param_groups=groups, state=state)


def full_parts(copies: dict[int, dict], step: int) -> dict[str, bytes]:
    """The layout-free checkpoint files (in memory) of a world's state from every rank's
    :func:`local_shards` copy, all taken at ``step``: ``copies`` maps each rank of that world to its copy. The
    dense part comes from the first rank, each expert from the first rank holding it."""
    missing = sorted({q for c in copies.values() for lay in (*c["layout"].values(), *c["opt_layout"].values())
                      if lay is not None for q in lay["ranks"]} - set(copies))
    if missing:
        raise ValueError(f"no copy of rank(s) {missing}: their shards are lost")
    parts: dict[str, bytes] = {}
    have: set = set()
    for rank in sorted(copies):
        mine = {(lid, g) for lid, ids in copies[rank]["experts"].values() for g in ids} - have
        if parts and not mine:
            continue
        model, optimizer = _rank_state(copies, rank)
        parts.update(checkpoint_parts(model, optimizer, step, dense=not parts, experts=sorted(mine)))
        have |= mine
    return parts


def checkpoint_parts(model: nn.Module, optimizer, step: int, dense: bool,
                     experts: list[tuple[int, int]] | None = None) -> dict[str, bytes]:
    """``model`` and ``optimizer`` (whole tensors: gathered when sharded) as checkpoint files in memory: the
    dense part if ``dense``, and the expert files of ``experts`` ((layer, global id) pairs; None = all)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt.save_checkpoint(tmp, step, model, optimizer, write_dense=dense, rng=False, write_manifest=False)
        wanted = None if experts is None else {ckpt.expert_file_name(lid, g) for lid, g in experts}
        parts = {}
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and (wanted is None or not rel.startswith(ckpt.EXPERT_DIR + "/") or rel in wanted):
                parts[rel] = p.read_bytes()
        return parts
