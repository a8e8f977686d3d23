"""Loading a checkpoint (see :mod:`raymoe.platform.checkpoint`, whose API ``load_checkpoint`` is part of) into a
whole model, an expert-parallel shard or an FSDP2-sharded one: every rank reads only the bytes of the tensors,
rows and slices it holds, straight into them.
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from raymoe.platform import fsdp, sharded_io
from raymoe.platform.checkpoint import (DENSE, MANIFEST, OPTIM_DENSE, CheckpointError, _opened, _restore_rng,
                                        _rng_file, expert_file_name, read_manifest, split_state)


def _part(path, f, key: str, like: torch.Tensor, strict: bool, row: int | None = None, name: str | None = None):
    """This rank's part of tensor ``key`` of the open file ``f`` as ``like`` (a model entry, whole or a
    DTensor shard; with ``row``, of its row ``row``) holds it: (its row in ``like``'s local part, the tensor
    read), reading only those bytes; None if this rank holds none of that row. The file's tensor must have
    ``like``'s shape (of a row) and, if ``strict``, its dtype."""
    sl, want = f.get_slice(key), list(like.shape[1:] if row is not None else like.shape)
    dtype = sharded_io.DTYPES.get(sl.get_dtype())
    if sl.get_shape() != want:
        raise CheckpointError(f"{path}: {name or key!r} has shape {sl.get_shape()} in the checkpoint but {want} "
                              "in the model")
    if strict and dtype != like.dtype:
        raise CheckpointError(f"{path}: {name or key!r} has dtype {dtype} in the checkpoint but {like.dtype} "
                              "in the model (strict=False casts)")
    if (where := sharded_io.index(like, row)) is None:
        return None
    local_row, index = where
    return local_row, sl[index] if index else f.get_tensor(key)


def _load(path, f, key: str, dst: torch.Tensor, strict: bool, row: int | None = None, name: str | None = None):
    """Copy this rank's part of tensor ``key`` of ``f`` into model entry ``dst`` (its row ``row``)."""
    if (got := _part(path, f, key, dst, strict, row, name)) is not None:
        local_row, src = got
        target = sharded_io.local(dst)
        with torch.no_grad():
            (target if local_row is None else target[local_row]).copy_(src)


def _check_keys(path, missing, unexpected) -> None:
    if missing or unexpected:
        raise CheckpointError(f"{path}: entries do not match the model: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")


def load_checkpoint(path_or_root, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    strict: bool = True, restore_rng: bool = True, rank: int | None = None) -> dict:
    """Load a committed checkpoint (a step dir, or a root: its latest) into ``model`` [and ``optimizer``].

    Every file read is checked against the manifest (size, sha256), every entry by name, shape and dtype;
    problems raise ``CheckpointError`` naming the file. Expert containers get the rows of the global experts
    they hold, whatever placement wrote the checkpoint. Optimizer state (AdamW exp_avg, exp_avg_sq, step)
    and param_group hyperparameters are restored exactly, so training continues bit-identically.
    An FSDP-sharded model gets its shards straight from the files: each rank reads only the bytes of its
    slices and files of experts it holds some of (no communication), and the AdamW state of a sharded
    parameter becomes a DTensor laid out like it. A checkpoint at a storage URI is read from local copies of
    those files, one at a time. ``strict=False`` tolerates missing/unexpected entries, missing experts and
    dtype casts. Returns ``{"step", "extra", "config", "path"}``.
    """
    manifest = read_manifest(path_or_root)
    ckpt, files = manifest["path"], manifest["files"]
    fsdp.reshard(model)
    dense, containers = split_state(model)
    if dense and (DENSE in files or strict):
        with _opened(manifest, DENSE) as (f, meta):
            stored = set(f.keys())
            source = {**{k: k for k in stored},
                      **{a: s for a, s in json.loads(meta.get("aliases", "{}")).items() if s in stored}}
            if strict:
                _check_keys(ckpt / DENSE, dense.keys() - source.keys(), source.keys() - dense.keys())
            for k in [k for k in dense if k in source]:
                _load(ckpt / DENSE, f, source[k], dense[k], strict, name=k)
    expert_state = {}
    for lid, (prefix, mod, entries) in containers.items():
        expert_state.update(_load_experts(manifest, lid, prefix, mod, entries, optimizer is not None, strict))
    if optimizer is not None:
        _load_optimizer(manifest, model, optimizer, expert_state, strict)
    if restore_rng and _rng_file(rank) in files:
        with _opened(manifest, _rng_file(rank)) as (f, meta):
            _restore_rng({k: f.get_tensor(k) for k in f.keys()}, meta)
    return {"step": manifest["step"], "extra": manifest.get("extra"), "config": manifest.get("config"),
            "path": ckpt}


class _ExpertState:
    """The AdamW state of one expert container's parameters, file by file: this rank's rows of each
    per-element state into a buffer laid out like the parameter's part, the scalars every file repeats."""

    def __init__(self, entries: dict):
        self.entries, self.rows, self.filled, self.shared = entries, {}, {}, {}

    def add(self, path, f, key: str, row: int, common: bool) -> None:
        sname, _, ln = key.partition(".")
        if common:  # AdamW's step: the same in every file
            v = f.get_tensor(key).clone()
            if self.shared.setdefault((ln, sname), v) is not v and not torch.equal(self.shared[(ln, sname)], v):
                raise CheckpointError(f"{path}: {key!r} differs from the other experts' files")
        elif (got := _part(path, f, key, self.entries[ln], False, row=row)) is not None:
            shape, device = sharded_io.layout(self.entries[ln])[0], sharded_io.local(self.entries[ln]).device
            buf = self.rows.setdefault((ln, sname), torch.empty(shape, dtype=got[1].dtype, device=device))
            buf[got[0]].copy_(got[1])
            self.filled[(ln, sname)] = self.filled.get((ln, sname), 0) + 1

    def result(self, prefix: str, held: list[int], strict: bool, where: str) -> dict:
        """{param name: {state: tensor}}; a parameter whose state some held expert's file lacks gets none
        (an error if ``strict``)."""
        out, missing = {}, set()
        for (ln, sname), buf in self.rows.items():
            if self.filled[(ln, sname)] != sum(sharded_io.index(self.entries[ln], i) is not None for i in held):
                if strict:
                    raise CheckpointError(f"{where} {ln!r}: optimizer state {sname!r} is missing from some of "
                                          "the files of its experts")
                missing.add(ln)
            out.setdefault(ln, {})[sname] = sharded_io.like(buf, self.entries[ln])
        for (ln, sname), v in self.shared.items():
            out.setdefault(ln, {})[sname] = v
        return {prefix + ln: st for ln, st in out.items() if ln not in missing}


def _load_experts(manifest, lid, prefix, mod, entries, want_state: bool, strict: bool) -> dict:
    """Load the rows of the experts of container ``mod`` this rank holds (of an FSDP shard: only its rows or
    columns; files of experts it holds nothing of are not read); returns their optimizer state, if
    ``want_state``: {param name: {state: tensor laid out like the parameter}}."""
    ckpt, files = manifest["path"], manifest["files"]
    params, state = {ln for ln, _ in mod.named_parameters()}, _ExpertState(entries)
    held = [i for i in range(len(mod.global_expert_ids))
            if any(sharded_io.index(t, i) is not None for t in entries.values())]
    for i in held:
        gid = int(mod.global_expert_ids[i])
        if (rel := expert_file_name(lid, gid)) not in files:
            if not strict:
                continue
            raise CheckpointError(f"{ckpt / rel}: not in the checkpoint; the model holds layer {lid} expert {gid}, "
                                  f"the checkpoint has {manifest.get('experts', {}).get(str(lid))}")
        with _opened(manifest, rel) as (f, meta):
            if (meta.get("layer_id"), meta.get("global_expert_id")) != (str(lid), str(gid)):
                raise CheckpointError(f"{ckpt / rel}: metadata says layer {meta.get('layer_id')} expert "
                                      f"{meta.get('global_expert_id')}")
            names = set(json.loads(meta.get("params", "[]")))
            if strict:
                _check_keys(ckpt / rel, entries.keys() - names, names - entries.keys())
            for ln in [ln for ln in entries if ln in names]:
                _load(ckpt / rel, f, ln, entries[ln], strict, row=i)
            common = set(json.loads(meta.get("shared", "[]")))
            for key in f.keys() if want_state else ():
                if key not in names and key.partition(".")[2] in params:
                    state.add(ckpt / rel, f, key, i, key in common)
    return state.result(prefix, held, strict, f"{ckpt}: layer {lid}")


def _dense_optimizer_state(manifest, model: nn.Module) -> tuple[dict, set]:
    """({param name: {state: tensor}} of the dense parameters, laid out like them (a sharded one: this rank's
    slices only), names of parameters the file has state for that the model lacks)."""
    ckpt, params = manifest["path"], dict(model.named_parameters())
    per_param, unknown = {}, set()
    with _opened(manifest, OPTIM_DENSE) as (f, _):
        for key in f.keys():
            sname, _, pname = key.partition(".")
            if (p := params.get(pname)) is None:
                unknown.add(pname)
            elif isinstance(p, DTensor) and f.get_slice(key).get_shape():
                # in memory of its own: what safetensors returns is a view of the file's mapped tensor
                v = sharded_io.like(_part(ckpt / OPTIM_DENSE, f, key, p, False)[1].clone(), p)
                per_param.setdefault(pname, {})[sname] = v
            else:  # whole (AdamW's scalar step too)
                per_param.setdefault(pname, {})[sname] = f.get_tensor(key).clone()
    return per_param, unknown


def _load_optimizer(manifest, model, optimizer, expert_state: dict, strict) -> None:
    ckpt = manifest["path"]
    saved_groups = (manifest.get("optimizer") or {}).get("param_groups")
    if saved_groups is None:
        if not strict:
            return
        raise CheckpointError(f"{ckpt}: no optimizer state ({OPTIM_DENSE} not in the manifest) but an "
                              "optimizer was passed (strict=False skips it)")
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{ckpt / MANIFEST}: {len(saved_groups)} optimizer param groups, the optimizer "
                              f"has {len(optimizer.param_groups)}")
    per_param, unknown = _dense_optimizer_state(manifest, model)
    per_param.update(expert_state)
    names = {id(p): n for n, p in model.named_parameters()}
    index, groups = {}, []
    for gi, (g, sg) in enumerate(zip(optimizer.param_groups, saved_groups)):
        gnames = [names.get(id(p), "?") for p in g["params"]]
        if gnames != sg.get("params"):
            raise CheckpointError(f"{ckpt / MANIFEST}: optimizer param group {gi} holds {len(gnames)} params "
                                  f"{gnames[:3]}..., the checkpoint's {sg.get('params', [])[:3]}...")
        new = {k: v for k, v in g.items() if k != "params"}
        for k, v in sg.items():
            cur = g.get(k)
            if v is not None and k != "params":
                v = torch.tensor(v, dtype=cur.dtype, device=cur.device) if torch.is_tensor(cur) else v
                new[k] = tuple(v) if isinstance(cur, tuple) else v
        new["params"] = list(range(len(index), len(index) + len(gnames)))
        index.update(zip(gnames, new["params"]))
        groups.append(new)
    if strict and (per_param.keys() | unknown) - index.keys():
        raise CheckpointError(f"{ckpt / OPTIM_DENSE}: optimizer state for params the optimizer does not hold: "
                              f"{sorted((per_param.keys() | unknown) - index.keys())[:8]}")
    state = {index[n]: st for n, st in per_param.items() if n in index}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
