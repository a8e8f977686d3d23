"""Generation for a batch of token-id prompts: ``generate``, ``generate_stream`` and ``sample_text``.

They run the one decode loop (`raymoe.platform.decode.DecodeLoop`, the same the serving engine drives) to
completion over a `LocalRunner` (or a `RecomputeRunner` with ``use_cache=False``), synchronously, with every
prompt admitted at once. Prompts of different lengths are left-padded; padding is masked (never attended to,
never routed to an expert) and positions count real tokens only. The MoE layers run dropless: with capacity
dropping, whether a token keeps its expert would depend on the other tokens in the call, so cached decoding
(one token per call) could differ from a full recompute. Sampling filters (`sample_next`, `top_k_filter`,
`top_p_filter`) are defined in `raymoe.platform.decode` and part of this module's API.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from raymoe.platform.decode import (DecodeLoop, EosIds, Row, check_sampling, sample_next, top_k_filter,
                                    top_p_filter)
from raymoe.platform.detokenize import IncrementalDetokenizer
from raymoe.platform.runner import LocalRunner, RecomputeRunner

__all__ = ["StreamStep", "generate", "generate_stream", "sample_next", "sample_text", "top_k_filter",
           "top_p_filter"]


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


class _BatchRow(Row):
    """A row of `generate_stream`: keeps what the current step released."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.released: list[int] = []
        self.finished_now: Optional[str] = None

    def emit(self, tokens: list[int], text: Optional[str], finish_reason: Optional[str]) -> None:
        self.released += tokens
        self.finished_now = finish_reason


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


def generate_stream(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    eos_id: EosIds = None, seed: Optional[int] = None, use_cache: bool = True,
                    stop_sequences: Optional[Sequence[Sequence[int]]] = None) -> Iterator[StreamStep]:
    """Decode a batch of prompts step by step, yielding a `StreamStep` per step.

    Arguments are validated when called (ValueError); decoding starts on the first iteration.
    The model (a GPT) runs in eval mode and dropless for the duration; both settings are restored when the
    stream ends or is closed. Stops when every row finished (EOS, a stop sequence, or max_new_tokens).
    """
    check_sampling(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    cfg = model.config
    prompts = _validate_prompts(prompts, cfg.vocab_size)
    stops = [list(map(int, s)) for s in (stop_sequences or [])]
    if any(len(s) == 0 for s in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens - 1 > cfg.block_size:  # the last new token is never fed back
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                         f"block_size={cfg.block_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    rows = [_BatchRow(p, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                      stop_sequences=stops, eos_id=eos_id) for p in prompts]
    return _stream(model, rows, use_cache)


def _stream(model, rows: list[_BatchRow], use_cache: bool) -> Iterator[StreamStep]:
    # Arguments are validated eagerly by generate_stream; this generator runs only when iterated.
    if rows[0].max_new_tokens == 0:
        return
    was_training = model.training
    try:
        with model.dropless(True):  # restores each layer's setting; LocalRunner switches to eval + dropless
            longest = max(len(r.prompt_ids) for r in rows)
            runner = (LocalRunner(model, len(rows), max_len=max(2, longest + rows[0].max_new_tokens)) if use_cache
                      else RecomputeRunner(model, len(rows)))
            loop = DecodeLoop(runner, max_rows=len(rows))
            new = loop.admit(collections.deque(rows))
            while new or loop.rows:
                loop.step(new)
                new = []
                failed = next((r.error for r in rows if r.error is not None), None)
                if failed is not None:
                    raise failed
                yield StreamStep([r.released for r in rows], [r.finished_now for r in rows])
                for r in rows:
                    r.released, r.finished_now = [], None
    finally:
        model.train(was_training)


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: EosIds = None, seed: Optional[int] = None, use_cache: bool = True,
             stop_sequences: Optional[Sequence[Sequence[int]]] = None) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts (different lengths allowed).

    Returns one list of new tokens per prompt (EOS and a matched stop sequence excluded). ``eos_id``: one
    stop-token id or several (a tokenizer's ``stop_ids``). temperature 0 is greedy; top_k / top_p filter
    before sampling; `seed` makes sampling reproducible. Consumes `generate_stream`, so both give the same
    tokens.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                                use_cache, stop_sequences):
        for i, toks in enumerate(step.tokens):
            outputs[i].extend(toks)
    return outputs


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, seed: int = 0) -> str:
    """``prompt`` plus a generated continuation decoded with ``tokenizer`` (`raymoe.platform.tokenizer`; the
    checkpoint's own: ``load_tokenizer(checkpoint)``), at most up to the model's context length."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not ids:
        raise ValueError("the sample prompt encodes to no tokens; give a non-empty prompt")
    room = model.config.block_size - len(ids) + 1
    if room < 1:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context (block_size) is "
                         f"{model.config.block_size}")
    out = generate(model, [ids], max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=tokenizer.stop_ids, seed=seed)
    detok = IncrementalDetokenizer(tokenizer, ids)  # decoded in the prompt's context, as a server streams it
    return prompt + detok.push(out[0]) + detok.flush()
