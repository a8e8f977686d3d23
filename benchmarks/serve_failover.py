"""Failover of expert-parallel serving: kill one shard of one of two EP replicas under load, measure the gap.

A local Ray + Serve deployment of a small MoE checkpoint with ``--replicas`` (default 2) expert-parallel
replicas of ``--ep-size`` (default 2) shards each. ``--clients`` closed-loop clients send short greedy
completions; after ``--warmup`` seconds the benchmark kills one shard process of one replica (SIGKILL, as a
crashed or OOM-killed shard) and keeps the load for ``--after`` seconds. Printed, measured in this run:

- answers after the kill by status (200, 503 with the OpenAI body, anything else: a plain 500 would be a bug);
- the gap: the longest time after the kill without a successful answer (ratio to the p50 request latency
  before the kill: 1-2 means the other replica answered all along);
- the time until a new replica (a new engine pid) answers, and whether the other replica's pid answered
  in between.

Usage: python benchmarks/serve_failover.py [--clients 8] [--replicas 2] [--ep-size 2] [--warmup 8] [--after 25]
       [--num-cpus 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import tempfile
import threading
import time


def make_checkpoint(folder: str) -> str:
    import torch

    from raymoe.platform.checkpoint import save_checkpoint
    from raymoe.platform.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.from_dict(dict(vocab_size=257, block_size=128, n_layer=2, n_head=2, d_model=64,
                                   expert_interval=2, num_experts=4, k=1))
    model = GPT(cfg)
    return str(save_checkpoint(folder, 0, model, extra={"model_config": model.config.to_dict()}))


def client_loop(url: str, stop: threading.Event, out: list) -> None:
    import requests

    body = json.dumps({"model": "bench", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0})
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
            ok_body = "error" in r.text and r.headers.get("content-type", "").startswith("application/json")
            out.append((t0, time.monotonic(), r.status_code, ok_body or r.status_code == 200,
                        r.headers.get("Retry-After")))
        except Exception:  # noqa: BLE001 - a refused connection counts as a failure
            out.append((t0, time.monotonic(), -1, False, None))


def replica_info(handle) -> dict:
    return handle.info.remote().result(timeout_s=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--ep-size", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--after", type=float, default=25.0)
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray instance")
    a = ap.parse_args()

    import ray
    from ray import serve

    from raymoe.deployments.app import build_app
    from raymoe.deployments.proxy_errors import PROXY_ERRORS_ENV

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ckpt = make_checkpoint(tmp)
        os.environ.update(PROXY_ERRORS_ENV)  # the proxy's own failures as OpenAI errors, as `raymoe serve` runs it
        ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"checkpoint": ckpt, "model_id": "bench", "ep_size": a.ep_size,
                                 "num_replicas": a.replicas, "ray_actor_options": {"num_cpus": 0},
                                 "engine": {"max_batch_size": 8, "torch_threads": 1}}), name="bench",
                      route_prefix="/")
            run(a, f"http://127.0.0.1:{port}/v1/completions", serve.get_deployment_handle("OpenAIServer", "bench"))
        finally:
            serve.shutdown()
            ray.shutdown()


def run(a, url: str, handle) -> None:
    infos = {}
    deadline = time.monotonic() + 60
    while len(infos) < a.replicas and time.monotonic() < deadline:  # every replica's pid and shard pids
        i = replica_info(handle)
        infos[i["pid"]] = [s["pid"] for s in i["shards"]]
    victim_replica, shard_pids = next(iter(infos.items()))
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=client_loop, args=(url, stop, out), daemon=True) for _ in range(a.clients)]
    for t in threads:
        t.start()
    time.sleep(a.warmup)
    t_kill = time.monotonic()
    os.kill(shard_pids[-1], signal.SIGKILL)  # a shard process this benchmark's Ray started
    new_pid_at, seen = None, set()
    end = t_kill + a.after
    while time.monotonic() < end:
        try:
            pid = replica_info(handle)["pid"]
        except Exception:  # noqa: BLE001 - routed to the dying replica: try again
            pid = None
        seen.add(pid)
        if new_pid_at is None and pid is not None and pid not in infos:
            new_pid_at = time.monotonic()
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(60)
    report(out, t_kill, new_pid_at, seen, infos, victim_replica)


def report(out, t_kill, new_pid_at, seen, infos, victim) -> None:
    before = [e - s for s, e, code, _, _ in out if e < t_kill and code == 200]
    after = [x for x in out if x[1] >= t_kill]
    ok_times = sorted([t_kill] + [e for _, e, code, _, _ in after if code == 200])
    gap = max(b - a for a, b in zip(ok_times, ok_times[1:])) if len(ok_times) > 1 else float("nan")
    by_code: dict = {}
    for _, _, code, openai_body, retry in after:
        key = (code, "openai body" if openai_body else "other body", "Retry-After" if retry else "")
        by_code[key] = by_code.get(key, 0) + 1
    p50 = statistics.median(before) if before else float("nan")
    in_flight = [x for x in after if x[0] < t_kill]
    failed_later = [x for x in after if x[0] >= t_kill and x[2] != 200]
    print(f"requests before the kill: {len(before)} ok, p50 latency {p50 * 1000:.0f} ms")
    print(f"in flight at the kill: {len(in_flight)} ({sum(x[2] != 200 for x in in_flight)} failed); sent after "
          f"the kill and failed: {len(failed_later)} (these clients retry at once, ignoring Retry-After)")
    print("answers after the kill:", ", ".join(f"{c[0]} {c[1]} {c[2]}: {n}" for c, n in sorted(by_code.items())))
    print(f"gap without a successful answer after the kill: {gap:.2f} s = {gap / p50:.1f} x p50 latency")
    survivor = [p for p in infos if p != victim]
    print(f"the other replica answered after the kill: {any(p in seen for p in survivor)}; "
          f"a new replica answered {new_pid_at - t_kill:.1f} s after the kill" if new_pid_at is not None else
          "no new replica answered within the measurement")


if __name__ == "__main__":
    main()
