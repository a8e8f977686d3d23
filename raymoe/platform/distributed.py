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
from raymoe.platform.init import materialize, meta_model
from raymoe.platform.model import GPT, GPTConfig
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

    The model is built on the meta device with this rank's experts only, activation checkpointing and FSDP2
    are applied to it, and only then is this rank's part allocated on ``device`` and initialised
    (:func:`raymoe.platform.init.materialize`): from ``run.seed`` as a function of each parameter's name and
    global expert id, so every layout starts from the weights the single-process trainer starts from, and no
    rank ever holds the whole model; or from ``model.init_from``.
    """
    t = cfg.train
    layout = parallel.ParallelLayout(world, {int(k): v for k, v in ep_sizes.items()}, model_config.experts_per_layer())
    groups = parallel.build_process_groups(layout, rank, ranks_per_node=ranks_per_node)
    torch.manual_seed(cfg.run.seed)  # the process's RNG (dropout) starts from the seed, as in a local run
    model = meta_model(model_config, moe_kwargs=parallel.make_moe_kwargs(
        layout, groups, hierarchical=cfg.cluster.hierarchical_all_to_all, ranks_per_node=ranks_per_node,
        uniform_tokens=True))  # every rank runs the same micro-batch and evaluation sizes
    apply_activation_checkpointing(model, t.activation_checkpointing)
    # cluster.dense_sharding / expert_sharding: FSDP2 around the meta model, so a rank only ever allocates its shards
    c = cfg.cluster
    sharded = fsdp.apply_sharding(model, layout, groups, dense=c.dense_sharding, experts=c.expert_sharding,
                                  device=device)
    materialize(model, device, cfg)
    if sharded and rank == 0:
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
