"""Safetensors files written and read a tensor at a time, for whole tensors and FSDP2 shards (DTensors) alike.

Writing: :func:`header` is a file's header from the names, dtypes and shapes known up front (byte-identical to
what ``safetensors.torch.save_file`` writes, with the metadata keys sorted: safetensors writes them in a
random order), then each tensor's bytes go out in the file's order as they arrive (:func:`write_files`), so a
sharded tensor is gathered whole only when it is written, only by the rank that writes it, and dropped right
after. Reading: :func:`layout` says which part of a tensor this rank holds, so a reader takes only those bytes
from a file (``safetensors.safe_open(...).get_slice(name)[index]``) and :func:`like` makes them a DTensor laid
out like the parameter (FSDP2's optimizer expects its state so).
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from raymoe.platform import storage

# safetensors' dtype names, in the order of its Dtype enum: a file holds its tensors by dtype, last first, then
# by name (the float8 variants whose place is not known here are refused rather than misplaced)
_DTYPE_ORDER = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
                (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"),
                (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"),
                (torch.float32, "F32"), (torch.complex64, "C64"), (torch.float64, "F64"), (torch.int64, "I64"),
                (torch.uint64, "U64")]
_NAME = {d: n for d, n in _DTYPE_ORDER}
_RANK = {d: i for i, (d, _) in enumerate(_DTYPE_ORDER)}
DTYPES = {n: d for d, n in _DTYPE_ORDER}  # safetensors' name -> torch dtype

Specs = dict  # {name: (torch dtype, shape)}


def _name(dtype: torch.dtype) -> str:
    if dtype not in _NAME:
        raise ValueError(f"dtype {dtype} cannot be written here; allowed: {sorted(map(str, _NAME))}")
    return _NAME[dtype]


def order(specs: Specs) -> list[str]:
    """The names of ``specs`` in the order their bytes follow in the file."""
    for dtype, _ in specs.values():
        _name(dtype)  # a dtype that cannot be written is refused by name
    return sorted(specs, key=lambda k: (-_RANK[specs[k][0]], k))


def header(specs: Specs, metadata: dict[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file of tensors ``specs`` ({name: (dtype, shape)}): the header's length,
    then its JSON (``metadata`` keys sorted), padded with spaces to a multiple of 8 bytes."""
    head, offset = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}, 0
    for k in order(specs):
        dtype, shape = specs[k]
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        head[k] = {"dtype": _name(dtype), "shape": [int(n) for n in shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as a file holds them (little-endian, row-major), without a copy if ``t`` is a
    contiguous CPU tensor."""
    assert sys.byteorder == "little", "safetensors files are little-endian"
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor's full tensor (a collective over its mesh: every rank of it calls, in the same
    order), else ``t`` itself; detached."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _writing_members(t: DTensor, writes: bool) -> list[int]:
    """The indices, in ``t``'s mesh, of the ranks that write files (a collective over the mesh)."""
    group = t.device_mesh.get_group()
    flags = [torch.zeros(1, dtype=torch.int32, device=t.device) for _ in range(group.size())]
    dist.all_gather(flags, torch.tensor([int(writes)], dtype=torch.int32, device=t.device), group=group)
    return [i for i, f in enumerate(flags) if f.item()]


def gather_to(t: DTensor, dst: int) -> torch.Tensor | None:
    """``t`` whole on the rank at index ``dst`` of its mesh, None on the others, which only send their part
    (a collective over the mesh). FSDP2 splits as ``torch.chunk``: part i starts at i * ceil(n / mesh size) and
    the last parts may be short or empty, so every part travels padded to that size. Point to point, each part
    straight into its place in the whole tensor (gloo's gather collects into a buffer of its own first)."""
    (placement,) = t.placements
    if not isinstance(placement, Shard):
        return t.to_local().detach()  # replicated: every rank of the mesh holds it whole
    group, d = t.device_mesh.get_group(), placement.dim
    n, size, part = group.size(), t.shape[placement.dim], t.to_local().detach()
    chunk = -(-size // n)
    if part.shape[d] != chunk:
        padded = part.new_zeros(part.shape[:d] + (chunk,) + part.shape[d + 1:])
        padded.narrow(d, 0, part.shape[d]).copy_(part)
        part = padded
    if group.rank() != dst:
        dist.send(part.contiguous(), dst=dist.get_global_rank(group, dst), group=group)
        return None
    out = part.new_empty(part.shape[:d] + (chunk * n,) + part.shape[d + 1:])
    for i, place in enumerate(out.chunk(n, dim=d)):
        if i == dst:
            place.copy_(part)
        elif d == 0:  # rows of the whole tensor: contiguous, received in place
            dist.recv(place, src=dist.get_global_rank(group, i), group=group)
        else:
            got = torch.empty_like(part)
            dist.recv(got, src=dist.get_global_rank(group, i), group=group)
            place.copy_(got)
    return out.narrow(d, 0, size)


def write_files(locations: list | None, tensors: dict[str, torch.Tensor], metadata: list[dict[str, str]],
                rows: set[str] = frozenset()) -> list[dict]:
    """Write one safetensors file per entry of ``metadata`` at ``locations`` (each whole or not at all, see
    :func:`storage.write_file`); returns their {"size", "sha256"}.

    File j holds every tensor of ``tensors`` whole, or its row j for the names in ``rows``. Tensors are taken
    one at a time in the files' order, a DTensor gathered whole just then and dropped once written, so this
    rank holds at most one whole tensor beyond its shards. Collective for DTensors: every rank of their meshes
    calls with the same names, dtypes and shapes; with ``locations`` None it writes nothing, only takes part
    in those gathers (a tensor it holds whole is not even read). A DTensor is gathered whole only where it is
    written: to the one rank of its mesh that writes (the others send their shards and never hold it whole),
    to every rank when several write, not at all when none does."""
    specs = {k: (t.dtype, tuple(t.shape[1:] if k in rows else t.shape)) for k, t in tensors.items()}
    writers: dict[int, list[int]] = {}  # id of a DTensor's mesh -> the indices of its ranks that write
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(storage.write_file(loc)) for loc in locations or ()]
        for out, meta in zip(outs, metadata):
            out.write(header(specs, meta))
        for k in order(specs):
            t = tensors[k]
            if isinstance(t, DTensor):
                if id(t.device_mesh) not in writers:  # every rank of the mesh meets its first tensor here
                    writers[id(t.device_mesh)] = _writing_members(t, bool(outs))
                who = writers[id(t.device_mesh)]
                full = None if not who else gather_to(t, who[0]) if len(who) == 1 else whole(t)
            else:
                full = t.detach() if outs else None
            if full is not None:
                for j, out in enumerate(outs):
                    out.write(tensor_bytes(full[j] if k in rows else full))
            del full
    return [{"size": out.size, "sha256": out.sha256} for out in outs]


def layout(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset in the whole tensor) of the part of ``t`` this rank holds: a DTensor's local shard, else
    all of ``t``."""
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.dim()


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (a DTensor's local tensor, else ``t``): writing into it writes ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def index(t: torch.Tensor, row: int | None = None) -> tuple[int | None, tuple[slice, ...]] | None:
    """Where this rank's part of ``t`` lies in the whole tensor: ``(None, index)``; with ``row``, of row ``row``
    of ``t``: ``(its row in the local part, index within the row)``, or None if this rank holds none of it."""
    shape, offset = layout(t)
    slices = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    if row is None:
        return None, slices
    if not slices[0].start <= row < slices[0].stop:
        return None
    return row - slices[0].start, slices[1:]


def like(part: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``part`` (this rank's part, as :func:`layout` of ``t`` says) laid out like ``t``, on its device: a DTensor
    with ``t``'s mesh and placements if ``t`` is one, else a tensor. No communication."""
    part = part.to(local(t).device)  # what a file gives is on the CPU
    if not isinstance(t, DTensor):
        return part
    return DTensor.from_local(part, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
