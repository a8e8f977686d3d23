"""The streaming safetensors writer (raymoe.platform.sharded_io): byte-identical to safetensors.torch.save_file
for every dtype, shape (scalars, empty tensors) and metadata, written through storage.write_file (whole or
nothing, its size and sha256)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.platform import sharded_io, storage

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2]


def _tensor(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _streamed(path, tensors: dict, metadata) -> dict:
    return sharded_io.write_files([path], tensors, [metadata])[0]


CASES = {
    "every dtype": {f"t{i}": _tensor(d, (3, 2), i) for i, d in enumerate(DTYPES)},
    "scalars and empty": {"s": torch.tensor(1.5), "e": torch.zeros(0, 4), "e0": torch.zeros(0), "v": torch.ones(5),
                          "i": torch.tensor(7, dtype=torch.int64), "z": torch.zeros(2, 0, 3, dtype=torch.bfloat16)},
    "names out of order": {"b.w": torch.ones(2, 3), "a.w": torch.zeros(4), "c": torch.arange(6.0).reshape(3, 2),
                           "A": torch.tensor([1, 2], dtype=torch.int8)},
    "odd sizes": {"x": torch.randn(7, 3), "y": torch.arange(5, dtype=torch.int8), "z": torch.randn(1, 1, 13)},
    "nothing": {},
}
METADATA = [None, {}, {"aliases": json.dumps({"lm_head.weight": "wte.weight"})},
            {"q": 'x"\n\t\x01/\u00e9\\ \u2603'}]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("meta", range(len(METADATA)))
def test_streamed_file_equals_save_file(tmp_path, case, meta):
    tensors, metadata = CASES[case], METADATA[meta]
    if not tensors and metadata == {}:
        pytest.skip("safetensors writes the header {},\"__metadata__\":{}} for this case (not JSON)")
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    info = _streamed(tmp_path / "streamed.safetensors", tensors, metadata)
    want, got = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "streamed.safetensors").read_bytes()
    assert got == want
    assert info == {"size": len(got), "sha256": hashlib.sha256(got).hexdigest()}


def test_metadata_keys_are_sorted_so_the_bytes_are_the_same_every_time(tmp_path):
    # safetensors writes several metadata keys in a random order (a hash map): the same header otherwise
    tensors = {"w": torch.randn(4, 3), "step": torch.tensor(3.0)}
    metadata = {"layer_id": "1", "global_expert_id": "12", "params": json.dumps(["w"]), "shared": "[]"}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    _streamed(tmp_path / "streamed.safetensors", tensors, metadata)
    want, got = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "streamed.safetensors").read_bytes()

    def header(b: bytes):
        n = struct.unpack("<Q", b[:8])[0]
        return n, json.loads(b[8:8 + n]), b[8 + n:]

    (n_want, h_want, data_want), (n_got, h_got, data_got) = header(want), header(got)
    assert (n_got, h_got, data_got) == (n_want, h_want, data_want)
    assert list(h_got["__metadata__"]) == sorted(metadata)
    for name, t in load_file(str(tmp_path / "streamed.safetensors")).items():
        assert torch.equal(t, tensors[name])


def test_rows_go_to_one_file_each(tmp_path):
    # file j holds row j of the row entries and the other entries whole (an expert file per expert)
    w, step = torch.randn(3, 4, 2), torch.tensor(5.0)
    paths = [tmp_path / f"e{j}.safetensors" for j in range(3)]
    infos = sharded_io.write_files(paths, {"w": w, "step.w": step}, [{"id": str(j)} for j in range(3)], {"w"})
    for j, (p, info) in enumerate(zip(paths, infos)):
        save_file({"w": w[j].contiguous(), "step.w": step}, str(tmp_path / "ref"), metadata={"id": str(j)})
        assert p.read_bytes() == (tmp_path / "ref").read_bytes()
        assert info["size"] == p.stat().st_size


def test_a_failed_write_leaves_no_file(tmp_path):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with storage.write_file(tmp_path / "f.safetensors") as out:
            out.write(b"partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="dtype torch.float8_e4m3fnuz cannot be written here; allowed"):
        _streamed(tmp_path / "f", {"x": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}, None)
