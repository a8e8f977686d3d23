"""MoE layer benchmark: fast index-based path vs a dense GEMM pair vs the dense one-hot einsum reference.

Ratios are measured side by side in one run (DESIGN.md "Performance method"):
  times are the minimum over interleaved reps (the machine may be shared; min is the least-disturbed run)
  useful GF/s        = useful FLOPs / MoE time; useful FLOPs = 2 * M * 2 * D * F forward (x3 for fwd+bwd),
                       M = kept token-choices (T*k when dropless)
  dense-equivalence  = time of a dense pair gelu(x_ND @ w1_DF) @ w2_FD with N = T*k rows (DESIGN.md's definition;
                       in drop mode the MoE computes only the kept M <= N, useful GF/s counts those) in the
                       same dtype / MoE time (both start each rep with grads set to None, as a training step
                       after zero_grad does)
  ref/fast           = einsum reference time / fast time (reference timed with fewer reps, after all fast cases)
  layout             = how the experts ran (MoE.last_stats.layout): slots (a padded [E, C, D] buffer, batched
                       GEMMs; the layer picks it when the kept rows fill >= 0.8 of the slots, C = the largest
                       kept count) or segments (variable segments, grouped GEMM); --min-fill 0 forces slots,
                       2 segments; fill = kept rows / (E * largest kept count)

Usage: python benchmarks/moe_layer.py [--quick] [--shapes T4096_D512 ...] [--modes dropless cf1.0 cf1.25]
       [--router deepspeed|softmax_topk|sigmoid_group] [--activation gelu|swiglu] [--drop-policy probs|position]
       (swiglu: the dense pair is a SwiGLU pair too and the useful FLOPs count its three projections)
       [--cpu-time]   (1 thread timed by its CPU time: stable on a machine shared with other jobs)
       [--device cuda [--dtype bf16]]   (GPU: timed with synchronize; bf16 runs the experts and the dense pair
                                         in bf16 under autocast, the gate stays fp32, as in training)
glibc reads MALLOC_MMAP_THRESHOLD_ at process start only, so the script re-executes itself with it set
(large fresh tensors otherwise come from mmap and pay page faults on every allocation).
"""

from __future__ import annotations

import argparse
import os

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from raymoe.platform.moe import MoE  # noqa: E402
from raymoe.platform.moe.reference import reference_forward  # noqa: E402

SHAPES = {  # name: (T, D, F, E, k)
    "T4096_D512_F2048_E8_k2": (4096, 512, 2048, 8, 2),
    "T1024_D128_F512_E16_k2": (1024, 128, 512, 16, 2),
    "T4096_D256_F128_E64_k8": (4096, 256, 128, 64, 8),
    "T2048_D1024_F256_E32_k4": (2048, 1024, 256, 32, 4),
}
MODES = {"dropless": None, "cf1.0": 1.0, "cf1.25": 1.25}


CLOCK = time.perf_counter
DEVICE = torch.device("cpu")
DTYPE = torch.float32


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _times(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync()
        t0 = CLOCK()
        fn()
        _sync()
        ts.append(CLOCK() - t0)
    return ts


def _autocast():
    return torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32)


def _bench_case(T, D, Fd, E, k, cf, backward: bool, reps: int, ref_reps: int, only_ref: bool = False,
                min_fill: float | None = None, segment_loop: bool = False, router: str = "deepspeed",
                activation: str = "gelu", drop_policy: str = "probs"):
    """Times of the fast path and the dense pair (interleaved), or with ``only_ref`` the einsum reference."""
    torch.manual_seed(0)
    extra = {} if min_fill is None else {"capacity_layout_min_fill": min_fill}
    if router == "sigmoid_group":
        extra.update(n_group=min(E, 8), topk_group=min(E, 8) // 2 or 1)
    moe = MoE(D, Fd, num_experts=E, k=k, capacity_factor=cf or 1.0, drop_tokens=cf is not None,
              min_capacity=4, router=router, activation=activation, drop_policy=drop_policy,
              **extra).to(DEVICE).train()
    moe.experts.force_fallback = segment_loop
    x = torch.randn(T, D, device=DEVICE, requires_grad=backward)
    gy = torch.randn(T, D, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    noise = moe.draw_noise(T)

    def fast():
        moe.zero_grad(set_to_none=True)  # as a training step does: backward writes fresh grads, no accumulation
        x.grad = None
        with _autocast():
            y, l_aux, _ = moe(x, noise=noise)
        if backward:
            torch.autograd.backward([y, l_aux], [gy, one])

    def ref():
        with _autocast():
            o = reference_forward(moe, x, noise=noise)
        if backward:
            torch.autograd.backward([o.y, o.l_aux], [gy, one])

    if only_ref:
        return min(_times(ref, ref_reps, 1))
    fast()
    M, N = int(moe.last_stats.kept_counts.sum()), T * k
    xd = torch.randn(N, D, device=DEVICE, requires_grad=backward)
    gated = activation == "swiglu"
    w1 = (torch.randn(D, (2 if gated else 1) * Fd, device=DEVICE) * 0.02).requires_grad_(backward)
    w2 = (torch.randn(Fd, D, device=DEVICE) * 0.02).requires_grad_(backward)
    gd = torch.randn(N, D, device=DEVICE)

    def dense():
        xd.grad = w1.grad = w2.grad = None
        with _autocast():
            h = xd @ w1
            y = (F.silu(h[:, :Fd]) * h[:, Fd:] if gated else F.gelu(h, approximate="tanh")) @ w2
        if backward:
            y.backward(gd.to(y.dtype))

    dense()
    t_dense, t_fast = [], []
    for _ in range(reps):  # interleaved, so load from other processes hits both alike
        t_dense += _times(dense, 1, 0)
        t_fast += _times(fast, 1, 0)
    # min over reps: the least-disturbed run estimates the uncontended time on a shared machine
    td, tf = min(t_dense), min(t_fast)
    flops = 2 * (3 if gated else 2) * D * Fd * (3 if backward else 1)  # per row
    return dict(M=M, N=N, t_fast=tf, t_dense=td, gflops=M * flops / tf / 1e9,
                layout=f"{moe.last_stats.layout} (fill {M / (E * int(moe.last_stats.kept_counts.max())):.2f})",
                dense_gflops=N * flops / td / 1e9, dense_eq=td / tf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 reps")
    ap.add_argument("--shapes", nargs="*", default=None, help="substring filters on shape names")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ref-reps", type=int, default=2)
    ap.add_argument("--no-ref", action="store_true", help="skip the einsum reference")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, timed by the thread's CPU time: robust when other processes share the cores")
    ap.add_argument("--no-reexec", action="store_true", help="do not re-exec with MALLOC_* set")
    ap.add_argument("--min-fill", type=float, default=None,
                    help="MoE capacity_layout_min_fill: 0 = always one slot buffer, 2 = always segments")
    ap.add_argument("--segment-loop", action="store_true",
                    help="segments: the per-expert GEMM loop (the fallback) instead of torch._grouped_mm")
    ap.add_argument("--router", default="deepspeed", choices=["deepspeed", "softmax_topk", "sigmoid_group"])
    ap.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    ap.add_argument("--drop-policy", default="probs", choices=["probs", "position"],
                    help="DeepSpeed top-k (k > 2) drop mode: which choices an expert over capacity keeps")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast (fp32 master weights, fp32 gate), for GPUs; CPU bf16 GEMMs are slow")
    args = ap.parse_args(argv)
    global CLOCK, DEVICE, DTYPE
    DEVICE = torch.device(args.device)
    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.cpu_time:
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = dict(SHAPES)
    if args.quick:
        shapes = {"T256_D64_F128_E8_k2": (256, 64, 128, 8, 2), "T256_D64_F64_E16_k4": (256, 64, 64, 16, 4)}
        args.reps, args.ref_reps = 2, 1
    if args.shapes:
        shapes = {n: s for n, s in shapes.items() if any(f in n for f in args.shapes)}
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, {where}, dtype {args.dtype}, "
          f"clock {'thread CPU time' if args.cpu_time else 'wall'}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}, grouped_mm "
          f"{'yes' if hasattr(torch, '_grouped_mm') else 'no'}, router {args.router}, activation "
          f"{args.activation}, drop_policy {args.drop_policy}")
    hdr = (f"{'shape':<26}{'mode':<9}{'pass':<8}{'M kept':>8}{'fast ms':>9}{'dense ms':>9}"
           f"{'GF/s':>8}{'denseGF/s':>10}{'dense-eq':>9}  layout")
    print(hdr)
    print("-" * len(hdr))
    cases = [(name, mode, p) for name in shapes for mode in args.modes for p in args.passes]
    variant = dict(router=args.router, activation=args.activation, drop_policy=args.drop_policy)
    fast_ms = {}
    for name, mode, p in cases:
        r = _bench_case(*shapes[name], MODES[mode], p == "fwd+bwd", args.reps, args.ref_reps,
                        min_fill=args.min_fill, segment_loop=args.segment_loop, **variant)
        fast_ms[name, mode, p] = r["t_fast"]
        print(f"{name:<26}{mode:<9}{p:<8}{r['M']:>8}{r['t_fast'] * 1e3:>9.2f}{r['t_dense'] * 1e3:>9.2f}"
              f"{r['gflops']:>8.1f}{r['dense_gflops']:>10.1f}{r['dense_eq']:>9.2f}  {r['layout']}", flush=True)
    if args.no_ref:
        return
    # The reference runs after every fast case, so its huge one-hot tensors cannot disturb the fast timings.
    # (The segment layout's run-to-run swings, see README, happen without the reference too.)
    print(f"\n{'shape':<26}{'mode':<9}{'pass':<8}{'ref ms':>10}{'ref/fast':>9}")
    for name, mode, p in cases:
        tr = _bench_case(*shapes[name], MODES[mode], p == "fwd+bwd", args.reps, args.ref_reps, only_ref=True,
                         min_fill=args.min_fill, segment_loop=args.segment_loop, **variant)
        print(f"{name:<26}{mode:<9}{p:<8}{tr * 1e3:>10.1f}{tr / fast_ms[name, mode, p]:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
