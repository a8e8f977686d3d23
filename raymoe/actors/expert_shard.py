"""ExpertShard: one Ray actor per worker/GPU; a rank of the torch.distributed world.

It owns its experts (the global expert ids the layout assigns to its expert-parallel rank), a replica of the
dense part, and its optimizer state. Hidden states move between shards only by all-to-all inside the MoE
layers; the coordinator sends window offsets (a few ints per sample) and receives scalar metrics.

The same actor serves (expert-parallel inference, `raymoe.deployments.ep_runner.EPRunner`): ``start_inference``
joins a group whose expert-parallel size is the group size, builds the model with only this rank's experts
and loads them and the dense part from a training checkpoint; ``serve_step`` runs this rank's rows (a
`raymoe.platform.runner.LocalRunner` around that model) and returns their last-position logits. The replica
sends token ids only; hidden states cross shards by all-to-all inside the MoE layers.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist

from raymoe.config import RaymoeConfig, config_from_dict
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import parallel
from raymoe.platform.data import build_dataset, windows_from_starts
from raymoe.platform.host_memory import tune_malloc
from raymoe.platform.model import GPT
from raymoe.platform.runner import LocalRunner, prepare_for_inference
from raymoe.platform.train_step import build_optimizer, train_step
from raymoe.platform.model_io import gpt_config_from, model_config_of
from raymoe.platform.training import resolve_dtype, window_loss_sums


class ExpertShard:
    """A Ray actor (see :func:`remote_class`); lifecycle verbs: start, check_health, shutdown."""

    def __init__(self, cfg: dict, *, build_data: bool = True):
        tune_malloc()  # this worker process allocates the model's tensors every step
        self.cfg: RaymoeConfig = config_from_dict(cfg, source="coordinator")
        self.rank = -1
        self.world = 0
        self.model: GPT | None = None
        self.last_completed: int | None = None  # the last step whose optimizer update this shard applied
        self._undo: dict | None = None  # state before that update (for rolling back a step that failed elsewhere)
        self._snapshots: dict[str, tuple[int, dict[str, bytes]]] = {}  # "own"/"buddy" in-memory copies
        self._fault: tuple[str, int] | None = None
        self.runner = None  # inference (start_inference)
        self._pending_weights = None
        if not build_data:  # an inference shard reads no corpus
            return
        ds = build_dataset(self.cfg.data.sources or None, cache_dir=self.cfg.data.cache_dir,
                           jsonl_field=self.cfg.data.jsonl_field)
        self.train_ds, self.val_ds = ds.split(self.cfg.data.val_fraction, block_size=self.cfg.model.block_size)

    # -- placement / rendezvous ---------------------------------------------------------------------------
    def node_info(self) -> dict:
        """Where this shard runs (the coordinator orders ranks by node for the hierarchical all-to-all)."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def free_port(self) -> int:
        """A free TCP port on this node, for the rendezvous when this shard is rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, init_method: str, rank: int, world: int, ep_sizes: dict[int, int],
              ranks_per_node: int | None, parts: dict[str, bytes] | None = None, step: int = 0) -> dict:
        """Join the process group, build EP/EDP groups, the model with this rank's experts and the optimizer.

        Called again after a membership change: the old group is left first, and ``parts`` (checkpoint files
        exported by the shards that hold the state, see :meth:`export_parts`) restore the weights and optimizer
        state of the experts this rank owns in the new layout.
        """
        c, t = self.cfg.cluster, self.cfg.train
        self.abort()
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if c.gpus_per_worker > 0 and torch.cuda.is_available() else \
            torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(c.cpus_per_worker)))
        backend = c.backend if c.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=c.collective_timeout_s))
        self.layout = parallel.ParallelLayout(world, {int(k): v for k, v in ep_sizes.items()})
        self.groups = parallel.build_process_groups(self.layout, rank, ranks_per_node=ranks_per_node)
        gpt_cfg = gpt_config_from(self.cfg)
        torch.manual_seed(self.cfg.run.seed)
        # every rank builds the same full (EP=1) model from the seed and keeps its experts' rows: dense
        # replicas agree and each expert starts exactly as it would without expert parallelism
        full_state = GPT(gpt_cfg).state_dict()
        self.model = GPT(gpt_cfg, moe_kwargs=parallel.make_moe_kwargs(
            self.layout, self.groups, hierarchical=c.hierarchical_all_to_all, ranks_per_node=ranks_per_node,
            uniform_tokens=True))  # every rank runs the same micro-batch and eval sizes (coordinator's plan)
        parallel.load_full_state_dict(self.model, full_state)
        del full_state
        self.model.to(self.device)
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.optimizer = build_optimizer(self.model, lr=t.lr, weight_decay=t.weight_decay,
                                         betas=(t.beta1, t.beta2), device_type=self.device.type)
        if c.elastic:  # a state copy per step, only needed to undo a step that failed on another shard
            self.optimizer.register_step_pre_hook(self._remember_state)
        self.grad_sync = parallel.make_grad_sync(self.model, self.layout, self.groups)
        self.grad_norm = parallel.make_grad_norm(self.model, self.layout, self.groups)
        if parts:
            self._load_parts(parts, step, gpt_cfg.experts_per_layer())
        self.last_completed, self._undo = None, None
        return {"rank": rank, "experts": {m.layer_id: list(m.experts.global_expert_ids)
                                          for m in self.model.moe_modules()}, "device": str(self.device)}

    # -- steps --------------------------------------------------------------------------------------------
    def train_step(self, step: int, starts: list[int], lr: float, micro_batch: int) -> dict:
        """One optimizer step over this rank's windows; returns the step's scalar results."""
        t = self.cfg.train
        x, y = windows_from_starts(self.train_ds, np.asarray(starts, dtype=np.int64),
                                   self.cfg.model.block_size, self.device)
        micro = list(zip(x.split(micro_batch), y.split(micro_batch)))
        parallel.seed_router_noise(self.cfg.run.seed, step, self.rank, model=self.model, micro_batches=len(micro))
        parallel.reset_comm_stats(self.model)
        t0 = time.perf_counter()
        self._pending_step = step
        if self._fault and self._fault[0] == "train_step" and self._fault[1] == step:
            self._arm_exit_after_forwards(len(micro) // 2 + 1)
        res = train_step(self.model, self.optimizer, micro, lr=lr, grad_clip=t.grad_clip,
                         autocast_dtype=self.dtype, grad_sync=self.grad_sync, grad_norm_fn=self.grad_norm)
        self.last_completed = step
        out = dataclasses.asdict(res)
        out["compute_s"] = time.perf_counter() - t0
        out["all_to_all_s"] = parallel.total_comm_seconds(self.model)
        return out

    @torch.no_grad()
    def eval_step(self, starts: list[int], micro_batch: int) -> tuple[float, int]:
        """Summed cross-entropy and token count over this rank's evaluation windows (micro-batch forwards)."""
        return window_loss_sums(self.model, self.val_ds, starts, block_size=self.cfg.model.block_size,
                                micro_batch=micro_batch, device=self.device, autocast_dtype=self.dtype)

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, root: str, step: int) -> str:
        """Write this rank's part: the dense part on rank 0; its experts if it is the first expert-data-parallel
        replica of any layer (with per-layer EP sizes it then also rewrites some replicated experts: identical
        bytes, atomic renames)."""
        if self._fault and self._fault[0] == "save" and self._fault[1] == step:
            # test hook: die after the dense file is written, before this rank's experts are complete
            ckpt.save_checkpoint(root, step, self.model, None, write_experts=False, write_manifest=False)
            os._exit(1)
        path = ckpt.save_checkpoint(root, step, self.model, self.optimizer, write_dense=self.rank == 0,
                                    write_experts=any(i == 0 for i in self.groups.expert_replica_index.values()),
                                    write_manifest=False,
                                    rank=self.rank)
        return str(path)

    # -- elasticity: state export, rollback, in-memory copies ---------------------------------------------
    def _remember_state(self, optimizer, args, kwargs) -> None:
        """Optimizer pre-step hook: keep the state before this update so a failed step can be undone."""
        self._undo = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                      "optimizer": copy.deepcopy(optimizer.state_dict()), "step": self._pending_step}

    def rollback(self, step: int) -> int | None:
        """Undo the update of ``step`` if this shard applied it (the step failed on another shard)."""
        if self.last_completed == step and self._undo is not None and self._undo["step"] == step:
            self.model.load_state_dict(self._undo["model"])
            self.optimizer.load_state_dict(self._undo["optimizer"])
            self.last_completed = step - 1
        return self.last_completed

    def export_parts(self, step: int, dense: bool, experts: list[tuple[int, int]] | None = None) -> dict[str, bytes]:
        """This shard's state as checkpoint files in memory: the dense part if ``dense``, and the expert files
        of ``experts`` ((layer, global id) pairs; None = all it holds)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = ckpt.save_checkpoint(tmp, step, self.model, self.optimizer, write_dense=dense, rng=False,
                                        write_manifest=False)
            wanted = None if experts is None else {ckpt.expert_file_name(lid, g) for lid, g in experts}
            parts = {}
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path).as_posix()
                if p.is_file() and (wanted is None or not rel.startswith(ckpt.EXPERT_DIR + "/") or rel in wanted):
                    parts[rel] = p.read_bytes()
            return parts

    def _load_parts(self, parts: dict[str, bytes], step: int, experts_per_layer: dict[int, int]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ckpt.step_dir_name(step)
            for rel, data in parts.items():
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                (path / rel).write_bytes(data)
            ckpt.finalize_checkpoint(path, step=step, expected_experts=experts_per_layer, update_latest=False)
            ckpt.load_checkpoint(path, self.model, self.optimizer, restore_rng=False)

    def keep_snapshot(self, kind: str, step: int, parts: dict[str, bytes]) -> int:
        """Hold an in-memory copy: "own" (this shard's state) or "buddy" (a peer's), taken at ``step``."""
        self._snapshots[kind] = (step, parts)
        return step

    def snapshots(self) -> dict[str, tuple[int, dict[str, bytes]]]:
        return self._snapshots

    def inject_fault(self, where: str, step: int) -> None:
        """Test hook: exit the process abruptly inside ``train_step`` (mid all-to-all) or ``save`` at ``step``."""
        self._fault = (where, step)

    def _arm_exit_after_forwards(self, n: int) -> None:
        count = {"n": 0}

        def hook(module, args):
            count["n"] += 1
            if count["n"] > n:
                os._exit(1)

        self.model.register_forward_pre_hook(hook)

    def load(self, path: str) -> int:
        """Load weights + optimizer state (any EP layout: experts are keyed by global id)."""
        info = ckpt.load_checkpoint(path, self.model, self.optimizer, restore_rng=False)
        return int(info["step"])

    def full_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters on CPU (tests gather them to compare layouts)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # -- inference (expert-parallel serving) ---------------------------------------------------------------
    def start_inference(self, init_method: str, rank: int, world: int, checkpoint: str, max_rows: int,
                        device: str = "cpu", threads: int | None = None) -> dict:
        """Join an inference group of ``world`` shards (expert-parallel size ``world`` on every MoE layer), build
        the model with this rank's experts only and load them and the dense part from ``checkpoint`` (the
        training format: each rank reads the dense file and its own experts' files)."""
        c = self.cfg.cluster
        self.abort()
        self.rank, self.world = rank, world
        use_cuda = device != "cpu" and torch.cuda.is_available() and bool(ray.get_gpu_ids())
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if threads:
            torch.set_num_threads(int(threads))
        backend = c.backend if c.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=c.collective_timeout_s))
        model, step = self._inference_model(checkpoint)
        self.runner = LocalRunner(model, max_rows, loader=self._inference_model)
        ctx = ray.get_runtime_context()
        return {"rank": rank, "step": step, "config": dataclasses.asdict(model.config), "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "placement_group_id": ctx.get_placement_group_id(),
                "device": str(self.device), "parameters": model.num_parameters(),
                "experts": {m.layer_id: list(m.experts.global_expert_ids) for m in model.moe_modules()}}

    def _inference_model(self, checkpoint: str) -> tuple[GPT, int | None]:
        info = ckpt.read_manifest(checkpoint)
        gpt_cfg = model_config_of(info, checkpoint)
        layout = parallel.ParallelLayout.from_config(gpt_cfg, self.world, ep_size=self.world)
        groups = parallel.build_process_groups(layout, self.rank)  # EP group = world: creates no new group
        model = GPT(gpt_cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups))
        ckpt.load_checkpoint(checkpoint, model, restore_rng=False)
        return prepare_for_inference(model.to(self.device)), info.get("step")

    @torch.inference_mode()
    def serve_step(self, kind: str, keep: list[int] | None, idx: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Keep rows ``keep`` (None: all), then ``kind`` = "prefill" (new rows ``idx``/``mask``, appended) or
        "decode" (one token per row). Every shard of the group is called for every step, also with no rows:
        the MoE layers' all-to-alls are collective. Returns (logits [rows, V], expert counts of this rank)."""
        r = self.runner
        if keep is not None:
            r.keep_rows(keep)
        if idx.shape[0] == 0:
            logits = r.idle_forward()
        elif kind == "prefill":
            logits = r.prefill(idx, mask)
        elif kind == "decode":
            logits = r.decode(idx)
        else:
            raise ValueError(f"kind={kind!r}; allowed: 'prefill', 'decode'")
        return logits.cpu(), {lid: c.cpu() for lid, c in r.expert_counts.items()}

    def serve_reset(self) -> None:
        """Drop every row (after a failed step)."""
        self.runner.reset()

    def serve_prepare(self, checkpoint: str) -> dict:
        """Load new weights beside the serving ones (no collective); ``serve_swap`` installs them."""
        self._pending_weights = self.runner.prepare(checkpoint)
        return {"config": dataclasses.asdict(self._pending_weights.config), "step": self._pending_weights.step}

    def serve_swap(self) -> None:
        if self._pending_weights is None:
            raise RuntimeError("serve_swap without serve_prepare")
        self.runner.swap(self._pending_weights)
        self._pending_weights = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def check_health(self) -> bool:
        return True

    def abort(self) -> None:
        """Leave the current process group (after a peer failed or before re-joining a new one)."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group broken by a dead peer may refuse an orderly teardown
                pass

    def shutdown(self) -> None:
        self.abort()


def remote_class(num_cpus: float, num_gpus: float):
    """The ExpertShard actor class with its resource request."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(ExpertShard)
