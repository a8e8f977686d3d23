"""`EPRunner`: the engine's model runner over a group of `InferenceShard` actors (expert-parallel serving).

Layout. The group has ``ep_size`` shards; every MoE layer is split over all of them (expert-parallel size =
group size, global experts r*E/ep .. (r+1)*E/ep - 1 on rank r, as in training), and each shard holds a dense
replica. Each shard loads the dense file and its own experts' files of a training checkpoint.

Rows are data-parallel over the shards: a new row goes to the shard with the fewest running rows, and stays
there (its KV cache lives on that shard). Per engine step every shard runs one forward on its rows, also
with none (an idle forward that routes no token): the MoE layers' all-to-alls are collective. The replica
sends token ids and receives last-position logits; hidden states cross shards only by all-to-all inside the
MoE layers (torch.distributed: gloo on CPU, NCCL on GPU), never through the object store.
Trade-off: with rows split, attention and the dense layers are not repeated on every shard and every token
reaches its expert once; the cost is one actor call per shard per step and the all-to-alls.
(Running the same batch on every shard and reading rank 0's logits would be simpler but repeats the
dense work ``ep_size`` times and sends ``ep_size`` copies of every token through the experts.)

Hot-expert replication (``redundant_experts`` > 0; `raymoe.platform.moe.replication`). Routing is skewed and
the busiest shard sets every step's pace, so each shard gets ``redundant_experts`` extra slots per MoE layer
for copies of hot experts. The runner sums the expert counts the shards return with every step; every
``replan_interval_steps`` steps it plans a placement from that load (plus half the load behind the previous
plan, a moving average) and, if it changed, installs it on every shard between two steps (the shards fetch the
new copies from their owners). Running rows keep their KV caches: nothing is dropped, and the outputs are the
same as without copies (a copy holds its owner's weights).

Placement. Inside a Serve replica whose deployment has ``placement_group_bundles`` (see
`raymoe.deployments.app`), the shards go to the last ``ep_size`` bundles of the replica's placement group,
so the whole group is reserved, started, scaled and stopped with the replica; the shards are the replica's
child actors and die with it. Without a current placement group (in-process use) the runner reserves one
of its own and removes it on ``shutdown``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from raymoe.platform.moe.replication import replan_placement
from raymoe.platform.runner import Pending


def check_ep_size(config, ep_size: int, checkpoint: str) -> None:
    """ValueError unless ``ep_size`` divides the expert count of every MoE layer of ``config`` (a GPTConfig)."""
    from raymoe.platform.parallel import ParallelLayout

    experts = config.experts_per_layer()
    try:
        if not experts:
            raise ValueError("no MoE layers")
        ParallelLayout.plan(experts, ep_size, ep_size)  # a group of ep_size shards, every layer split over all
    except ValueError:
        raise ValueError(f"ep_size={ep_size} must divide the expert count of every MoE layer; {checkpoint} "
                         f"has {experts or 'no MoE layers'} (layer id: experts)") from None


class EPRunner:
    """`ModelRunner` over ``ep_size`` `InferenceShard` actors (see the module docstring).

    num_cpus / num_gpus: resources of each shard (its bundle when the runner reserves the placement group);
    device: the shards' device (default: "cuda" with num_gpus, else "cpu");
    backend: torch.distributed backend ("auto": nccl on GPU, gloo on CPU); timeout_s: bound on every step
    and on the collectives; start_timeout_s: bound on placing and loading the shards;
    redundant_experts: extra expert slots per shard and MoE layer for copies of hot experts (0: no replication);
    replan_interval_steps: steps between two placement plans (see the module docstring).
    """

    def __init__(self, checkpoint: str, ep_size: int, max_rows: int, *, max_len: Optional[int] = None,
                 device: Optional[str] = None,
                 threads: Optional[int] = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 backend: str = "auto", timeout_s: float = 120.0, start_timeout_s: float = 300.0,
                 placement_strategy: str = "PACK", redundant_experts: int = 0, replan_interval_steps: int = 32):
        import ray

        if not isinstance(ep_size, int) or ep_size < 2:
            raise ValueError(f"ep_size must be an int >= 2 for EPRunner; got {ep_size!r}")
        self.ep_size, self.max_rows, self.timeout_s = ep_size, max_rows, float(timeout_s)
        self.requested_len = max_len
        self._check_checkpoint(checkpoint)
        self._own_pg = None
        self.shards: list = []
        self._broken: Optional[BaseException] = None
        self.owner: list[int] = []  # shard of each running row, in the engine's row order
        self._keep: list[Optional[list[int]]] = [None] * ep_size  # row removals not yet sent to each shard
        self.expert_counts: dict[int, torch.Tensor] = {}
        for name, v, low in (("redundant_experts", redundant_experts, 0), ("replan_interval_steps",
                                                                          replan_interval_steps, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
        self.redundant_experts, self.replan_interval_steps = redundant_experts, replan_interval_steps
        self.placements: dict[int, list[int]] = {}  # layer id -> placement in force ({}: every expert at home)
        self._window: dict[int, torch.Tensor] = {}  # expert counts since the last plan
        self._load: dict[int, torch.Tensor] = {}  # the load the last plan was made from
        self._steps_since_plan, self.replans = 0, 0
        try:
            pg, first = self._placement_group(ray, num_cpus, num_gpus, placement_strategy, start_timeout_s)
            self._start(ray, pg, first, checkpoint, device, threads, num_cpus, num_gpus, backend, start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # -- start / stop ------------------------------------------------------------------------------------
    def _check_checkpoint(self, checkpoint) -> None:
        """``checkpoint``: a path (native or Hugging Face) or a training run's published weights."""
        from raymoe.actors.weight_registry import LiveWeights
        from raymoe.platform.model_io import checkpoint_config

        config = checkpoint.gpt_config() if isinstance(checkpoint, LiveWeights) else checkpoint_config(checkpoint)
        check_ep_size(config, self.ep_size, str(checkpoint))

    def _placement_group(self, ray, num_cpus, num_gpus, strategy, timeout_s):
        """(placement group, index of the first shard bundle): the current one (a Serve replica's: the last
        ep_size bundles) or a new one."""
        from ray.util.placement_group import get_current_placement_group, placement_group

        pg = get_current_placement_group()
        if pg is not None:
            n = len(pg.bundle_specs)
            if n < self.ep_size + 1:
                raise ValueError(f"ep_size={self.ep_size} needs placement_group_bundles with one bundle for the "
                                 f"replica plus {self.ep_size} for the shards; this replica's group has {n}")
            return pg, n - self.ep_size
        bundle = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
        self._own_pg = placement_group([bundle] * self.ep_size, strategy=strategy)
        if not self._own_pg.wait(timeout_s):
            raise TimeoutError(f"placement group for {self.ep_size} shards of {bundle} not ready in {timeout_s}s")
        return self._own_pg, 0

    def _start(self, ray, pg, first, checkpoint, device, threads, num_cpus, num_gpus, backend, timeout_s) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raymoe.actors.inference_shard import remote_class
        from raymoe.platform.model import GPTConfig

        cls = remote_class(num_cpus, num_gpus)
        shard_args = dict(max_rows=self.max_rows, max_len=self.requested_len, device=device or ("cuda" if num_gpus else "cpu"),
                          threads=threads or max(1, int(num_cpus)), backend=backend,
                          collective_timeout_s=self.timeout_s, redundant_experts=self.redundant_experts)
        self.shards = [cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=first + r)).remote(**shard_args) for r in range(self.ep_size)]
        ip = ray.get(self.shards[0].node_info.remote(), timeout=timeout_s)["ip"]
        port = ray.get(self.shards[0].free_port.remote(), timeout=timeout_s)
        init = f"tcp://{ip}:{port}"
        self.shard_info = ray.get([s.start.remote(init, r, self.ep_size, str(checkpoint))
                                   for r, s in enumerate(self.shards)], timeout=timeout_s)
        self.config = GPTConfig.from_dict(self.shard_info[0]["config"])
        self.max_len = self.shard_info[0]["max_len"]
        self.step = self.shard_info[0]["step"]

    def shutdown(self) -> None:
        """Stop the shards (leave the process group, kill the actors) and remove a placement group of our own."""
        import ray

        shards, self.shards = self.shards, []
        if shards:
            try:
                ray.get([s.shutdown.remote() for s in shards], timeout=10)
            except Exception:  # a dead or stuck shard: killed below anyway
                pass
            for s in shards:
                ray.kill(s)
        if self._own_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._own_pg)
            self._own_pg = None

    # -- ModelRunner (raymoe.platform.runner) ---------------------------------------------------------
    mixed_step = False  # prefill_and_decode is a decode round then a prefill round (two calls per shard)

    @property
    def rows(self) -> int:
        return len(self.owner)

    def prefill_and_decode(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor,
                           idx_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        run_BV = self.decode(idx_B1)
        return self.prefill(idx_BP, mask_BP), run_BV

    def prefill(self, idx_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        counts = [self.owner.count(s) for s in range(self.ep_size)]
        assign = []
        for _ in range(idx_BP.shape[0]):  # least-loaded shard first (ties: lowest rank)
            s = min(range(self.ep_size), key=lambda q: counts[q])
            assign.append(s)
            counts[s] += 1
        if max(counts) > self.max_rows:
            raise ValueError(f"prefill of {idx_BP.shape[0]} rows: a shard would hold {max(counts)} > "
                             f"max_rows={self.max_rows}")
        parts = []
        for s in range(self.ep_size):
            rows = [i for i, a in enumerate(assign) if a == s]
            idx, mask = idx_BP[rows], mask_BP[rows]
            if rows:  # drop the columns that are padding in every row of this shard
                P = int(mask.sum(1).max())
                idx, mask = idx[:, idx.shape[1] - P:], mask[:, mask.shape[1] - P:]
            parts.append((rows, (idx.contiguous(), mask.contiguous())))
        logits = self._step("prefill", parts, idx_BP.shape[0])
        self.owner += assign
        return logits

    def decode(self, idx_B1: torch.Tensor) -> torch.Tensor:
        if idx_B1.shape[0] != len(self.owner):
            raise ValueError(f"decode needs one token per running row ({len(self.owner)}); got {idx_B1.shape[0]}")
        parts = []
        for s in range(self.ep_size):
            rows = [i for i, o in enumerate(self.owner) if o == s]
            parts.append((rows, (idx_B1[rows].contiguous(),)))
        return self._step("decode", parts, len(self.owner))

    def _step(self, kind: str, parts: list, n_rows: int) -> torch.Tensor:
        import ray

        if self._broken is not None:
            raise self._dead()
        refs = [shard.step.remote(kind, self._keep[s], *args) for s, (shard, (_, args))
                in enumerate(zip(self.shards, parts))]
        self._keep = [None] * self.ep_size
        try:
            results = ray.get(refs, timeout=self.timeout_s)
        except BaseException as exc:  # a dead shard or a failed collective: the group cannot continue
            self._broken = exc
            raise self._dead() from exc
        out = torch.empty(n_rows, self.config.vocab_size)
        counts: dict[int, torch.Tensor] = {}
        for (rows, _), (logits, c) in zip(parts, results):
            if rows:
                out[rows] = logits.to(out.dtype)
            for lid, v in c.items():
                counts[lid] = v if lid not in counts else counts[lid] + v
        self.expert_counts = counts
        self._observe(counts)
        return out

    # -- hot-expert replication ----------------------------------------------------------------------------
    def _observe(self, counts: dict[int, torch.Tensor]) -> None:
        if not self.redundant_experts:
            return
        for lid, c in counts.items():
            self._window[lid] = c.double() if lid not in self._window else self._window[lid] + c
        self._steps_since_plan += 1
        if self._steps_since_plan >= self.replan_interval_steps:
            self.replan()

    def replan(self) -> dict[int, list[int]]:
        """Plan a placement per MoE layer from the load seen since the last plan plus half the load behind the
        last plan, and install it if it changed (between steps; running rows are kept). A layer keeps its
        placement unless the new one lowers its busiest shard's load by 5% (`replan_placement`): moving copies
        costs weight transfers. Returns the placements."""
        load = {lid: w + 0.5 * self._load[lid] if lid in self._load else w for lid, w in self._window.items()}
        self._load, self._window, self._steps_since_plan = load, {}, 0
        plan = {lid: replan_placement(self.placements.get(lid), v.tolist(), self.ep_size, self.redundant_experts)
                for lid, v in load.items()}
        if plan != self.placements:
            self.set_placement(plan)
        return plan

    def set_placement(self, placements: dict[int, list[int]]) -> None:
        """Install ``placements`` (layer id -> physical slots' logical experts) on every shard."""
        self._on_all("set_placement", placements)
        self.placements = {lid: list(p) for lid, p in placements.items()}
        self.replans += 1

    def physical_load(self) -> dict[int, torch.Tensor]:
        """Rows sent to each physical expert slot per layer since the last call, summed over the shards
        (slot r * (experts per shard + redundant_experts) + i lives on shard r)."""
        out: dict[int, torch.Tensor] = {}
        for part in self._on_all("physical_load"):
            for lid, v in part.items():
                out[lid] = v if lid not in out else out[lid] + v
        return out

    def _on_all(self, method: str, *args) -> list:
        """Call ``method`` on every shard at once (collective calls need all of them); a failure breaks the
        group, as a failed step does."""
        import ray

        if self._broken is not None:
            raise self._dead()
        try:
            return ray.get([getattr(s, method).remote(*args) for s in self.shards], timeout=self.timeout_s)
        except BaseException as exc:
            self._broken = exc
            raise self._dead() from exc

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep rows ``keep`` (ascending); each shard keeps its own of them at its next step."""
        keep = list(keep)
        local = []  # index of each running row inside its shard
        seen = [0] * self.ep_size
        for o in self.owner:
            local.append(seen[o])
            seen[o] += 1
        for s in range(self.ep_size):
            mine = [local[i] for i in keep if self.owner[i] == s]
            if mine == list(range(seen[s])):
                continue
            prev = self._keep[s]
            self._keep[s] = mine if prev is None else [prev[j] for j in mine]
        self.owner = [self.owner[i] for i in keep]

    def reset(self) -> None:
        import ray

        self.owner, self._keep = [], [None] * self.ep_size
        if self._broken is None:
            try:
                ray.get([s.reset.remote() for s in self.shards], timeout=self.timeout_s)
            except BaseException as exc:
                self._broken = exc
                raise

    def prepare(self, checkpoint) -> Pending:
        """Every shard loads its part of ``checkpoint`` (a path, or `LiveWeights`: each shard fetches the dense
        part and its own experts from their owners)."""
        import ray

        from raymoe.platform.model import GPTConfig

        from raymoe.actors.weight_registry import LiveWeights

        self._check_checkpoint(checkpoint)
        source = checkpoint if isinstance(checkpoint, LiveWeights) else str(checkpoint)  # refs go to the shards
        res = ray.get([s.prepare.remote(source) for s in self.shards], timeout=self.timeout_s)
        return Pending(GPTConfig.from_dict(res[0]["config"]), res[0]["step"], str(checkpoint))

    def swap(self, pending: Pending) -> None:
        import ray

        ray.get([s.swap.remote() for s in self.shards], timeout=self.timeout_s)
        if pending.config != self.config:
            assert not self.owner, "an architecture change needs an empty batch (drain policy)"
            self.config = pending.config
            self.max_len = min(self.requested_len or self.config.block_size, self.config.block_size)

    def check_health(self) -> None:
        """RuntimeError when a step failed earlier or a shard does not answer its own health check."""
        import ray

        if self._broken is None:
            try:
                ray.get([s.check_health.remote() for s in self.shards], timeout=self.timeout_s)
            except BaseException as exc:  # a dead shard (RayActorError), a failed one, or a timeout
                self._broken = exc
        if self._broken is not None:
            raise self._dead()

    def _dead(self):
        """The error requests and health checks get once the group is broken: no internals (pids, addresses
        of the dead shard's error) in its text, which clients see; the cause stays in ``_broken`` and the log."""
        from raymoe.deployments.protocol import EngineDeadError

        return EngineDeadError("expert-parallel group is broken (a shard died or a collective failed); this "
                               "replica is being replaced")

    def info(self) -> dict:
        import ray

        shards = [{k: i[k] for k in ("rank", "pid", "node_id", "placement_group_id", "device", "experts")}
                  for i in self.shard_info]
        pg = self._own_pg.id.hex() if self._own_pg is not None else ray.get_runtime_context().get_placement_group_id()
        return {"runner": "expert_parallel", "ep_size": self.ep_size, "shards": shards, "placement_group_id": pg,
                "redundant_experts": self.redundant_experts, "placements": self.placements, "replans": self.replans,
                "rank0_parameters": self.shard_info[0]["parameters"], "config": self.config.to_dict()}
