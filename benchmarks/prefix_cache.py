"""Prefix caching: time to first token of batched chat traffic sharing a system prompt, with vs without the
engine's prefix cache, in one run.

Two in-process `Engine`s over the same random-weight model (the local_tiny shape of serve_load.py: 4 layers,
d=128, 8 experts on blocks 1 and 3; block 512), one with ``prefix_cache_mb`` and one without, take turns:
each wave sends ``--clients`` streamed requests at once, each a ``--system-len``-token system prompt (bytes)
followed by its own ``--user-len``-token question; greedy, ``--max-tokens`` tokens. Before the waves, each
engine answers one request with the system prompt (the cache then holds it, as it would after the first
request of a deployment; the uncached engine gets the same warm-up). Printed per mode: p50/p99 time to first
token and mean wave time over all waves, the ratios uncached / cached, the prefix cache's hit rate, and whether
every request got the same tokens from both engines (the script fails if not).

Usage: python benchmarks/prefix_cache.py [--clients 16] [--waves 6] [--system-len 200] [--user-len 24]
       [--max-tokens 8] [--prefix-cache-mb 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import statistics
import sys
import time

if __name__ == "__main__":  # before torch is imported: glibc reads MALLOC_* at process start
    from _host import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import torch  # noqa: E402

from raymoe.deployments.engine import Engine  # noqa: E402
from raymoe.deployments.engine_config import EngineConfig  # noqa: E402
from raymoe.deployments.protocol import SamplingParams  # noqa: E402
from raymoe.platform.model import GPT, GPTConfig  # noqa: E402

WORDS = "the of expert mixture token route gate layer batch serve ray model data text please answer".split()


def text(rng: random.Random, n: int) -> str:
    """About ``n`` bytes of words (the byte tokenizer: one token per byte)."""
    s = ""
    while len(s) < n:
        s += rng.choice(WORDS) + " "
    return s[:n]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def wave(eng: Engine, prompts: list[str], params: SamplingParams) -> tuple[list[float], list[list[int]], float]:
    """All prompts at once; (time to first token per request, tokens per request, wave seconds)."""
    async def one(prompt: str):
        t0, ttft, ids = time.perf_counter(), None, []
        async for ch in await eng.stream(prompt, params):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids += ch.token_ids
        return ttft, ids

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(p) for p in prompts))
    return [t for t, _ in out], [ids for _, ids in out], time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent requests per wave")
    p.add_argument("--waves", type=int, default=6, help="waves per mode (alternating)")
    p.add_argument("--system-len", type=int, default=200, help="tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=24, help="tokens of each request's own question")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prefix-cache-mb", type=float, default=64.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-reexec", action="store_true", help="keep this process's malloc settings")
    a = p.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(dict(vocab_size=257, block_size=512, n_layer=4, n_head=4, d_model=128, d_ff=512,
                                         expert_interval=2, num_experts=8, k=1)))
    settings = dict(max_batch_size=a.clients, max_waiting=4 * a.clients, torch_threads=a.threads)
    engines = {"uncached": Engine(model=copy.deepcopy(model), config=EngineConfig(**settings)),
               "cached": Engine(model=copy.deepcopy(model), config=EngineConfig(**settings,
                                                                                prefix_cache_mb=a.prefix_cache_mb))}
    rng = random.Random(0)
    system = text(rng, a.system_len)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    ttft = {m: [] for m in engines}
    wall = {m: [] for m in engines}
    outputs = {m: [] for m in engines}
    for eng in engines.values():
        eng.start()
    try:
        for eng in engines.values():  # warm-up: torch's first calls, and the system prompt enters the cache
            eng.generate_sync(system + text(rng, a.user_len), params, 120)
        for _ in range(a.waves):
            prompts = [system + text(rng, a.user_len) for _ in range(a.clients)]
            for mode, eng in engines.items():
                t, ids, w = asyncio.run(asyncio.wait_for(wave(eng, prompts, params), 300))
                ttft[mode] += t
                wall[mode].append(w)
                outputs[mode] += ids
        stats = engines["cached"].stats()
    finally:
        for eng in engines.values():
            eng.shutdown(10)

    print(f"{a.clients} concurrent requests x {a.waves} waves per mode: {a.system_len}-token system prompt + "
          f"{a.user_len}-token question, {a.max_tokens} tokens greedy; torch threads {torch.get_num_threads()}")
    print(f"{'mode':<10} {'ttft p50 ms':>12} {'ttft p99 ms':>12} {'wave ms':>9}")
    for mode in engines:
        print(f"{mode:<10} {1e3 * percentile(ttft[mode], 50):>12.1f} {1e3 * percentile(ttft[mode], 99):>12.1f} "
              f"{1e3 * statistics.mean(wall[mode]):>9.1f}")
    ratio = {q: percentile(ttft["uncached"], q) / percentile(ttft["cached"], q) for q in (50, 99)}
    print(f"uncached/cached: ttft p50 {ratio[50]:.2f}x  ttft p99 {ratio[99]:.2f}x  wave "
          f"{statistics.mean(wall['uncached']) / statistics.mean(wall['cached']):.2f}x")
    hit, query = stats["prefix_cache_hit_tokens"], stats["prefix_cache_query_tokens"]
    print(f"prefix cache: {hit}/{query} prompt tokens reused ({hit / query:.0%}), "
          f"{stats.get('prefix_cache_inserted_blocks', 0)} blocks stored, "
          f"{stats.get('prefix_cache_evicted_blocks', 0)} evicted")
    same = sum(x == y for x, y in zip(outputs["uncached"], outputs["cached"]))
    print(f"outputs identical: {same}/{len(outputs['cached'])} requests")
    return 0 if same == len(outputs["cached"]) else 1


if __name__ == "__main__":
    sys.exit(main())
