"""The training step shared by local and distributed training.

One optimizer step = gradient accumulation over micro-batches, an optional gradient-synchronisation hook
(the distributed trainer all-reduces there), clipping, AdamW, and the aux-loss-free expert-bias update.
The learning-rate schedule is a pure function of the step so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from raymoe.platform.distill import kd_loss

Batch = tuple[torch.Tensor, torch.Tensor]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D params) and none on biases, norms and gate vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """bf16 autocast on GPU when asked; a no-op on CPU fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@dataclass
class KDSettings:
    """Knowledge distillation for one step (Mixture-of-Students)."""

    teacher: torch.nn.Module
    beta: float
    temperature: float
    direction: str = "teacher_student"


@dataclass
class StepResult:
    """What one optimizer step measured (all plain floats / lists, cheap to ship across processes)."""

    loss: float
    ce_loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    tokens: int
    kd_active: bool = False
    # per MoE layer (in model order): token-choices routed per expert, summed over micro-batches
    expert_counts: list[list[int]] = field(default_factory=list)
    dropped_fraction: list[float] = field(default_factory=list)
    l_aux: list[float] = field(default_factory=list)


def _moe_summaries(stats_per_pass: list[list], real: int,
                   total: int) -> tuple[list[list[int]], list[float], list[float]]:
    """Per MoE layer: expert counts summed over the first ``real`` passes (the others are padding), and the
    dropped fraction and l_aux summed over them divided by ``total`` (this rank's share of the step's mean)."""
    if not stats_per_pass or not stats_per_pass[0]:
        return [], [], []
    counts, dropped, l_aux = [], [], []
    for layer in range(len(stats_per_pass[0])):
        per = [micro[layer] for micro in stats_per_pass[:real]]
        zero = torch.zeros_like(stats_per_pass[0][layer].exp_counts, device="cpu", dtype=torch.long)
        counts.append([int(c) for c in sum((s.exp_counts.detach().cpu().long() for s in per), zero).tolist()])
        dropped.append(sum(float(s.dropped_fraction) for s in per) / total)
        l_aux.append(sum(float(s.l_aux.detach()) for s in per) / total)
    return counts, dropped, l_aux


@contextlib.contextmanager
def _keeping_expert_loads(model: torch.nn.Module, keep: bool):
    """Inside (``keep``): what forwards add to the MoE layers' expert loads (aux-loss-free balancing) is undone
    on exit, so padding passes leave the loads as the real micro-batches made them."""
    moes = getattr(model, "moe_modules", lambda: [])() if keep else []
    saved = [m.expert_load.clone() for m in moes]
    try:
        yield
    finally:
        for m, load in zip(moes, saved):
            m.expert_load.copy_(load)


@dataclass
class _Sums:
    loss: float = 0.0
    ce: float = 0.0
    aux: float = 0.0
    tokens: int = 0


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Batch], *,
               lr: float, grad_clip: float = 0.0, autocast_dtype: torch.dtype | None = None,
               kd: KDSettings | None = None,
               grad_sync: Callable[[torch.nn.Module], None] | None = None,
               grad_norm_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
               total_micro_batches: int | None = None, padding: int = 0) -> StepResult:
    """Run one optimizer step over ``micro_batches`` (their mean loss is the step's loss).

    Distributed (a world of ranks, each with its share of the global batch): ``total_micro_batches`` is the
    number of micro-batches of the whole global batch; each micro-batch's loss is weighted by 1/total, so
    ``grad_sync`` SUMS the ranks' gradients (dense over the world, expert grads over their expert-data-parallel
    group, see :mod:`raymoe.platform.parallel`) into the mean over the global batch, however unevenly the
    micro-batches are spread; the loss, aux loss, dropped fraction and l_aux of the result are this rank's
    share of the step's mean (their sum over the ranks is the mean). Default: ``len(micro_batches)`` (a world
    of one: the mean). The last ``padding`` entries of ``micro_batches`` are padding passes: run forward and
    backward with weight 0 so that every rank runs the same number of passes (each MoE layer's all-to-alls and
    FSDP's gathers need every rank of their group); they add nothing to the loss, gradients, metrics, expert
    counts or expert loads. ``grad_norm_fn`` gives the global gradient norm (each expert counted once although
    it lives on one shard); ``grad_sync`` is called after the backward passes and before clipping.
    """
    batches = list(micro_batches)
    real = len(batches) - padding
    total = real if total_micro_batches is None else total_micro_batches
    if not batches or padding < 0 or real < 0 or total < max(real, 1):
        raise ValueError(f"train_step got {len(batches)} passes, padding={padding}, total_micro_batches="
                         f"{total_micro_batches}: needs at least one pass, 0 <= padding <= passes and "
                         f"this rank's micro-batches <= total_micro_batches >= 1")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums, stats = _Sums(), []
    for i, batch in enumerate(batches):
        with _keeping_expert_loads(model, keep=i >= real):
            out = _pass(model, batch, kd if i < real else None, autocast_dtype, total if i < real else None,
                        sums if i < real else _Sums())
        stats.append(list(out.stats))
    if grad_sync is not None:
        grad_sync(model)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = grad_norm_fn(model) if grad_norm_fn is not None else local_grad_norm(params)
    if grad_clip > 0:
        clip_grads_(params, norm, grad_clip)
    grad_norm = float(norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the bias update reads only the step's expert loads, AdamW only the gradients: the order changes nothing, but
    # done first, the step's whole state is there when the optimizer's step hooks run (elastic's shard copies)
    for moe in getattr(model, "moe_modules", lambda: [])():
        moe.update_expert_bias()
    optimizer.step()
    counts, dropped, l_aux = _moe_summaries(stats, real, total)
    return StepResult(loss=sums.loss / total, ce_loss=sums.ce / total, aux_loss=sums.aux / total,
                      grad_norm=grad_norm, lr=lr, tokens=sums.tokens, kd_active=kd is not None,
                      expert_counts=counts, dropped_fraction=dropped, l_aux=l_aux)


def _pass(model, batch: Batch, kd: KDSettings | None, autocast_dtype, divisor: int | None, sums: _Sums):
    """One forward and backward of ``batch`` with its loss divided by ``divisor`` (None: a padding pass, weight
    0, whose backward still runs every collective and adds exact zeros); adds the unweighted losses to ``sums``."""
    x, y = batch
    with autocast_context(next(model.parameters()).device.type, autocast_dtype):
        out = model(x, y)
        loss, ce = out.loss, out.ce_loss
        if kd is not None:
            with torch.no_grad():
                teacher_logits = kd.teacher(x).logits
            kd_total = kd_loss(out.logits, teacher_logits, y, beta=kd.beta, temperature=kd.temperature,
                               direction=kd.direction)
            loss = loss - ce + kd_total
    (loss / divisor if divisor is not None else loss * 0.0).backward()
    sums.loss += float(loss.detach())
    sums.ce += float(ce.detach())
    sums.aux += float(out.aux_loss.detach()) if torch.is_tensor(out.aux_loss) else float(out.aux_loss)
    sums.tokens += y.numel()
    return out


def local_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients in this process."""
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


@torch.no_grad()
def clip_grads_(params: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (torch's clip_grad_norm_ rule)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]  # FSDP: the shards
    torch._foreach_mul_(grads, coef.to(grads[0].device))
