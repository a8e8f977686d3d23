"""Autoregressive generation: KV cache, sampling, batched prompts of different lengths, streaming.

Shape legend: B batch rows, T tokens in one forward call, L cache slots, H heads, Dh head dim, V vocab.

Batching: prompts are left-padded to a common length; padding is passed to the model as token_mask=False,
so it is never attended to and never routed to an expert, and positions count real tokens only (a row's
first real token has position 0). The MoE layers run dropless during generation: with capacity dropping,
whether a token keeps its expert would depend on the other tokens in the call, so cached decoding (one token
per call) could differ from a full recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn


class KVCache:
    """Preallocated per-layer key/value cache, [B, H, max_len, Dh] per layer, shared slot index for all rows.

    Rows are aligned by slot (left padding), `key_mask_BL` marks which slots hold real tokens and
    `valid_len_B` counts real tokens per row (the next position of each row).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 *, device=None, dtype=torch.float32):
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"KVCache needs max_len >= 1 and batch_size >= 1; got {max_len}, {batch_size}")
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
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
        return cls(cfg.n_layer, batch_size, cfg.n_head, cfg.d_model // cfg.n_head, max_len,
                   device=p.device, dtype=p.dtype)

    def begin(self, T: int, token_mask_BT: Optional[torch.Tensor]) -> None:
        """Reserve slots [length, length + T) for the forward call about to run."""
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} + {T} tokens > max_len={self.max_len}")
        self._pending = T
        sl = slice(self.length, self.length + T)
        self.key_mask_BL[:, sl] = True if token_mask_BT is None else token_mask_BT.to(self.key_mask_BL.device)

    def write(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """Store this call's keys/values of `layer`; returns all keys/values so far, [B, H, L, Dh]."""
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


# ---- sampling ---------------------------------------------------------------------------------------


def top_k_filter(logits_BV: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    if top_k is None or top_k >= logits_BV.size(-1):
        return logits_BV
    kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches top_p."""
    if top_p is None or top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV.float(), dim=-1)
    mass_before_BV = probs_BV.cumsum(-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= top_p  # the top token always has mass_before 0 < top_p: kept
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1]; got {top_p}")


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from logits [B, V] -> LongTensor [B]. temperature 0 = greedy (argmax)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = top_k_filter(logits_BV.float() / temperature, top_k)
    logits_BV = top_p_filter(logits_BV, top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ---- generation -------------------------------------------------------------------------------------


@dataclass
class StreamStep:
    """One decoding step of `generate_stream`.

    tokens[i]: tokens released for row i at this step (usually one; none while a possible stop sequence is
    held back, several when a held-back prefix turns out not to be a stop sequence). EOS and matched stop
    sequences are never released. finish_reason[i]: None while running, else "eos", "stop" or "length";
    it is set at the step a row finishes (rows already finished before get no tokens).
    """

    tokens: list[list[int]]
    finish_reason: list[Optional[str]]


class _RowState:
    """Per-row bookkeeping: held-back tokens for stop sequences and the finish reason."""

    def __init__(self, stop_sequences: list[list[int]], eos_id: Optional[int]):
        self.stops = stop_sequences
        self.eos_id = eos_id
        self.pending: list[int] = []
        self.finish_reason: Optional[str] = None

    def push(self, token: int) -> list[int]:
        """Add a sampled token; return the tokens that can be released now."""
        if self.eos_id is not None and token == self.eos_id:
            return self.finish("eos")
        self.pending.append(token)
        for stop in self.stops:
            if len(self.pending) >= len(stop) and self.pending[-len(stop):] == stop:
                self.pending = self.pending[:-len(stop)]
                return self.finish("stop")
        hold = self._held_suffix()
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop sequence."""
        for n in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(len(s) > n and s[:n] == tail for s in self.stops):
                return n
        return 0

    def finish(self, reason: str) -> list[int]:
        self.finish_reason = reason
        out, self.pending = self.pending, []
        return out


def _validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token lists")
    rows = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size}): {bad[:5]}")
    return rows


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    idx_BP = torch.zeros(len(rows), P, dtype=torch.long, device=device)
    mask_BP = torch.zeros(len(rows), P, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        idx_BP[i, P - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask_BP[i, P - len(r):] = True
    return idx_BP, mask_BP


def generate_stream(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    eos_id: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
                    stop_sequences: Optional[Sequence[Sequence[int]]] = None) -> Iterator[StreamStep]:
    """Decode a batch of prompts step by step, yielding a `StreamStep` per step.

    Arguments are validated when called (ValueError); decoding starts on the first iteration.
    The model (a GPT) runs in eval mode and dropless for the duration; both settings are restored when the
    stream ends or is closed. Stops when every row finished (EOS, a stop sequence, or max_new_tokens).
    """
    _check_sampling(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    cfg = model.config
    rows = _validate_prompts(prompts, cfg.vocab_size)
    stops = [list(map(int, s)) for s in (stop_sequences or [])]
    if any(len(s) == 0 for s in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens - 1 > cfg.block_size:  # the last new token is never fed back
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                         f"block_size={cfg.block_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    states = [_RowState(stops, eos_id) for _ in rows]
    return _stream(model, rows, states, max_new_tokens, use_cache, device,
                   lambda logits: sample_next(logits, temperature, top_k, top_p, generator))


def _stream(model, rows, states, max_new_tokens, use_cache, device, sample) -> Iterator[StreamStep]:
    # Arguments are validated eagerly by generate_stream; this generator runs only when iterated.
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        with model.dropless(True):
            yield from _decode(model, rows, states, max_new_tokens, use_cache, device, sample)
    finally:
        model.train(was_training)


def _decode(model, rows, states, max_new_tokens, use_cache, device, sample) -> Iterator[StreamStep]:
    idx_BT, mask_BT = _left_pad(rows, device)
    B = len(rows)
    cache = KVCache.for_model(model, B, idx_BT.shape[1] + max_new_tokens) if use_cache else None
    feed_idx, feed_mask = idx_BT, mask_BT
    for step in range(max_new_tokens):
        # no_grad only around the call: grad mode is thread-global, so it must not stay set across yields.
        with torch.no_grad():
            out = model(feed_idx, kv_cache=cache, token_mask_BT=feed_mask, last_logits_only=True)
            next_B = sample(out.logits[:, -1, :])
        alive_B = torch.tensor([s.finish_reason is None for s in states], device=device)
        released, reasons = [], []
        for i, st in enumerate(states):
            if st.finish_reason is not None:
                released.append([])
                reasons.append(None)
                continue
            toks = st.push(int(next_B[i]))
            if st.finish_reason is None and step == max_new_tokens - 1:
                toks += st.finish("length")
            released.append(toks)
            reasons.append(st.finish_reason)
        yield StreamStep(released, reasons)
        if all(s.finish_reason is not None for s in states):
            return
        # Finished rows keep a slot but are masked out: never attended to, never routed to an expert.
        new_idx_B1, new_mask_B1 = next_B[:, None], alive_B[:, None]
        if use_cache:
            feed_idx, feed_mask = new_idx_B1, new_mask_B1
        else:
            idx_BT = torch.cat([idx_BT, new_idx_B1], dim=1)
            mask_BT = torch.cat([mask_BT, new_mask_B1], dim=1)
            feed_idx, feed_mask = idx_BT, mask_BT


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
             stop_sequences: Optional[Sequence[Sequence[int]]] = None) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts (different lengths allowed).

    Returns one list of new tokens per prompt (EOS and a matched stop sequence excluded). temperature 0 is
    greedy; top_k / top_p filter before sampling; `seed` makes sampling reproducible. Consumes
    `generate_stream`, so both give the same tokens.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                                use_cache, stop_sequences):
        for i, toks in enumerate(step.tokens):
            outputs[i].extend(toks)
    return outputs

def sample_text(model: nn.Module, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int = 0) -> str:
    """``prompt`` plus a generated continuation (byte tokenizer), at most up to the model's context length."""
    from raymoe.platform.data import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    room = model.config.block_size - len(ids) + 1
    if room < 1:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context (block_size) is "
                         f"{model.config.block_size}")
    out = generate(model, [ids], max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=tok.eos_id, seed=seed)
    return prompt + tok.decode(out[0])
