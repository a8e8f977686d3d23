"""Fault injection for tests and drills: make a shard's process exit abruptly at a chosen point of a step.

``train_step`` exits in the middle of the step's forwards (inside the MoE all-to-alls); ``save`` exits after
the dense checkpoint file is written and before this rank's experts are, so the checkpoint is incomplete;
``start`` exits while the world forms, right after joining the process group (a shard lost while it joins).
"""

from __future__ import annotations

import os

from raymoe.platform import checkpoint as ckpt

FAULT_POINTS = ("train_step", "save", "start")


class FaultPlan:
    """The loop's :class:`~raymoe.platform.training.StepHooks`: exits at (``where``, ``step``) once armed."""

    def __init__(self):
        self.armed: tuple[str, int] | None = None

    def arm(self, where: str, step: int) -> None:
        if where not in FAULT_POINTS:
            raise ValueError(f"fault point {where!r}; allowed: {list(FAULT_POINTS)}")
        self.armed = (where, step)

    def after_join(self) -> None:
        if self.armed is not None and self.armed[0] == "start":
            os._exit(1)

    def before_step(self, step: int, trainer, micro_batches: int) -> None:
        if self.armed != ("train_step", step):
            return
        count, limit = {"n": 0}, micro_batches // 2 + 1

        def exit_mid_step(module, args):
            count["n"] += 1
            if count["n"] > limit:
                os._exit(1)

        trainer.model.register_forward_pre_hook(exit_mid_step)

    def before_save(self, step: int, trainer, root) -> None:
        if self.armed == ("save", step):
            ckpt.save_checkpoint(root, step, trainer.model, None, write_experts=False, write_manifest=False)
            os._exit(1)
