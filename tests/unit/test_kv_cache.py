"""KV caches sized from GPTConfig.kv_dims(): grouped-query attention caches Hk heads, multi-head latent attention
keys and values of different dims; every SlotKVCache path (join with shift right, mixed prefill + decode, leave
with gather, compact with shift left) gives the logits of a full recompute for those models."""

import pytest
import torch

from raymoe.platform.kv_cache import KVCache, SlotKVCache
from raymoe.platform.mixed_step import forward_groups
from raymoe.platform.model import GPT, GPTConfig

V = 97
KINDS = {
    "gqa": dict(n_kv_head=2, head_dim=12, qk_norm="head"),
    "mla": dict(attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6, rope_interleave=True),
}


def _model(kind: str) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, d_model=32, expert_interval=2,
                      num_experts=4, moe=dict(k=1), position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                      **KINDS[kind]))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    m.eval()
    m.set_dropless(True)
    return m


@pytest.mark.parametrize("kind, heads, k_dim, v_dim", [("gqa", 2, 12, 12), ("mla", 4, 12, 6)])
def test_cache_shapes_follow_kv_dims(kind, heads, k_dim, v_dim):
    m = _model(kind)
    assert m.config.kv_dims() == (heads, k_dim, v_dim)
    kv = KVCache.for_model(m, 3, 5)
    assert [t.shape for t in kv.k] == [(3, heads, 5, k_dim)] * 2
    assert [t.shape for t in kv.v] == [(3, heads, 5, v_dim)] * 2
    slot = SlotKVCache.for_model(m, 4, max_len=20)  # the serving length, not block_size
    assert slot._k[0].shape == (4, heads, 20, k_dim) and slot._v[0].shape == (4, heads, 20, v_dim)
    assert SlotKVCache.for_model(m, 4)._k[0].shape[2] == m.config.block_size
    with pytest.raises(ValueError, match="max_len"):
        SlotKVCache.for_model(m, 4, max_len=0)


def _prompts(prompts):
    P = max(map(len, prompts))
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    return idx, mask


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_slot_cache_paths_equal_full_recompute(kind):
    m = _model(kind)
    cache = SlotKVCache.for_model(m, max_rows=4, max_len=24)
    seqs: list[list[int]] = []
    gen = torch.Generator().manual_seed(0)

    def check(logits_BV, sequences):
        assert logits_BV.shape[0] == len(sequences)
        for logits_V, s in zip(logits_BV, sequences):
            full = m(torch.tensor([s]), last_logits_only=True).logits[0, -1]
            torch.testing.assert_close(logits_V, full, rtol=1e-4, atol=1e-4)

    def prefill(prompts):
        idx, mask = _prompts(prompts)
        kv = KVCache.for_model(m, len(prompts), idx.shape[1])
        logits = m(idx, kv_cache=kv, token_mask_BT=mask, last_logits_only=True).logits[:, -1]
        cache.add_rows(kv)
        seqs.extend(list(p) for p in prompts)
        check(logits, prompts)

    def step():
        nxt = torch.randint(0, V, (len(seqs),), generator=gen).tolist()
        out = m(torch.tensor(nxt)[:, None], kv_cache=cache, token_mask_BT=torch.ones(len(seqs), 1, dtype=torch.bool),
                last_logits_only=True).logits[:, -1]
        for s, t in zip(seqs, nxt):
            s.append(t)
        check(out, seqs)

    prefill([[1, 2, 3]])
    step()
    step()
    # mixed step: the running row decodes while two new rows prefill, one longer than the cache (shift right)
    new = [[5] * 9, [6, 7]]
    new_idx, new_mask = _prompts(new)
    new_kv = KVCache.for_model(m, 2, new_idx.shape[1])
    nxt = [11]
    new_BV, run_BV = forward_groups(m, [(new_idx, new_kv, new_mask), (torch.tensor(nxt)[:, None], cache,
                                                                     torch.ones(1, 1, dtype=torch.bool))])
    cache.add_rows(new_kv)
    seqs[0].append(nxt[0])
    seqs.extend(new)
    check(torch.cat([run_BV, new_BV]), seqs)
    step()
    cache.keep_rows([2, 0])  # leave with a gather
    seqs[:] = [seqs[2], seqs[0]]
    step()
    cache.keep_rows([0])  # the short row stays: dead slots on the left
    seqs[:] = [seqs[0]]
    assert cache.compact(force=True) > 0 and cache.length == len(seqs[0])
    for _ in range(3):
        step()


def test_compact_keeps_a_gap_between_a_cached_prefix_and_its_suffix():
    """A row started from a cached prefix (`KVCache.start_rows`, raymoe.platform.prefix_cache) has masked slots
    between its prefix and its suffix: compaction counts its span in slots, not its tokens."""
    pre = KVCache(1, 2, 1, 1, max_len=9)
    pre.start_rows(torch.tensor([6, 0]))  # row 0: 6 cached tokens in slots 0-5; row 1: none
    assert pre.key_mask_BL[:, :6].tolist() == [[True] * 6, [False] * 6] and pre.valid_len_B.tolist() == [6, 0]
    mask = torch.tensor([[False, False, True], [True, True, True]])  # row 0: 1 suffix token after 2 pads
    pre.begin(3, mask)
    pre.end(3, mask)
    slot = SlotKVCache(1, 2, 1, 1, max_len=12)
    slot.add_rows(pre)
    assert slot.valid_len_B.tolist() == [7, 3] and slot.length == 9
    for _ in range(2):  # decode steps
        slot.begin(1, None)
        slot.end(1, None)
    assert slot.compact(force=True) == 0  # row 0 spans all 11 slots although it has 9 tokens
    slot.keep_rows([1])
    assert slot.compact(force=True) == 6 and slot.length == 5
    assert slot.key_mask_BL[:, :slot.length].sum().item() == slot.valid_len_B.item() == 5
