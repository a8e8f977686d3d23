"""One rank of a distributed training world: join the process group and build what the training loop needs.

Nothing here knows Ray: an `ExpertShard` actor (or a spawned test process) calls :func:`join_world` with a
rendezvous address and its rank, then :func:`build_rank` for the model with only this rank's experts, the
optimizer, the gradient synchronisation and the :class:`~raymoe.platform.training.RankInfo` the loop runs with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from raymoe.config import RaymoeConfig
from raymoe.platform import fsdp, parallel
from raymoe.platform.activation_checkpoint import apply_activation_checkpointing
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.model_io import init_weights
from raymoe.platform.train_step import build_optimizer
from raymoe.platform.training import RankInfo


def shard_device(gpus_per_worker: float) -> torch.device:
    """A shard's device: its GPU when it reserved one and CUDA is there (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", 0) if gpus_per_worker > 0 and torch.cuda.is_available() else torch.device("cpu")


def join_world(init_method: str, rank: int, world: int, *, backend: str, device: torch.device,
               timeout_s: float) -> None:
    """Leave any previous process group, then join a new one (``backend`` "auto": nccl on GPU, gloo on CPU)."""
    leave_world()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def leave_world() -> None:
    """Destroy the current process group, if any (a group broken by a dead peer may refuse an orderly end)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


@dataclass
class RankParts:
    """What :func:`build_rank` returns: this rank's model, optimizer, gradient hooks and place."""

    model: GPT
    optimizer: torch.optim.Optimizer
    grad_sync: parallel.GradSync
    grad_norm: parallel.GradNorm
    place: RankInfo


def build_rank(cfg: RaymoeConfig, model_config: GPTConfig, rank: int, world: int, ep_sizes: dict[int, int],
               ranks_per_node: int | None, device: torch.device) -> RankParts:
    """Build this rank's training parts (the process group must be joined).

    Every rank builds the same full (EP=1) model from ``run.seed`` and keeps its experts' rows, so the dense
    replicas agree and each expert starts exactly as it would without expert parallelism.
    """
    t = cfg.train
    layout = parallel.ParallelLayout(world, {int(k): v for k, v in ep_sizes.items()}, model_config.experts_per_layer())
    groups = parallel.build_process_groups(layout, rank, ranks_per_node=ranks_per_node)
    torch.manual_seed(cfg.run.seed)
    # from scratch, every rank builds the whole model to start from the same weights; model.init_from gives
    # them instead (each rank reads only its own experts)
    full_state = None if cfg.model.init_from else GPT(model_config).state_dict()
    model = GPT(model_config, moe_kwargs=parallel.make_moe_kwargs(
        layout, groups, hierarchical=cfg.cluster.hierarchical_all_to_all, ranks_per_node=ranks_per_node,
        uniform_tokens=True))  # every rank runs the same micro-batch and evaluation sizes
    if full_state is None:
        init_weights(model, cfg)
    else:
        parallel.load_full_state_dict(model, full_state)
    del full_state
    apply_activation_checkpointing(model, t.activation_checkpointing)
    model.to(device)
    # cluster.dense_sharding / expert_sharding: FSDP2 around the loaded model, before the optimizer holds it
    c = cfg.cluster
    if fsdp.apply_sharding(model, layout, groups, dense=c.dense_sharding, experts=c.expert_sharding, device=device):
        if rank == 0:
            print(f"FSDP2 over {world} shards: dense {c.dense_sharding}, experts {c.expert_sharding} "
                  f"({fsdp.local_bytes(model.parameters())} parameter bytes on rank 0)", flush=True)
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                device_type=device.type)
    # the dense part comes from rank 0; experts from the first expert-data-parallel replica of any layer (with
    # per-layer EP sizes that rank also rewrites some replicated experts: identical bytes, atomic renames)
    place = RankInfo(rank=rank, world=world, group=groups.world, writes_dense=rank == 0,
                     writes_experts=any(i == 0 for i in groups.expert_replica_index.values()))
    return RankParts(model, optimizer, parallel.make_grad_sync(model, layout, groups),
                     parallel.make_grad_norm(model, layout, groups), place)


def local_experts(model: GPT) -> dict[int, list[int]]:
    """{layer id: global expert ids} this rank holds."""
    return {m.layer_id: list(m.experts.global_expert_ids) for m in model.moe_modules()}
