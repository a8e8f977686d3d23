"""Activation checkpointing per transformer block, applied around the single-device model.

``train.activation_checkpointing``:

- ``none``: every activation of the forward is kept for the backward.
- ``moe``: the MoE sublayer of each MoE block (router, dispatch, experts, shared expert) keeps only its input;
  its activations, the largest of the model ([T*k, F] per expert projection), are recomputed in the backward.
- ``full``: each block keeps only its input; the whole block is recomputed in the backward.

Results are identical to ``none`` (the tests check losses, gradients and the expert-load counters): the
recomputation replays the same random draws (torch's RNG state is saved and restored around it, so router noise,
random token selection and dropout repeat exactly), and the MoE layer's side effects (the expert-load counters
of aux-loss-free balancing, ``last_stats``) happen once, in the first forward, never in the recomputation.
Under expert parallelism the recomputed forward runs its all-to-alls again inside the backward, in the same
order on every rank.

It uses PyTorch's non-reentrant ``torch.utils.checkpoint`` inside ``Block.forward`` (no wrapper module), so
parameter names, checkpoints and FSDP2's per-block sharding are unchanged.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

AC_MODES = ("none", "moe", "full")

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed region is being recomputed in the backward (side effects must not repeat)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recompute_context():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: nothing in the forward, the recompute flag in
    the recomputation."""
    return contextlib.nullcontext(), _recompute_context()


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Set the activation-checkpointing ``mode`` (one of :data:`AC_MODES`) on every block of ``model``."""
    if mode not in AC_MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; allowed: {', '.join(AC_MODES)}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks: activation checkpointing applies to raymoe's GPT")
    for block in blocks:
        block.checkpoint_mode = None if mode == "none" or (mode == "moe" and not block.is_moe) else mode
    return model
