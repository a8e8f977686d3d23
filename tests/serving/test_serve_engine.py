"""The engine in-process (no Ray): continuous batching == single-request greedy, per-row settings, errors,
admission control, reload, shutdown; the slot cache against the platform's KVCache."""

import asyncio
import threading
import time

import pytest
import torch

from raymoe.deployments.engine import Engine
from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.fake_engine import FakeEngine, FakeEngineConfig
from raymoe.deployments.protocol import (EngineObserver, EngineOverloadedError, EngineShutdownError, RequestError,
                                         SamplingParams)
from raymoe.platform.generate import generate
from raymoe.platform.kv_cache import KVCache, SlotKVCache
from serving_helpers import spicy_model

PROMPTS = ["hello", "a", "The quick brown fox", "xyz" * 6, "q", "Mixture of experts", "0123456789"]
EOS = 256


def reference(model, prompt: str, n: int, stop=None) -> list[int]:
    """Single-request greedy tokens from the platform's generate (the engine's reference)."""
    stops = [list(s.encode()) for s in (stop or [])]
    return generate(model, [list(prompt.encode())], n, temperature=0.0, eos_id=EOS, stop_sequences=stops)[0]


@pytest.fixture
def engine():
    eng = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=4, max_waiting=64, max_prefill_tokens=64))
    eng.start()
    yield eng
    eng.shutdown(timeout_s=5)


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def test_batched_greedy_equals_single_request(engine):
    ref_model = spicy_model(0)
    n = [20, 7, 30, 12, 25, 3, 18]  # per-row max_tokens: rows leave at different steps

    async def client(i, p):
        await asyncio.sleep(0.003 * i)  # staggered: requests join a running batch
        return await engine.generate(p, SamplingParams(max_tokens=n[i], temperature=0.0))

    async def main():
        return await asyncio.gather(*(client(i, p) for i, p in enumerate(PROMPTS)))

    results = run(main())
    for i, (p, r) in enumerate(zip(PROMPTS, results)):
        assert r.token_ids == reference(ref_model, p, n[i]), p
        assert r.prompt_tokens == len(p.encode())
        assert r.finish_reason == ("length" if len(r.token_ids) == n[i] else "stop")
        assert r.text == bytes(t for t in r.token_ids if t < 256).decode("utf-8", errors="replace")
    stats = engine.stats()
    assert stats["max_batch_size_seen"] > 1  # rows really shared decode steps
    assert stats["prefills"] > 1  # and joined at different step boundaries
    assert stats["mixed_steps"] > 0  # some joined in the running rows' decode forward
    assert 0 < stats["busy_s"] < 60  # time in steps with work (benchmarks/serve_load.py: ms per step)


def test_stop_strings_and_per_row_settings(engine):
    """Stop strings are matched on the reply's text (since the engine detokenizes incrementally: before, on the
    bytes): the reply ends just before the first one, which never shows."""
    free = engine.generate_sync("hello", SamplingParams(max_tokens=30, temperature=0.0))
    assert free.finish_reason == "length" and free.token_ids == reference(spicy_model(0), "hello", 30)
    at = next(i for i in range(2, len(free.text) - 1) if "\ufffd" not in free.text[i:i + 2])
    stop = free.text[at:at + 2]  # a stop string the greedy continuation is known to contain
    res = engine.generate_sync("hello", SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))
    assert res.finish_reason == "stop"
    assert res.text == free.text[:free.text.index(stop)] and stop not in res.text
    # seeded sampling is reproducible and independent of what else is in the batch
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)

    async def mixed():
        others = [engine.generate(p, SamplingParams(max_tokens=10, temperature=1.0)) for p in PROMPTS[:3]]
        return await asyncio.gather(engine.generate("seeded", sp), *others)

    alone = engine.generate_sync("seeded", sp)
    assert run(mixed())[0].token_ids == alone.token_ids
    assert engine.generate_sync("seeded", sp).token_ids == alone.token_ids


def test_stream_chunks_concatenate_to_generate(engine):
    async def main():
        chunks = [c async for c in await engine.stream("stream me", SamplingParams(max_tokens=15, temperature=0))]
        return chunks, await engine.generate("stream me", SamplingParams(max_tokens=15, temperature=0))

    chunks, whole = run(main())
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[-1].finish_reason == whole.finish_reason and all(c.finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("prompt,params,param", [
    ("", SamplingParams(), "prompt"),
    ("x" * 65, SamplingParams(), "prompt"),
    ("hi", SamplingParams(max_tokens=-1), "max_tokens"),
    ("hi", SamplingParams(max_tokens=0), "max_tokens"),
    ("hi", SamplingParams(max_tokens=64), "max_tokens"),  # 2 + 64 - 1 > block_size 64
    ("hi", SamplingParams(temperature=-0.5), "temperature"),
    ("hi", SamplingParams(top_p=0.0), "top_p"),
    ("hi", SamplingParams(max_tokens="3"), "max_tokens"),
    ([1, 2, 999], SamplingParams(), "prompt"),
    (3.5, SamplingParams(), "prompt"),
])
def test_bad_requests_raise_request_error(engine, prompt, params, param):
    with pytest.raises(RequestError) as ei:
        engine.generate_sync(prompt, params)
    assert ei.value.param == param and ei.value.status == 400


def test_max_tokens_none_fills_the_context(engine):
    room = 64 - 3 + 1  # block_size - prompt + 1: the last sampled token is never fed back
    ref = reference(spicy_model(0), "abc", room)
    assert len(ref) == room  # this greedy continuation has no EOS: the request runs into the context limit
    res = engine.generate_sync("abc", SamplingParams(max_tokens=None, temperature=0.0))
    assert (res.finish_reason, res.completion_tokens, res.token_ids) == ("length", room, ref)


def test_queue_full_is_overloaded_and_engine_survives():
    eng = FakeEngine(config=FakeEngineConfig(max_batch_size=1, max_waiting=1, token_delay_s=0.02))
    eng.start()
    try:
        async def main():
            first = await eng.stream("a", SamplingParams(max_tokens=50))
            await asyncio.sleep(0.1)  # first is running; the next one waits, the third is refused
            second = await eng.stream("b", SamplingParams(max_tokens=2))
            with pytest.raises(EngineOverloadedError):
                await eng.stream("c", SamplingParams(max_tokens=2))
            await first.aclose()  # client gone: aborted at the next step, the waiting one runs
            return [c async for c in second]

        assert "".join(c.text for c in run(main(), 20)) == "bb"
    finally:
        eng.shutdown(5)


def test_per_request_failures_do_not_stop_the_engine(engine):
    # a model step that raises (here: a prompt with a poisoned token) fails the rows of that step only
    real_forward = engine.model.forward

    def flaky(idx_BT, *a, **kw):
        if (idx_BT == 7).any():
            raise RuntimeError("boom")
        return real_forward(idx_BT, *a, **kw)

    engine.model.forward = flaky
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate_sync([7, 7, 7], SamplingParams(max_tokens=3, temperature=0.0))
    engine.model.forward = real_forward
    engine.check_health()
    assert engine.generate_sync("ok", SamplingParams(max_tokens=4, temperature=0)).token_ids == \
        reference(spicy_model(0), "ok", 4)


def test_expert_load_and_observer_hooks():
    seen = {"ttft": 0, "tokens": 0, "steps": 0, "finish": 0, "experts": {}}

    class Obs(EngineObserver):
        def on_first_token(self, ttft_s): seen["ttft"] += 1
        def on_tokens(self, n, itl): seen["tokens"] += n
        def on_step(self, b, w, r): seen["steps"] += 1
        def on_finish(self, reason, lat, pt, ct): seen["finish"] += 1
        def on_expert_load(self, layer, fr): seen["experts"][layer] = fr

    eng = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=4, expert_load_interval_s=0.0),
                 observer=Obs())
    eng.start()
    try:
        eng.generate_sync("count experts", SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        eng.shutdown(5)
    assert seen["ttft"] == 1 and seen["finish"] == 1 and seen["tokens"] >= 1 and seen["steps"] >= 1
    assert list(seen["experts"]) == [1] and abs(sum(seen["experts"][1]) - 1.0) < 1e-5
    counts = eng.stats()["expert_counts"][1]
    assert sum(counts) == len("count experts") + 7  # prompt tokens + fed-back tokens, top-1


@pytest.mark.parametrize("policy", ["drain", "immediate"])
def test_reload_swaps_weights_without_dropping_requests(checkpoints, policy):
    eng = Engine(str(checkpoints["a"]), config=EngineConfig(max_batch_size=4, reload_policy=policy))
    eng.start()
    try:
        old, new = spicy_model(0), spicy_model(1)
        out = {}

        def long_request():
            out["r"] = eng.generate_sync("long one", SamplingParams(max_tokens=40, temperature=0.0), timeout_s=60)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.05)  # it is running when the reload starts
        eng.reload(str(checkpoints["b"]))
        t.join(60)
        assert out["r"].completion_tokens == 40  # finished, not dropped
        if policy == "drain":  # generated entirely by the old weights
            assert out["r"].token_ids == reference(old, "long one", 40)
        after = eng.generate_sync("after", SamplingParams(max_tokens=10, temperature=0.0))
        assert after.token_ids == reference(new, "after", 10)
        assert eng.info()["checkpoint"] == str(checkpoints["b"]) and eng.stats()["reloads"] == 1
    finally:
        eng.shutdown(5)


def test_lifecycle_health_and_shutdown():
    eng = Engine(model=spicy_model(0))
    with pytest.raises(RuntimeError):
        eng.check_health()  # not started
    with pytest.raises(EngineShutdownError):
        eng.generate_sync("x", SamplingParams())
    eng.start()
    eng.check_health()
    out = {}
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    t = threading.Thread(target=lambda: out.setdefault("r", eng.generate_sync("bye", greedy)))
    t.start()
    time.sleep(0.02)
    eng.shutdown(timeout_s=30)  # graceful: the running request finishes first
    t.join(10)
    ref = reference(spicy_model(0), "bye", 30)
    assert len(ref) == 30  # no EOS in this continuation: it ends by length
    assert (out["r"].finish_reason, out["r"].token_ids) == ("length", ref)
    with pytest.raises(RuntimeError):
        eng.check_health()
    with pytest.raises(EngineShutdownError):
        eng.generate_sync("x", SamplingParams())


def test_engine_argument_errors():
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        Engine()
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="reload_policy"):
        EngineConfig(reload_policy="later")
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="Extra inputs"):
        EngineConfig(max_bach_size=2)
    with pytest.raises(TypeError, match="EngineConfig"):
        Engine(model=spicy_model(0), config={"max_batch_size": 2})


def test_slot_cache_join_leave_compact_matches_full_forward():
    """Rows joining with longer prompts (shift right), leaving (gather), and compaction (shift left) give the
    same logits as a fresh forward over each row's tokens."""
    torch.manual_seed(0)
    m = spicy_model(0)
    m.eval()
    m.set_dropless(True)
    cache = SlotKVCache.for_model(m, max_rows=4)
    seqs = []

    def prefill(prompts):
        P = max(map(len, prompts))
        idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
        mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
        kv = KVCache.for_model(m, len(prompts), P)
        with torch.no_grad():
            m(idx, kv_cache=kv, token_mask_BT=mask, last_logits_only=True)
        cache.add_rows(kv)
        seqs.extend(list(p) for p in prompts)

    def step():
        nxt = [int(torch.randint(0, 256, ())) for _ in seqs]
        with torch.no_grad():
            out = m(torch.tensor(nxt)[:, None], kv_cache=cache, token_mask_BT=torch.ones(len(seqs), 1, dtype=bool),
                    last_logits_only=True)
        for s, t in zip(seqs, nxt):
            s.append(t)
        for i, s in enumerate(seqs):
            with torch.no_grad():
                full = m(torch.tensor([s]), last_logits_only=True).logits[0, -1]
            torch.testing.assert_close(out.logits[i, -1], full, rtol=1e-4, atol=1e-4)

    prefill([[1, 2, 3]])
    step(); step()
    prefill([[5] * 9, [6, 7]])  # longer than the cache: existing rows shift right
    step()
    keep = [1, 2]
    cache.keep_rows(keep)
    seqs[:] = [seqs[i] for i in keep]
    step()
    cache.keep_rows([1])
    seqs[:] = [seqs[1]]
    assert cache.compact(force=True) > 0 and cache.length == len(seqs[0])
    step()
    prefill([[9] * 4])
    step()


def test_a_consumer_whose_event_loop_closed_does_not_break_the_batch(engine):
    async def start_and_leave():  # the loop closes while the request still runs
        await engine.stream("orphan", SamplingParams(max_tokens=40, temperature=0.0))

    asyncio.run(start_and_leave())
    res = engine.generate_sync("survivor", SamplingParams(max_tokens=30, temperature=0.0))
    assert res.token_ids == reference(spicy_model(0), "survivor", 30)
    engine.check_health()


def test_max_model_len_sizes_the_cache_and_bounds_requests():
    """A RoPE model's context can be huge (Mixtral: 131072 positions): the engine allocates max_model_len slots
    per row, not block_size, and checks requests against it."""
    from raymoe.platform.model import GPT, GPTConfig

    torch.manual_seed(0)
    big = GPT(GPTConfig(vocab_size=257, block_size=1 << 22, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                        position="rope", norm="rmsnorm", mlp="swiglu", num_experts=4, moe={"k": 2}))
    eng = Engine(model=big, config=EngineConfig(max_batch_size=2, max_model_len=48))
    eng.start()
    try:
        res = eng.generate_sync("hello", SamplingParams(max_tokens=8, temperature=0.0), 60)
        assert res.token_ids == generate(big, [list(b"hello")], 8, temperature=0.0)[0]
        assert eng.info()["block_size"] == 48
        assert eng.runner.cache.k[0].shape[2] == 48  # slots per row
        with pytest.raises(RequestError) as ei:
            eng.generate_sync("x" * 40, SamplingParams(max_tokens=10), 60)
        assert ei.value.param == "max_tokens" and ei.value.code == "context_length_exceeded"
    finally:
        eng.shutdown(5)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=1)


def _rope_gqa_model():
    from raymoe.platform.model import GPT, GPTConfig

    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=257, block_size=128, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                      position="rope", norm="rmsnorm", mlp="swiglu", num_experts=4, moe={"k": 2}))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("make_model", [lambda: spicy_model(0), _rope_gqa_model], ids=["gpt_moe", "rope_gqa"])
def test_prefix_cache_outputs_equal_the_uncached_engine_and_count_hits(make_model):
    """Chat-like traffic sharing a system prompt: the engine with a prefix cache answers what the engine without
    one answers (greedy), loads the shared blocks instead of prefilling them, and reports the hits."""
    seen = {"query": 0, "hit": 0}

    class Obs(EngineObserver):
        def on_prefix_cache(self, query_tokens, hit_tokens):
            seen["query"] += query_tokens
            seen["hit"] += hit_tokens

    system = "You are a terse assistant. "
    prompts = [system + q for q in ("hi", "what is a mixture of experts?", "2+2", "name a colour")]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    answers = {}
    for mb in (0.0, 1.0):
        eng = Engine(model=make_model(), config=EngineConfig(max_batch_size=4, prefix_cache_mb=mb,
                                                              prefix_block_size=4), observer=Obs())
        eng.start()
        try:
            first = eng.generate_sync(prompts[0], params, 60).token_ids  # warms the cache with the system prompt

            async def rest():
                return await asyncio.gather(*(eng.generate(p, params) for p in prompts[1:]))

            answers[mb] = [first] + [r.token_ids for r in run(rest())]
            stats = eng.stats()
        finally:
            eng.shutdown(5)
    assert answers[1.0] == answers[0.0]
    assert stats["prefix_cache_hit_tokens"] >= 3 * (len(system) // 4) * 4
    assert seen == {"query": stats["prefix_cache_query_tokens"], "hit": stats["prefix_cache_hit_tokens"]}
    assert seen["query"] == sum(len(p.encode()) for p in prompts)


def test_prefix_cache_is_rejected_with_expert_parallelism():
    with pytest.raises(ValueError, match="prefix_cache_mb=1.0 needs ep_size=1"):
        Engine("unused-checkpoint", ep_size=2, config=EngineConfig(prefix_cache_mb=1))
    from raymoe.deployments.app import ServeArgs  # a Serve config is refused before any replica starts

    with pytest.raises(ValueError, match="engine.prefix_cache_mb=1.0 needs ep_size=1"):
        ServeArgs(checkpoint="unused-checkpoint", ep_size=2, engine={"prefix_cache_mb": 1})
    with pytest.raises(ValueError, match="prefix_block_size"):
        EngineConfig(prefix_block_size=0)


def test_prefix_cache_in_the_engine_process_reports_hits(checkpoints):
    """Serve's default engine runs in a child process: the setting reaches it and its hits reach the observer."""
    from raymoe.deployments.proc_engine import ProcessEngine
    from serving_helpers import wait_until

    seen = []

    class Obs(EngineObserver):
        def on_prefix_cache(self, query_tokens, hit_tokens):
            seen.append((query_tokens, hit_tokens))

    eng = ProcessEngine(checkpoints["a"], config=EngineConfig(max_batch_size=2, prefix_cache_mb=1,
                                                              prefix_block_size=4), observer=Obs())
    eng.start()
    try:
        params = SamplingParams(max_tokens=5, temperature=0.0)
        first = eng.generate_sync("a shared system prompt, then: hi", params, 60)
        again = eng.generate_sync("a shared system prompt, then: hi", params, 60)
        assert again.token_ids == first.token_ids == reference(spicy_model(0), "a shared system prompt, then: hi", 5)
        wait_until(lambda: len(seen) == 2, timeout_s=10)
    finally:
        eng.shutdown(5)
    assert seen == [(32, 0), (32, 28)]  # 32 prompt tokens; the second reuses 7 blocks of 4 (one token is run)
