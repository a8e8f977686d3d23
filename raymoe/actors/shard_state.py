"""An expert shard's recoverable state for elastic training: undoing one step, and its state as checkpoint
files in memory (exported for peers after a membership change, or kept as in-memory copies).

Any expert placement loads these files (experts are keyed by global id), so the survivors of a lost shard, or
a grown world, re-form with a new layout from what the old one exports.

With FSDP sharding (``cluster.dense_sharding`` / ``expert_sharding``) the undo copy holds this rank's shards
only (the model's state_dict and the optimizer's state are DTensors), and the exported files are gathered to
full tensors first, which is collective: every rank of a live world exports at once (the in-memory copies at
each step boundary, growth). A world that lost a rank has lost that rank's shards, so recovery then reads the
in-memory copies or the checkpoint, never the survivors' live state (:mod:`raymoe.actors.elastic`).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from raymoe.platform import checkpoint as ckpt
from raymoe.platform import fsdp


class ShardState:
    """Step undo and the in-memory checkpoint files of one shard's model and optimizer."""

    def __init__(self, model, optimizer, *, keep_undo: bool):
        self.model, self.optimizer = model, optimizer
        self.last_completed: int | None = None  # the last step whose optimizer update this shard applied
        self._undo: dict | None = None
        self._pending_step: int | None = None
        if keep_undo:  # a state copy per step, only needed to undo a step that failed on another shard
            optimizer.register_step_pre_hook(self._remember)
            optimizer.register_step_post_hook(self._applied)

    def begin_step(self, step: int) -> None:
        self._pending_step = step

    def _remember(self, optimizer, args, kwargs) -> None:
        self._undo = {"model": _clone_state(self.model.state_dict()),
                      "optimizer": copy.deepcopy(optimizer.state_dict()), "step": self._pending_step}

    def _applied(self, optimizer, args, kwargs) -> None:
        self.last_completed = self._pending_step

    def undo_bytes(self) -> int:
        """Bytes of the undo copy this rank holds (its shards when the model is sharded)."""
        if self._undo is None:
            return 0
        opt = [v for st in self._undo["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v)]
        model = {id(v): v for v in self._undo["model"].values()}.values()  # tied weights once
        return fsdp.local_bytes([*model, *opt])

    def rollback(self, step: int) -> int | None:
        """Undo the update of ``step`` if this shard applied it (the step failed on another shard)."""
        if self.last_completed == step and self._undo is not None and self._undo["step"] == step:
            self.model.load_state_dict(self._undo["model"])
            self.optimizer.load_state_dict(self._undo["optimizer"])
            self.last_completed = step - 1
        return self.last_completed

    def export_parts(self, step: int, dense: bool, experts: list[tuple[int, int]] | None = None) -> dict[str, bytes]:
        """This shard's state as checkpoint files: the dense part if ``dense``, and the expert files of
        ``experts`` ((layer, global id) pairs; None = all it holds)."""
        with tempfile.TemporaryDirectory() as tmp, fsdp.gathered(self.model, self.optimizer):
            path = ckpt.save_checkpoint(tmp, step, self.model, self.optimizer, write_dense=dense, rng=False,
                                        write_manifest=False)
            wanted = None if experts is None else {ckpt.expert_file_name(lid, g) for lid, g in experts}
            parts = {}
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path).as_posix()
                if p.is_file() and (wanted is None or not rel.startswith(ckpt.EXPERT_DIR + "/") or rel in wanted):
                    parts[rel] = p.read_bytes()
            return parts

    def load_parts(self, parts: dict[str, bytes], step: int, experts_per_layer: dict[int, int]) -> None:
        """Load exported files (complete: every expert of every layer) into this shard's model and optimizer."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ckpt.step_dir_name(step)
            for rel, data in parts.items():
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                (path / rel).write_bytes(data)
            ckpt.finalize_checkpoint(path, step=step, expected_experts=experts_per_layer, update_latest=False)
            with fsdp.gathered(self.model, self.optimizer, write_back=True):
                ckpt.load_checkpoint(path, self.model, self.optimizer, restore_rng=False)


def _clone_state(state: dict) -> dict:
    """A copy of a state dict; entries sharing memory (tied embedding and head) share one copy."""
    copies, out = {}, {}
    for k, v in state.items():
        local = v.to_local() if isinstance(v, DTensor) else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)) if local.numel() else k
        if key not in copies:
            copies[key] = v.detach().clone()
        out[k] = copies[key]
    return out
