"""What raymoe's malloc settings (raymoe.platform.host_memory.tune_malloc) buy a CPU process.

Each measurement runs in a fresh child process (glibc settings are per process and cannot be undone), without
any ``MALLOC_*`` variables, once with ``RAYMOE_TUNE_MALLOC=0`` (glibc's defaults) and once with the settings
that raymoe's CLI, ExpertShard actors and serving engines apply. The two kinds alternate for ``--rounds``
rounds on the same machine. Cases, all fp32, forward + backward:
  moe-E32     the MoE layer at T2048 D1024 F256 E32 k4, dropless (benchmarks/moe_layer.py's shape)
  dense-E32   its dense pair (gelu MLP over T*k rows)
  tiny-step   one training step (AdamW) of cluster_configs/local_tiny.yaml's GPT-MoE, the README's main job
Printed per case: median over rounds of each child's best time, minor page faults per call, and
default / tuned time (> 1: the tuned process is faster).

Usage: python benchmarks/host_memory.py [--rounds 3] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _case_fns(quick: bool):
    import torch
    import torch.nn.functional as F

    from raymoe.config import load_config
    from raymoe.platform.model import GPT
    from raymoe.platform.moe import MoE
    from raymoe.platform.train_step import build_optimizer, train_step
    from raymoe.platform.model_io import gpt_config_from

    T, D, Fd, E, k = (256, 128, 64, 8, 2) if quick else (2048, 1024, 256, 32, 4)
    torch.manual_seed(0)
    moe = MoE(D, Fd, num_experts=E, k=k, drop_tokens=False).train()
    x = torch.randn(T, D, requires_grad=True)
    gy, one = torch.randn(T, D), torch.ones(())
    noise = moe.draw_noise(T)
    xd = torch.randn(T * k, D, requires_grad=True)
    w1 = (torch.randn(D, Fd) * 0.02).requires_grad_()
    w2 = (torch.randn(Fd, D) * 0.02).requires_grad_()
    gd = torch.randn(T * k, D)

    def moe_step():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y, l_aux, _ = moe(x, noise=noise)
        torch.autograd.backward([y, l_aux], [gy, one])

    def dense_step():
        xd.grad = w1.grad = w2.grad = None
        (F.gelu(xd @ w1, approximate="tanh") @ w2).backward(gd)

    cfg = load_config(str(ROOT / "cluster_configs" / "local_tiny.yaml"), [])
    model = GPT(gpt_config_from(cfg)).train()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    B, L = cfg.train.global_batch_size, cfg.model.block_size
    tokens = torch.randint(0, 256, (B, L + 1))

    def tiny_step():
        train_step(model, opt, [(tokens[:, :-1], tokens[:, 1:])], lr=1e-3, grad_clip=1.0)

    return {"moe-E32": moe_step, "dense-E32": dense_step, "tiny-step": tiny_step}


def child(reps: int, quick: bool) -> dict:
    """Best time and minor page faults per call of every case, in this process."""
    from raymoe.platform.host_memory import tune_malloc

    tuned = tune_malloc()
    out = {"tuned": tuned}
    for name, fn in _case_fns(quick).items():
        fn()
        fn()
        times, faults = [], 0
        for _ in range(reps):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        out[name] = (min(times), faults / reps)
    return out


def _run_child(tune: bool, reps: int, quick: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["RAYMOE_TUNE_MALLOC"] = "1" if tune else "0"
    argv = [sys.executable, __file__, "--child", "--reps", str(reps)] + (["--quick"] if quick else [])
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"child failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["tuned"] != tune:
        raise SystemExit(f"child with RAYMOE_TUNE_MALLOC={int(tune)} reports tuned={out['tuned']}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1 round, 2 reps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick and not args.child:
        args.rounds, args.reps = 1, 2
    if args.child:
        print(json.dumps(child(args.reps, args.quick)))
        return
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both kinds alike
        for tune in (False, True):
            runs[tune].append(_run_child(tune, args.reps, args.quick))
    print(f"{args.rounds} rounds x {args.reps} reps per child process; times: median over rounds of each "
          f"child's best")
    print(f"{'case':<12}{'default ms':>12}{'faults':>9}{'tuned ms':>11}{'faults':>9}{'default/tuned':>15}")
    for name in runs[False][0]:
        if name == "tuned":
            continue
        d_ms, t_ms = (statistics.median(r[name][0] for r in runs[t]) * 1e3 for t in (False, True))
        d_pf, t_pf = (statistics.median(r[name][1] for r in runs[t]) for t in (False, True))
        print(f"{name:<12}{d_ms:>12.2f}{d_pf:>9.0f}{t_ms:>11.2f}{t_pf:>9.0f}{d_ms / t_ms:>15.2f}")


if __name__ == "__main__":
    main()
