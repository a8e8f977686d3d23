"""Prefix caching: prompts that share a block-aligned token prefix (a system prompt, a chat history) reuse its
keys/values instead of prefilling it again.

Shape legend: N blocks in the store, S block size (tokens), H cached heads, Dk key dim, Dv value dim, B rows,
C slots of the loaded prefixes, T suffix tokens run by the model.

The store holds the keys/values of whole blocks of S prompt tokens. A block is named by its tokens and its
parent block (the chain from the prompt's first token), as vLLM's automatic prefix caching does with block
hashes; here the name is the exact ``(parent id, tokens)`` tuple, so two prefixes never collide. The KV of a
token depends on every token before it, and on nothing else once routing is dropless (a token's expert choice
is its own top-k, whatever tokens it is routed with): a block's KV is valid in every prompt that starts with
its chain. Memory is bounded: ``max_blocks`` preallocated ([N, H, S, Dk] keys and [N, H, S, Dv] values per layer,
``torch.empty``: pages are touched only when used); a full store evicts its least recently used block that no
other cached block extends (a chain's tail goes before its head, as vLLM frees blocks in reverse order).

A prefill of new rows (`PrefixCache.prefill_inputs`) looks up each prompt's longest cached prefix (at least one
token is left to run: the model has to produce the last position's logits), loads it into a `KVCache`
right-aligned at slot C (row i's c_i tokens in slots [C - c_i, C)) and returns the left-padded suffixes to run
after it: positions continue from c_i (``valid_len_B``), so learned absolute positions and RoPE both see the
same positions as a full prefill. Between a row's prefix and its suffix lie C - c_i + padding slots that are
masked (`SlotKVCache` compacts by each row's span, not its token count). After the forward,
`PrefixCache.store` adds the prompts' new full blocks. Hits are capped so that C + T never exceeds the padded
length of the whole prompts: the batch uses at most the slots it would without the cache.

Outputs equal those of a full prefill up to floating-point rounding (the prefix's KV was computed in another
batch: other GEMM shapes; tests/unit/test_prefix_cache.py checks logits and greedy tokens).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from raymoe.platform.decode import left_pad
from raymoe.platform.kv_cache import KVCache


@dataclass
class _Block:
    id: int
    slot: int  # index into the store's buffers
    parent: tuple  # the parent block's key ((0, ()) names the root)
    children: int = 0


@dataclass
class PrefixPrefill:
    """A prefill of new rows over their cached prefixes: the `KVCache` holding the prefixes, the suffixes to run
    (left-padded ids and mask, [B, T]) and what `PrefixCache.store` needs afterwards."""

    cache: KVCache
    idx_BT: torch.Tensor
    mask_BT: torch.Tensor
    prompts: list = field(default_factory=list)
    hit_tokens: list = field(default_factory=list)


_ROOT = (0, ())


class PrefixCache:
    """Keys/values of block-aligned prompt prefixes, LRU-bounded (see the module docstring).

    ``stats``: queries (prompts looked up), query_tokens, hit_tokens (tokens loaded instead of prefilled),
    inserted_blocks, evicted_blocks; `take_counts` returns the (query, hit) tokens since its last call.
    """

    def __init__(self, n_layer: int, n_head: int, k_dim: int, v_dim: int, *, block_size: int, max_blocks: int,
                 device=None, dtype=torch.float32):
        if block_size < 1 or max_blocks < 1:
            raise ValueError(f"PrefixCache needs block_size >= 1 and max_blocks >= 1; got {block_size}, {max_blocks}")
        self.block_size, self.max_blocks = block_size, max_blocks
        self.k = [torch.empty(max_blocks, n_head, block_size, k_dim, device=device, dtype=dtype)
                  for _ in range(n_layer)]
        self.v = [torch.empty(max_blocks, n_head, block_size, v_dim, device=device, dtype=dtype)
                  for _ in range(n_layer)]
        # every key from the start: other threads read it (engine.stats()) while the loop's thread counts
        self.stats = collections.Counter(dict.fromkeys(
            ("queries", "query_tokens", "hit_tokens", "inserted_blocks", "evicted_blocks"), 0))
        self._taken = (0, 0)
        self.clear()

    @staticmethod
    def block_bytes(model, block_size: int) -> int:
        """Bytes one block of ``block_size`` tokens takes for ``model`` (keys and values of every layer)."""
        cfg = model.config
        heads, k_dim, v_dim = cfg.kv_dims()
        itemsize = next(model.parameters()).element_size()
        return cfg.n_layer * heads * block_size * (k_dim + v_dim) * itemsize

    @classmethod
    def for_model(cls, model, *, block_size: int, budget_bytes: int) -> "PrefixCache":
        """A store for ``model`` (a GPT) holding as many blocks as ``budget_bytes`` allows."""
        per_block = cls.block_bytes(model, block_size)
        if budget_bytes < per_block:
            raise ValueError(f"prefix cache budget of {budget_bytes} bytes holds no block: one block of "
                             f"{block_size} tokens takes {per_block} bytes for this model; raise prefix_cache_mb")
        cfg, p = model.config, next(model.parameters())
        heads, k_dim, v_dim = cfg.kv_dims()
        return cls(cfg.n_layer, heads, k_dim, v_dim, block_size=block_size, max_blocks=budget_bytes // per_block,
                   device=p.device, dtype=p.dtype)

    def clear(self) -> None:
        """Forget every block (new weights make every cached KV stale)."""
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()  # oldest first
        self._free = list(range(self.max_blocks - 1, -1, -1))
        self._ids = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def take_counts(self) -> tuple[int, int]:
        """(query tokens, hit tokens) since the last call (for metrics counters)."""
        now = (self.stats["query_tokens"], self.stats["hit_tokens"])
        delta = (now[0] - self._taken[0], now[1] - self._taken[1])
        self._taken = now
        return delta

    # -- lookup ------------------------------------------------------------------------------------------
    def _key(self, parent: tuple, tokens: tuple) -> tuple:
        """The name of the block of ``tokens`` after the block ``parent`` (its id: unique while it is cached)."""
        return (self._blocks[parent].id if parent is not _ROOT else 0, tokens)

    def _chain(self, tokens: Sequence[int], n_blocks: int) -> list[tuple]:
        """Keys of the cached blocks that start ``tokens``, at most ``n_blocks``."""
        S, keys, parent = self.block_size, [], _ROOT
        for b in range(n_blocks):
            key = self._key(parent, tuple(tokens[b * S:(b + 1) * S]))
            if key not in self._blocks:
                break
            keys.append(key)
            parent = key
        return keys

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):  # the chain's head becomes the most recent: tails are evicted first
            self._blocks.move_to_end(key)

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Buffer slots of the longest cached block-aligned prefix of ``tokens`` that leaves at least one token."""
        keys = self._chain(tokens, (len(tokens) - 1) // self.block_size)
        self._touch(keys)
        return [self._blocks[k].slot for k in keys]

    def prefill_inputs(self, model, prompts: Sequence[Sequence[int]], max_slots: int) -> PrefixPrefill:
        """The cache and suffixes of a prefill of ``prompts`` (see the module docstring); the loaded prefixes and
        the suffixes together use at most ``max_slots`` slots (the padded length of the whole prompts)."""
        S = self.block_size
        hits = [self.match(p) for p in prompts]
        cap = max(len(h) for h in hits)
        while cap and cap * S + max(len(p) - min(len(h), cap) * S for p, h in zip(prompts, hits)) > max_slots:
            cap -= 1  # a long prefix and a long suffix in one batch: load less (cap 0 always fits)
        hit_tokens = [min(len(h), cap) * S for h in hits]
        idx_BT, mask_BT = left_pad([p[c:] for p, c in zip(prompts, hit_tokens)])
        C = max(hit_tokens)
        cache = KVCache.for_model(model, len(prompts), C + idx_BT.shape[1])
        if C:
            cache.start_rows(torch.tensor(hit_tokens))
            for i, (h, c) in enumerate(zip(hits, hit_tokens)):
                if c:
                    self._load(cache, i, h[:c // S], C)
        self.stats["queries"] += len(prompts)
        self.stats["query_tokens"] += sum(map(len, prompts))
        self.stats["hit_tokens"] += sum(hit_tokens)
        return PrefixPrefill(cache, idx_BT, mask_BT, [list(p) for p in prompts], hit_tokens)

    def _load(self, cache: KVCache, row: int, slots: list[int], end: int) -> None:
        idx = torch.tensor(slots, device=self.k[0].device)
        n = len(slots) * self.block_size
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            for src_NHSd, dst_BHLd in zip(mine, theirs):
                blocks_nHSd = src_NHSd.index_select(0, idx)
                dst_BHLd[row, :, end - n:end] = blocks_nHSd.transpose(0, 1).reshape(blocks_nHSd.shape[1], n, -1)

    # -- insertion ---------------------------------------------------------------------------------------
    def store(self, pre: PrefixPrefill) -> None:
        """Add the full blocks of the prompts of a finished prefill ``pre`` (its cache holds their KV)."""
        S, T = self.block_size, pre.idx_BT.shape[1]
        C = pre.cache.length - T
        for i, (prompt, c) in enumerate(zip(pre.prompts, pre.hit_tokens)):
            n_blocks = len(prompt) // S
            keys = self._chain(prompt, n_blocks)
            self._touch(keys)
            for b in range(len(keys), n_blocks):
                key = self._insert(keys[-1] if keys else _ROOT, tuple(prompt[b * S:(b + 1) * S]), set(keys))
                if key is None:
                    break
                # a loaded block (evicted meanwhile by another row's) ends at slot C; the suffix ends at C + T
                start = C - c + b * S if b * S < c else C + T - len(prompt) + b * S
                self._copy_in(pre.cache, i, start, self._blocks[key].slot)
                keys.append(key)

    def _insert(self, parent: tuple, tokens: tuple, protect: set) -> Optional[tuple]:
        slot = self._free.pop() if self._free else self._evict(protect)
        if slot is None:
            return None
        self._ids += 1
        key = self._key(parent, tokens)
        self._blocks[key] = _Block(self._ids, slot, parent)
        if parent is not _ROOT:
            self._blocks[parent].children += 1
        self.stats["inserted_blocks"] += 1
        return key

    def _evict(self, protect: set) -> Optional[int]:
        """Free the least recently used block that no cached block extends (not one of ``protect``)."""
        for key, blk in self._blocks.items():
            if blk.children == 0 and key not in protect:
                del self._blocks[key]
                if blk.parent is not _ROOT:
                    self._blocks[blk.parent].children -= 1
                self.stats["evicted_blocks"] += 1
                return blk.slot
        return None

    def _copy_in(self, cache: KVCache, row: int, start: int, slot: int) -> None:
        sl = slice(start, start + self.block_size)
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            for dst_NHSd, src_BHLd in zip(mine, theirs):
                dst_NHSd[slot] = src_BHLd[row, :, sl]
