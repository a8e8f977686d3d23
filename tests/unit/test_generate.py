"""Generation: sampling filters, KV cache == full recompute, batched == individual, EOS / stop sequences."""

import contextlib

import pytest
import torch

from raymoe.platform.decode import _RowState
from raymoe.platform.generate import StreamStep, generate, generate_stream, sample_next, top_k_filter, top_p_filter
from raymoe.platform.kv_cache import KVCache
from raymoe.platform.model import GPT, GPTConfig

V = 257
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [7], [200, 100, 50, 25]]


def spicy(moe: bool, **kw) -> GPT:
    """Tiny model with large random weights, so greedy outputs vary from token to token."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=48, n_layer=4, n_head=4, d_model=32, expert_interval=2 if moe else 0,
               num_experts=[2, 4], k=1)
    if moe:  # capacity dropping in train and eval: generation must switch it off
        cfg.update(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)
    else:
        cfg.update(num_experts=1)
    cfg.update(kw)
    m = GPT(GPTConfig.from_dict(cfg))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


def greedy_reference(m: GPT, prompt: list[int], n: int) -> list[int]:
    """No cache, no padding, one row: argmax of a full forward per step (dropless, eval)."""
    m.eval()
    out, seq = [], list(prompt)
    with torch.no_grad(), m.dropless():
        for _ in range(n):
            tok = int(m(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
    return out


# ---- sampling -------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_filter_hand_made():
    assert kept(top_k_filter(LOGITS, 2)) == [1, 3]
    assert kept(top_k_filter(LOGITS, 1)) == [1]
    assert kept(top_k_filter(LOGITS, None)) == [0, 1, 2, 3]
    assert kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3]
    torch.testing.assert_close(top_k_filter(LOGITS, 2)[0, [1, 3]], LOGITS[0, [1, 3]])


def test_top_p_filter_hand_made():
    # sorted probs 0.4, 0.3, 0.2, 0.1: a token is kept while the mass before it is < top_p
    assert kept(top_p_filter(LOGITS, 0.3)) == [1]
    assert kept(top_p_filter(LOGITS, 0.5)) == [1, 3]
    assert kept(top_p_filter(LOGITS, 0.75)) == [1, 2, 3]
    assert kept(top_p_filter(LOGITS, 1.0)) == [0, 1, 2, 3]
    both = torch.cat([LOGITS, LOGITS.flip(-1)])  # rows filter independently
    assert torch.isfinite(top_p_filter(both, 0.5)).tolist() == [[False, True, False, True],
                                                                  [True, False, True, False]]


def test_sample_next_frequencies_follow_renormalized_filter():
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_next(LOGITS.expand(n, 4), temperature=1.0, top_p=0.75, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / n
    expected = torch.tensor([0.0, 0.4, 0.2, 0.3]) / 0.9
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)
    draws_k = sample_next(LOGITS.expand(n, 4), temperature=1.0, top_k=2, generator=g)
    freq_k = torch.bincount(draws_k, minlength=4).float() / n
    torch.testing.assert_close(freq_k, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]), rtol=0, atol=0.015)


def test_temperature_zero_is_greedy_and_seed_reproducible():
    logits = torch.randn(5, V)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_arguments_validated(kw):
    with pytest.raises(ValueError):
        sample_next(LOGITS, **{"temperature": 1.0, **kw})


# ---- KV cache ------------------------------------------------------------------------------------------

def test_kv_cache_shapes_and_overflow():
    m = spicy(False)
    cache = KVCache.for_model(m, batch_size=2, max_len=5)
    assert len(cache.k) == 4 and cache.k[0].shape == (2, 4, 5, 8)
    m(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    assert cache.length == 3 and cache.valid_len_B.tolist() == [3, 3]
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("moe", [False, True])
def test_cached_logits_equal_full_forward_with_left_padding(moe):
    m = spicy(moe).eval()
    m.set_dropless(True)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False  # row 0 left-padded by 4
    full = m(idx, token_mask_BT=mask).logits
    cache = KVCache.for_model(m, 2, 9)
    parts = [m(idx[:, :5], kv_cache=cache, token_mask_BT=mask[:, :5]).logits]
    for t in range(5, 9):
        parts.append(m(idx[:, t:t + 1], kv_cache=cache, token_mask_BT=mask[:, t:t + 1]).logits)
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_cache_equals_no_cache_equals_individual(moe):
    m = spicy(moe)
    if moe:  # the config really drops tokens when not dropless, so dropless generation matters
        m.eval()
        idx = torch.randint(0, V, (4, 8))
        assert any(s.dropped_fraction > 0 for s in m(idx).stats)
    m.train()
    n = 10
    cached = generate(m, PROMPTS, n, temperature=0.0)
    uncached = generate(m, PROMPTS, n, temperature=0.0, use_cache=False)
    single = [generate(m, [p], n, temperature=0.0)[0] for p in PROMPTS]
    # generation restores the caller's settings
    assert m.training and all(x.drop_tokens for x in m.moe_modules())
    ref = [greedy_reference(m, p, n) for p in PROMPTS]
    assert cached == uncached == single == ref
    assert len({tuple(r) for r in ref}) == len(PROMPTS) and max(len(set(r)) for r in ref) > 3  # non-degenerate


def test_seeded_sampling_reproducible_and_cache_independent():
    m = spicy(True)
    a = generate(m, PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    b = generate(m, PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, seed=5, use_cache=False)
    assert a == b and all(len(r) == 8 for r in a)


def test_eos_and_stop_sequences():
    m = spicy(False)
    free = generate(m, PROMPTS, 12, temperature=0.0)
    row = free[1]
    eos = row[4]
    first = row.index(eos)
    out = generate(m, PROMPTS, 12, temperature=0.0, eos_id=eos)
    assert out[1] == row[:first]
    for i, r in enumerate(free):  # every row stops at its own first EOS (or runs to the end)
        assert out[i] == (r[:r.index(eos)] if eos in r else r)
    stop = row[5:7]
    cut = next(j for j in range(len(row) - 1) if row[j:j + 2] == stop)
    out = generate(m, [PROMPTS[1]], 12, temperature=0.0, stop_sequences=[stop])
    assert out[0] == row[:cut]


def test_stream_matches_generate_and_reports_finish():
    m = spicy(False)
    steps = list(generate_stream(m, PROMPTS, 6, temperature=0.0))
    assert len(steps) == 6 and all(isinstance(s, StreamStep) for s in steps)
    assert all(len(t) == 1 for s in steps for t in s.tokens)
    assert steps[-1].finish_reason == ["length"] * 4 and steps[0].finish_reason == [None] * 4
    joined = [[t for s in steps for t in s.tokens[i]] for i in range(4)]
    assert joined == generate(m, PROMPTS, 6, temperature=0.0)


def test_stop_sequence_holdback():
    st = _RowState([[5, 6, 7]], eos_id=None)
    assert [st.push(t) for t in (1, 5, 6, 8, 5, 6)] == [[1], [], [], [5, 6, 8], [], []]
    assert st.push(7) == [] and st.finish_reason == "stop"
    overlap = _RowState([[5, 5, 6]], eos_id=0)
    assert [overlap.push(t) for t in (5, 5, 5, 6)] == [[], [], [5], []]
    assert overlap.finish_reason == "stop"
    held = _RowState([[5, 6]], eos_id=0)
    assert held.push(5) == [] and held.push(0) == [5] and held.finish_reason == "eos"


def test_generate_argument_errors_and_edges():
    m = spicy(False)
    assert generate(m, [[1], [2, 3]], 0) == [[], []]
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[1], []], 3)
    with pytest.raises(ValueError, match="block_size"):
        generate(m, [[1] * 40], 10)
    with pytest.raises(ValueError, match="token ids"):
        generate(m, [[V]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_stream(m, [[1]], -1)  # validated eagerly, before iteration
    assert len(generate(m, [[1] * 40], 9, temperature=0.0)[0]) == 9  # 40 + 9 - 1 == block_size


def test_stream_leaves_grad_mode_alone():
    m = spicy(False)
    it = generate_stream(m, [[1, 2]], 3, temperature=0.0)
    next(it)
    assert torch.is_grad_enabled()
    with contextlib.closing(it):
        pass
    assert m.training  # closing the stream early restores train mode
