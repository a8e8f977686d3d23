"""Fault injection for tests and drills: make a shard's process exit abruptly at a chosen point of a step.

``train_step`` exits in the middle of the step's forwards (inside the MoE all-to-alls); ``save`` exits after
the dense checkpoint file is written and before this rank's experts are, so the checkpoint is incomplete (a
shard of an FSDP-sharded model exits before writing: its dense file needs every rank's shards);
``save_expert`` writes the dense file, then exits in the middle of writing this rank's first expert file (half
its bytes handed to the storage stream, which is never closed: on an object store no object appears, locally
a temporary file is left) and before this rank's record of what it wrote; ``start`` exits while the world
forms, right after joining the process group (a shard lost while it joins).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch.distributed.tensor import DTensor

from raymoe.platform import checkpoint as ckpt
from raymoe.platform import storage

FAULT_POINTS = ("train_step", "save", "save_expert", "start")


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
            if not any(isinstance(p, DTensor) for p in trainer.model.parameters()):
                ckpt.save_checkpoint(root, step, trainer.model, None, write_experts=False, write_manifest=False)
            os._exit(1)
        if self.armed == ("save_expert", step):
            exit_mid_expert_write(root, step, trainer.model)


def exit_mid_expert_write(root, step: int, model) -> None:
    """Write the dense file of checkpoint ``step`` under ``root`` (any location), then exit the process in the
    middle of writing the model's first expert file: half its bytes written to the open stream."""
    with tempfile.TemporaryDirectory() as tmp:
        part = ckpt.save_checkpoint(tmp, step, model, None, rng=False, write_manifest=False)
        dest = storage.location(root) / ckpt.step_dir_name(step)
        storage.upload(part / ckpt.DENSE, dest / ckpt.DENSE)
        rel = next(p.relative_to(part).as_posix() for p in sorted(Path(part, ckpt.EXPERT_DIR).iterdir()))
        data = (part / rel).read_bytes()
        with storage.open_output(dest / rel) as f:
            f.write(data[:len(data) // 2])
            f.flush()
            os._exit(1)
