"""The decode loop: rows of token-id prompts in, sampled tokens out, over a model runner (`raymoe.platform.runner`).

Shape legend: B rows, P padded prompt length, V vocab.

One implementation for every caller: `raymoe.platform.generate` (``generate``, ``generate_stream``,
``sample_text``, ``raymoe generate``) runs it to completion over a `LocalRunner`; the serving engine
(`raymoe.deployments.engine.Engine`) drives it from its thread, admitting requests between steps, over a
`LocalRunner` or an `EPRunner`.

Each `DecodeLoop.step`:

1. drops rows that finished, failed or were abandoned (``Row.gone``);
2. prefills the admitted rows together (left-padded: padding is masked, never attended to and never routed to
   an expert) and samples their first token. While other rows are running and the runner has a mixed step
   (``runner.mixed_step``), the new prompts and the running rows' next tokens share one forward;
3. otherwise, when rows were running before this step, runs one decode step for every running row (one
   token each);
4. applies the rows' logits processors (penalties, logit_bias, min_tokens: `raymoe.platform.logits`, batched
   over the rows that set any; rows at the defaults are untouched), samples per row with the row's
   temperature / top_k / top_p and random generator (rows that share a generator and settings are sampled in
   one call), records the logprobs of rows that ask (raw model distribution) and applies its stop rules (`_RowState`: stop tokens, stop
   sequences of ids with hold-back, max_new_tokens; with a `raymoe.platform.detokenize.TextStream`, stop strings
   matched on the detokenized text), handing released tokens and their text to ``Row.emit``.

Rows do not depend on each other: the runner keeps the MoE layers dropless and masks padding, so batched
greedy output equals single-row greedy output. Errors stay per row where they can: a failing sampling call
fails its rows; a failing prefill fails the rows being admitted; a failing decode or mixed step fails the rows
of that forward and resets the runner's batch.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from raymoe.platform.logits import DEFAULT, LogitsSettings, RowLogits, logprob_entries, process


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


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """ValueError naming the setting and its allowed values."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1]; got {top_p}")


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from logits [B, V] -> LongTensor [B]. temperature 0 = greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = top_k_filter(logits_BV.float() / temperature, top_k)
    logits_BV = top_p_filter(logits_BV, top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ---- rows ------------------------------------------------------------------------------------------

EosIds = Optional[Union[int, Iterable[int]]]


def eos_set(eos_id: EosIds) -> frozenset[int]:
    """The stop-token ids of ``eos_id``: None, one id, or several (a tokenizer's ``stop_ids``)."""
    if eos_id is None:
        return frozenset()
    return frozenset([int(eos_id)] if isinstance(eos_id, int) else map(int, eos_id))



class _RowState:
    """Stop rules of one row: EOS, stop sequences (a possible match is held back) and the finish reason."""

    def __init__(self, stop_sequences: Sequence[Sequence[int]], eos_id: EosIds):
        self.stops = [list(s) for s in stop_sequences]
        self.eos_ids = eos_set(eos_id)
        self.pending: list[int] = []
        self.finish_reason: Optional[str] = None

    def push(self, token: int) -> list[int]:
        """Add a sampled token; return the tokens that can be released now."""
        if token in self.eos_ids:
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


class Row:
    """One sequence in the loop: its prompt, sampling settings and stop rules.

    Owners subclass it: ``emit(tokens, text, finish_reason)`` receives released tokens (finish_reason "eos",
    "stop" or "length" on the last call), ``fail(exc)`` a failure of this row, and ``gone()`` says when the loop
    should drop the row (default: finished or failed; an engine adds "the client went away").
    ``generator`` None samples from torch's global generator. ``eos_id``: one stop-token id or several.
    ``text``: a `raymoe.platform.detokenize.TextStream` (detokenizer + stop strings): ``emit`` then also gets
    the text released with the tokens, and a matched stop string ends the row ("stop"); without one, text is
    None. ``logits``: penalties, logit bias, min_tokens and logprobs (`raymoe.platform.logits`); with
    logprobs, ``emitted_logprobs`` holds the entries of the tokens passed to the current ``emit`` call.
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, stop_sequences: Sequence[Sequence[int]] = (),
                 eos_id: EosIds = None, text=None, logits: LogitsSettings = DEFAULT):
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.stop = _RowState(stop_sequences, eos_id)
        # None at the defaults: the loop then leaves this row's logits alone (outputs as before)
        self.logits = (RowLogits(logits, prompt_ids, self.stop.eos_ids)
                       if logits.processes or logits.logprobs is not None else None)
        self._held_logprobs: list = []  # entries of sampled tokens not released yet (held back or EOS)
        self.emitted_logprobs: list = []
        self.text = text
        self.completion_tokens = 0  # sampled so far (a matched stop sequence's tokens included)
        self.next_token: Optional[int] = None  # the last sampled token: the next decode step's input
        self.error: Optional[BaseException] = None

    @property
    def finish_reason(self) -> Optional[str]:
        return self.stop.finish_reason

    def gone(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def take(self, token: int, logprob=None) -> None:
        """Count a sampled token (with its logprob entry when the row asked for logprobs), run the stop rules
        and emit what they release."""
        self.next_token = token
        self.completion_tokens += 1
        if self.logits is not None:
            self.logits.took(token)
            if logprob is not None:
                self._held_logprobs.append(logprob)
        released = self.stop.push(token)
        if self.stop.finish_reason is None and self.completion_tokens >= self.max_new_tokens:
            released += self.stop.finish("length")
        # released tokens are the oldest sampled ones in order; what a finish drops (EOS, a stop) is dropped here
        self.emitted_logprobs = self._held_logprobs[:len(released)]
        self._held_logprobs = [] if self.stop.finish_reason else self._held_logprobs[len(released):]
        text = None
        if self.text is not None:
            text, matched = self.text.push(released, final=self.stop.finish_reason is not None)
            if matched:  # a stop string in the text: the reply ends before it
                self.stop.finish("stop")
        self.emit(released, text, self.stop.finish_reason)

    def emit(self, tokens: list[int], text: Optional[str], finish_reason: Optional[str]) -> None:
        """Tokens (and their text, with a ``text`` stream) released by the last sampled token (override to
        deliver them)."""

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    def dropped(self) -> None:
        """Called when the loop drops the row (finished, failed or gone)."""


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] and their mask (False = padding)."""
    P = max(len(p) for p in prompts)
    idx_BP = torch.zeros(len(prompts), P, dtype=torch.long)
    mask_BP = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx_BP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask_BP[i, P - len(p):] = True
    return idx_BP, mask_BP


# ---- the loop --------------------------------------------------------------------------------------


class DecodeLoop:
    """Continuous batching over a runner (see the module docstring).

    max_rows: running rows at most; max_prefill_tokens: padded prompt tokens admitted per step (None: no
    limit); on_forward(): called after every model forward (expert-load accounting reads
    ``runner.expert_counts``); on_decode(batch_size): called at every step that decodes running rows.
    ``counters``: prefills, prefill_tokens, decode_steps, mixed_steps, generated_tokens, max_batch_size_seen.
    """

    def __init__(self, runner, *, max_rows: int, max_prefill_tokens: Optional[int] = None,
                 on_forward: Optional[Callable[[], None]] = None,
                 on_decode: Optional[Callable[[int], None]] = None):
        self.runner = runner
        self.max_rows, self.max_prefill_tokens = max_rows, max_prefill_tokens
        self.on_forward = on_forward or (lambda: None)
        self.on_decode = on_decode or (lambda batch_size: None)
        self.rows: list[Row] = []
        self.counters: collections.Counter = collections.Counter()

    def admit(self, waiting: collections.deque) -> list[Row]:
        """Take rows from the front of ``waiting`` (FIFO) within max_rows and max_prefill_tokens; rows already
        gone are dropped. Call under the lock that guards ``waiting``; pass the result to `step`."""
        taken: list[Row] = []
        longest = 0
        while waiting and len(self.rows) + len(taken) < self.max_rows:
            r = waiting[0]
            if r.gone():
                waiting.popleft()
                r.dropped()
                continue
            longest = max(longest, len(r.prompt_ids))
            limit = self.max_prefill_tokens
            if taken and limit is not None and longest * (len(taken) + 1) > limit:
                break
            taken.append(waiting.popleft())
        return taken

    def step(self, new: Sequence[Row] = ()) -> None:
        """One iteration: prefill ``new`` (admitted rows) and decode the running ones (see the module docstring)."""
        new = list(new)
        self.retire()
        running = bool(self.rows)  # rows prefilled into an empty batch take one token this step, as any row
        mixed = bool(new and running and self.runner.mixed_step)
        with torch.no_grad():  # only around the forwards: grad mode is thread-global (generate_stream yields)
            if mixed:
                try:  # one forward: the new rows' prompts and the running rows' next tokens
                    self._prefill_and_decode(new)
                except Exception as exc:
                    self._fail_batch(new + self.rows, exc)
                self.retire()
            elif new:
                try:
                    self._prefill(new)
                except Exception as exc:
                    for r in new:
                        r.fail(exc)
                    self.rows = [r for r in self.rows if r not in new]
                    self._reset_after_failed_prefill()
                self.retire()
            if running and self.rows and not mixed:
                try:
                    self._decode()
                except Exception as exc:
                    self._fail_batch(self.rows, exc)
                self.retire()

    def retire(self) -> None:
        """Drop rows that finished, failed or are gone (the runner drops their KV cache)."""
        keep = [i for i, r in enumerate(self.rows) if not r.gone()]
        if len(keep) != len(self.rows):
            for r in self.rows:
                if r.gone():
                    r.dropped()
            self.rows = [self.rows[i] for i in keep]
            self.runner.keep_rows(keep)

    # -- forwards ----------------------------------------------------------------------------------------
    def _fail_batch(self, rows: list[Row], exc: BaseException) -> None:
        for r in rows:
            r.fail(exc)
        self.rows = []
        self.runner.reset()

    def _reset_after_failed_prefill(self) -> None:
        """The running rows continue if the runner still holds exactly them."""
        if self.runner.rows == len(self.rows):
            return
        self._fail_batch(self.rows, RuntimeError("the batch was reset after a failed prefill"))

    def _next_tokens(self, rows: list[Row]) -> torch.Tensor:
        return torch.tensor([[r.next_token] for r in rows], dtype=torch.long)

    def _prefill_and_decode(self, new: list[Row]) -> None:
        idx_BP, mask_BP = left_pad([r.prompt_ids for r in new])
        rows = self.rows
        new_BV, run_BV = self.runner.prefill_and_decode(idx_BP, mask_BP, self._next_tokens(rows))
        self.on_forward()
        self.counters["mixed_steps"] += 1
        self._accept_decode(rows, run_BV)
        self._join(new, mask_BP, new_BV)

    def _prefill(self, new: list[Row]) -> None:
        idx_BP, mask_BP = left_pad([r.prompt_ids for r in new])
        logits_BV = self.runner.prefill(idx_BP, mask_BP)
        self.on_forward()
        self._join(new, mask_BP, logits_BV)

    def _decode(self) -> None:
        rows = self.rows
        logits_BV = self.runner.decode(self._next_tokens(rows))
        self.on_forward()
        self._accept_decode(rows, logits_BV)

    def _join(self, new: list[Row], mask_BP: torch.Tensor, logits_BV: torch.Tensor) -> None:
        """New rows join the batch with their first token."""
        tokens = self._sample(logits_BV, new)
        self.rows.extend(new)
        self.counters["prefills"] += 1
        self.counters["prefill_tokens"] += int(mask_BP.sum())
        self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(self.rows))
        for r, (t, lp) in zip(new, tokens):
            self._take(r, t, lp)

    def _accept_decode(self, rows: list[Row], logits_BV: torch.Tensor) -> None:
        """Running rows take their next token."""
        self.counters["decode_steps"] += 1
        self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(rows))
        self.on_decode(len(rows))
        for r, (t, lp) in zip(rows, self._sample(logits_BV, rows)):
            self._take(r, t, lp)

    def _take(self, r: Row, token: Optional[int], logprob) -> None:
        if token is None or r.gone():
            return
        self.counters["generated_tokens"] += 1
        r.take(token, logprob)

    @staticmethod
    def _sample(raw_BV: torch.Tensor, rows: list[Row]) -> list[tuple[Optional[int], Optional[tuple]]]:
        """(token, logprob entry) per row: the rows' logits processors, then sampling with each row's settings;
        rows whose sampling call fails are failed (None). Logprobs come from the raw logits."""
        row_logits = [r.logits for r in rows]
        try:
            logits_BV = process(raw_BV, row_logits)
        except Exception as exc:  # processors failing (a bad setting that got through): these rows only
            for r in rows:
                if r.logits is not None:
                    r.fail(exc)
            logits_BV = raw_BV
        out: list[Optional[int]] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            key = ("greedy",) if r.temperature == 0 else (id(r.generator), r.temperature, r.top_k, r.top_p)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            r0 = rows[idx[0]]
            try:
                if key[0] == "greedy":
                    tokens = logits_BV[idx].argmax(dim=-1).tolist() if len(idx) < len(rows) else \
                        logits_BV.argmax(dim=-1).tolist()
                else:
                    tokens = sample_next(logits_BV[idx], r0.temperature, r0.top_k, r0.top_p, r0.generator).tolist()
            except Exception as exc:  # e.g. non-finite logits: these rows only
                for i in idx:
                    rows[i].fail(exc)
                continue
            for i, t in zip(idx, tokens):
                out[i] = t
        return list(zip(out, logprob_entries(raw_BV, out, row_logits)))
