"""Plan (and verify) loading a checkpoint at another expert-parallel layout: `raymoe checkpoint reshard`.

Checkpoints store one file per global expert (weights and their optimizer rows), so any layout loads any
checkpoint without rewriting it: each rank of the new layout reads the files of the experts it owns. This
module computes that assignment for a target world size and EP degree and verifies every file it needs
(size, sha256, optimizer state present), so a resize is known to work before a cluster is started.
"""

from __future__ import annotations

from raymoe.platform.checkpoint import CheckpointError, expert_file_name, inspect_checkpoint
from raymoe.platform.parallel import ParallelLayout, expert_placement


def reshard_plan(path, world: int, ep_size: int | None = None) -> dict:
    """Per-rank expert ids and files of ``path`` for ``world`` ranks (``ep_size`` None = the largest valid).

    Raises CheckpointError if a file is missing or corrupted, ValueError if ``ep_size`` does not fit.
    """
    if world < 1:
        raise ValueError(f"world={world}: must be >= 1")
    info = inspect_checkpoint(path, verify=True)
    layers = {int(k): list(v) for k, v in info["expert_ids"].items()}
    plan: dict = {"path": info["path"], "step": info["step"], "world": world, "ep_sizes": {}, "ranks": []}
    for lid, ids in layers.items():
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{info['path']}: layer {lid} has experts {ids}, expected 0..{len(ids) - 1}")
    try:
        layout = ParallelLayout.plan({lid: len(ids) for lid, ids in layers.items()}, world, ep_size)
    except ValueError as exc:
        raise ValueError(f"--ep-size {ep_size} does not fit --workers {world}: {exc}") from None
    plan["ep_sizes"] = dict(layout.ep_sizes)
    if info["has_optimizer"] is False:
        plan["warning"] = "checkpoint has no optimizer state: training resumes with fresh AdamW moments"
    for rank in range(world):
        experts = {lid: expert_placement(len(ids), plan["ep_sizes"][lid], rank % plan["ep_sizes"][lid])
                   for lid, ids in layers.items()}
        files = [expert_file_name(lid, g) for lid, gids in experts.items() for g in gids]
        plan["ranks"].append({"rank": rank, "experts": experts, "files": files})
    return plan
