"""Penalties, logit_bias, min_tokens, logprobs and best_of (no Ray): hand-computed processor values, the engine's
logprobs against a full forward of the model, batched rows with mixed settings == the same rows alone."""

import asyncio

import pytest
import torch

from raymoe.deployments.engine import Engine
from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.protocol import SamplingParams
from raymoe.platform.logits import LogitsSettings, RowLogits, process
from serving_helpers import spicy_model

EOS = 256


@pytest.fixture(scope="module")
def engine():
    eng = Engine(model=spicy_model(0), config=EngineConfig(max_batch_size=4))
    eng.start()
    yield eng
    eng.shutdown(timeout_s=5)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 12), temperature=0.0, **kw)


def test_processors_by_hand():
    """Repetition over prompt + generated, then frequency x count and presence over generated (vLLM's order),
    logit_bias added, min_tokens bans the stop ids; a row at the defaults is left as it is."""
    s = LogitsSettings(presence_penalty=0.25, frequency_penalty=0.5, repetition_penalty=2.0, logit_bias={3: 1.0},
                       min_tokens=5)
    row = RowLogits(s, prompt_ids=[0], stop_ids=frozenset({3}))
    row.state(4, "cpu")
    for t in (2, 2, 1):
        row.took(t)
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [2.0, -1.0, 0.5, 0.0]])
    out = process(logits, [row, None])
    assert out[0].tolist() == [1.0, -2.75, -1.0, float("-inf")]
    assert out[1].tolist() == logits[1].tolist()
    for _ in range(2):
        row.took(0)  # 5 tokens: EOS allowed again, with its bias
    assert process(logits, [row])[0, 3].item() == 1.0
    assert process(logits, [None]) is logits  # no row processes: nothing computed


def _full_forward_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position, by one forward over the whole sequence."""
    with torch.no_grad(), model.dropless(True):
        model.eval()
        out = model(torch.tensor([prompt + tokens[:-1]]))
        logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.log_softmax(logits[0, len(prompt) - 1:].float(), dim=-1)


def test_logprobs_are_the_raw_model_distribution(engine):
    prompt = "hello"
    res = engine.generate_sync(prompt, greedy(logprobs=3, max_tokens=10))
    assert len(res.logprobs) == len(res.token_ids) == 10
    ref = _full_forward_logprobs(spicy_model(0), list(prompt.encode()), res.token_ids)
    for pos, (tok, lp, top) in enumerate(res.logprobs):
        assert tok == res.token_ids[pos] and lp == pytest.approx(ref[pos, tok].item(), abs=1e-4)
        want = ref[pos].topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    # raw, not after processing: a temperature changes the samples' distribution, not the reported logprobs
    hot = engine.generate_sync(prompt, SamplingParams(max_tokens=1, temperature=1.5, seed=3, logprobs=0))
    tok, lp, top = hot.logprobs[0]
    assert lp == pytest.approx(ref[0, tok].item(), abs=1e-4) and top == []
    # streamed chunks carry the same entries
    async def stream():
        return [c async for c in await engine.stream(prompt, greedy(logprobs=3, max_tokens=10))]

    chunks = asyncio.run(asyncio.wait_for(stream(), 60))
    assert [e for c in chunks for e in c.logprobs] == res.logprobs
    assert engine.generate_sync(prompt, greedy()).logprobs is None


def test_logit_bias_bans_and_forces_tokens(engine):
    free = engine.generate_sync("hello", greedy())
    banned = free.token_ids[0]
    res = engine.generate_sync("hello", greedy(logit_bias={banned: -100}))
    assert banned not in res.token_ids  # the "-100 on 'e' still produced 'e'"
    forced = engine.generate_sync("hello", greedy(logit_bias={ord("e"): 100}, max_tokens=6))
    assert forced.text == "eeeeee"


def test_min_tokens_holds_back_the_stop_token(engine):
    eos_first = greedy(logit_bias={EOS: 100}, max_tokens=10)  # EOS the most likely token everywhere
    assert engine.generate_sync("hi", eos_first).completion_tokens == 1  # EOS at once
    res = engine.generate_sync("hi", greedy(logit_bias={EOS: 100}, max_tokens=10, min_tokens=4))
    assert len(res.token_ids) == 4 and res.finish_reason == "stop" and res.completion_tokens == 5


def test_penalties_change_repetitive_output_and_batching_keeps_rows_independent(engine):
    free = engine.generate_sync("hello", greedy(max_tokens=16))
    assert len(set(free.token_ids)) < len(free.token_ids)  # the tiny model repeats itself
    settings = [greedy(max_tokens=16, frequency_penalty=2.0), greedy(max_tokens=16, presence_penalty=2.0),
                greedy(max_tokens=16, repetition_penalty=2.0), greedy(max_tokens=16),
                SamplingParams(max_tokens=16, temperature=0.8, seed=5, frequency_penalty=1.0, logprobs=1)]
    alone = [engine.generate_sync("hello", sp) for sp in settings]
    assert alone[3].token_ids == free.token_ids  # defaults: unchanged
    assert all(a.token_ids != free.token_ids for a in alone[:3])
    no_repeat = alone[2].token_ids  # repetition_penalty 2 on this model: no token twice in the first few
    assert len(set(no_repeat[:4])) == 4

    async def together():
        return await asyncio.gather(*(engine.generate("hello", sp) for sp in settings))

    batched = asyncio.run(asyncio.wait_for(together(), 60))
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]  # one vectorised step, same rows
    assert [e[1] for e in batched[4].logprobs] == pytest.approx([e[1] for e in alone[4].logprobs], abs=1e-4)


def test_best_of_keeps_the_candidates_with_the_highest_cumulative_logprob():
    from raymoe.deployments import openai_api as oa
    from raymoe.deployments.ingress import OpenAIIngress

    req = oa.parse(oa.CompletionRequest, {"prompt": ["a", "b"], "best_of": 3, "n": 2})
    jobs = [{"index": i, "prompt_index": i // 3} for i in range(6)]
    cum = [-3.0, -1.0, -2.0, -0.5, -9.0, -0.1]
    results = [{"text": str(i), "logprobs": [["x", c / 2, []], ["y", c / 2, []]]} for i, c in enumerate(cum)]
    best = OpenAIIngress._best(req, jobs, results)
    assert [r["text"] for _, r in best] == ["1", "2", "5", "3"] and [j["index"] for j, _ in best] == [0, 1, 2, 3]
    assert all("logprobs" not in r for _, r in best)  # asked for by best_of only: not returned


def test_the_settings_and_logprobs_cross_the_engine_process(engine, checkpoints):
    """The default engine runs in a child process: the settings go there and the logprobs come back."""
    from raymoe.deployments.proc_engine import ProcessEngine

    proc = ProcessEngine(str(checkpoints["a"]), config=EngineConfig(max_batch_size=2))  # spicy_model(0)'s weights
    proc.start()
    try:
        sp = greedy(max_tokens=8, logprobs=2, logit_bias={ord("l"): -100}, frequency_penalty=1.0, min_tokens=2)
        got, want = proc.generate_sync("hello", sp), engine.generate_sync("hello", sp)
    finally:
        proc.shutdown(5)
    assert got.token_ids == want.token_ids and len(got.logprobs) == 8
    assert [e[1] for e in got.logprobs] == pytest.approx([e[1] for e in want.logprobs], abs=1e-4)
    assert [[t for t, _ in e[2]] for e in got.logprobs] == [[t for t, _ in e[2]] for e in want.logprobs]
