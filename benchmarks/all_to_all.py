"""All-to-all benchmark: the MoE layer's exchange vs raw ``all_to_all_single`` at the same payload.

Both are measured in one run, interleaved, in the same gloo world of N processes on this machine
(DESIGN.md "Performance method"):
  layer   = what the MoE layer runs per exchange. Dropless (variable splits): AllToAllDispatcher.dispatch +
            combine: per-expert count exchange and the row exchange; route "a2a" = all_to_all_single +
            re-sorting the received rows to local-expert order and back, "auto" = the default (on CPU the
            source-order route: no re-sort, the experts run (source rank, expert) segments; see
            raymoe.platform.moe.comm), "hier" = --hierarchical. Drop mode (capacity factor 1.0):
            dispatch_capacity + combine_capacity of the fixed [E, C, D] buffer, equal splits; "cap" = as in
            training (uniform_tokens: every rank runs equal micro-batches), "cap+agree" = preceded by the
            slot-count all-reduce the layer runs when token counts may differ (token masks, other callers),
            "cap-hier" = two-phase
  raw     = two all_to_all_single calls with the same split sizes into preallocated buffers (the floor)
  bytes/s = payload bytes this rank sends (dispatch + combine) / time (min over reps of the slowest rank,
            each rep after a barrier); ratio = layer bytes/s / raw bytes/s (target >= 0.8), the median over
            reps of raw time / layer time, raw and layer alternating rep by rep (robust on a shared machine)
``--backward`` also times forward+backward (the backward runs the reverse exchanges).

Usage: python benchmarks/all_to_all.py [--worlds 2 4] [--reps 10] [--hierarchical] [--backward]
glibc reads MALLOC_MMAP_THRESHOLD_ at process start only, so the script re-executes itself with it set.
"""

from __future__ import annotations

import argparse
import statistics

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _gloo import free_port, gloo_rank  # noqa: E402

from raymoe.platform import parallel  # noqa: E402
from raymoe.platform.moe.router import compute_capacity  # noqa: E402

SHAPES = {  # name: (tokens per rank T, model dim D, experts E, top-k)
    "T1024_D128_E16_k2": (1024, 128, 16, 2),
    "T4096_D512_E8_k2": (4096, 512, 8, 2),
    "T2048_D1024_E32_k4": (2048, 1024, 32, 4),
}


def _routed_rows(T: int, D: int, E: int, k: int, seed: int):
    """x_MD sorted by expert and its per-expert counts for T*k random (top-k distinct) token-choices."""
    g = torch.Generator().manual_seed(seed)
    e_N = torch.rand(T, E, generator=g).topk(k, dim=1).indices.reshape(-1)
    counts_E = torch.bincount(e_N, minlength=E)
    return torch.randn(T * k, D, generator=g), counts_E


def _rep(fn) -> float:
    """One timed call of the slowest rank (a barrier aligns the ranks first)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def _paired(raw_fn, layer_fn, reps: int) -> tuple[float, float, float]:
    """(min raw s, min layer s, median of per-rep raw/layer ratios): raw and layer alternate rep by rep, so
    load from other jobs on a shared machine hits both alike."""
    t_raw, t_layer = [], []
    for _ in range(reps):
        t_raw.append(_rep(raw_fn))
        t_layer.append(_rep(layer_fn))
    return min(t_raw), min(t_layer), statistics.median(r / l for r, l in zip(t_raw, t_layer))


def _bench_shape(rank, world, name, reps, groups, exchange, hierarchical, backward, rpn):
    T, D, E, k = SHAPES[name]
    layout = parallel.ParallelLayout(world, {0: world})
    d = parallel.make_moe_kwargs(layout, groups, hierarchical=hierarchical, ranks_per_node=rpn,
                                 exchange="auto" if exchange.startswith("capacity") else exchange,
                                 uniform_tokens=exchange == "capacity")(0, E)["dispatcher"]
    if exchange.startswith("capacity"):
        return _measure(*_capacity_case(T, D, E, k, d), reps, backward), d.last_route
    x_MD, counts_E = _routed_rows(T, D, E, k, seed=rank)
    send = counts_E.view(world, -1).sum(1).tolist()
    recv_E = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_E, counts_E)
    recv = recv_E.view(world, -1).sum(1).tolist()
    buf_in, buf_back = x_MD.new_empty(sum(recv), D), x_MD.new_empty(x_MD.shape)

    def raw():
        dist.all_to_all_single(buf_in, x_MD, recv, send)
        dist.all_to_all_single(buf_back, buf_in, send, recv)

    def exchange_rows(x):
        return d.combine(d.dispatch(x, counts_E)[0])

    return _measure(raw, exchange_rows, x_MD, reps, backward), d.last_route


def _capacity_case(T, D, E, k, d):
    """Drop mode (capacity factor 1.0): the fixed [E, C, D] buffer; the slot count is the local capacity with
    uniform_tokens (training), else agreed by an all-reduce first, as the MoE layer does. Raw moves the same
    bytes with all_to_all_single."""
    C = compute_capacity(T, E, k, 1.0, 4)
    x_ECD = torch.randn(E, C, D)
    buf_in, buf_back = torch.empty_like(x_ECD), torch.empty_like(x_ECD)

    def raw():
        dist.all_to_all_single(buf_in, x_ECD)
        dist.all_to_all_single(buf_back, buf_in)

    def exchange_slots(x):
        c = C if d.uniform_tokens else int(d.all_reduce_max(torch.tensor(C)))
        return d.combine_capacity(d.dispatch_capacity(x[:, :c]))

    return raw, exchange_slots, x_ECD


def _measure(raw, exchange, x, reps: int, backward: bool) -> list[tuple]:
    """Rows (pass, raw bytes/s, layer bytes/s, ratio, payload bytes) of ``exchange(x)`` (dispatch + combine;
    with ``backward`` also forward+backward) against ``raw`` (the same bytes by all_to_all_single)."""
    nbytes = 2 * x.numel() * x.element_size()
    x_req = x.clone().requires_grad_(True)

    def layer():
        exchange(x)

    def layer_fwd_bwd():
        exchange(x_req).sum().backward()

    def raw_fwd_bwd():
        raw()
        raw()

    for fn in (raw, layer):  # warm up connections and allocator
        fn()
    pairs = [("fwd", raw, layer)] + ([("fwd+bwd", raw_fwd_bwd, layer_fwd_bwd)] if backward else [])
    rows = []
    for label, r_fn, l_fn in pairs:
        t_raw, t_layer, ratio = _paired(r_fn, l_fn, reps)
        mult = 2 if label == "fwd+bwd" else 1
        rows.append((label, mult * nbytes / t_raw, mult * nbytes / t_layer, ratio, nbytes))
    return rows


def _worker(rank, world, port, args, results):
    with gloo_rank(rank, world, port, timeout_s=120):
        rpn = args.ranks_per_node if args.hierarchical else None
        groups = parallel.build_process_groups(parallel.ParallelLayout(world, {0: world}), rank,
                                               ranks_per_node=rpn)
        routes = [("hier", "all_to_all", True)] if args.hierarchical and world > rpn else []
        routes += [("a2a", "all_to_all", False), ("auto", "auto", False), ("cap", "capacity", False),
                   ("cap+agree", "capacity_agree", False)]
        if args.hierarchical and world > rpn:
            routes.append(("cap-hier", "capacity", True))
        for name in args.shapes:
            for label, exchange, hier in routes:
                rows, used = _bench_shape(rank, world, name, args.reps, groups, exchange, hier, args.backward, rpn)
                if rank == 0:
                    results.put((world, name, f"{label}:{used}", rows))
        dist.barrier()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--hierarchical", action="store_true", help="two-phase intra/inter-node route")
    p.add_argument("--ranks-per-node", type=int, default=2, help="with --hierarchical (simulated nodes)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    print(f"{'world':>5} {'shape':<20} {'route (used)':<18} {'pass':<8} {'payload MB':>10} {'raw MB/s':>9} "
          f"{'layer MB/s':>10} {'ratio':>6}")
    for world in args.worlds:
        results = ctx.Queue()
        procs = mp.start_processes(_worker, args=(world, free_port(), args, results), nprocs=world, join=False,
                                   start_method="spawn")
        n_routes = 4 + 2 * (args.hierarchical and world > args.ranks_per_node)
        for _ in range(len(args.shapes) * n_routes):
            w, name, route, rows = results.get(timeout=300)
            for label, raw_bps, layer_bps, ratio, nbytes in rows:
                mb = nbytes / 1e6
                print(f"{w:>5} {name:<20} {route:<18} {label:<8} {mb:>10.1f} "
                      f"{raw_bps / 1e6:>9.0f} {layer_bps / 1e6:>10.0f} {ratio:>6.2f}", flush=True)
        try:
            procs.join(timeout=60)
        except mp.ProcessExitedException as e:  # every row arrived; a gloo teardown abort changes none of them
            print(f"(world {world}: a worker died during process-group teardown after reporting: {e})")


if __name__ == "__main__":
    main()
