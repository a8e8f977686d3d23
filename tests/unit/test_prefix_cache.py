"""Prefix caching (raymoe.platform.prefix_cache): block lookup, placement of loaded prefixes, LRU eviction of chain
tails, and a runner with the cache == a runner without it (logits and greedy tokens) for GPT-MoE (learned
positions) and a RoPE/GQA family, through prefill, the mixed step, decode, rows leaving and compaction."""

import pytest
import torch

from raymoe.platform.decode import left_pad
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.prefix_cache import PrefixCache
from raymoe.platform.runner import LocalRunner, Pending, prepare_for_inference

V = 97
FAMILIES = {
    # the paper's GPT-MoE: learned positions, LayerNorm, GELU; capacity dropping in training
    "gpt_moe": dict(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1),
    "rope_gqa": dict(n_kv_head=1, position="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm="head"),
}


def _model(family: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig.from_dict(dict(vocab_size=V, block_size=96, n_layer=2, n_head=2, d_model=32,
                                     expert_interval=2, num_experts=4, k=1, **FAMILIES[family])))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return prepare_for_inference(m)


def _tagged_prefill(store, model, prompts):
    """prefill_inputs + store without a forward: every written key is its token id, so loads are checkable."""
    P = max(map(len, prompts))
    pre = store.prefill_inputs(model, prompts, P)
    T = pre.idx_BT.shape[1]
    C = pre.cache.length
    for i, (p, c) in enumerate(zip(prompts, pre.hit_tokens)):
        got = pre.cache.k[0][i, 0, C - c:C, 0].tolist()
        assert got == [float(t) for t in p[:c]], "a loaded prefix is the prompt's first tokens, right-aligned at C"
        for layer in range(len(pre.cache.k)):
            pre.cache.k[layer][i, :, C + T - (len(p) - c):C + T] = torch.tensor(p[c:], dtype=torch.float)[None, :, None]
    pre.cache.length = C + T
    store.store(pre)
    return pre.hit_tokens


def test_lookup_placement_and_lru_eviction_of_tails():
    model = _model("gpt_moe")
    store = PrefixCache.for_model(model, block_size=2, budget_bytes=3 * PrefixCache.block_bytes(model, 2))
    assert store.max_blocks == 3
    assert _tagged_prefill(store, model, [[1, 2, 3, 4, 5]]) == [0] and len(store) == 2  # blocks (1 2) (3 4)
    assert _tagged_prefill(store, model, [[1, 2, 3, 4, 9]]) == [4]
    # different hits in one batch; a whole-prompt match still leaves one token to run
    assert _tagged_prefill(store, model, [[1, 2, 7], [1, 2, 3, 4]]) == [2, 2]
    # a long prefix and a long miss: loading 4 + running 5 would take more slots than the 5 of the prompts
    assert _tagged_prefill(store, model, [[1, 2, 3, 4, 9], [8] * 5]) == [0, 0]
    # (8 8) (8 8) needed 2 blocks of 1 free: the least recently used tail (3 4) went, never (1 2) it extends
    assert len(store) == 3 and store.stats["evicted_blocks"] == 1
    assert len(store.match([1, 2, 3, 4, 0])) == 1 and len(store.match([8, 8, 8, 8, 0])) == 2
    # a block is named by its whole chain: (3 4) after (8 8) is another block than (3 4) after (1 2)
    store.clear()
    _tagged_prefill(store, model, [[1, 2, 3, 4, 0]])
    assert len(store.match([8, 8, 3, 4, 0])) == 0 and len(store.match([1, 2, 3, 4, 0])) == 2
    assert store.take_counts() == (store.stats["query_tokens"], store.stats["hit_tokens"]) and \
        store.take_counts() == (0, 0)
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        PrefixCache.for_model(model, block_size=2, budget_bytes=10)


def test_evicts_the_least_recently_used_tail_and_keeps_extended_blocks():
    model = _model("gpt_moe")
    store = PrefixCache.for_model(model, block_size=1, budget_bytes=3 * PrefixCache.block_bytes(model, 1))
    _tagged_prefill(store, model, [[1, 2, 3]])  # chain 1 -> 2 -> 3
    _tagged_prefill(store, model, [[5]])  # full store: evicts 3 (the tail), never 1 or 2 (extended)
    assert store.match([1, 2, 3, 0]) == store.match([1, 2, 0]) and len(store.match([1, 2, 0])) == 2
    assert len(store.match([5, 0])) == 1 and len(store) == 3


def test_dropless_routing_does_not_depend_on_the_tokens_routed_together():
    """A suffix prefilled alone must route as inside the whole prompt: with serving's dropless routing each
    token's experts and output are its own (capacity_factor=0.5 would drop tokens when they are routed
    together)."""
    model = _model("gpt_moe")
    moe = model.moe_modules()[0]
    torch.manual_seed(1)
    h_ND = torch.randn(40, 32) * 3

    def whole_and_parts():
        with torch.no_grad():
            whole, counts = moe(h_ND)[0], moe.last_stats.exp_counts.clone()
            parts, part_counts = [], 0
            for sl in (slice(0, 7), slice(7, 30), slice(30, 40)):
                parts.append(moe(h_ND[sl])[0])
                part_counts = part_counts + moe.last_stats.exp_counts
        return whole, torch.cat(parts), counts, part_counts

    whole, parts, counts, part_counts = whole_and_parts()
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)  # GEMMs of other shapes: rounding only
    assert torch.equal(part_counts, counts) and int(counts.sum()) == 40  # the same experts, none dropped
    moe.set_dropless(False, deterministic=True)  # capacity dropping: which tokens are dropped depends on the batch
    whole, parts, counts, part_counts = whole_and_parts()
    assert not torch.allclose(parts, whole, rtol=1e-4, atol=1e-5)


def _runners(family):
    model = _model(family)
    plain = LocalRunner(model, 4, max_len=96)
    cached = LocalRunner(model, 4, max_len=96, prefix_cache_bytes=1 << 20, prefix_block_size=4)
    return plain, cached


def _same(a, b):
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    return a.argmax(-1)[:, None]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_runner_with_prefix_cache_equals_without(family):
    plain, cached = _runners(family)
    g = torch.Generator().manual_seed(2)
    system = torch.randint(0, V, (21,), generator=g).tolist()
    user = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 6)]
    first = left_pad([system + user[0]])
    nxt = _same(plain.prefill(*first), cached.prefill(*first))  # cold: stores 5 blocks of 4
    assert cached.prefix_cache.stats["hit_tokens"] == 0 and len(cached.prefix_cache) == 6
    for _ in range(3):
        nxt = _same(plain.decode(nxt), cached.decode(nxt))
    # mixed step: a full system-prompt hit, a shorter shared prefix, a miss, left-padded together
    new = left_pad([system + user[1], system[:9] + user[2], user[2] + user[0]])
    new_plain, run_plain = plain.prefill_and_decode(*new, nxt)
    new_cached, run_cached = cached.prefill_and_decode(*new, nxt)
    assert cached.prefix_cache.stats["hit_tokens"] == 20 + 8
    nxt = torch.cat([_same(run_plain, run_cached), _same(new_plain, new_cached)])
    for step in range(12):  # rows leave; the rows with a gap between prefix and suffix are compacted
        if step == 4:
            plain.keep_rows([1, 2]), cached.keep_rows([1, 2])
            nxt = nxt[[1, 2]]
        nxt = _same(plain.decode(nxt), cached.decode(nxt))
    assert cached.cache.compact(force=True) >= 0
    c = cached.cache
    assert torch.equal(c.key_mask_BL[:, :c.length].sum(1), c.valid_len_B)  # no real slot dropped
    # a plain prefill (no running rows) of a hit
    plain.reset(), cached.reset()
    _same(plain.prefill(*left_pad([system + user[4]])), cached.prefill(*left_pad([system + user[4]])))


def test_new_weights_empty_the_prefix_cache():
    _, cached = _runners("rope_gqa")
    with torch.no_grad():
        cached.prefill(*left_pad([list(range(30))]))
    assert len(cached.prefix_cache) == 7
    other = _model("rope_gqa", seed=1)
    cached.swap(Pending(other.config, None, "other", other))
    assert len(cached.prefix_cache) == 0 and cached.model is other
