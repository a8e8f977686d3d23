"""The KV cache `GPT.forward(kv_cache=...)` appends to: one call's batch (`KVCache`) and the running batch of
continuous decoding (`SlotKVCache`, rows join and leave between steps).

Shape legend: B rows, T tokens in one forward call, L slots (cache length), Lc slot capacity, R row capacity,
H cached heads, Dk key dim, Dv value dim. What one layer caches per token comes from `GPTConfig.kv_dims()`:
grouped-query attention caches its Hk key/value heads (not the H query heads); multi-head latent attention
caches H heads whose keys (no-RoPE + RoPE dims) and values have different sizes.

What the model uses (both classes): ``length`` (slots in use), ``key_mask_BL`` (which slots hold real tokens:
padding and slots before a row's first token are never attended to), ``valid_len_B`` (real tokens per row:
the next position of each row) and ``begin``/``write``/``end`` around a forward call.

`KVCache` holds the rows of one prefill: rows are left-padded to a common length, so slot i is the same
call position in every row.

`SlotKVCache` holds up to ``max_rows`` rows that started at different times. Every row is right-aligned at slot
``length`` (each decode step appends one slot to every row), so a row's real tokens are the last
``valid_len_B[i]`` slots (a row started from a cached prefix also has masked slots among them). Positions come from ``valid_len_B``, so where a row sits in the slot range does not
change its numbers. Hence:

- joining rows whose prefill is longer than ``length``: shift every row right (one slice copy);
- compacting: slots older than the longest live row are unused by every row: shift left (one slice copy); a
  row that started from a cached prefix has masked slots between its prefix and its suffix, so "longest" is
  counted in slots from the row's first real token (its span), not in tokens;
- leaving rows: gather the kept rows to the front (skipped when only trailing rows leave).

Its buffers are allocated once ([R, H, Lc, Dk] keys and [R, H, Lc, Dv] values per layer); the active rows are
views ``buf[:B]``. Lc is the serving length (``for_model(max_len=...)``), not the model's block_size: a RoPE
model's block_size is its max_position_embeddings (131072 for Mixtral), far more slots than a server needs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def _layer_buffers(n_layer, rows, n_head, max_len, head_dim, v_dim, device, dtype):
    """Zeroed key and value buffers of every layer: [rows, H, max_len, Dh] (values: v_dim, default Dh)."""
    k_shape = (rows, n_head, max_len, head_dim)
    v_shape = (rows, n_head, max_len, head_dim if v_dim is None else v_dim)
    return ([torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(n_layer)],
            [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(n_layer)])


class KVCache:
    """Preallocated per-layer key/value cache, [B, H, max_len, Dk] keys and [B, H, max_len, Dv] values per
    layer (``v_dim`` None: Dv = Dk), shared slot index for all rows.

    Rows are aligned by slot (left padding), `key_mask_BL` marks which slots hold real tokens and
    `valid_len_B` counts real tokens per row (the next position of each row).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 *, v_dim: Optional[int] = None, device=None, dtype=torch.float32):
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"KVCache needs max_len >= 1 and batch_size >= 1; got {max_len}, {batch_size}")
        self.k, self.v = _layer_buffers(n_layer, batch_size, n_head, max_len, head_dim, v_dim, device, dtype)
        self.key_mask_BL = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.valid_len_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0
        self._pending = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache sized for `model` (a GPT: uses model.config and the dtype/device of its parameters)."""
        cfg = model.config
        p = next(model.parameters())
        heads, k_dim, v_dim = cfg.kv_dims()
        return cls(cfg.n_layer, batch_size, heads, k_dim, max_len, v_dim=v_dim, device=p.device, dtype=p.dtype)

    def start_rows(self, lengths_B: torch.Tensor) -> None:
        """Make an empty cache start with row i's ``lengths_B[i]`` tokens right-aligned at slot
        ``max(lengths_B)`` (their keys/values are written by the caller: `raymoe.platform.prefix_cache`)."""
        assert self.length == 0, "start_rows on a cache in use"
        C = int(lengths_B.max())
        lengths_B = lengths_B.to(self.valid_len_B.device)
        self.key_mask_BL[:, :C] = torch.arange(C, device=lengths_B.device)[None, :] >= C - lengths_B[:, None]
        self.valid_len_B[:] = lengths_B
        self.length = C

    def begin(self, T: int, token_mask_BT: Optional[torch.Tensor]) -> None:
        """Reserve slots [length, length + T) for the forward call about to run."""
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} + {T} tokens > max_len={self.max_len}")
        self._pending = T
        sl = slice(self.length, self.length + T)
        self.key_mask_BL[:, sl] = True if token_mask_BT is None else token_mask_BT.to(self.key_mask_BL.device)

    def write(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """Store this call's keys/values of `layer`; returns all keys/values so far, [B, H, L, Dk] / [.., Dv]."""
        end = self.length + k_BHTd.shape[2]
        self.k[layer][:, :, self.length:end] = k_BHTd
        self.v[layer][:, :, self.length:end] = v_BHTd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def end(self, T: int, token_mask_BT: Optional[torch.Tensor]) -> None:
        """Commit the slots reserved by `begin`."""
        assert T == self._pending, "KVCache.end without a matching begin"
        self.length += T
        self.valid_len_B += T if token_mask_BT is None else token_mask_BT.long().sum(1).to(self.valid_len_B.device)
        self._pending = 0


class SlotKVCache(KVCache):
    """Preallocated cache of up to ``max_rows`` rows of up to ``max_len`` slots each (see module docstring)."""

    def __init__(self, n_layer: int, max_rows: int, n_head: int, head_dim: int, max_len: int, *,
                 v_dim: Optional[int] = None, device=None, dtype=torch.float32):
        if max_len < 1 or max_rows < 1:
            raise ValueError(f"SlotKVCache needs max_len >= 1 and max_rows >= 1; got {max_len}, {max_rows}")
        self._k, self._v = _layer_buffers(n_layer, max_rows, n_head, max_len, head_dim, v_dim, device, dtype)
        self._mask_RL = torch.zeros(max_rows, max_len, dtype=torch.bool, device=device)
        self._valid_R = torch.zeros(max_rows, dtype=torch.long, device=device)
        # slots from a row's first real token to `length`: its token count, plus the masked gap between a
        # cached prefix and the suffix prefilled after it (raymoe.platform.prefix_cache)
        self._span_R = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.max_rows, self.max_len = max_rows, max_len
        self.rows = 0
        self.length = 0
        self._pending = 0
        self._views()

    @classmethod
    def for_model(cls, model, max_rows: int, max_len: Optional[int] = None) -> "SlotKVCache":
        """A cache for `model` (a GPT) of ``max_rows`` rows and ``max_len`` slots per row: the serving length
        (longest padded prompt + generated tokens a row may reach). None: the model's block_size, which for a
        RoPE model is its max_position_embeddings (e.g. 131072): pass the serving length there."""
        cfg = model.config
        p = next(model.parameters())
        heads, k_dim, v_dim = cfg.kv_dims()
        if max_len is None:
            max_len = cfg.block_size
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"SlotKVCache.for_model: max_len must be an int >= 1 or None; got {max_len!r}")
        return cls(cfg.n_layer, max_rows, heads, k_dim, max_len, v_dim=v_dim, device=p.device, dtype=p.dtype)

    def _views(self) -> None:
        B = self.rows
        self.k = [t[:B] for t in self._k]
        self.v = [t[:B] for t in self._v]
        self.key_mask_BL = self._mask_RL[:B]
        self.valid_len_B = self._valid_R[:B]

    # -- membership --------------------------------------------------------------------------------------
    def _shift(self, d: int) -> None:
        """Move every row's slots by d (d > 0: right, making room at the left; d < 0: drop the oldest -d)."""
        B, L = self.rows, self.length
        if B == 0 or d == 0:
            self.length = L if B else 0
            return
        src, dst = (slice(0, L), slice(d, L + d)) if d > 0 else (slice(-d, L), slice(0, L + d))
        for bufs in (self._k, self._v):
            for t in bufs:
                t[:B, :, dst] = t[:B, :, src].clone()
        self._mask_RL[:B, dst] = self._mask_RL[:B, src].clone()
        if d > 0:
            self._mask_RL[:B, :d] = False
        self.length = L + d

    def add_rows(self, prefill: KVCache) -> None:
        """Append the rows of a finished prefill (a `KVCache` of n rows and ``prefill.length`` slots)."""
        n, P = prefill.key_mask_BL.shape[0], prefill.length
        if self.rows + n > self.max_rows:
            raise ValueError(f"SlotKVCache: {self.rows} + {n} rows > max_rows={self.max_rows}")
        if P > self.max_len:
            raise ValueError(f"SlotKVCache: prefill of {P} slots > max_len={self.max_len}")
        if self.rows == 0:
            self.length = P
        elif P > self.length:
            self._shift(P - self.length)
        B, L = self.rows, self.length
        new = slice(B, B + n)
        for mine, theirs in ((self._k, prefill.k), (self._v, prefill.v)):
            for t, src in zip(mine, theirs):
                t[new, :, L - P:L] = src[:, :, :P]
        self._mask_RL[new, :L] = False
        self._mask_RL[new, L - P:L] = prefill.key_mask_BL[:, :P]
        self._valid_R[new] = prefill.valid_len_B
        first_n = prefill.key_mask_BL[:, :P].int().argmax(1)  # every row has a real token
        self._span_R[new] = P - first_n.to(self._span_R.device)
        self.rows = B + n
        self._views()

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order, moved to the front); the others leave."""
        keep = list(keep)
        L = self.length
        if keep != list(range(len(keep))):
            idx = torch.tensor(keep, dtype=torch.long, device=self._mask_RL.device)
            n = len(keep)
            for bufs in (self._k, self._v):
                for t in bufs:
                    t[:n, :, :L] = t[idx, :, :L]
            self._mask_RL[:n, :L] = self._mask_RL[idx, :L]
            self._valid_R[:n] = self._valid_R[idx]
            self._span_R[:n] = self._span_R[idx]
        self.rows = len(keep)
        if self.rows == 0:
            self.length = 0
        self._views()

    def end(self, T: int, token_mask_BT: Optional[torch.Tensor]) -> None:
        super().end(T, token_mask_BT)
        self._span_R[:self.rows] += T

    def compact(self, force: bool = False) -> int:
        """Drop slots no row uses. Runs when forced, when the next step would overflow, or when at least half
        the slots are dead (attention cost is proportional to ``length``). Returns the slots dropped."""
        if self.rows == 0:
            self.length = 0
            return 0
        longest = int(self._span_R[:self.rows].max())  # == the most real tokens of a row unless a row has a gap
        dead = self.length - longest
        if dead > 0 and (force or self.length + 1 > self.max_len or dead * 2 >= self.length):
            self._shift(-dead)
            return dead
        return 0
