"""What the checkpoint commit protocol costs on a local path, against the bare writes.

A model of one MoE layer (``--experts`` experts of two ``--d`` x ``--f`` fp32 matrices, plus a dense layer) is
written as a checkpoint. Measured in alternating rounds, in one process, on one local folder:
  floor     safetensors' save_file of the same files (dense + one per expert), each fsynced: the bare writes
  save      raymoe's save_checkpoint + commit: each file written under a temporary name, hashed by its writer,
            fsynced and renamed; then the commit reads every file back, checks size and sha256, writes the
            manifest (raymoe.platform.checkpoint, checkpoint_commit, storage)
  load      load_checkpoint of it (every file read and checked against the manifest)
Printed: the median of each over ``--rounds`` rounds, and save / floor.

Usage: python benchmarks/checkpoint_storage.py [--rounds 5] [--experts 8] [--d 1024] [--f 2048] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from raymoe.platform import checkpoint as ckpt


class _Experts(nn.Module):
    def __init__(self, n: int, d: int, f: int):
        super().__init__()
        self.layer_id, self.global_expert_ids = 1, list(range(n))
        self.w1 = nn.Parameter(torch.randn(n, d, f))
        self.w2 = nn.Parameter(torch.randn(n, f, d))


class _Model(nn.Module):
    def __init__(self, n: int, d: int, f: int):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.experts = _Experts(n, d, f)


def _floor(model: _Model, folder: Path) -> None:
    """The same files written bare: save_file + fsync."""
    e = model.experts
    files = {"dense.safetensors": {k: v for k, v in model.state_dict().items() if not k.startswith("experts.")}}
    files.update({f"expert{g}.safetensors": {"w1": e.w1[i].detach().contiguous(), "w2": e.w2[i].detach().contiguous()}
                  for i, g in enumerate(e.global_expert_ids)})
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
        fd = os.open(folder / name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--f", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="smoke size: 4 experts of 128 x 256, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.experts, args.d, args.f = 2, 4, 128, 256
    model = _Model(args.experts, args.d, args.f)
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    times: dict[str, list[float]] = {"floor": [], "save": [], "load": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for r in range(args.rounds):
            bare, root = Path(tmp) / f"bare{r}", Path(tmp) / f"ckpt{r}"
            bare.mkdir()
            t0 = time.perf_counter()
            _floor(model, bare)
            t1 = time.perf_counter()
            ckpt.save_checkpoint(root, 1, model, None, rng=False)
            t2 = time.perf_counter()
            ckpt.load_checkpoint(root, model, restore_rng=False)
            t3 = time.perf_counter()
            for name, secs in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(secs)
            shutil.rmtree(bare)
            shutil.rmtree(root)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint of {mb:.0f} MiB ({args.experts} expert files + dense), {args.rounds} rounds, median s:")
    for name, secs in med.items():
        print(f"{name:6s} {secs:8.3f}")
    print(f"save/floor {med['save'] / med['floor']:.2f}")


if __name__ == "__main__":
    main()
