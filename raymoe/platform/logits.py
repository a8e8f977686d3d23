"""Per-row logits processors and logprobs of the decode loop (`raymoe.platform.decode`).

Shape legend: N rows that use a processor (a subset of the batch), V vocab.

`LogitsSettings` holds one row's settings; its defaults change nothing, so rows at the defaults skip this
module entirely (greedy and seeded outputs stay what they were). For the rows that use one, each step applies,
in vLLM's order, on the model's logits (fp32):

1. ``min_tokens``: the stop-token ids (EOS) get -inf until the row has sampled that many tokens;
2. ``logit_bias``: {token id: bias} added to the logits (OpenAI: -100 bans a token, +100 forces it);
3. ``repetition_penalty`` (Hugging Face / vLLM, multiplicative): the logit of every token of the prompt or
   already generated is divided by it when positive, multiplied when negative;
4. ``frequency_penalty`` and ``presence_penalty`` (OpenAI): minus frequency x count, minus presence when the
   count > 0, counts over the generated tokens only;

then the loop applies temperature, top-k and top-p as before. The processors of all rows of a step run as one
batched tensor computation (per-row settings as tensors), not one row at a time.

Logprobs (``logprobs`` not None) are those of the raw model distribution: ``log_softmax`` of the model's
logits before any processor, temperature or filter (vLLM's default ``raw_logprobs``), so they describe the
model, whatever the sampling settings. Each sampled token gets (token id, its logprob, the ``logprobs`` most
likely tokens with theirs).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import torch

LogprobEntry = tuple  # (token id, logprob, [(token id, logprob), ...] the top alternatives, most likely first)


@dataclasses.dataclass(frozen=True)
class LogitsSettings:
    """One row's logits processors and logprobs request (see the module docstring)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
    min_tokens: int = 0
    logprobs: Optional[int] = None  # None: none; k >= 0: the sampled token's and the k most likely

    def __post_init__(self):
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0; got {self.repetition_penalty}")
        if self.min_tokens < 0 or (self.logprobs is not None and self.logprobs < 0):
            raise ValueError(f"min_tokens and logprobs must be >= 0; got {self.min_tokens}, {self.logprobs}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processes(self) -> bool:
        """Whether any processor changes this row's logits."""
        return self.penalized or bool(self.logit_bias) or self.min_tokens > 0


DEFAULT = LogitsSettings()


class RowLogits:
    """A row's processor state: its settings, the counts of its generated tokens and the tokens of its prompt
    (both [V] tensors, made on the logits' device at the first step that needs them)."""

    def __init__(self, settings: LogitsSettings, prompt_ids: Sequence[int], stop_ids: frozenset[int]):
        self.s, self.prompt_ids, self.stop_ids = settings, list(prompt_ids), sorted(stop_ids)
        self.counts_V: Optional[torch.Tensor] = None
        self.prompt_V: Optional[torch.Tensor] = None
        self.generated = 0
        self.bias = (torch.tensor(list(settings.logit_bias), dtype=torch.long),
                     torch.tensor(list(settings.logit_bias.values()), dtype=torch.float32))

    def state(self, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts_V is None:
            self.counts_V = torch.zeros(V, device=device)
            self.prompt_V = torch.zeros(V, dtype=torch.bool, device=device)
            self.prompt_V[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
        return self.counts_V, self.prompt_V

    def took(self, token: int) -> None:
        self.generated += 1
        if self.counts_V is not None:
            self.counts_V[token] += 1


def process(logits_BV: torch.Tensor, rows: Sequence[Optional[RowLogits]]) -> torch.Tensor:
    """``logits_BV`` with every row's processors applied (rows whose entry is None or processes nothing are
    left as they are; the input is returned unchanged when no row processes)."""
    idx = [i for i, r in enumerate(rows) if r is not None and r.s.processes]
    if not idx:
        return logits_BV
    sub = [rows[i] for i in idx]
    x_NV = logits_BV[idx].float()
    N, V = x_NV.shape
    rr, cc, vv = [], [], []  # sparse additions: min_tokens bans and logit_bias, as one index_put
    for j, r in enumerate(sub):
        if r.generated < r.s.min_tokens and r.stop_ids:
            rr += [j] * len(r.stop_ids)
            cc += r.stop_ids
            vv += [float("-inf")] * len(r.stop_ids)
        if r.s.logit_bias:
            rr += [j] * len(r.bias[0])
            cc += r.bias[0].tolist()
            vv += r.bias[1].tolist()
    if rr:
        x_NV = x_NV.index_put((torch.tensor(rr, device=x_NV.device), torch.tensor(cc, device=x_NV.device)),
                              torch.tensor(vv, device=x_NV.device), accumulate=True)
    pen = [j for j, r in enumerate(sub) if r.s.penalized]
    if pen:
        states = [sub[j].state(V, x_NV.device) for j in pen]
        x_NV[pen] = penalize(x_NV[pen], torch.stack([c for c, _ in states]), torch.stack([p for _, p in states]),
                             *(torch.tensor([getattr(sub[j].s, f) for j in pen], device=x_NV.device)
                               for f in ("presence_penalty", "frequency_penalty", "repetition_penalty")))
    out = logits_BV.float().clone() if logits_BV.dtype != torch.float32 else logits_BV.clone()
    out[idx] = x_NV
    return out


def penalize(x_NV: torch.Tensor, counts_NV: torch.Tensor, prompt_NV: torch.Tensor, presence_N: torch.Tensor,
             frequency_N: torch.Tensor, repetition_N: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt + generated tokens, then frequency and presence over generated ones."""
    seen_NV = prompt_NV | (counts_NV > 0)
    rep_N1 = repetition_N[:, None]
    x_NV = torch.where(seen_NV, torch.where(x_NV > 0, x_NV / rep_N1, x_NV * rep_N1), x_NV)
    return x_NV - frequency_N[:, None] * counts_NV - presence_N[:, None] * (counts_NV > 0).float()


def logprob_entries(logits_BV: torch.Tensor, tokens: Sequence[Optional[int]],
                    rows: Sequence[Optional[RowLogits]]) -> list[Optional[LogprobEntry]]:
    """Per row: (token, logprob, top alternatives) from the raw logits, for rows that asked for logprobs."""
    out: list[Optional[LogprobEntry]] = [None] * len(rows)
    idx = [i for i, r in enumerate(rows) if r is not None and r.s.logprobs is not None and tokens[i] is not None]
    if not idx:
        return out
    lp_NV = torch.log_softmax(logits_BV[idx].float(), dim=-1)
    chosen = lp_NV.gather(1, torch.tensor([[tokens[i]] for i in idx], device=lp_NV.device)).squeeze(1).tolist()
    k = max(rows[i].s.logprobs for i in idx)
    top_v, top_i = (lp_NV.topk(k, dim=-1) if k else (lp_NV[:, :0], lp_NV[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(idx):
        n = rows[i].s.logprobs
        out[i] = (tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out
