"""The mixed prefill + decode forward (`forward_groups`) equals separate forwards and a full recompute."""

import pytest
import torch

from raymoe.platform.kv_cache import KVCache, SlotKVCache
from raymoe.platform.mixed_step import forward_groups
from raymoe.platform.model import GPT
from raymoe.platform.runner import LocalRunner, ModelRunner, RecomputeRunner
from test_generate import spicy


def _model(moe: bool = True) -> GPT:
    """test_generate's model with large random weights, in eval mode and dropless (as the serving runner)."""
    m = spicy(moe)
    m.eval()
    m.set_dropless(True)
    return m


def _prompts(prompts):
    P = max(map(len, prompts))
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    return idx, mask


def _full_last_logits(m, seq):
    with torch.no_grad():
        return m(torch.tensor([seq]), last_logits_only=True).logits[0, -1]


@pytest.mark.parametrize("moe", [True, False])
def test_prefill_and_decode_in_one_forward_equal_a_full_recompute(moe):
    m = _model(moe)
    cache = SlotKVCache.for_model(m, max_rows=4)
    running = [[1, 2, 3, 4, 5], [7, 8]]
    idx, mask = _prompts(running)
    kv = KVCache.for_model(m, 2, idx.shape[1])
    with torch.no_grad():
        m(idx, kv_cache=kv, token_mask_BT=mask, last_logits_only=True)
    cache.add_rows(kv)
    # one step: the running rows decode one token each while two new rows (one longer than the cache) prefill
    nxt = [11, 12]
    new = [[20] * 9, [21, 22, 23]]
    new_idx, new_mask = _prompts(new)
    new_kv = KVCache.for_model(m, 2, new_idx.shape[1])
    with torch.no_grad():
        new_BV, run_BV = forward_groups(m, [(new_idx, new_kv, new_mask),
                                            (torch.tensor(nxt)[:, None], cache, torch.ones(2, 1, dtype=torch.bool))])
    cache.add_rows(new_kv)
    for s, t in zip(running, nxt):
        s.append(t)
    seqs = running + new
    for i, logits in enumerate(list(run_BV) + list(new_BV)):
        torch.testing.assert_close(logits, _full_last_logits(m, seqs[i]), rtol=1e-4, atol=1e-4)
    # the cache holds all four rows correctly: a plain decode step afterwards still equals the recompute
    step = [30, 31, 32, 33]
    with torch.no_grad():
        out = m(torch.tensor(step)[:, None], kv_cache=cache, token_mask_BT=torch.ones(4, 1, dtype=torch.bool),
                last_logits_only=True).logits[:, -1]
    for i, s in enumerate(seqs):
        s.append(step[i])
        torch.testing.assert_close(out[i], _full_last_logits(m, s), rtol=1e-4, atol=1e-4)


def test_runner_mixed_step_equals_prefill_then_decode():
    a, b = LocalRunner(_model(), 4), LocalRunner(_model(), 4)
    idx, mask = _prompts([[1, 2, 3], [4, 5, 6, 7, 8]])
    with torch.no_grad():
        first_a, first_b = a.prefill(idx, mask), b.prefill(idx, mask)
        tok = torch.stack([first_a.argmax(-1), first_b.argmax(-1)], 0)[0][:, None]
        new_idx, new_mask = _prompts([[9, 10]])
        new_a, run_a = a.prefill_and_decode(new_idx, new_mask, tok)
        run_b = b.decode(tok)
        new_b = b.prefill(new_idx, new_mask)
    torch.testing.assert_close(run_a, run_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_a, new_b, rtol=1e-4, atol=1e-4)
    assert a.rows == b.rows == 3
    with pytest.raises(ValueError, match="one token per running row"):
        a.prefill_and_decode(new_idx, new_mask, tok)


def test_every_runner_implements_the_protocol():
    from raymoe.deployments.ep_runner import EPRunner  # importing it does not import Ray

    members = [n for n in vars(ModelRunner) if not n.startswith("_")] + list(ModelRunner.__annotations__)
    for cls in (LocalRunner, RecomputeRunner, EPRunner):
        assert isinstance(cls.mixed_step, bool), cls
        missing = [n for n in members if n not in ("config", "expert_counts") and not hasattr(cls, n)]
        assert not missing, (cls.__name__, missing)
    r = LocalRunner(_model(), 2)
    assert isinstance(r, ModelRunner) and isinstance(RecomputeRunner(_model(), 2), ModelRunner)
