"""How close can a pure-PyTorch CPU MoE expert MLP get to a dense GEMM pair? (ceilings behind the layer's
dense-equivalence, benchmarks/moe_layer.py)

All variants compute, for N = T*k routed rows spread over E experts by a freshly initialized top-k gate (as
the layer benchmark's; its uneven column norms make the load uneven), the expert MLP
y = gelu(x @ w1[e]) @ w2[e] forward and backward (grads of x, w1, w2; written out as GEMMs and the gelu and
its backward, no autograd), in fp32; the times are the minimum over interleaved reps, printed as
dense / variant (1.0 = as fast as one dense pair over the same N rows):
  dense         one GEMM pair over all N rows (the dense-equivalence denominator)
  padded-bmm    rows already sorted into an [E, C, D] slot buffer, C = the largest expert count: batched GEMMs
                (the layer's slot layout; the padding costs 1 - fill)
  split-gemms   exact rows, one GEMM per expert, each split over the intra-op threads (the segment loop;
                torch._grouped_mm on CPU does the same)
  experts/thread  exact rows, whole experts on threads (each thread runs its experts' GEMMs single-threaded,
                taking the largest remaining expert from a shared queue): one threaded region forward, one
                backward
  fused/thread  experts/thread plus everything else the local layer does per expert: gather the rows from
                the token matrix, the gate weight (and its gradient), scatter-add into the token output (one
                [T, D] buffer per thread, summed), and the mirror in backward - no [N, D] intermediate

The layer adds routing on top of any of them. Current numbers: docs/benchmarks.md. Usage:
  python benchmarks/expert_gemm_ceiling.py [--shape T2048_D1024_F256_E32_k4] [--reps 7] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, wait  # noqa: E402

import torch  # noqa: E402

from raymoe.platform.moe.experts import ACTIVATIONS  # noqa: E402

_POOL = ThreadPoolExecutor(max(os.cpu_count() or 1, 1), thread_name_prefix="ceiling")
_LOCK = threading.Lock()


gelu = ACTIVATIONS["gelu"]  # the experts' default activation (tanh approximation)


def gelu_bwd(g, h):
    return torch.ops.aten.gelu_backward(g, h, approximate="tanh")


def on_threads(work, threads: int) -> None:
    """work(i) for i < threads, i = 0 on this thread, each with one intra-op thread (restored after)."""
    if threads <= 1:
        work(0)
        return

    def run(i):
        torch.set_num_threads(1)  # this thread's OpenMP team size (the pool threads keep it)
        with torch.no_grad():
            work(i)

    prev = torch.get_num_threads()
    with _LOCK:
        torch.set_num_threads(1)
        futures = [_POOL.submit(run, i) for i in range(1, threads)]
        try:
            run(0)
        finally:
            wait(futures)
            torch.set_num_threads(prev)
    for f in futures:
        f.result()


def routing(x_TD, E, k, seed=0):
    """Expert-sorted token ids tok_N, per-expert counts and the gate weights g_N of a freshly initialized
    top-k gate (as benchmarks/moe_layer.py's layer: its uneven column norms make the load uneven)."""
    torch.manual_seed(seed)
    probs_TE = torch.nn.Linear(x_TD.shape[1], E, bias=False)(x_TD).detach().softmax(1)
    g_TK, e_TK = probs_TE.topk(k, dim=1)
    flat = e_TK.t().reshape(-1)  # choice-major, as the layer's plan
    order = torch.sort(flat, stable=True).indices
    return order % x_TD.shape[0], torch.bincount(flat, minlength=E).tolist(), g_TK.t().reshape(-1)[order]


class Problem:
    def __init__(self, T, D, Fd, E, k):
        self.T, self.D, self.F, self.E, self.k = T, D, Fd, E, k
        gen = torch.Generator().manual_seed(1)
        self.x_TD = torch.randn(T, D, generator=gen)
        self.tok, self.counts, self.g = routing(self.x_TD, E, k)
        self.N = T * k
        self.gy_TD = torch.randn(T, D, generator=gen)
        self.w1 = torch.randn(E, D, Fd, generator=gen) * 0.02
        self.w2 = torch.randn(E, Fd, D, generator=gen) * 0.02
        self.x_ND = self.x_TD.index_select(0, self.tok)  # expert-sorted rows (variants without a gather)
        self.gy_ND = self.gy_TD.index_select(0, self.tok)
        starts = [0]
        for n in self.counts:
            starts.append(starts[-1] + n)
        self.segs = sorted(((e, starts[e], n) for e, n in enumerate(self.counts) if n), key=lambda s: -s[2])
        self.C = max(self.counts)
        self.fill = self.N / (E * self.C)
        self.W1, self.W2 = self.w1[0].clone(), self.w2[0].clone()
        # the slot buffers of padded-bmm (filling them is the layer's gather, not the experts' work)
        self.x_ECD, self.gy_ECD = torch.zeros(E, self.C, D), torch.zeros(E, self.C, D)
        for e, s, n in self.segs:
            self.x_ECD[e, :n], self.gy_ECD[e, :n] = self.x_ND[s:s + n], self.gy_ND[s:s + n]


def dense(p: Problem):
    h = p.x_ND @ p.W1
    a = gelu(h)
    y = a @ p.W2
    gw2 = a.t() @ p.gy_ND
    gh = gelu_bwd(p.gy_ND @ p.W2.t(), h)
    return y, gh @ p.W1.t(), p.x_ND.t() @ gh, gw2


def padded_bmm(p: Problem):
    x = p.x_ECD
    h = torch.bmm(x, p.w1)
    a = gelu(h)
    y = torch.bmm(a, p.w2)
    gw2 = torch.bmm(a.transpose(1, 2), p.gy_ECD)
    gh = gelu_bwd(torch.bmm(p.gy_ECD, p.w2.transpose(1, 2)), h)
    return y, torch.bmm(gh, p.w1.transpose(1, 2)), torch.bmm(x.transpose(1, 2), gh), gw2


def _per_expert(p: Problem, threads: int):
    N, D, Fd = p.N, p.D, p.F
    h, a, y = torch.empty(N, Fd), torch.empty(N, Fd), torch.empty(N, D)
    gx, gw1, gw2 = torch.empty(N, D), torch.empty_like(p.w1), torch.empty_like(p.w2)

    def fwd(i, queue):
        for e, s, n in queue:
            r = slice(s, s + n)
            torch.mm(p.x_ND[r], p.w1[e], out=h[r])
            a[r] = gelu(h[r])
            torch.mm(a[r], p.w2[e], out=y[r])

    def bwd(i, queue):
        for e, s, n in queue:
            r = slice(s, s + n)
            torch.mm(a[r].t(), p.gy_ND[r], out=gw2[e])
            gh = gelu_bwd(p.gy_ND[r] @ p.w2[e].t(), h[r])
            torch.mm(p.x_ND[r].t(), gh, out=gw1[e])
            torch.mm(gh, p.w1[e].t(), out=gx[r])

    for body in (fwd, bwd):
        queue = iter(p.segs)  # shared: the next free thread takes the largest remaining expert
        on_threads(lambda i: body(i, queue), threads)
    return y, gx, gw1, gw2


def split_gemms(p: Problem):
    return _per_expert(p, 1)


def experts_on_threads(p: Problem):
    return _per_expert(p, min(torch.get_num_threads(), len(p.segs)))


def fused_on_threads(p: Problem):
    """The local layer's whole expert work per expert and thread: gather, GEMM, gelu, gate, GEMM, scatter."""
    N, T, D, Fd = p.N, p.T, p.D, p.F
    threads = min(torch.get_num_threads(), len(p.segs))
    h, a = torch.empty(N, Fd), torch.empty(N, Fd)
    gw1, gw2, gg = torch.empty_like(p.w1), torch.empty_like(p.w2), torch.empty(N)
    ys, gxs = [None] * threads, [None] * threads

    def fwd(i, queue):
        y = ys[i] = torch.zeros(T, D)
        xs, out = torch.empty(p.C, D), torch.empty(p.C, D)
        for e, s, n in queue:
            r, tok = slice(s, s + n), p.tok[s:s + n]
            torch.mm(torch.index_select(p.x_TD, 0, tok, out=xs[:n]), p.w1[e], out=h[r])
            a[r] = gelu(h[r])
            y.index_add_(0, tok, torch.mm(a[r] * p.g[r, None], p.w2[e], out=out[:n]))

    def bwd(i, queue):
        gx = gxs[i] = torch.zeros(T, D)
        gys, xs, out = torch.empty(p.C, D), torch.empty(p.C, D), torch.empty(p.C, D)
        for e, s, n in queue:
            r, tok, g = slice(s, s + n), p.tok[s:s + n], p.g[s:s + n, None]
            gy = torch.index_select(p.gy_TD, 0, tok, out=gys[:n])
            torch.mm((a[r] * g).t(), gy, out=gw2[e])
            gz = gy @ p.w2[e].t()
            torch.sum(gz * a[r], 1, out=gg[r])
            gh = gelu_bwd(gz.mul_(g), h[r])
            torch.mm(torch.index_select(p.x_TD, 0, tok, out=xs[:n]).t(), gh, out=gw1[e])
            gx.index_add_(0, tok, torch.mm(gh, p.w1[e].t(), out=out[:n]))

    for body in (fwd, bwd):
        queue = iter(p.segs)
        on_threads(lambda i: body(i, queue), threads)
    for t in ys[1:]:
        ys[0].add_(t)
    for t in gxs[1:]:
        gxs[0].add_(t)
    return ys[0], gxs[0], gw1, gw2


VARIANTS = {"padded-bmm": padded_bmm, "split-gemms": split_gemms, "experts/thread": experts_on_threads,
            "fused/thread": fused_on_threads}


def check(p: Problem) -> None:
    """Every variant computes the same expert MLP (weight grads compared with the unthreaded loop)."""
    y, gx, gw1, gw2 = split_gemms(p)
    for got, want in zip(experts_on_threads(p), (y, gx, gw1, gw2)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    yb, gxb, gw1b, gw2b = padded_bmm(p)
    for e, s, n in p.segs:
        torch.testing.assert_close(yb[e, :n], y[s:s + n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw1b, gw1, rtol=1e-4, atol=1e-4)
    # fused: gate-weighted and summed per token
    yf, gxf, _, _ = fused_on_threads(p)
    want = torch.zeros(p.T, p.D).index_add_(0, p.tok, y * p.g[:, None])
    torch.testing.assert_close(yf, want, rtol=1e-4, atol=1e-5)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="T2048_D1024_F256_E32_k4", help="T{tokens}_D{dim}_F{ffn}_E{experts}_k{k}")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny shape, 2 reps")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.reps = "T256_D64_F128_E8_k2", 2
    m = re.fullmatch(r"T(\d+)_D(\d+)_F(\d+)_E(\d+)_k(\d+)", args.shape)
    if not m:
        raise SystemExit(f"--shape {args.shape!r}: expected T<tokens>_D<dim>_F<ffn>_E<experts>_k<k>")
    if args.threads:
        torch.set_num_threads(args.threads)
    p = Problem(*(int(v) for v in m.groups()))
    check(p)
    fns = {"dense": dense, **VARIANTS}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(p)
    for _ in range(args.reps):  # interleaved, so load from other processes hits all alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(p)
            times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {args.shape}, "
          f"fill {p.fill:.2f} (rows / (E * largest count)), numerics checked")
    print(f"{'variant':<16}{'ms':>9}{'dense/variant':>15}")
    for name, t in best.items():
        print(f"{name:<16}{t * 1e3:>9.2f}{best['dense'] / t:>15.2f}")


if __name__ == "__main__":
    main()
