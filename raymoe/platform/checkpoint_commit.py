"""Committing a checkpoint: the writers' files are checked in the storage, then the manifest is written last.

A checkpoint (see :mod:`raymoe.platform.checkpoint`) is committed iff its ``manifest.json`` exists. Each writer
(a rank of the training world) writes its files, each whole or not at all, then an index of what it wrote (each
file's size and sha256). The committer reads every index, lists the checkpoint in the storage, reads every
listed file back from the storage (not from a local copy: on a cluster without a shared file system, or on an
object store, the committer's disk holds nothing) and checks its size and sha256 against the writer's; any
missing index or file, or any mismatch, raises ``CheckpointError`` and nothing is written, so the previous
committed checkpoint stays the latest. Then the manifest (every file's size and sha256) is written as the last
object, and ``latest`` (a hint) after it. No rename is needed, so this works on object stores.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from raymoe.platform import storage
from raymoe.platform.checkpoint import (_EXPERT_RE, _STEP_RE, FORMAT_VERSION, LATEST, MANIFEST, OPTIM_DENSE,
                                        CheckpointError, _header, _written_file)


def finalize_checkpoint(ckpt_dir, *, step: int | None = None, config: dict | None = None,
                        extra: dict | None = None, expected_experts: dict[int, int] | None = None,
                        update_latest: bool = True, tokenizer=None, writer_ranks=None):
    """Commit a checkpoint dir: check its files in the storage, write ``manifest.json`` (last), then ``latest``.

    Call it once, after every writer's ``save_checkpoint(..., write_manifest=False)`` returned.
    ``writer_ranks`` (e.g. ``range(world)``): the ranks that wrote it; each one's index of written files must be
    there, and every file it lists must be in the storage with the size and sha256 its writer wrote (read back
    from the storage, never from a local copy), else CheckpointError and nothing is committed. Without
    ``writer_ranks`` every file present is taken as it is (in-memory copies). ``expected_experts``
    ({layer_id: num_experts}) refuses to commit unless each such layer has exactly experts 0..n-1. ``step``
    defaults to the one in the directory name. ``tokenizer``: a `raymoe.platform.tokenizer.Tokenizer` whose
    files are written into the checkpoint first (so the manifest lists and hashes them, and eval, generate and
    serve find the tokenizer the model was trained with).
    """
    ckpt = storage.location(ckpt_dir)
    if step is None:
        if not (m := _STEP_RE.match(ckpt.name)):
            raise ValueError(f"step not given and {ckpt.name!r} is not a step_XXXXXXXX directory")
        step = int(m.group(1))
    claims = None if writer_ranks is None else _writer_claims(ckpt, writer_ranks)
    if tokenizer is not None:
        written = _save_tokenizer(ckpt, tokenizer)
        claims = None if claims is None else {**claims, **{rel: [e] for rel, e in written.items()}}
    files = _stored_files(ckpt, claims)
    experts: dict[int, list[int]] = {}
    for m in filter(None, map(_EXPERT_RE.match, files)):
        experts.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    for lid, n in (expected_experts or {}).items():
        if sorted(experts.get(lid, [])) != list(range(n)):
            raise CheckpointError(f"{ckpt}: layer {lid} should have experts 0..{n - 1}, found "
                                  f"{sorted(experts.get(lid, []))}; not committing")
    groups = None
    if OPTIM_DENSE in files:
        groups = json.loads(_header(ckpt / OPTIM_DENSE)["__metadata__"]["param_groups"])
    manifest = {"format_version": FORMAT_VERSION, "step": step, "created": time.time(),
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": config, "extra": extra, "files": files,
                "experts": {str(k): sorted(v) for k, v in sorted(experts.items())},
                "optimizer": None if groups is None else {"param_groups": groups}}
    storage.write_bytes(ckpt / MANIFEST, json.dumps(manifest, indent=1).encode())
    if update_latest:
        storage.write_bytes(ckpt.parent / LATEST, (ckpt.name + "\n").encode())
    return ckpt


def _writer_claims(ckpt, ranks) -> dict[str, list[dict]]:
    """{file: [{"size", "sha256"} as each writer of it wrote it]} from the writers' indexes."""
    claims: dict[str, list[dict]] = {}
    for rank in ranks:
        index = ckpt / _written_file(rank)
        try:
            written = json.loads(storage.read_bytes(index))
        except FileNotFoundError:
            raise CheckpointError(f"{index}: missing: rank {rank} did not finish writing its part of the "
                                  "checkpoint; not committing") from None
        for rel, entry in written.items():
            claims.setdefault(rel, []).append(entry)
    return claims


def _save_tokenizer(ckpt, tokenizer) -> dict[str, dict]:
    """Write the tokenizer's files into the checkpoint; returns their {"size", "sha256"}."""
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for p in sorted(Path(tmp).iterdir()):
            size, sha = storage.digest(p)
            storage.upload(p, ckpt / p.name)
            written[p.name] = {"size": size, "sha256": sha}
    return written


def _stored_files(ckpt, claims: dict[str, list[dict]] | None) -> dict[str, dict]:
    """{file: {"size", "sha256"}} of the checkpoint's files as the storage holds them: those ``claims`` lists
    (each must match what one of its writers wrote), or, without claims, every file present."""
    present = {rel: size for rel, size in storage.list_files(ckpt).items()
               if rel != MANIFEST and not any(part.startswith(".") for part in rel.split("/"))}
    files = {}
    for rel in sorted(present if claims is None else claims):
        if rel not in present:
            raise CheckpointError(f"{ckpt / rel}: written by a shard but not in the storage; not committing")
        size, sha = storage.digest(ckpt / rel)
        wrote = (claims or {}).get(rel)
        if wrote is not None and size not in {w["size"] for w in wrote}:
            raise CheckpointError(f"{ckpt / rel}: {size} bytes in the storage but its writer wrote "
                                  f"{sorted({w['size'] for w in wrote})} (truncated or overwritten); not committing")
        if wrote is not None and sha not in {w["sha256"] for w in wrote}:
            raise CheckpointError(f"{ckpt / rel}: sha256 {sha} in the storage does not match what its writer "
                                  "wrote: the file is corrupted; not committing")
        files[rel] = {"size": size, "sha256": sha}
    return files
