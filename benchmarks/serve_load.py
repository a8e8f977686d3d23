"""Serving load test: the same engine called in-process vs through Ray Serve over HTTP, in one run.

N concurrent clients send completion requests back to back for a bounded time, first to an `Engine` in this
process (asyncio clients calling ``engine.generate``/``engine.stream``), then to a local Serve deployment of the
same checkpoint and engine settings on 127.0.0.1 (aiohttp clients). Printed per mode: requests, generated
tokens/s, p50/p99 request latency, p50/p99 time to first token (``--stream``), and Serve / in-process ratios;
then the engine's side per mode (generated tokens per step, ms per step, prefills and how many ran inside a
mixed step): a lower tokens/s with the same tokens/step means slower steps, not emptier batches.

Usage: python benchmarks/serve_load.py [--checkpoint DIR] [--clients 8] [--duration 10] [--max-tokens 32]
       [--prompt-len 32] [--max-batch-size 16] [--stream [--stream-interval 0.02]] [--num-cpus 2]
       [--layout single|split] [--rounds N] [--cpu-report] [--ingress proxy|direct|both] [--stagger auto|S]
``--stagger``: seconds between the clients' first requests in each window (auto: the mode's warm-up p50 /
clients: arrivals spread over a request's duration in both modes; 0: together - in-process clients then stay
in lockstep, one prefill for all prompts of a round, which clients across a network never do).
``--layout``: the Serve app (single: routes + engine in one deployment, the default; split: ingress ->
LLMServer). ``--ingress``: how clients reach Serve (see --help); "both" (default) prints a row for each.
``--rounds N``: N alternating windows per mode (for shared machines). ``--cpu-report``: CPU
cores per process in each mode, with a warning when processes outside this benchmark used the CPU.
Without --checkpoint a random-weight model of the local_tiny shape (4 layers, d=128, 8 experts on blocks 1
and 3, block 128) is saved to a temporary folder. Greedy decoding, so both modes generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import socket
import statistics
import tempfile
import time


@dataclasses.dataclass
class Sample:
    latency_s: float
    ttft_s: float | None
    tokens: int


def cpu_snapshot() -> dict[int, tuple[str, float, int]]:
    """{pid: (name, cpu seconds, parent pid)} of every process (Linux /proc; {} elsewhere)."""
    import os

    out, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = cmd.split(" ")[0] if cmd.startswith("ray::") else (cmd[:60] or stat[stat.index("(") + 1:stat.rindex(")")])
        out[int(d)] = (name, (int(fields[11]) + int(fields[12])) / tick, int(fields[1]))
    return out


def add_cpu_use(mode: str, before: dict, after: dict, wall_s: float) -> None:
    """Accumulate CPU seconds per process name between two snapshots into CPU_USE[mode]; processes that are
    not this benchmark or its descendants (its Ray instance) are prefixed "other: "."""
    import os

    ours, grew = {os.getpid()}, True
    while grew:
        grew = False
        for pid, (_, _, ppid) in after.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    use = CPU_USE.setdefault(mode, {"_wall": 0.0})
    use["_wall"] += wall_s
    for pid, (name, t, _) in after.items():
        d = t - before.get(pid, (name, 0.0, 0))[1]
        if d > 0:
            key = name if pid in ours else "other: " + name
            use[key] = use.get(key, 0.0) + d


def print_cpu_use() -> None:
    for mode, use in CPU_USE.items():
        wall = use["_wall"]
        top = sorted(((n, c / wall) for n, c in use.items() if n != "_wall"), key=lambda kv: -kv[1])[:8]
        print(f"CPU cores used during {mode}: " + ", ".join(f"{n} {c:.2f}" for n, c in top))
        other = sum(c for n, c in use.items() if n.startswith("other: ")) / wall
        if other > 0.1:
            print(f"WARNING: other processes used {other:.2f} cores during {mode}: the ratio is not clean")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def make_checkpoint(folder: str) -> str:
    import torch

    from raymoe.platform.checkpoint import save_checkpoint
    from raymoe.platform.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(dict(vocab_size=257, block_size=128, n_layer=4, n_head=4, d_model=128, d_ff=512,
                          expert_interval=2, num_experts=8, k=1)))
    return str(save_checkpoint(folder, 0, model, extra={"model_config": model.config.to_dict()}))


def prompts(n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of expert mixture token route gate layer batch serve ray model data text".split()
    out = []
    for _ in range(n):
        s = ""
        while len(s) < length:
            s += rng.choice(words) + " "
        out.append(s[:length])
    return out


CPU_USE: dict[str, dict[str, float]] = {}  # mode -> {process name: CPU seconds, "_wall": seconds} (--cpu-report)


async def drive(one, n_clients: int, duration_s: float, pool: list[str], mode: str = "",
                stagger_s: float = 0.0) -> tuple[list[Sample], float]:
    """n_clients loops calling ``one(prompt) -> Sample`` until the deadline (client i starts ``i * stagger_s``
    late); returns samples and wall time."""
    snap = cpu_snapshot() if mode else None
    deadline = time.perf_counter() + duration_s
    samples: list[Sample] = []

    async def client(i: int):
        await asyncio.sleep(i * stagger_s)
        k = i
        while time.perf_counter() < deadline:
            samples.append(await one(pool[k % len(pool)]))
            k += n_clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(n_clients)))
    wall = time.perf_counter() - t0
    if snap is not None:
        add_cpu_use(mode, snap, cpu_snapshot(), wall)
    return samples, wall


def engine_settings(a) -> dict:
    """The engine's settings (`EngineConfig` fields), the same in both modes."""
    return {"max_batch_size": a.max_batch_size, "max_waiting": 4 * a.clients, "torch_threads": a.threads}


def start_engine(ckpt: str, a):
    from raymoe.deployments.engine import Engine
    from raymoe.deployments.engine_config import EngineConfig

    eng = Engine(ckpt, config=EngineConfig(**engine_settings(a)))
    eng.start()
    return eng


def in_process_client(eng, a):
    """``one(prompt) -> Sample`` calling the engine in this process."""
    from raymoe.deployments.protocol import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)

    async def one(prompt: str) -> Sample:
        t0 = time.perf_counter()
        if not a.stream:
            r = await eng.generate(prompt, params)
            return Sample(time.perf_counter() - t0, None, r.completion_tokens)
        ttft, n = None, 0
        async for ch in await eng.stream(prompt, params):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            n = ch.completion_tokens
        return Sample(time.perf_counter() - t0, ttft, n)

    return one


def start_serve(ckpt: str, a) -> dict[str, str]:
    """A local Ray + Serve deployment of the same checkpoint and engine settings; returns {mode: URL}:
    "serve-http" through Serve's HTTP proxy, "serve-direct" to the replica's own HTTP server (--ingress)."""
    import os

    import ray
    from ray import serve

    from raymoe.deployments.app import build_app, direct_ingress_env, direct_ingress_urls
    from raymoe.deployments.proxy_errors import PROXY_ERRORS_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if a.ingress != "proxy":  # read by the Serve processes when they start: before ray.init
        os.environ.update(direct_ingress_env(port))
    os.environ.update(PROXY_ERRORS_ENV)  # the proxy's own failures as OpenAI errors, as `raymoe serve` runs it
    # Ray starts workers at nice 15; the in-process baseline runs at the caller's priority, so on a shared
    # machine the comparison would measure priority, not Serve. Same priority for both: niceness 0.
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": a.worker_niceness})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({
        "checkpoint": ckpt, "model_id": "bench", "max_ongoing_requests": 4 * a.clients,
        "single_deployment": a.layout == "single",
        "engine_cls": f"raymoe.deployments.{'proc_engine:ProcessEngine' if a.engine_process else 'engine:Engine'}",
        "stream_interval_s": a.stream_interval,
        "engine": engine_settings(a)}), name="bench", route_prefix="/")
    urls = {}
    if a.ingress != "direct":
        urls["serve-http"] = f"http://127.0.0.1:{port}/v1/completions"
    if a.ingress != "proxy":
        found = direct_ingress_urls("127.0.0.1", port, 1)
        if not found:
            raise SystemExit("the replica's direct-ingress server did not answer (Ray < 2.56?)")
        urls["serve-direct"] = f"{found[0]}/v1/completions"
    return urls


def stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_client(http, url: str, a):
    """``one(prompt) -> Sample`` over HTTP (an aiohttp session)."""
    async def one(prompt: str) -> Sample:
        body = {"model": "bench", "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0,
                "stream": a.stream, **({"stream_options": {"include_usage": True}} if a.stream else {})}
        t0 = time.perf_counter()
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            if not a.stream:
                n = (await resp.json())["usage"]["completion_tokens"]
                return Sample(time.perf_counter() - t0, None, n)
            ttft, n = None, 0
            async for line in resp.content:
                line = line.decode().strip()
                if line.startswith("data: {"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    n = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", n)
            return Sample(time.perf_counter() - t0, ttft, n)

    return one


async def measure(modes: dict, a, pool: list[str], eng=None) -> dict[str, tuple[list[Sample], float]]:
    """Warm up every mode, then ``a.rounds`` rounds of duration/rounds seconds per mode, alternating, so
    that both modes see the same background load; samples and wall time summed per mode."""
    import aiohttp

    out = {name: ([], 0.0) for name in modes}
    conn = aiohttp.TCPConnector(limit=a.clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as http:
        ones = {name: make(http) for name, make in modes.items()}
        stagger = {}
        for name, one in ones.items():
            warm, _ = await drive(one, a.clients, min(2.0, a.duration / 4), pool)
            # "auto": the clients' first requests spread evenly over one request's duration (this mode's p50)
            p50 = percentile([w.latency_s for w in warm], 50)
            stagger[name] = a.stagger if a.stagger != "auto" else p50 / a.clients
            STAGGER[name] = stagger[name]
        for _ in range(a.rounds):
            for name, one in ones.items():
                before = await engine_stats(name, eng)
                samples, wall = await drive(one, a.clients, a.duration / a.rounds, pool, name if a.cpu_report else "",
                                            stagger[name])
                out[name] = (out[name][0] + samples, out[name][1] + wall)
                add_engine_use(name, before, await engine_stats(name, eng))
    return out


ENGINE_USE: dict[str, dict[str, float]] = {}  # mode -> summed engine counter deltas
STAGGER: dict[str, float] = {}  # mode -> seconds between the clients' first requests


async def engine_stats(mode: str, eng) -> dict:
    """The serving engine's counters: the in-process engine's, or the Serve replica's (via its handle)."""
    if mode == "in-process":
        return eng.stats()
    from ray import serve

    return (await serve.get_app_handle("bench").info.remote())["stats"]


def add_engine_use(mode: str, before: dict, after: dict) -> None:
    use = ENGINE_USE.setdefault(mode, {})
    for k in ("busy_s", "decode_steps", "mixed_steps", "prefills", "generated_tokens"):
        use[k] = use.get(k, 0) + after.get(k, 0) - before.get(k, 0)


def print_engine_use() -> None:
    """Where the engine's time went per mode: tokens per step (how full the batch was), ms per step (a mixed
    step, one prompt admitted into the running batch, costs more than a decode step), busy seconds."""
    for mode, u in ENGINE_USE.items():
        steps = max(u["decode_steps"] + u["prefills"] - u["mixed_steps"], 1)
        print(f"engine during {mode}: {u['generated_tokens'] / steps:.2f} tokens/step, "
              f"{1e3 * u['busy_s'] / steps:.2f} ms/step, busy {u['busy_s']:.1f} s, {steps} steps "
              f"({u['prefills']} prefills, {u['mixed_steps']} of them in mixed steps)")


def _serve_modes(urls: dict[str, str], a) -> dict:
    return {name: (lambda http, _u=url: serve_client(http, _u, a)) for name, url in urls.items()}


def run(ckpt: str, a, pool: list[str]) -> dict[str, tuple[list[Sample], float]]:
    """rounds == 1: in-process first (no Ray running), then Serve. rounds > 1: both up, windows alternate."""
    eng = start_engine(ckpt, a)
    try:
        if a.rounds == 1:
            res = asyncio.run(measure({"in-process": lambda http: in_process_client(eng, a)}, a, pool, eng))
            eng.shutdown(10)
            urls = start_serve(ckpt, a)
            try:
                res.update(asyncio.run(measure(_serve_modes(urls, a), a, pool, eng)))
            finally:
                stop_serve()
            return res
        urls = start_serve(ckpt, a)
        try:
            return asyncio.run(measure({"in-process": lambda http: in_process_client(eng, a),
                                        **_serve_modes(urls, a)}, a, pool, eng))
        finally:
            stop_serve()
    finally:
        eng.shutdown(10)


def summarize(name: str, samples: list[Sample], wall_s: float) -> dict:
    lat = [s.latency_s for s in samples]
    ttft = [s.ttft_s for s in samples if s.ttft_s is not None]
    return {"mode": name, "requests": len(samples), "tokens_per_s": sum(s.tokens for s in samples) / wall_s,
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "mean_tokens": statistics.mean(s.tokens for s in samples) if samples else 0.0}


def stagger_arg(value: str):
    """--stagger: "auto" or seconds >= 0."""
    if value == "auto":
        return value
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"--stagger {value!r}: expected 'auto' or seconds >= 0")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per mode")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt bytes (= tokens)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both modes)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--worker-niceness", type=int, default=0, help="niceness of Ray workers (Ray's default: 15)")
    ap.add_argument("--stream", action="store_true", help="stream tokens (adds time to first token)")
    ap.add_argument("--stream-interval", type=float, default=0.0,
                    help="Serve mode: min seconds between two chunks of a stream (ServeArgs.stream_interval_s)")
    ap.add_argument("--layout", choices=["single", "split"], default="single",
                    help="Serve app: single = routes and engine in one deployment (one hop); split = ingress "
                         "deployment -> LLMServer deployment")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="Serve mode: the replica runs the engine in a child process (ProcessEngine: its decode "
                         "loop does not share the GIL with Serve's request handling); --no-engine-process: in "
                         "the replica's process (Engine)")
    ap.add_argument("--stagger", type=stagger_arg, default="auto",
                    help="seconds between the clients' first requests in each measured window; auto (default): "
                         "that mode's warm-up p50 latency / clients, so arrivals are spread over a request's "
                         "duration in both modes. 0: all clients start together - in-process they then tend to "
                         "stay in lockstep (every prompt of a round in one prefill), which clients across a "
                         "network do not")
    ap.add_argument("--cpu-report", action="store_true", help="print the processes using the CPU per mode and "
                                                              "warn when processes outside the benchmark ran")
    ap.add_argument("--rounds", type=int, default=1, help="1: in-process, then Serve (Ray not running during "
                    "in-process); N > 1: both set up, N alternating windows of duration/N s per mode (both modes "
                    "see the same background load on a shared machine; Ray idles during in-process windows)")
    ap.add_argument("--ingress", choices=["proxy", "direct", "both"], default="both",
                    help="Serve side: proxy = through Serve's HTTP proxy (Ray's defaults); direct = Ray Serve's "
                         "throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), clients send to the "
                         "replica's own HTTP server; both = the throughput-optimized Serve measured both ways")
    a = ap.parse_args()
    if a.clients < 1 or a.duration <= 0 or a.max_tokens < 1 or a.rounds < 1:
        raise SystemExit("--clients, --duration, --max-tokens and --rounds must be positive")
    pool = prompts(64, a.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or make_checkpoint(tmp)
        res = run(ckpt, a, pool)
        rows = [summarize(name, *res[name]) for name in ("in-process", "serve-http", "serve-direct") if name in res]
    print(f"\n{a.clients} clients, {a.duration:.0f} s in {a.rounds} round(s), {a.layout} layout, ingress {a.ingress}, "
          f"{'ProcessEngine' if a.engine_process else 'Engine'} in Serve, prompt {a.prompt_len} tokens, max_tokens {a.max_tokens}, "
          f"max_batch_size {a.max_batch_size}, stream={a.stream}, stream_interval {a.stream_interval} s")
    print("client start stagger: " + ", ".join(f"{m} {1e3 * v:.1f} ms" for m, v in STAGGER.items()))
    print(f"{'mode':12s} {'requests':>8s} {'tok/s':>9s} {'p50 s':>8s} {'p99 s':>8s} {'ttft50 s':>9s} {'ttft99 s':>9s}")
    for r in rows:
        print(f"{r['mode']:12s} {r['requests']:8d} {r['tokens_per_s']:9.1f} {r['p50_s']:8.3f} {r['p99_s']:8.3f} "
              f"{r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f}")
    base = rows[0]
    for srv in rows[1:]:
        print(f"ratio {srv['mode']}/in-process: tokens/s {srv['tokens_per_s'] / base['tokens_per_s']:.2f}, "
              f"p50 latency {srv['p50_s'] / base['p50_s']:.2f}, p99 latency {srv['p99_s'] / base['p99_s']:.2f}")
    print_cpu_use()
    print_engine_use()
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
