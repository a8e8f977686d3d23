"""InferenceShard: one rank of an expert-parallel serving group (`raymoe.deployments.ep_runner.EPRunner`).

``start`` joins a torch.distributed group whose expert-parallel size is the group size on every MoE layer,
builds the model with only this rank's experts and loads them and the dense part from a training checkpoint
(each rank reads the dense file and its own experts' files). ``step`` runs this rank's rows through a
`raymoe.platform.runner.LocalRunner` and returns their last-position logits; the replica sends token ids
only, and hidden states cross shards by all-to-all inside the MoE layers. Every rank is called for every step,
also with no rows (an idle forward): the all-to-alls are collective.

Lifecycle verbs: ``start``, ``check_health`` (started, still in its process group, no failed step), ``shutdown``
(leave the process group). Weights: ``prepare`` loads new ones beside the serving ones, ``swap`` installs them.

Hot-expert replication (``redundant_experts`` > 0, `raymoe.platform.moe.replication`): every MoE layer gets
that many extra expert slots on this rank; ``set_placement`` (called on every rank between two steps, with the
same placements) fills them with copies of hot experts fetched from their owners, and a swap re-installs the
placement on the new weights.
"""

from __future__ import annotations

import os
from typing import Optional

import ray
import torch
import torch.distributed as dist

from raymoe.platform import parallel
from raymoe.platform.distributed import join_world, leave_world
from raymoe.platform.host_memory import tune_malloc
from raymoe.platform.model import GPT
from raymoe.platform.model_io import checkpoint_config, checkpoint_step, load_weights
from raymoe.platform.moe.replication import ReplicatedExperts
from raymoe.platform.runner import LocalRunner, Pending, prepare_for_inference

from . import rendezvous
from .weight_registry import LiveWeights

_BACKENDS = ("auto", "gloo", "nccl")


class InferenceShard:
    """A Ray actor (see :func:`remote_class`) serving one rank's rows and experts (see the module docstring).

    max_rows: rows this shard's KV cache holds; max_len: tokens per row it holds (None: the model's
    block_size); device: "cpu" or "cuda" (cuda only when Ray gave this actor a
    GPU); threads: torch intra-op threads; backend: torch.distributed backend ("auto": nccl on GPU, gloo on
    CPU); collective_timeout_s: bound on every collective (a dead peer fails the step instead of hanging it);
    redundant_experts: extra expert slots per MoE layer on this rank for copies of hot experts (0: none).
    """

    def __init__(self, *, max_rows: int, max_len: Optional[int] = None, device: str = "cpu",
                 threads: Optional[int] = None, backend: str = "auto", collective_timeout_s: float = 120.0,
                 redundant_experts: int = 0):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1; got {max_rows!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
        tune_malloc()  # this process allocates activations every step
        self.max_rows, self.threads, self.collective_timeout_s = max_rows, threads, collective_timeout_s
        self.max_len = max_len
        self.redundant_experts = redundant_experts
        self.placements: dict[int, list[int]] = {}  # layer id -> placement in force (replication)
        use_cuda = device == "cuda" and torch.cuda.is_available() and bool(ray.get_gpu_ids())
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        self.rank, self.world = -1, 0
        self.runner: Optional[LocalRunner] = None
        self._pending: Optional[Pending] = None
        self._failed: Optional[str] = None  # the error of a failed step: the group cannot continue

    # -- placement / rendezvous ---------------------------------------------------------------------------
    def node_info(self) -> dict:
        """Where this shard runs."""
        return rendezvous.node_info()

    def free_port(self) -> int:
        """A free TCP port on this node, for the rendezvous when this shard is rank 0."""
        return rendezvous.free_port()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, init_method: str, rank: int, world: int, checkpoint: str) -> dict:
        """Join the group of ``world`` shards as ``rank`` and load this rank's part of ``checkpoint``."""
        self.rank, self.world = rank, world
        if self.threads:
            torch.set_num_threads(int(self.threads))
        join_world(init_method, rank, world, backend=self.backend, device=self.device,
                   timeout_s=self.collective_timeout_s)
        model, step = self._load(checkpoint)
        self.runner = LocalRunner(model, self.max_rows, max_len=self.max_len, loader=self._load)
        self._failed = None
        ctx = ray.get_runtime_context()
        return {"rank": rank, "step": step, "config": model.config.to_dict(), "max_len": self.runner.max_len,
                "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "placement_group_id": ctx.get_placement_group_id(),
                "device": str(self.device), "parameters": model.num_parameters(),
                "experts": {m.layer_id: list(m.experts.global_expert_ids) for m in model.moe_modules()}}

    def check_health(self) -> dict:
        """Raise RuntimeError unless started, still in its process group and no step failed; else a summary."""
        if self.runner is None:
            raise RuntimeError("inference shard not started")
        if not dist.is_initialized():
            raise RuntimeError(f"inference shard rank {self.rank} left its process group")
        if self._failed is not None:
            raise RuntimeError(f"inference shard rank {self.rank}: a step failed: {self._failed}")
        return {"rank": self.rank, "rows": self.runner.rows, "pid": os.getpid()}

    def abort(self) -> None:
        """Leave the current process group (after a peer failed or before joining a new one)."""
        leave_world()

    def shutdown(self) -> None:
        self.abort()
        self.runner = None

    # -- serving ------------------------------------------------------------------------------------------
    def _load(self, checkpoint) -> tuple[GPT, Optional[int]]:
        # a native checkpoint, a Hugging Face folder or a training run's published weights (LiveWeights);
        # whichever, this rank reads only its experts
        live = isinstance(checkpoint, LiveWeights)
        gpt_cfg = checkpoint.gpt_config() if live else checkpoint_config(checkpoint)
        layout = parallel.ParallelLayout.from_config(gpt_cfg, self.world, ep_size=self.world)
        groups = parallel.build_process_groups(layout, self.rank)  # EP group = world: creates no new group
        model = GPT(gpt_cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups))
        if live:
            checkpoint.load_into(model)
        else:
            load_weights(model, checkpoint)
        model = prepare_for_inference(model.to(self.device))
        if self.redundant_experts:  # empty slots; set_placement / swap fill them (collective)
            for m in model.moe_modules():
                m.replicas = ReplicatedExperts(m, self.redundant_experts)
        return model, checkpoint.step if live else checkpoint_step(checkpoint)

    @torch.inference_mode()
    def step(self, kind: str, keep: Optional[list[int]], idx: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Keep rows ``keep`` (None: all), then ``kind`` = "prefill" (new rows ``idx``/``mask``, appended) or
        "decode" (one token per row); no rows: an idle forward. Returns (logits [rows, V], this rank's expert
        counts)."""
        if kind not in ("prefill", "decode"):
            raise ValueError(f"kind={kind!r}; allowed: 'prefill', 'decode'")
        r = self.runner
        try:
            if keep is not None:
                r.keep_rows(keep)
            if idx.shape[0] == 0:
                logits = r.idle_forward()
            elif kind == "prefill":
                logits = r.prefill(idx, mask)
            else:
                logits = r.decode(idx)
        except Exception as exc:
            self._failed = repr(exc)
            raise
        return logits.cpu(), {lid: c.cpu() for lid, c in r.expert_counts.items()}

    def reset(self) -> None:
        """Drop every row (after a failed step); the shard is usable again if its group still is."""
        self.runner.reset()
        self._failed = None

    def prepare(self, checkpoint) -> dict:
        """Load new weights (a checkpoint path or `LiveWeights`) beside the serving ones (no collective);
        ``swap`` installs them."""
        self._pending = self.runner.prepare(checkpoint)
        return {"config": self._pending.config.to_dict(), "step": self._pending.step}

    def swap(self) -> None:
        if self._pending is None:
            raise RuntimeError("swap without prepare")
        self.runner.swap(self._pending)
        self._pending = None
        if self.placements:  # the new weights' copies, from their owners (every rank swaps in the same call)
            self.set_placement(self.placements)

    # -- hot-expert replication -----------------------------------------------------------------------------
    def set_placement(self, placements: dict[int, list[int]]) -> None:
        """Install a placement per MoE layer id (collective: every rank, same placements, between steps)."""
        for m in self.runner.model.moe_modules():
            if m.layer_id in placements:
                m.replicas.set_placement(placements[m.layer_id])
        self.placements = {lid: list(p) for lid, p in placements.items()}

    def physical_load(self) -> dict[int, torch.Tensor]:
        """Rows this rank sent to each physical expert slot per layer since the last call (then reset)."""
        out = {}
        for m in self.runner.model.moe_modules():
            if m.replicas is not None:
                out[m.layer_id], m.replicas.load_P = m.replicas.load_P, torch.zeros_like(m.replicas.load_P)
        return out


def remote_class(num_cpus: float, num_gpus: float):
    """The InferenceShard actor class with its resource request."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(InferenceShard)
