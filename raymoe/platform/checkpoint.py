"""Checkpoints: safetensors files (one per global expert, one dense, optimizer, RNG) committed by a manifest.

Layout of ``<root>/step_{step:08d}/``::

    dense.safetensors        non-expert state_dict entries (params + persistent buffers; tied weights once)
    optim_dense.safetensors  optimizer state of dense params, "<state>.<param name>" (exp_avg.wte.weight, ...)
    experts/layer{L:03d}_expert{G:04d}.safetensors   global expert G of layer L: its rows of every expert
                             entry ("w1", "w2") and of their optimizer state ("exp_avg.w1", "step.w1", ...)
    rng.safetensors          torch CPU/CUDA, python and numpy RNG states (rng_rank{R:05d}... per rank)
    tokenizer.json, tokenizer_config.json [, chat_template.jinja, generation_config.json]
                             the tokenizer the model was trained with (`raymoe.platform.tokenizer`), written
                             by the committer; a checkpoint without them is read with the byte tokenizer
    .written/rank{R:05d}.json  what rank R wrote (each file's size and sha256), written after its files
    manifest.json            written LAST, the commit point: every file's size and sha256, step, config, extra,
                             optimizer param_groups; then ``<root>/latest`` (a hint: a checkpoint is committed
                             iff its manifest exists; readers fall back to listing the step dirs)

Expert files are keyed by GLOBAL expert id, so any expert placement loads into any other. An expert
container is any module with ``layer_id`` and ``global_expert_ids`` (e.g. ``GroupedExperts``) whose state
entries have E_local leading rows. Nothing is unpickled: tensors go through safetensors, the rest JSON.
Distributed: each shard calls ``save_checkpoint(..., write_dense=rank == 0, write_manifest=False, rank=r)``;
then the coordinator calls ``finalize_checkpoint(dir, writer_ranks=range(world), ...)``, which reads every file
the writers list back from the storage, checks its size and sha256 against what the writer wrote, and commits.
FSDP2-sharded state (DTensors) is written as the same files, each sharded tensor gathered alone, to the rank
that writes it, and streamed into its files (:mod:`raymoe.platform.sharded_io`), and loaded by reading each
rank's slices only (:mod:`raymoe.platform.checkpoint_load`): no rank ever holds the whole state.

``root`` may be a local path or a storage URI (``s3://bucket/run/checkpoints``, see
:mod:`raymoe.platform.storage`): every file is written whole or not at all (local: tmp + fsync + rename; an
object store: one object, no rename needed), so a writer killed mid-write leaves the checkpoint visibly
incomplete, never committed, and the previous committed one intact. Paths returned are ``Path`` for local
locations and :class:`~raymoe.platform.storage.RemotePath` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from raymoe.platform import fsdp, sharded_io, storage

__all__ = ["DENSE", "EXPERT_DIR", "FORMAT_VERSION", "LATEST", "MANIFEST", "OPTIM_DENSE", "CheckpointError",
           "expert_file_name", "fetch_files", "finalize_checkpoint", "inspect_checkpoint", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "memory_key", "read_manifest", "record_written",
           "remove_checkpoint", "save_checkpoint", "split_state", "step_dir_name", "verify_files"]

FORMAT_VERSION = 1
MANIFEST, LATEST, DENSE, OPTIM_DENSE, EXPERT_DIR = "manifest.json", "latest", "dense.safetensors", \
    "optim_dense.safetensors", "experts"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_EXPERT_RE = re.compile(r"^experts/layer(\d{3,})_expert(\d{4,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model; the message names the file."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (``step_00000123``)."""
    return f"step_{step:08d}"


def expert_file_name(layer_id: int, global_id: int) -> str:
    """Path, relative to a checkpoint dir, of the file of global expert ``global_id`` of ``layer_id``."""
    return f"{EXPERT_DIR}/layer{layer_id:03d}_expert{global_id:04d}.safetensors"


def _rng_file(rank: int | None) -> str:
    return "rng.safetensors" if rank is None else f"rng_rank{rank:05d}.safetensors"


def _written_file(rank: int | None) -> str:
    """The index of the files rank ``rank`` wrote (a dotfile: never part of the manifest)."""
    return f".written/rank{rank or 0:05d}.json"


def record_written(ckpt_dir, rank: int | None, written: dict[str, dict]) -> None:
    """Record that ``rank`` finished writing its part of checkpoint ``ckpt_dir``: ``written`` is {file: {"size",
    "sha256"}} as it wrote them (the commit checks the storage against it; see `finalize_checkpoint`)."""
    storage.write_bytes(storage.location(ckpt_dir) / _written_file(rank), json.dumps(written, indent=1).encode())


def memory_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same memory (tied weights: one tensor under two names)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def split_state(model: nn.Module):
    """-> (dense state entries, {layer_id: (prefix, module, {local name: tensor})}) of model.state_dict()."""
    containers: dict[int, tuple[str, nn.Module, dict]] = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "global_expert_ids") and hasattr(mod, "layer_id"):
            lid, ids = int(mod.layer_id), [int(g) for g in mod.global_expert_ids]
            if lid in containers or len(set(ids)) != len(ids):
                raise ValueError(f"expert container {name!r}: layer_id={lid} seen twice or duplicate "
                                 f"global_expert_ids {ids}")
            containers[lid] = (f"{name}." if name else "", mod, {})
    dense = {}
    for key, t in model.state_dict().items():
        for prefix, mod, entries in containers.values():
            if key.startswith(prefix):
                if t.dim() == 0 or t.shape[0] != len(mod.global_expert_ids):
                    raise ValueError(f"expert entry {key!r} has shape {list(t.shape)}; its leading dim must be "
                                     f"len(global_expert_ids)={len(mod.global_expert_ids)}")
                entries[key[len(prefix):]] = t
                break
        else:
            dense[key] = t
    return dense, containers


def _write(written: dict, ckpt, rel: str, tensors: dict, metadata: dict, write: bool = True) -> None:
    """Write file ``rel`` of ``tensors`` (``write`` False: only take part in gathering its sharded tensors, see
    `sharded_io.write_files`) and record its {"size", "sha256"} in ``written``."""
    if write:
        written[rel] = sharded_io.write_files([ckpt / rel], tensors, [metadata])[0]
    else:
        sharded_io.write_files(None, tensors, [metadata])


def _header(path, buf: bytes | None = None) -> dict:
    """The JSON header of a safetensors file (from ``buf`` if given, else from the start of ``path``)."""
    if buf is None:
        with storage.open_input(path) as f:
            buf = f.read(8)
            buf += f.read(struct.unpack("<Q", buf)[0] if len(buf) == 8 else 0)
    n = struct.unpack("<Q", buf[:8])[0] if len(buf) >= 8 else -1
    try:
        if 0 <= n <= len(buf) - 8:
            return json.loads(buf[8:8 + n])
    except ValueError:
        pass
    raise CheckpointError(f"{path}: not a safetensors file (unreadable header)")


def _rng_payload() -> tuple[dict, dict]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        t.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py_version, py_state, py_gauss = random.getstate()
    t["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    t["numpy_keys"] = torch.from_numpy(np_keys.astype(np.int64))
    return t, {"python": json.dumps([py_version, py_gauss]),
               "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_cached)])}


def _restore_rng(t: dict, meta: dict) -> None:
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda_{i}" in t:
                torch.cuda.set_rng_state(t[f"cuda_{i}"], i)
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(t["python_state"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_cached = json.loads(meta["numpy"])
    np.random.set_state((np_name, t["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))


def save_checkpoint(root, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    extra: dict | None = None, config: dict | None = None, rng: bool = True,
                    write_dense: bool = True, write_manifest: bool = True, write_experts: bool = True,
                    rank: int | None = None, tokenizer=None):
    """Write ``model`` [+ ``optimizer`` state, RNG state] to ``<root>/step_{step:08d}/``; return that dir.

    An FSDP-sharded model (DTensor parameters and AdamW state) is written as the same files as a whole one:
    each sharded tensor is gathered alone, when its file is written, to the rank that writes it (the others
    send their shards), and dropped right after, so a rank holds at most one whole tensor beyond its shards.
    This makes the call a collective for a sharded model: every rank calls it, each with its own ``write_*``
    flags (a rank that writes nothing still takes part).

    ``write_dense``/``write_experts`` pick the parts this process writes; ``write_manifest`` commits here
    (else a coordinator calls ``finalize_checkpoint`` once every writer returned). ``extra`` and ``config``
    must be JSON-serializable (they go into the manifest). ``rank`` names a per-rank RNG file. ``tokenizer``
    (with ``write_manifest``): its files go into the checkpoint (see `finalize_checkpoint`). Re-saving a
    step first removes its manifest, so a crash midway leaves it visibly incomplete. Last, the index of what
    this rank wrote (each file's size and sha256) goes to ``.written/rank{rank}.json`` for the commit to check.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    for name, value in (("extra", extra), ("config", config)):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be JSON-serializable: {e}") from e
    ckpt = storage.location(root) / step_dir_name(step)
    storage.remove_file(ckpt / MANIFEST)
    written: dict[str, dict] = {}
    fsdp.reshard(model)
    dense, containers = split_state(model)
    dense_opt, expert_opt, groups = _optimizer_payload(model, optimizer, containers)
    _write(written, ckpt, DENSE, *_dense_payload(model, dense), write_dense)
    if optimizer is not None:
        _write(written, ckpt, OPTIM_DENSE, dense_opt, {"param_groups": groups}, write_dense)
    for lid, (_, mod, entries) in containers.items():
        _write_experts(written, ckpt, lid, mod, entries, expert_opt.get(lid, {}), write_experts)
    if rng:
        _write(written, ckpt, _rng_file(rank), *_rng_payload())
    record_written(ckpt, rank, written)
    if write_manifest:
        finalize_checkpoint(ckpt, step=step, config=config, extra=extra, tokenizer=tokenizer,
                            writer_ranks=[rank or 0])
    return ckpt


def _dense_payload(model: nn.Module, dense: dict) -> tuple[dict, dict]:
    """(the dense entries to store, the dense file's metadata): tied weights (wte/lm_head) are stored once, the
    other names listed as aliases. A sharded tensor is tied by its parameter (its local part may be empty,
    and every rank must agree on what is gathered); a whole one by its memory."""
    params = {k: id(p) for k, p in model.named_parameters(remove_duplicate=False)}
    stored, aliases, seen = {}, {}, {}
    for k, t in dense.items():
        key = ("param", params[k]) if isinstance(t, DTensor) else memory_key(t)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key], stored[k] = k, t
    return stored, {"aliases": json.dumps(aliases)}


def _write_experts(written: dict, ckpt, lid: int, mod, entries: dict, states: dict, write: bool) -> None:
    """The files of the experts of container ``mod`` (layer ``lid``): expert i's file holds row i of every
    entry and of its per-element optimizer state; the rest (AdamW's scalar step) is copied to every file.
    All of the layer's files are written at once, so each sharded tensor is gathered once."""
    tensors, rows, shared = dict(entries), set(entries), []
    for ln, per_state in states.items():
        for sname, v in per_state.items():
            tensors[f"{sname}.{ln}"] = v
            (rows.add if v.shape == entries[ln].shape else shared.append)(f"{sname}.{ln}")
    ids = [int(g) for g in mod.global_expert_ids]
    rels = [expert_file_name(lid, g) for g in ids]
    metas = [{"layer_id": str(lid), "global_expert_id": str(g), "params": json.dumps(sorted(entries)),
              "shared": json.dumps(sorted(shared))} for g in ids]
    infos = sharded_io.write_files([ckpt / r for r in rels] if write else None, tensors, metas, rows)
    written.update(zip(rels, infos))


def _optimizer_payload(model, optimizer, containers):
    """-> (dense state {"<state>.<name>": t}, {layer: {local name: {state: t}}}, param_groups as JSON)."""
    if optimizer is None:
        return {}, {}, None
    names = {id(p): n for n, p in model.named_parameters()}
    expert_of = {id(p): (lid, ln) for lid, (_, mod, _) in containers.items() for ln, p in mod.named_parameters()}
    dense, experts, groups = {}, {}, []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError(f"optimizer holds a parameter of shape {list(p.shape)} that is not in the model")
            for sname, v in optimizer.state.get(p, {}).items():
                if v is not None and not isinstance(v, torch.Tensor):
                    raise ValueError(f"optimizer state {sname!r} of {names[id(p)]!r} is a {type(v).__name__}; "
                                     "only tensor state is checkpointed")
                if v is not None and id(p) in expert_of:
                    lid, ln = expert_of[id(p)]
                    experts.setdefault(lid, {}).setdefault(ln, {})[sname] = v
                elif v is not None:
                    dense[f"{sname}.{names[id(p)]}"] = v
        groups.append({**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                       "params": [names[id(p)] for p in g["params"]]})
    # tensors (a tensor lr) become numbers; what JSON cannot hold (callables) becomes null = "keep live value"
    return dense, experts, json.dumps(groups, default=lambda o: o.tolist() if torch.is_tensor(o) else None)


def list_checkpoints(root) -> list:
    """Committed checkpoint dirs (those with a manifest) under ``root``, oldest step first."""
    root = storage.location(root)
    found = [(int(m.group(1)), root / name) for name in storage.list_dir(root)
             if (m := _STEP_RE.match(name)) and storage.is_file(root / name / MANIFEST)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root):
    """The dir named by ``<root>/latest`` if it is committed, else the newest committed one, else None.
    ``latest`` is only a hint: a dir it names without a manifest is not trusted."""
    root = storage.location(root)
    name = storage.read_text(root / LATEST).strip() if storage.is_file(root / LATEST) else ""
    if _STEP_RE.match(name) and storage.is_file(root / name / MANIFEST):
        return root / name
    done = list_checkpoints(root)
    return done[-1] if done else None


def remove_checkpoint(path) -> None:
    """Delete one checkpoint dir; the manifest goes first so a crash leaves it incomplete, never half-valid."""
    p = storage.location(path)
    if not _STEP_RE.match(p.name):
        raise ValueError(f"{p}: not a step_XXXXXXXX checkpoint directory; refusing to delete it")
    storage.remove_file(p / MANIFEST)
    storage.remove_tree(p)


def _resolve(path):
    p = storage.location(path)
    if storage.is_file(p / MANIFEST):
        return p
    names = storage.list_dir(p)
    if LATEST in names or any(_STEP_RE.match(n) for n in names):
        if (found := latest_checkpoint(p)) is None:
            raise CheckpointError(f"{p}: no committed checkpoint (no step_* dir has a {MANIFEST}): "
                                  "the checkpoint write did not complete")
        return found
    if names or storage.is_dir(p) or _STEP_RE.match(p.name):
        raise CheckpointError(f"{p / MANIFEST}: manifest missing: the checkpoint write did not complete "
                              "(or this is not a checkpoint directory)")
    raise CheckpointError(f"{p}: no such checkpoint directory")


def read_manifest(path_or_root) -> dict:
    """The manifest of a committed checkpoint (a step dir, or a root: its latest), plus ``"path"``."""
    path = _resolve(path_or_root) / MANIFEST
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: unsupported manifest (format_version={version!r}, "
                              f"this code reads <= {FORMAT_VERSION})")
    return {**manifest, "path": path.parent}


def _verified(manifest: dict, rel: str, dest: Path | None = None):
    """The file ``rel`` of a committed checkpoint once it is checked: listed in the manifest, present, its
    size and sha256 as listed (streamed: never held in memory whole). With ``dest``, copied there first (and
    checked as it is copied); returns the path that was checked."""
    path, entry = manifest["path"] / rel, manifest["files"].get(rel)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in {manifest['path'] / MANIFEST}")
    try:
        size, digest = storage.digest(path) if dest is None else storage.download(path, dest)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: listed in the manifest but missing") from None
    problem = (f"{size} bytes but the manifest says {entry['size']} (truncated or overwritten)"
               if size != entry["size"] else
               f"sha256 {digest} does not match the manifest's {entry['sha256']}: the file is corrupted"
               if digest != entry["sha256"] else None)
    if problem:
        if dest is not None:
            dest.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: {problem}")
    return path if dest is None else dest


@contextlib.contextmanager
def _opened(manifest: dict, rel: str):
    """(open safetensors file, its metadata) of the checked file ``rel``, to read tensors or slices of them
    (only those bytes are read); a file at a storage URI is copied to a local temporary folder first."""
    remote = isinstance(manifest["path"], storage.RemotePath)
    with tempfile.TemporaryDirectory() if remote else contextlib.nullcontext() as tmp:
        local = _verified(manifest, rel, Path(tmp) / "file" if remote else None)
        try:
            f = safe_open(str(local), framework="pt")
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"{manifest['path'] / rel}: not a valid safetensors file ({e})") from e
        with f:
            yield f, f.metadata() or {}


def fetch_files(path_or_root, names, dest) -> Path:
    """Verified local copies, in folder ``dest``, of those of ``names`` the committed checkpoint lists (for
    readers that need local files, such as a tokenizer, when the checkpoint is at a storage URI)."""
    manifest, dest = read_manifest(path_or_root), Path(dest)
    for rel in [n for n in names if n in manifest["files"]]:
        _verified(manifest, rel, dest / rel)
    return dest


def verify_files(ckpt_dir, names) -> None:
    """CheckpointError unless each of ``names`` (paths relative to the committed checkpoint ``ckpt_dir``) is
    listed in its manifest and matches its size and sha256."""
    manifest = read_manifest(ckpt_dir)
    for rel in names:
        _verified(manifest, rel)


def inspect_checkpoint(path, *, verify: bool = False) -> dict:
    """Summary of a committed checkpoint (a step dir or a root) for ``raymoe checkpoint inspect``: step,
    MoE layers, experts per layer, parameter counts and byte sizes. Reads only the manifest and safetensors
    headers unless ``verify`` (then every file's size and sha256 is checked; a mismatch raises)."""
    manifest = read_manifest(path)
    ckpt, files = manifest["path"], manifest["files"]
    for rel in files if verify else ():
        _verified(manifest, rel)

    def numel(rel, keep=lambda k: True) -> int:
        header = _header(ckpt / rel)
        return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__" and keep(k))

    experts = {int(k): v for k, v in (manifest.get("experts") or {}).items()}
    per_expert = {}
    for rel in [expert_file_name(lid, gid) for lid, ids in experts.items() for gid in ids]:
        names = set(json.loads(_header(ckpt / rel)["__metadata__"].get("params", "[]")))
        per_expert[rel] = numel(rel, names.__contains__)
    dense_params = numel(DENSE) if DENSE in files else 0

    def size(pred) -> int:
        return sum(e["size"] for rel, e in files.items() if pred(rel))

    return {"path": str(ckpt), "step": manifest["step"], "format_version": manifest["format_version"],
            "created_utc": manifest.get("created_utc"), "num_moe_layers": len(experts),
            "experts_per_layer": {lid: len(ids) for lid, ids in experts.items()}, "expert_ids": experts,
            "params": {"dense": dense_params, "experts": sum(per_expert.values()),
                       "total": dense_params + sum(per_expert.values()),
                       "per_expert": {lid: per_expert[expert_file_name(lid, ids[0])]
                                      for lid, ids in experts.items()}},
            "bytes": {"total": size(lambda r: True), "dense": size(lambda r: r == DENSE),
                      "optim_dense": size(lambda r: r == OPTIM_DENSE),
                      "experts": size(lambda r: r.startswith(EXPERT_DIR + "/")),
                      "rng": size(lambda r: r.startswith("rng"))},
            "num_files": len(files), "has_optimizer": manifest.get("optimizer") is not None,
            "has_rng": any(r.startswith("rng") for r in files),
            "config": manifest.get("config"), "extra": manifest.get("extra")}


# the commit protocol and the loader live in their own modules; they are part of this module's API
from raymoe.platform.checkpoint_commit import finalize_checkpoint  # noqa: E402
from raymoe.platform.checkpoint_load import load_checkpoint  # noqa: E402
