"""Loading a Hugging Face folder: peak memory / model bytes, and the bytes an expert-parallel shard reads.

A random Mixtral-shaped raymoe model (a few hundred MB in fp32; --quick: a few MB) is exported with
raymoe's exporter as (a) one model.safetensors, (b) shards + model.safetensors.index.json, (c) one bf16 file.
Each load then runs in a fresh child process (raymoe's malloc settings, as its CLI and shards use), which
builds the model and fills it; printed per case, measured side by side in this run:
  peak/model   peak RSS increase while building + loading / bytes of the model's tensors (1.0 = the model
               itself and nothing else; a load that reads the whole file first needs ~2)
  read/file    tensor bytes read from the safetensors files / tensor bytes in them
The "whole-file" case is the naive way for comparison: safetensors.torch.load_file of every file, then copy.
"ep2-rank0" builds only rank 0's experts of an expert-parallel size 2 (as an ExpertShard does) and reads only
their tensors.

Usage: python benchmarks/hf_load.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {  # ~420 MB fp32 / ~6 MB
    "full": dict(vocab_size=16000, d_model=768, n_layer=4, n_head=12, n_kv_head=4, expert_ffn=1024, num_experts=8),
    "quick": dict(vocab_size=1000, d_model=128, n_layer=2, n_head=4, n_kv_head=2, expert_ffn=256, num_experts=8),
}


def _config(size: str):
    from raymoe.config import MoEArgs
    from raymoe.platform.model import GPTConfig

    s = dict(SIZES[size])
    return GPTConfig(**s, block_size=4096, d_ff=s["expert_ffn"], bias=False, norm="rmsnorm", position="rope",
                     mlp="swiglu", tie_embeddings=False, moe_layers=list(range(s["n_layer"])),
                     moe=MoEArgs(k=2, router="softmax_topk", norm_topk_prob=True))


class _NoExchange:
    """Stands in for the all-to-all dispatcher: the shard is only built and loaded here."""
    local_expert_ids = None


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak RSS (VmHWM) of this process to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(case: str, folder: str) -> dict:
    import torch

    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    cfg = hf.config_from_folder(folder)
    torch.ones(1).add_(1)  # torch's own lazy allocations happen before the baseline
    base = _rss_bytes("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    if case == "ep2-rank0":
        def kwargs(layer_id, n):
            return {"ep_size": 2, "dispatcher": _NoExchange(), "global_expert_ids": list(range(n // 2))}
        model = GPT(cfg, moe_kwargs=kwargs)
    else:
        model = GPT(cfg)
    if case == "whole-file":
        from safetensors.torch import load_file

        tensors = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            tensors.update(load_file(f))
        state = model.state_dict()
        with torch.no_grad():
            for m in hf.weight_maps(model, hf.family_for(cfg)):
                for name, view in m.pieces(state[m.ours]):
                    view.copy_(tensors[name].t() if m.transpose else tensors[name])
        read = sum(t.numel() * t.itemsize for t in tensors.values())
        del tensors
    else:
        read = hf.load_weights(model, folder)["bytes_read"]
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM") - base
    model_bytes = sum(t.numel() * t.itemsize for t in model.state_dict().values())
    return {"peak": peak, "model_bytes": model_bytes, "read": read, "seconds": seconds, "exact_peak": exact}


def _file_bytes(folder: Path) -> int:
    from raymoe.platform.hf import SafetensorsFolder

    with SafetensorsFolder(folder) as st:
        return sum(i.end - i.start for i in st.tensors.values())


def _export(tmp: Path, size: str) -> dict[str, Path]:
    import torch

    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    torch.manual_seed(0)
    model = GPT(_config(size))
    shard = "100MB" if size == "full" else "1MB"
    folders = {"single": tmp / "single", "sharded": tmp / "sharded", "bf16": tmp / "bf16"}
    hf.export_model(model, folders["single"], max_shard_size="100GB")
    hf.export_model(model, folders["sharded"], max_shard_size=shard)
    hf.export_model(model, folders["bf16"], max_shard_size="100GB", dtype=torch.bfloat16)
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few MB instead of a few hundred")
    ap.add_argument("--keep", default=None, help="write the folders here (default: a temporary folder)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--no-reexec", action="store_true", help="do not re-execute with raymoe's malloc settings")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()
    size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        folders = _export(tmp, size)
        runs = [("single", "single"), ("sharded", "sharded"), ("bf16->fp32", "bf16"), ("ep2-rank0", "single"),
                ("whole-file", "single")]
        print(f"model: {SIZES[size]} (Mixtral-shaped, fp32 in memory); files: "
              + ", ".join(f"{k} {_file_bytes(v) / 1e6:.1f} MB" for k, v in folders.items()))
        print(f"{'case':12s} {'model MB':>9s} {'peak MB':>8s} {'peak/model':>10s} {'read MB':>8s} "
              f"{'read/file':>9s} {'seconds':>8s}")
        for case, folder in runs:
            out = subprocess.run([sys.executable, __file__, "--child", case if case in ("ep2-rank0", "whole-file")
                                  else "stream", str(folders[folder])], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            file_bytes = _file_bytes(folders[folder])
            note = "" if r["exact_peak"] else "  (peak from ru_maxrss)"
            print(f"{case:12s} {r['model_bytes'] / 1e6:9.1f} {r['peak'] / 1e6:8.1f} "
                  f"{r['peak'] / r['model_bytes']:10.2f} {r['read'] / 1e6:8.1f} {r['read'] / file_bytes:9.2f} "
                  f"{r['seconds']:8.2f}{note}")


if __name__ == "__main__":
    main()
