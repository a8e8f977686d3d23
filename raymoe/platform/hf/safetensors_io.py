"""Safetensors files of a Hugging Face folder, read tensor by tensor and written shard by shard.

Reading parses only the JSON headers when a folder is opened; a tensor's bytes are read (``os.preadv``, no
mmap) when it is asked for, straight into the destination when dtype and layout allow, so loading a model
costs one copy of the weights plus one tensor, and a caller that asks only for some tensors (an
expert-parallel shard: its own experts) reads only their bytes (``bytes_read`` counts them).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import HFFormatError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_HEADER_LIMIT = 100 << 20  # safetensors' own bound on the header size


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors listed in the header of safetensors file ``path`` (nothing else is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= _HEADER_LIMIT else b""
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise HFFormatError(f"{path}: no such file") from None
    try:
        header = json.loads(raw) if len(raw) == n and n > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise HFFormatError(f"{path}: not a safetensors file (unreadable header)")
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise HFFormatError(f"{path}: tensor {key!r} has dtype {entry.get('dtype')!r}; supported: "
                                f"{sorted(DTYPES)}")
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        numel = 1
        for d in shape:
            numel *= d
        info = TensorInfo(path, dtype, shape, 8 + n + begin, 8 + n + end)
        if end - begin != numel * dtype.itemsize or info.end > size:
            raise HFFormatError(f"{path}: tensor {key!r} ({entry.get('dtype')} {list(shape)}) has a byte range "
                                f"[{begin}, {end}) that does not fit its shape or the file (truncated?)")
        out[key] = info
    return out


class SafetensorsFolder:
    """The tensors of a Hugging Face folder: ``model.safetensors`` or the shards ``model.safetensors.index.json``
    lists. Use as a context manager (file descriptors stay open until ``close``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._slices: dict = {}  # file -> safe_open handle, for read_block
        self.tensors: dict[str, TensorInfo] = {}
        index = self.folder / INDEX
        if index.is_file():
            self._open_index(index)
        elif (self.folder / SINGLE).is_file():
            self.tensors = read_header(self.folder / SINGLE)
        else:
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            raise HFFormatError(f"{self.folder}: neither {SINGLE} nor {INDEX} found (safetensors files there: "
                                f"{others or 'none'}; .bin/.pt weights are not supported)")

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise HFFormatError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (self.folder / name).is_file()]
        if missing:
            raise HFFormatError(f"{self.folder / missing[0]}: shard file missing (listed in {index}; "
                                f"{len(missing)} of {len(files)} shards missing: {missing[:4]})")
        headers = {name: read_header(self.folder / name) for name in files}
        for key, name in weight_map.items():
            if key not in headers[name]:
                raise HFFormatError(f"{self.folder / name}: has no tensor {key!r}, which {index} places there")
            self.tensors[key] = headers[name][key]

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._slices.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise HFFormatError(f"{self.folder}: tensor {key!r} is missing from the safetensors files")
        return self.tensors[key]

    def read_block(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The block ``index`` (a slice per dim) of tensor ``key``, in its stored dtype: only the bytes of that
        block are read (safetensors' memory-mapped slices), for a rank that holds part of a tensor."""
        info = self.info(key)
        handle = self._slices.get(info.file)
        if handle is None:
            handle = self._slices[info.file] = safe_open(str(info.file), framework="pt")
        block = handle.get_slice(key)[index]
        self.bytes_read += block.numel() * block.element_size()
        return block

    def read(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor ``key`` (in its stored dtype); with ``out`` (contiguous, same dtype and shape) its bytes are
        read straight into ``out``, which is returned."""
        info = self.info(key)
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
            raise ValueError(f"read({key!r}, out=...): out must be contiguous {info.dtype} {list(info.shape)}")
        nbytes = info.end - info.start
        if nbytes:
            view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise HFFormatError(f"{info.file}: tensor {key!r} ends past the end of the file (truncated)")
                done += got
            self.bytes_read += nbytes
        return out


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB' (HF's max_shard_size spelling)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        s = str(size).strip().upper()
        units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        unit = next((u for u in units if s.endswith(u)), "")
        try:
            value = int(float(s[: len(s) - len(unit)]) * units.get(unit, 1))
        except ValueError:
            raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MB'") from None
    if value < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte; got {size!r}")
    return value


def write_sharded(out: Path, items: Iterable[tuple[str, int, Callable[[], torch.Tensor]]],
                  max_shard_size: int) -> list[str]:
    """Write tensors ``(name, nbytes, make)`` into ``model.safetensors`` or, past ``max_shard_size`` bytes,
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. ``make()`` builds a
    tensor only when its shard is written, so memory holds one shard at a time. Returns the file names."""
    shards: list[list[tuple[str, Callable]]] = [[]]
    size, total = 0, 0
    for name, nbytes, make in items:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
        total += nbytes
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        tensors = {}
        for name, make in shard:
            tensors[name] = make().detach().to("cpu").contiguous()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
