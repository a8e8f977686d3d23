"""Model runners: what the decode loop (`raymoe.platform.decode.DecodeLoop`) calls to run the model (no Ray here).

Shape legend: B rows, P padded prompt length, V vocab.

The loop owns rows, admission, sampling and stop rules; a runner owns the weights and the KV cache of the
running rows and answers with last-position logits. `ModelRunner` is the contract; implementations:

- `LocalRunner`: the whole model in this process plus its `SlotKVCache` (``raymoe generate``, plain serving
  replicas), optionally with a `raymoe.platform.prefix_cache.PrefixCache` (new rows load their prompts' cached
  prefixes and prefill only the rest). It is also what each `raymoe.actors.inference_shard.InferenceShard` runs for its slice of the rows
  in expert-parallel serving.
- `RecomputeRunner`: no cache, every step re-runs each row's whole sequence (``generate(use_cache=False)``:
  the reference the cache is tested against).
- `raymoe.deployments.ep_runner.EPRunner`: a group of `InferenceShard` actors (imports Ray, loaded lazily).

Row contract, the same for all: ``prefill`` appends its rows after the running ones; ``decode`` runs one
token for every running row, in order; ``prefill_and_decode`` does both in one call (``mixed_step`` says
whether that is one forward, which the loop prefers, or two); ``keep_rows(keep)`` (ascending indices) keeps
those rows, in order; ``reset`` drops every row. ``expert_counts`` holds the token-choices per expert of the
last forward ({layer id: LongTensor [E]}, all rows). ``prepare(checkpoint)`` loads weights without touching
the running model (called from any thread); ``swap(pending)`` installs them between two steps (the loop's
thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from raymoe.platform.decode import left_pad
from raymoe.platform.kv_cache import KVCache, SlotKVCache
from raymoe.platform.mixed_step import forward_groups
from raymoe.platform.prefix_cache import PrefixCache, PrefixPrefill


@runtime_checkable
class ModelRunner(Protocol):
    """What `DecodeLoop` and the serving engine call (see the module docstring)."""

    config: Any  # the model's GPTConfig (block_size, vocab_size, ...)
    mixed_step: bool  # prefill_and_decode runs one forward (True) or a decode then a prefill (False)
    expert_counts: dict[int, torch.Tensor]

    @property
    def rows(self) -> int: ...
    def prefill(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor: ...
    def decode(self, idx_B1: torch.Tensor) -> torch.Tensor: ...
    def prefill_and_decode(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor,
                           idx_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def keep_rows(self, keep: Sequence[int]) -> None: ...
    def reset(self) -> None: ...
    def prepare(self, checkpoint: str) -> "Pending": ...
    def swap(self, pending: "Pending") -> None: ...
    def info(self) -> dict: ...
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


@dataclass
class Pending:
    """Weights loaded by ``prepare`` and waiting for ``swap``: the model's config, the checkpoint's step, and
    the runner-specific payload (a model, or a marker that the shards hold one)."""

    config: Any
    step: Optional[int]
    checkpoint: str
    payload: Any = None


def prepare_for_inference(model):
    """Eval mode, dropless routing (capacity dropping would couple the rows of a batch), no grads."""
    model.eval()
    model.set_dropless(True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_local_model(checkpoint: str, device) -> tuple[Any, Optional[int]]:
    """(whole model, step) of a checkpoint (native, or a Hugging Face folder: step None), ready for inference
    on ``device``."""
    from raymoe.platform.model_io import checkpoint_step, load_model

    step = checkpoint_step(checkpoint)
    return prepare_for_inference(load_model(checkpoint, device=device)), step


class LocalRunner:
    """One model in this process and the KV cache of up to ``max_rows`` running rows (see module docstring).

    The model is switched to eval mode and dropless routing (capacity dropping would couple the rows of a
    batch); callers that lend a model for a while (``generate``) restore their settings afterwards.
    ``max_len``: tokens per row (prompt + generated) the KV cache holds, at most the model's block_size (None:
    block_size); ``self.max_len`` is the resulting serving context.
    ``loader(checkpoint) -> (model, step)`` builds models for ``prepare`` (default: the whole model of the
    checkpoint; an expert shard passes one that builds only its experts).
    ``prefix_cache_bytes`` > 0: a `PrefixCache` of that many bytes (blocks of ``prefix_block_size`` tokens)
    lets prompts reuse the keys/values of cached prefixes (``self.prefix_cache``; None when 0).
    """

    mixed_step = True

    def __init__(self, model, max_rows: int, *, max_len: Optional[int] = None, loader=None,
                 prefix_cache_bytes: int = 0, prefix_block_size: int = 16):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1; got {max_rows!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise ValueError(f"max_len must be an int >= 2 or None; got {max_len!r}")
        self.max_rows = max_rows
        self.requested_len = max_len
        self.loader = loader
        self.prefix_cache_bytes, self.prefix_block_size = prefix_cache_bytes, prefix_block_size
        self.expert_counts: dict[int, torch.Tensor] = {}
        self._install(model)

    def _install(self, model) -> None:
        model.eval()
        model.set_dropless(True)
        self.model = model
        self.config = model.config
        # tokens per row the cache holds (prompt + generated): a RoPE model's block_size is its whole position
        # range (e.g. 131072), far more than a serving cache should allocate up front
        self.max_len = min(self.requested_len or model.config.block_size, model.config.block_size)
        self.device = next(model.parameters()).device
        self.prefix_cache = (PrefixCache.for_model(model, block_size=self.prefix_block_size,
                                                   budget_bytes=self.prefix_cache_bytes)
                             if self.prefix_cache_bytes else None)
        self.reset()

    @property
    def rows(self) -> int:
        return self.cache.rows

    # -- forwards ----------------------------------------------------------------------------------------
    def prefill(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        """Prefill new rows (left-padded; mask False = padding), append them; logits [B, V] of their last
        position."""
        self._check_room(idx_BP.shape[0])
        pre = self._new_rows(idx_BP, mask_BP)
        out = self.model(pre.idx_BT.to(self.device), kv_cache=pre.cache, token_mask_BT=pre.mask_BT.to(self.device),
                         last_logits_only=True)
        self._record_counts()
        self._joined(pre)
        return out.logits[:, -1, :]

    def _new_rows(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> PrefixPrefill:
        """The KV cache and tokens of a prefill of new rows: the whole prompts, or with a prefix cache the
        prompts' suffixes after their cached prefixes (loaded into the cache)."""
        if self.prefix_cache is None:
            return PrefixPrefill(KVCache.for_model(self.model, *idx_BP.shape), idx_BP, mask_BP)
        prompts = [row[m].tolist() for row, m in zip(idx_BP, mask_BP)]
        return self.prefix_cache.prefill_inputs(self.model, prompts, idx_BP.shape[1])

    def _joined(self, pre: PrefixPrefill) -> None:
        """The prefilled rows join the running batch; their prompts' new full blocks go to the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(pre)
        self.cache.add_rows(pre.cache)

    def prefill_and_decode(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor,
                           idx_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill` of new rows and `decode` of the running rows in one forward (`forward_groups`); the new
        rows are appended after the running ones. Returns (new rows' logits, running rows' logits)."""
        B, R = idx_BP.shape[0], self.cache.rows
        self._check_room(B)
        self._check_decode(idx_B1)
        self.cache.compact()
        pre = self._new_rows(idx_BP, mask_BP)
        run_mask_B1 = torch.ones(R, 1, dtype=torch.bool, device=self.device)
        new_BV, run_BV = forward_groups(self.model, [(pre.idx_BT.to(self.device), pre.cache,
                                                      pre.mask_BT.to(self.device)),
                                                     (idx_B1.to(self.device), self.cache, run_mask_B1)])
        self._record_counts()
        self._joined(pre)
        return new_BV, run_BV

    def decode(self, idx_B1: torch.Tensor) -> torch.Tensor:
        """One token per running row (``idx_B1`` in row order); logits [B, V]."""
        B = self.cache.rows
        self._check_decode(idx_B1)
        self.cache.compact()
        mask_B1 = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        out = self.model(idx_B1.to(self.device), kv_cache=self.cache, token_mask_BT=mask_B1, last_logits_only=True)
        self._record_counts()
        return out.logits[:, -1, :]

    def _check_room(self, new_rows: int) -> None:
        if self.rows + new_rows > self.max_rows:
            raise ValueError(f"prefill of {new_rows} rows: {self.rows} are running and "
                             f"max_rows={self.max_rows}")

    def _check_decode(self, idx_B1: torch.Tensor) -> None:
        R = self.rows
        if idx_B1.shape != (R, 1):
            raise ValueError(f"decode needs one token per running row: shape {(R, 1)}, got {tuple(idx_B1.shape)}")

    def idle_forward(self) -> torch.Tensor:
        """A forward that routes no token and touches no cache: an expert shard with no rows in this step
        still has to enter every MoE layer's collectives. Returns empty logits [0, V]."""
        idx = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model(idx, token_mask_BT=torch.zeros(1, 1, dtype=torch.bool, device=self.device),
                   last_logits_only=True)
        self._record_counts()
        return torch.empty(0, self.config.vocab_size, device=self.device)

    def _record_counts(self) -> None:
        self.expert_counts = {m.layer_id: m.last_stats.exp_counts for m in self.model.moe_modules()
                              if m.last_stats is not None}

    # -- rows --------------------------------------------------------------------------------------------
    def keep_rows(self, keep: Sequence[int]) -> None:
        self.cache.keep_rows(keep)

    def reset(self) -> None:
        self.cache = SlotKVCache.for_model(self.model, self.max_rows, self.max_len)

    # -- weights -----------------------------------------------------------------------------------------
    def prepare(self, checkpoint: str) -> Pending:
        model, step = (self.loader or (lambda c: load_local_model(c, self.device)))(checkpoint)
        return Pending(model.config, step, str(checkpoint), model)

    def swap(self, pending: Pending) -> None:
        """Install prepared weights; the running rows' cache is kept when the architecture is the same, the
        prefix cache is emptied (its keys/values came from the old weights)."""
        if pending.config == self.config:
            self.model = pending.payload
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
        else:  # only with no running rows (the engine's drain policy)
            self._install(pending.payload)

    def info(self) -> dict:
        return {"runner": "local", "parameters": self.model.num_parameters()}

    def check_health(self) -> None:
        """Nothing here fails on its own (a failing forward raises in the loop's thread, which the engine's
        health check watches)."""

    def shutdown(self) -> None:
        """Nothing to release: the model and its cache go with this object."""


class RecomputeRunner(LocalRunner):
    """`LocalRunner` without a KV cache: every step re-runs each row's whole sequence, left-padded. Slow; the
    reference the cached path is tested against (``generate(..., use_cache=False)``)."""

    mixed_step = False

    def reset(self) -> None:
        self.seqs: list[list[int]] = []

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def _forward(self) -> torch.Tensor:
        idx_BP, mask_BP = left_pad(self.seqs)
        out = self.model(idx_BP.to(self.device), token_mask_BT=mask_BP.to(self.device), last_logits_only=True)
        self._record_counts()
        return out.logits[:, -1, :]

    def prefill(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        self._check_room(idx_BP.shape[0])
        B = len(self.seqs)
        self.seqs += [row[m].tolist() for row, m in zip(idx_BP, mask_BP)]
        return self._forward()[B:]

    def decode(self, idx_B1: torch.Tensor) -> torch.Tensor:
        self._check_decode(idx_B1)
        for s, t in zip(self.seqs, idx_B1[:, 0].tolist()):
            s.append(t)
        return self._forward()

    def prefill_and_decode(self, idx_BP, mask_BP, idx_B1):
        run_BV = self.decode(idx_B1)
        return self.prefill(idx_BP, mask_BP), run_BV

    def keep_rows(self, keep: Sequence[int]) -> None:
        self.seqs = [self.seqs[i] for i in keep]

