"""`ProcessEngine` (the Engine in a child process, no Ray): same outputs as `Engine`, streaming, abort of a
stream whose consumer left, the child's queue limit as a per-request error, argument errors before a process
starts, and shutdown stopping the child."""

import asyncio

import pytest

from raymoe.deployments.engine import Engine
from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.proc_engine import ProcessEngine
from raymoe.deployments.protocol import EngineOverloadedError, EngineShutdownError, SamplingParams
from serving_helpers import save_model, spicy_model, wait_until

T = 60
PROMPTS = ["hello", "a", "The quick brown fox", "xyz" * 6, "q"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_model(tmp_path_factory.mktemp("pe"), spicy_model(0)))


@pytest.fixture(scope="module")
def engines(ckpt):
    pe = ProcessEngine(ckpt, config=EngineConfig(max_batch_size=4, max_waiting=8))
    ref = Engine(ckpt, config=EngineConfig(max_batch_size=4))
    pe.start()
    ref.start()
    yield pe, ref
    ref.shutdown(5)
    pe.shutdown(5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, T))


def test_same_outputs_as_engine_and_streaming(engines):
    pe, ref = engines
    n = [20, 7, 30, 12, 25]

    async def batch(eng):
        async def one(i, p):
            await asyncio.sleep(0.003 * i)
            return await eng.generate(p, SamplingParams(max_tokens=n[i], temperature=0.0))
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    got, want = run(batch(pe)), run(batch(ref))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]

    async def stream():
        return [c async for c in await pe.stream("hello", SamplingParams(max_tokens=16, temperature=0.0))]

    chunks = run(stream())
    assert "".join(c.text for c in chunks) == want[0].text[:len("".join(c.text for c in chunks))]
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 16
    info = pe.info()
    assert info["engine"] == "ProcessEngine" and info["block_size"] == 64 and info["engine_pid"] != 0


def test_abandoned_stream_is_aborted_in_the_child(engines):
    pe, _ = engines
    before = pe.stats()["generated_tokens"]

    async def leave_early():
        it = await pe.stream("abc", SamplingParams(max_tokens=60, temperature=0.0))
        await it.__anext__()
        await it.aclose()

    run(leave_early())
    wait_until(lambda: pe.stats()["running"] == 0, timeout_s=T)
    assert pe.stats()["generated_tokens"] - before < 60


@pytest.mark.slow
def test_queue_limit_and_shutdown(ckpt):
    with pytest.raises(ValueError, match="checkpoint"):
        ProcessEngine(None)  # checked before a process starts
    pe = ProcessEngine(ckpt, config=EngineConfig(max_batch_size=1, max_waiting=1))
    pe.start()
    try:
        async def many():
            p = SamplingParams(max_tokens=30, temperature=0.0)
            return await asyncio.gather(*(pe.generate("x" * (i + 1), p) for i in range(6)), return_exceptions=True)

        results = run(many())
        assert any(isinstance(r, EngineOverloadedError) for r in results)
        assert any(not isinstance(r, BaseException) for r in results)
        pe.check_health()
    finally:
        pe.shutdown(5)
    assert pe._proc.poll() is not None  # the child exited
    with pytest.raises(EngineShutdownError):
        pe.generate_sync("late", SamplingParams(max_tokens=2))
