"""Mixture-of-Students (DeepSpeed-MoE, Rajbhandari et al. 2022): knowledge distillation into a shallower MoE.

Shape legend: N tokens (batch x time flattened), V vocab.

The student has the teacher's architecture at reduced depth (`build_student_config`). Staged KD: the KD term
helps early in training but hurts late (the student under-fits the teacher's distribution), so it is switched
off after `kd_stop_step` and training continues with plain cross-entropy (`KDSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from raymoe.platform.model import GPTConfig, ModelOutput

KL_DIRECTIONS = ("student_teacher", "teacher_student")


class KDTerms(NamedTuple):
    """loss = ce + beta * T^2 * kl; ce and kl are reported unscaled."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  beta: float, temperature: float = 1.0, *, direction: str = "student_teacher",
                  ignore_index: int = -1) -> KDTerms:
    """CE(student, targets) + beta * T^2 * KL, with both distributions softmax(logits / T).

    direction "student_teacher" (default, as the issue states): KL(p_s || p_t) = sum p_s (log p_s - log p_t),
    mode-seeking. direction "teacher_student": KL(p_t || p_s), the standard Hinton KD term used by
    DeepSpeed's MoS (it equals the soft-target cross-entropy minus the teacher entropy, so same gradients).
    The teacher is treated as a constant (detached). The KL is summed over the vocabulary and averaged over
    tokens whose target is not `ignore_index`, like the CE. logits: [..., V]; targets: [...].
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}; got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    V = student_logits.size(-1)
    s_NV = student_logits.reshape(-1, V).float()
    t_NV = teacher_logits.detach().reshape(-1, V).float()
    targets_N = targets.reshape(-1)
    ce = F.cross_entropy(s_NV, targets_N, ignore_index=ignore_index)
    valid_N = targets_N != ignore_index
    log_ps_NV = F.log_softmax(s_NV / temperature, dim=-1)
    log_pt_NV = F.log_softmax(t_NV / temperature, dim=-1)
    if direction == "student_teacher":
        kl_N = (log_ps_NV.exp() * (log_ps_NV - log_pt_NV)).sum(-1)
    else:
        kl_N = (log_pt_NV.exp() * (log_pt_NV - log_ps_NV)).sum(-1)
    kl = (kl_N * valid_N).sum() / valid_N.sum().clamp(min=1)
    return KDTerms(ce + beta * temperature ** 2 * kl, ce, kl)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            beta: float, temperature: float = 1.0, *, direction: str = "student_teacher",
            ignore_index: int = -1) -> torch.Tensor:
    """Scalar KD loss CE(student, targets) + beta * T^2 * KL(student || teacher); see `kd_loss_terms`."""
    return kd_loss_terms(student_logits, teacher_logits, targets, beta, temperature,
                         direction=direction, ignore_index=ignore_index).loss


@dataclass
class KDSchedule:
    """Staged KD: distill for steps < kd_stop_step, plain CE afterwards (kd_stop_step None = always distill).

    `loss(...)` returns the whole student objective for one step: the KD (or CE) term on the student's
    logits plus the student's MoE auxiliary and z losses, so the caller can skip the teacher forward entirely
    when `active(step)` is False.
    """

    kd_stop_step: Optional[int] = None
    beta: float = 1.0
    temperature: float = 1.0
    direction: str = "student_teacher"

    def __post_init__(self) -> None:
        if self.kd_stop_step is not None and (not isinstance(self.kd_stop_step, int) or self.kd_stop_step < 0):
            raise ValueError(f"kd_stop_step must be None or an int >= 0; got {self.kd_stop_step!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0; got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.direction not in KL_DIRECTIONS:
            raise ValueError(f"direction must be one of {KL_DIRECTIONS}; got {self.direction!r}")

    def active(self, step: int) -> bool:
        """True while the KD term is on (step < kd_stop_step)."""
        return self.kd_stop_step is None or step < self.kd_stop_step

    def loss(self, step: int, student_out: ModelOutput, teacher_logits: Optional[torch.Tensor],
             targets: torch.Tensor, ignore_index: int = -1) -> KDTerms:
        """Student objective at `step`: KD terms + the student's MoE losses (loss - ce_loss of its output)."""
        if student_out.loss is None or student_out.ce_loss is None:
            raise ValueError("student_out must come from a forward with targets (loss is None)")
        moe_losses = student_out.loss - student_out.ce_loss
        if not self.active(step):
            ce = student_out.ce_loss
            return KDTerms(ce + moe_losses, ce, ce.new_zeros(()))
        if teacher_logits is None:
            raise ValueError(f"teacher_logits are required while KD is active (step {step} < "
                             f"kd_stop_step={self.kd_stop_step})")
        terms = kd_loss_terms(student_out.logits, teacher_logits, targets, self.beta, self.temperature,
                              direction=self.direction, ignore_index=ignore_index)
        return KDTerms(terms.loss + moe_losses, terms.ce, terms.kl)


def build_student_config(teacher_cfg: GPTConfig, num_layers: int) -> GPTConfig:
    """Student of reduced depth with the teacher's width, vocab and MoE schedule pattern.

    See `GPTConfig.student`: interval schedules keep their interval, explicit MoE layers and pyramid expert
    counts are mapped by relative depth. num_layers must be in [1, teacher depth].
    """
    if not isinstance(teacher_cfg, GPTConfig):
        raise TypeError(f"teacher_cfg must be a GPTConfig; got {type(teacher_cfg).__name__}")
    return teacher_cfg.student(num_layers)
