"""Model runners: what the engine's decode loop calls to run the model (no Ray here).

Shape legend: B rows, P padded prompt length, V vocab.

The engine (`raymoe.deployments.engine.Engine`) owns requests, admission, sampling and stop rules; a runner
owns the weights and the KV cache of the running rows and answers with last-position logits. Two runners:

- `LocalRunner`: the whole model in this process plus its `SlotKVCache` (plain replicas, in-process use).
  It is also what each `ExpertShard` runs for its slice of the rows in expert-parallel serving.
- `raymoe.deployments.ep_runner.EPRunner`: a group of `ExpertShard` actors (imports Ray, loaded lazily).

Row contract, the same for both: ``prefill`` appends its rows after the running ones; ``decode`` runs one
token for every running row, in order; ``keep_rows(keep)`` (ascending indices) keeps those rows, in order;
``reset`` drops every row. ``expert_counts`` holds the token-choices per expert of the last forward
({layer id: LongTensor [E]}, all rows). ``prepare(checkpoint)`` loads weights without touching the running
model (called from any thread); ``swap(pending)`` installs them between two steps (the loop's thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from raymoe.platform.batch_cache import SlotKVCache
from raymoe.platform.generate import KVCache
from raymoe.platform.mixed_step import forward_groups


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
    """(whole model, step) of a checkpoint, ready for inference on ``device``."""
    from raymoe.platform.checkpoint import read_manifest
    from raymoe.platform.model_io import load_model

    step = read_manifest(checkpoint).get("step")
    return prepare_for_inference(load_model(checkpoint, device=device)), step


class LocalRunner:
    """One model in this process and the KV cache of up to ``max_rows`` running rows (see module docstring).

    ``loader(checkpoint) -> (model, step)`` builds models for ``prepare`` (default: the whole model of the
    checkpoint; an expert shard passes one that builds only its experts).
    """

    def __init__(self, model, max_rows: int, *, loader=None):
        self.max_rows = max_rows
        self.loader = loader
        self._install(prepare_for_inference(model))
        self.expert_counts: dict[int, torch.Tensor] = {}

    def _install(self, model) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache.for_model(model, self.max_rows)

    @property
    def rows(self) -> int:
        return self.cache.rows

    # -- forwards ----------------------------------------------------------------------------------------
    def prefill(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        """Prefill new rows (left-padded; mask False = padding), append them; logits [B, V] of their last
        position."""
        B, P = idx_BP.shape
        self._check_room(B)
        cache = KVCache.for_model(self.model, B, P)
        out = self.model(idx_BP.to(self.device), kv_cache=cache, token_mask_BT=mask_BP.to(self.device),
                         last_logits_only=True)
        self._record_counts()
        self.cache.add_rows(cache)
        return out.logits[:, -1, :]

    def prefill_and_decode(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor,
                           idx_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill` of new rows and `decode` of the running rows in one forward (`forward_groups`); the new
        rows are appended after the running ones. Returns (new rows' logits, running rows' logits)."""
        B, R = idx_BP.shape[0], self.cache.rows
        self._check_room(B)
        self._check_decode(idx_B1)
        self.cache.compact()
        new_cache = KVCache.for_model(self.model, B, idx_BP.shape[1])
        run_mask_B1 = torch.ones(R, 1, dtype=torch.bool, device=self.device)
        new_BV, run_BV = forward_groups(self.model, [(idx_BP.to(self.device), new_cache, mask_BP.to(self.device)),
                                                     (idx_B1.to(self.device), self.cache, run_mask_B1)])
        self._record_counts()
        self.cache.add_rows(new_cache)
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
        if self.cache.rows + new_rows > self.max_rows:
            raise ValueError(f"prefill of {new_rows} rows: {self.cache.rows} are running and "
                             f"max_rows={self.max_rows}")

    def _check_decode(self, idx_B1: torch.Tensor) -> None:
        R = self.cache.rows
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
        self.cache = SlotKVCache.for_model(self.model, self.max_rows)

    # -- weights -----------------------------------------------------------------------------------------
    def prepare(self, checkpoint: str) -> Pending:
        model, step = (self.loader or (lambda c: load_local_model(c, self.device)))(checkpoint)
        return Pending(model.config, step, str(checkpoint), model)

    def swap(self, pending: Pending) -> None:
        """Install prepared weights; the running rows' cache is kept when the architecture is the same."""
        if pending.config == self.config:
            self.model = pending.payload
        else:  # only with no running rows (the engine's drain policy)
            self._install(pending.payload)

    def info(self) -> dict:
        return {"runner": "local", "parameters": self.model.num_parameters()}

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
