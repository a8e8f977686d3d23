"""Any layout from any other: plan loading a checkpoint at another expert-parallel layout (`raymoe checkpoint
reshard`), and assemble a new world's state from the old world's ranks' shards (membership changes).

Checkpoints store one file per global expert (weights and their optimizer rows), so any layout loads any
checkpoint without rewriting it: each rank of the new layout reads the files of the experts it owns.
:func:`reshard_plan` computes that assignment for a target world size and EP degree and verifies every file it
needs (size, sha256, optimizer state present), so a resize is known to work before a cluster is started.

A rank's in-memory copy (:func:`local_shards`) is what it holds: its FSDP shards of the dense part and of its
experts' weights and AdamW state, or whole replicas where nothing is sharded, with where each part sits in the
layout-free whole (the mesh, the sharded dim and offset, an expert entry's global ids). On a membership change
(:mod:`raymoe.actors.elastic`) every copy of the old world (a survivor's live state, a lost rank's copy at its
buddy) stays with its holder, which stores it as pieces (:func:`piece_data`: one per tensor, one per expert
row of an expert entry; replicas once, spread over their holders: :func:`choose_sources`); each rank of the
new world, once built at its layout, fetches only the pieces that overlap its own local tensors and copies the
overlaps in (:func:`assemble`). No process holds the whole state (unless the new world is one rank: its share is the
whole), and no process group is needed across the two worlds.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from raymoe.platform import checkpoint as ckpt
from raymoe.platform.checkpoint import CheckpointError, expert_file_name, inspect_checkpoint
from raymoe.platform.parallel import ParallelLayout, expert_placement
from raymoe.platform.sharded_io import layout


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


# -- a rank's shards as a copy; a new layout's state assembled from the pieces of the old one's copies -------
def _placement(v) -> dict | None:
    """How ``v``'s local part sits in the whole tensor: None when this rank holds it whole, else the mesh's
    global ranks in order, the sharded dim, the whole shape and where the local part starts along that dim
    (FSDP2 splits as ``torch.chunk``: part i starts at i * ceil(n / mesh size), the last parts may be short
    or empty)."""
    if not isinstance(v, DTensor):
        return None
    (placement,) = v.placements
    if not isinstance(placement, Shard):
        return None  # replicated: every rank of the mesh holds it whole
    return {"ranks": v.device_mesh.mesh.flatten().tolist(), "dim": placement.dim, "shape": list(v.shape),
            "offset": layout(v)[1][placement.dim]}


def local_tensor(v) -> torch.Tensor:
    """This rank's part of ``v`` (a DTensor's local shard, else ``v``), detached."""
    return (v.to_local() if isinstance(v, DTensor) else v).detach()


def _kept(t, live: bool):
    if not torch.is_tensor(t):
        return copy.deepcopy(t)
    return t if live else t.to("cpu", copy=True)


def local_shards(model: nn.Module, optimizer, live: bool = False) -> dict:
    """What this rank holds of ``model`` and ``optimizer`` (its FSDP shards, its experts, its replicas; tied
    weights once, under their first name) and where each part sits in the layout-free whole: "layout" (see
    :func:`_placement`) and "rows" (an expert entry's global expert ids, whose rows it holds). No
    communication. A CPU copy (what a buddy keeps), or with ``live`` the local tensors themselves (a new
    rank's layout to fill, or a live state to publish piece by piece without a second copy of it)."""
    for m in model.modules():  # parameters registered as their shards (after a step that failed midway too)
        if isinstance(m, FSDPModule):
            m.reshard()
    experts = {f"{name}.": [int(g) for g in mod.global_expert_ids] for name, mod in model.named_modules()
               if hasattr(mod, "global_expert_ids") and hasattr(mod, "layer_id")}
    out = {"tensors": {}, "layout": {}, "rows": {}, "aliases": {}, "opt": {}, "opt_layout": {}, "groups": []}
    seen: dict = {}
    for name, v in model.state_dict(keep_vars=True).items():
        t = local_tensor(v)
        key = ckpt.memory_key(t) if t.numel() else name
        if key in seen:
            out["aliases"][name] = seen[key]
            continue
        seen[key] = name
        out["tensors"][name], out["layout"][name] = _kept(t, live), _placement(v)
        out["rows"][name] = next((ids for prefix, ids in experts.items() if name.startswith(prefix)), None)
    names = {id(p): out["aliases"].get(n, n) for n, p in model.named_parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            for s, v in optimizer.state.get(p, {}).items():
                key = (names[id(p)], s)
                out["opt"][key] = _kept(local_tensor(v) if torch.is_tensor(v) else v, live)
                out["opt_layout"][key] = _placement(v)
        out["groups"].append({**{k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", "param_names")},
                              "params": [names[id(p)] for p in g["params"]]})
    return out


def _regions(shape, layout: dict | None, rows: list[int] | None) -> list[tuple[int | None, tuple]]:
    """Where a local tensor of ``shape`` sits in its layout-free whole, as [(local row or None, region)],
    a region being ((start, stop) per dim). An expert entry (``rows``: its container's global ids, one per
    row of the whole) is one region per local row, at its global id: experts move whole, by id, whatever the
    EP layouts on either side."""
    bounds = [(0, n) for n in shape]
    if layout is not None:
        d, start = layout["dim"], layout["offset"]
        bounds[d] = (start, start + shape[d])
    whole_rows = layout["shape"][0] if layout is not None else shape[0]
    if rows is None or whole_rows != len(rows):
        return [(None, tuple(bounds))]
    first = bounds[0][0]
    return [(j, ((g, g + 1), *bounds[1:])) for j, g in enumerate(rows[first:first + shape[0]])]


def copy_pieces(state: dict) -> tuple[list[tuple[dict, torch.Tensor]], dict]:
    """A :func:`local_shards` result as pieces: ([(description, tensor view)], inline values). A description
    is {"key": ("model", name) | ("opt", name, state), "region", "nbytes", "dtype"}: the unit a holder
    publishes and a new rank fetches (one per tensor, one per expert row of an expert entry). Scalars (0-dim
    tensors such as AdamW's step, and non-tensor state) are inline values by key, carried as metadata."""
    pieces, inline = [], {}
    for part, lay, kind in (("tensors", "layout", "model"), ("opt", "opt_layout", "opt")):
        for k, t in state[part].items():
            key = ("model", k) if kind == "model" else ("opt", *k)
            if not torch.is_tensor(t) or t.dim() == 0:
                inline[key] = t
                continue
            for j, region in _regions(t.shape, state[lay][k], state["rows"][key[1]]):
                view = t if j is None else t[j:j + 1]
                pieces.append(({"key": key, "region": region, "nbytes": view.numel() * view.element_size(),
                                "dtype": view.dtype}, view))
    return pieces, inline


def choose_sources(layouts: list[list[dict]]) -> list[list[int]]:
    """For the piece descriptions of several copies of one world, the pieces each copy publishes: every
    distinct (key, region) once (shards are disjoint; a replica of the dense part or of an expert is held by
    several copies), from the copy with the fewest bytes to publish so far, so replicas are spread over
    their holders (the work, and the object store's memory on each holder's node)."""
    holders: dict = {}
    for c, pieces in enumerate(layouts):
        for i, p in enumerate(pieces):
            holders.setdefault((p["key"], p["region"]), []).append((c, i, p["nbytes"]))
    load, out = [0] * len(layouts), [[] for _ in layouts]
    for options in holders.values():
        c, i, n = min(options, key=lambda o: load[o[0]])
        load[c] += n
        out[c].append(i)
    return [sorted(o) for o in out]


def describe(state: dict) -> dict:
    """What a holder tells of a :func:`local_shards` copy: its pieces' descriptions (:func:`copy_pieces`), its
    inline values (on CPU) and param groups; metadata only."""
    pieces, inline = copy_pieces(state)
    return {"pieces": [desc for desc, _ in pieces], "groups": state["groups"],
            "inline": {k: v.to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in inline.items()}}


def piece_data(state: dict, which: list[int]) -> Iterator[torch.Tensor]:
    """The pieces ``which`` (indices into :func:`describe`'s) of ``state``, one at a time, each a CPU tensor of
    its own (a view would carry its whole storage along)."""
    pieces, _ = copy_pieces(state)
    for i in which:
        view = pieces[i][1]
        yield torch.empty(view.shape, dtype=view.dtype).copy_(view)


def published(layout: dict, which: list[int], refs: list) -> dict:
    """A copy as :func:`assemble` takes it: its description (:func:`describe`) with only the pieces ``which``,
    each with the reference ``refs`` gives it (in the same order)."""
    return {**layout, "pieces": [{**layout["pieces"][i], "ref": ref} for i, ref in zip(which, refs)]}


def intersect(dst: tuple, src: tuple) -> tuple[tuple, tuple, int] | None:
    """(slices into ``dst``'s tensor, slices into ``src``'s, elements) of two regions' overlap, or None."""
    lo = [max(a[0], b[0]) for a, b in zip(dst, src)]
    hi = [min(a[1], b[1]) for a, b in zip(dst, src)]
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    n = 1
    for low, h in zip(lo, hi):
        n *= h - low
    return (tuple(slice(low - d[0], h - d[0]) for low, h, d in zip(lo, hi, dst)),
            tuple(slice(low - s[0], h - s[0]) for low, h, s in zip(lo, hi, src)), n)


def _restore_groups(model: nn.Module, optimizer, groups: list[dict]) -> None:
    """The old optimizer's hyperparameters in the new one, whose groups must hold the same parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} optimizer param groups in the copies, {len(optimizer.param_groups)} here")
    for gi, (g, saved) in enumerate(zip(optimizer.param_groups, groups)):
        if [names.get(id(p)) for p in g["params"]] != saved["params"]:
            raise ValueError(f"optimizer param group {gi}: its parameters differ from the copies'")
        for k, v in saved.items():
            cur = g.get(k)
            if k != "params":
                g[k] = torch.as_tensor(v, dtype=cur.dtype, device=cur.device) if torch.is_tensor(cur) else v


def _create_opt_state(model: nn.Module, optimizer, copies: list[dict]) -> None:
    """Empty AdamW state shaped like the new parameters (a DTensor's like its shards), with the old state's
    scalars (its step), for every parameter the old optimizer had state of."""
    want: dict[str, dict] = {}
    for c in copies:  # scalars first: AdamW's own order (step, exp_avg, exp_avg_sq)
        for (kind, *k), v in c["inline"].items():
            if kind == "opt":
                want.setdefault(k[0], {}).setdefault(k[1], v)
        for p in c["pieces"]:
            if p["key"][0] == "opt":
                want.setdefault(p["key"][1], {}).setdefault(p["key"][2], p["dtype"])
    names = {id(p): n for n, p in model.named_parameters()}
    for g in optimizer.param_groups:
        on_device = g.get("fused") or g.get("capturable")  # their step lives with the parameters
        for p in g["params"]:
            if (n := names[id(p)]) in want:
                optimizer.state[p] = {
                    s: torch.zeros_like(p, dtype=v) if isinstance(v, torch.dtype)
                    else (v.to(local_tensor(p).device) if on_device else v.clone()) if torch.is_tensor(v)
                    else copy.deepcopy(v) for s, v in want[n].items()}


def assemble(model: nn.Module, optimizer, copies: list[dict], fetch: Callable[[list], list]) -> dict:
    """Fill ``model`` and ``optimizer``, built at a new layout (sharded or not, any EP), with the state of an
    old world published as ``copies`` (:func:`published`, together covering its whole state once). For each of
    this rank's local tensors, only the pieces overlapping it are fetched (``fetch``: handles -> tensors),
    one tensor's pieces at a time, and the overlaps copied in: this rank holds its own share plus one
    tensor's pieces, never the whole state. Returns {"fetched_bytes", "fetched_pieces", "share_bytes",
    "largest_fetch_bytes" (the most fetched at once: one tensor's pieces)}."""
    if optimizer.state:
        raise ValueError("assemble fills a new optimizer: this one already has state")
    _restore_groups(model, optimizer, copies[0]["groups"])
    _create_opt_state(model, optimizer, copies)
    targets, inline = copy_pieces(local_shards(model, optimizer, live=True))
    values = {k: v for c in reversed(copies) for k, v in c["inline"].items()}
    by_key: dict = {}
    for c in copies:
        for p in c["pieces"]:
            by_key.setdefault(p["key"], []).append(p)
    mine: dict = {}
    for desc, view in targets:
        mine.setdefault(desc["key"], []).append((desc["region"], view))
    missing = sorted(str(k) for k in mine.keys() - by_key.keys()) + sorted(
        str(k) for k in inline if k[0] == "model" and k not in values)
    if missing:
        raise ValueError(f"the old world's copies have no {missing[:4]}")
    stats = {"fetched_bytes": 0, "fetched_pieces": 0, "largest_fetch_bytes": 0,
             "share_bytes": sum(d["nbytes"] for d, _ in targets)}
    with torch.no_grad():
        for key, t in inline.items():
            if key[0] == "model":
                t.copy_(values[key])
        for key, regions in mine.items():
            hits = [(p, [(view, hit) for region, view in regions if (hit := intersect(region, p["region"]))])
                    for p in by_key[key]]
            hits = [(p, on) for p, on in hits if on]  # only the pieces that overlap this rank's parts
            for (p, on), got in zip(hits, fetch([p["ref"] for p, _ in hits])):
                for view, (dst, src, _) in on:
                    view[dst].copy_(got[src])
            covered, need = sum(hit[2] for _, on in hits for _, hit in on), sum(v.numel() for _, v in regions)
            if covered != need:
                raise ValueError(f"{key}: the old world's copies cover {covered} of this rank's {need} elements")
            fetched = sum(p["nbytes"] for p, _ in hits)
            stats["fetched_bytes"] += fetched
            stats["fetched_pieces"] += len(hits)
            stats["largest_fetch_bytes"] = max(stats["largest_fetch_bytes"], fetched)
    return stats
