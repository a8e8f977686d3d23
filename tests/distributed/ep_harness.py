"""Jobs of the expert-parallel tests, run in spawned gloo worlds (tests/gloo_world.py; every wait is bounded).

``spawn(world, jobs)`` starts ``world`` processes that join one gloo process group and run the jobs in order
(each job a dict with a ``kind``: "train" or "zero_tokens"); it returns every rank's results. ``train(...)`` runs
N optimizer steps of the real GPT-MoE through ``train_step`` and returns the global mean losses, grad norms
and the final weights gathered to the full EP=1 layout (global expert ids). World 1 runs in-process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import gloo_world  # tests/gloo_world.py: the spawned-world plumbing

BASE = dict(vocab_size=257, block_size=16, n_head=2, d_model=32, d_ff=64, expert_ffn=32, dropout=0.0,
            min_capacity=1, aux_loss_coef=0.01)
CONFIGS = {
    # k=1, capacity dropping with Random Token Selection, jitter noise, z-loss
    "k1_drop": dict(BASE, n_layer=2, expert_interval=1, num_experts=4, k=1, capacity_factor=1.0,
                    drop_tokens=True, use_rts=True, noisy_gate_policy="Jitter", z_loss_coef=1e-3),
    # k=2, dropless, aux-loss-free expert bias (buffers synced through the expert loads)
    "k2_dropless": dict(BASE, n_layer=2, expert_interval=1, num_experts=8, k=2, drop_tokens=False,
                        expert_bias=True, expert_bias_update_rate=1e-2),
    # PR-MoE pyramid (4 then 8 experts), k=2 with dropping + RTS, residual MoE, Jitter noise (RSample is top-1 only)
    "pyramid": dict(BASE, n_layer=4, expert_interval=2, num_experts=[4, 8], k=2, capacity_factor=1.25,
                    drop_tokens=True, use_rts=True, use_residual=True, noisy_gate_policy="Jitter"),
    # the modern families' options, trained: Mixtral-style (RoPE, GQA, RMSNorm, SwiGLU experts, softmax top-2
    # renormalised, dropless, untied) and DeepSeek-V3-style (MLA with YaRN, sigmoid scores with the correction
    # bias and group-limited selection, a shared expert, a first dense layer, aux-loss-free bias updates)
    "mixtral": dict(BASE, n_layer=2, expert_interval=1, num_experts=4, n_kv_head=1, norm="rmsnorm", bias=False,
                    position="rope", mlp="swiglu", tie_embeddings=False, k=2, router="softmax_topk",
                    norm_topk_prob=True, drop_tokens=False),
    "deepseek": dict(BASE, n_layer=3, moe_layers=[1, 2], num_experts=8, norm="rmsnorm", bias=False,
                     position="rope", attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=8,
                     rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                   "mscale": 1.0, "mscale_all_dim": 1.0},
                     mlp="swiglu", k=2, router="sigmoid_group", n_group=4, topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5, shared_expert_ffn=16, expert_bias=True, expert_bias_update_rate=1e-2,
                     drop_tokens=False),
}
TRAIN = dict(steps=3, global_batch=8, micro_batch=2, seed=1234, lr=2e-3, grad_clip=0.5)


def token_file(tmp_path_factory) -> str:
    """The embedded corpus as a token file (for a module-scoped ``data_path`` fixture)."""
    from raymoe.platform.data import build_token_file

    return str(build_token_file(None, tmp_path_factory.mktemp("tokens")))


def train_job(name: str, config: str, data: str, **kw) -> tuple[str, dict]:
    """(name, job) of a "train" job of ``config`` on the token file ``data``; ``kw``: ep, sharding, train, ..."""
    return name, dict(kind="train", config=config, data=data, **kw)


# -- one rank's training run ---------------------------------------------------------------------------------
class _Run:
    """One rank's GPT-MoE, AdamW and data for a job; ``steps`` trains, recording the global mean losses."""

    def __init__(self, rank: int, world: int, job: dict):
        from raymoe.platform import fsdp, parallel
        from raymoe.platform.activation_checkpoint import apply_activation_checkpointing
        from raymoe.platform.data import TokenDataset
        from raymoe.platform.model import GPT, GPTConfig
        from raymoe.platform.train_step import build_optimizer

        self.rank, self.world = rank, world
        self.t = t = dict(TRAIN, **job.get("train", {}))
        self.cfg = cfg = GPTConfig.from_dict({**CONFIGS[job["config"]], **job.get("model", {})})
        self.layout = parallel.ParallelLayout.from_config(cfg, world, job.get("ep", 1))
        rpn = job.get("ranks_per_node")
        self.groups = parallel.build_process_groups(self.layout, rank, ranks_per_node=rpn)
        torch.manual_seed(t["seed"])
        self.init = GPT(cfg).state_dict()  # every rank builds the same EP=1 model, then keeps its experts
        self.kwargs = parallel.make_moe_kwargs(self.layout, self.groups, hierarchical=job.get("hierarchical", False),
                                               ranks_per_node=rpn, exchange=job.get("exchange", "auto"),
                                               uniform_tokens=True)  # equal micro-batches, as the Ray trainer runs
        self.model = model = GPT(cfg, moe_kwargs=self.kwargs)
        parallel.load_full_state_dict(model, self.init)
        apply_activation_checkpointing(model, job.get("ac", "none"))  # recomputed forwards redo their all-to-alls
        # FSDP2 ({"dense": "shard", "experts": "shard"}): before the optimizer, which then holds the shards
        fsdp.apply_sharding(model, self.layout, self.groups, **job.get("sharding", {}))
        self.opt = build_optimizer(model, lr=t["lr"], weight_decay=0.1, betas=(0.9, 0.95))
        self.grad_sync = parallel.make_grad_sync(model, self.layout, self.groups) if world > 1 else None
        self.grad_norm = parallel.make_grad_norm(model, self.layout, self.groups) if world > 1 else None
        self.train_ds, _ = TokenDataset(job["data"]).split(0.1, block_size=cfg.block_size)
        self.losses, self.norms, self.dropped = [], [], []

    def steps(self, start: int, stop: int) -> None:
        from raymoe.platform import parallel
        from raymoe.platform.data import rank_micro_batches
        from raymoe.platform.train_step import train_step

        t, world = self.t, self.world
        for step in range(start, stop):
            # this rank's micro-batches (any world size: counts differing by at most one), then padding passes
            batches, first, padding = rank_micro_batches(self.train_ds, t["seed"], step, self.rank, world,
                                                         t["global_batch"], t["micro_batch"], self.cfg.block_size)
            parallel.seed_router_noise(t["seed"], step, self.rank, model=self.model,
                                       micro_batches=len(batches) - padding, first=first)
            res = train_step(self.model, self.opt, batches, lr=t["lr"], grad_clip=t["grad_clip"],
                             grad_sync=self.grad_sync, grad_norm_fn=self.grad_norm,
                             total_micro_batches=t["global_batch"] // t["micro_batch"], padding=padding)
            loss = torch.tensor([res.loss], dtype=torch.float64)  # this rank's share of the step's mean
            if world > 1:
                dist.all_reduce(loss)
            self.losses.append(float(loss))
            self.norms.append(res.grad_norm)
            self.dropped.append(res.dropped_fraction)

    @torch.no_grad()
    def eval_loss(self) -> float:
        """The global mean loss of one evaluation-mode forward (deterministic routing) on a fixed batch."""
        from raymoe.platform.data import sample_batch

        x, y = sample_batch(self.train_ds, 99, 0, self.rank, self.world, self.t["global_batch"], self.cfg.block_size)
        self.model.eval()
        with self.model.deterministic_routing():
            loss = torch.tensor([float(self.model(x, y).ce_loss)], dtype=torch.float64)
        self.model.train()
        if self.world > 1:
            dist.all_reduce(loss)
        return float(loss) / self.world

    def full_state(self) -> dict:
        """The EP=1 state dict (every expert, global ids) on every rank, whatever the layout and sharding."""
        from raymoe.platform import fsdp, parallel

        with fsdp.gathered(self.model):
            state = (parallel.gather_full_state_dict(self.model, self.layout, self.groups) if self.world > 1
                     else self.model.state_dict())
            return {k: v.clone() for k, v in state.items()}


# -- jobs ---------------------------------------------------------------------------------------------------
def train(rank: int, world: int, job: dict) -> dict:
    """N steps of GPT-MoE with AdamW via train_step; constant global batch and per-forward micro-batch."""
    from raymoe.platform import parallel
    from raymoe.platform.fsdp import local_bytes

    run = _Run(rank, world, job)
    run.steps(0, run.t["steps"])
    comm = sum(parallel.total_comm_seconds(run.model).values())
    routes = sorted({d.last_route for d in run.kwargs.dispatchers.values()})
    params = list(run.model.parameters())
    held = {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optim": local_bytes(v for st in run.opt.state.values() for v in st.values() if v.dim())}
    # a no_grad forward of the (maybe sharded) model; the state is gathered after it. One forward of this
    # rank's rows: equal sizes on every rank only where the world divides the global batch
    eval_loss = run.eval_loss() if run.t["global_batch"] % world == 0 else None
    return {"routes": routes, "losses": run.losses, "grad_norms": run.norms, "state": run.full_state(),
            "comm_seconds": comm, "dropped_fraction": run.dropped, "init": run.init, "bytes": held,
            "eval_loss": eval_loss}


def relayout(rank: int, world: int, job: dict) -> dict:
    """Train in phases (``job["phases"]``: each {"steps", "ep", "sharding"}), each phase a fresh model that
    loads the checkpoint the previous one wrote under ``job["dir"]`` (weights and AdamW state): checkpoints
    written by any layout and sharding continue in any other. Returns the losses and grad norms of every step
    and the final state, as ``train`` does."""
    from torch.distributed.tensor import DTensor

    from raymoe.platform import checkpoint as ckpt
    from raymoe.platform.fsdp import local_bytes

    step, losses, norms = 0, [], []
    for i, phase in enumerate(job["phases"]):
        run = _Run(rank, world, {**job, **phase})
        if i:  # a sharded model reads its slices straight into its shards
            ckpt.load_checkpoint(f"{job['dir']}/{ckpt.step_dir_name(step)}", run.model, run.opt, restore_rng=False)
        run.steps(step, step + phase["steps"])
        step += phase["steps"]
        losses, norms = losses + run.losses, norms + run.norms
        path = ckpt.save_checkpoint(job["dir"], step, run.model, run.opt, rng=False, write_manifest=False,
                                    write_dense=rank == 0, write_experts=run.groups.is_first_expert_replica)
        dist.barrier()
        if rank == 0:
            ckpt.finalize_checkpoint(path, step=step, expected_experts=run.cfg.experts_per_layer())
        dist.barrier()
    # after loads and saves a rank holds only its shards: no tensor is a view into a gathered full tensor
    held = [*run.model.parameters(), *(v for st in run.opt.state.values() for v in st.values() if v.dim())]
    locals_ = [t.to_local() if isinstance(t, DTensor) else t for t in held]
    return {"losses": losses, "grad_norms": norms, "state": run.full_state(), "held_bytes": local_bytes(held),
            "storage_bytes": sum(t.untyped_storage().nbytes() for t in locals_)}


def undo(rank: int, world: int, job: dict) -> dict:
    """The elastic per-step undo copy (raymoe.actors.shard_state) of a possibly sharded model: two steps, then
    a third that is rolled back and run again. Returns the losses, the state after step 2 and after the
    rollback, the final state, and the bytes of the undo copy, of the parameters and of the AdamW state."""
    from raymoe.actors.shard_state import ShardState
    from raymoe.platform.fsdp import local_bytes

    run = _Run(rank, world, job)
    state = ShardState(run.model, run.opt, keep_undo=True)
    for step in range(3):
        state.begin_step(step)
        run.steps(step, step + 1)
        if step == 1:
            after_two = run.full_state()
    rolled = state.rollback(2)
    undone = run.full_state()
    state.begin_step(2)
    run.steps(2, 3)
    params = list(run.model.parameters())
    return {"losses": run.losses, "grad_norms": run.norms, "rolled_back_to": rolled, "after_two": after_two,
            "undone": undone,
            "state": run.full_state(), "undo_bytes": state.undo_bytes(), "param_bytes": local_bytes(params),
            "buffer_bytes": local_bytes(run.model.buffers()),
            "optim_bytes": local_bytes(v for st in run.opt.state.values() for v in st.values() if v.dim())}


def zero_tokens(rank: int, world: int, job: dict) -> dict:
    """Experts with no tokens on a remote rank and a rank sending nothing: no hang, zero grads, no NaN."""
    from raymoe.platform import parallel
    from raymoe.platform.moe import MoE

    rpn = job.get("ranks_per_node")
    layout = parallel.ParallelLayout(world, {0: world})
    groups = parallel.build_process_groups(layout, rank, ranks_per_node=rpn)
    E = 2 * world
    make = parallel.make_moe_kwargs(layout, groups, hierarchical=bool(rpn), ranks_per_node=rpn,
                                    exchange=job.get("exchange", "auto"))
    d = make(0, E)["dispatcher"]
    # dispatcher level: rank 0 sends 5 rows to its own expert 0, rank 1 sends 3 rows to that remote expert,
    # the other ranks send nothing; every expert but expert 0 gets no row
    counts = torch.tensor([{0: 5, 1: 3}.get(rank, 0)] + [0] * (E - 1))
    x = torch.randn(int(counts.sum()), 3, requires_grad=True)
    x_loc, c_loc = d.dispatch(x, counts)
    y = d.combine(x_loc * 2.0)
    y.sum().backward()
    out = {"route": d.last_route, "rows": x_loc.shape[0], "counts_dim": c_loc.dim(),
           "local_counts": c_loc.reshape(-1, c_loc.shape[-1]).sum(0).tolist(),  # source order: [Q, El]
           "grad_ok": bool((x.grad == 2.0).all()),
           "y_ok": bool(torch.equal(y, 2 * x.detach()))}
    # layer level, dropless: every token of rank 0 goes to expert 0; other ranks route no token at all
    torch.manual_seed(0)
    kw = make(0, E)
    reduces = _count_all_reduces(kw["dispatcher"])
    moe = MoE(8, expert=16, num_experts=E, k=1, drop_tokens=False, **kw)
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = 10.0
    h = torch.rand(2, 6, 8, requires_grad=True)
    mask = torch.full((2, 6), rank == 0)
    y, l_aux, exp_counts = moe(h, token_mask=mask)
    (y.square().sum() + l_aux).backward()
    out.update(finite=bool(torch.isfinite(y).all() and torch.isfinite(h.grad).all()),
               expert_grad_zero=[bool(g.abs().sum() == 0) for g in moe.experts.w1.grad],
               y_zero=bool((y == 0).all()), capacity=moe.last_stats.capacity, all_reduces=reduces[0])
    moe.eval()
    with torch.no_grad():
        moe(h, token_mask=mask)
    return out


def uneven_tokens(rank: int, world: int, job: dict) -> dict:
    """Capacity (drop) mode with a different token count on every rank, one rank with none at all.

    Each rank's output must equal the EP=1 layer run on that rank's tokens alone (capacity from its own token
    count, as in DeepSpeed); the ranks agree on the slot-buffer size so the fixed-split all-to-all matches.
    Returns the max differences of y, x.grad and the (EP-group summed) expert grads vs the EP=1 layer.
    """
    from raymoe.platform import parallel
    from raymoe.platform.moe import MoE

    rpn = job.get("ranks_per_node")
    E = 2 * world
    args = dict(hidden_size=8, expert=16, num_experts=E, k=2, capacity_factor=1.0, min_capacity=1,
                drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)  # no random draws
    torch.manual_seed(0)
    ref = MoE(**args)
    layout = parallel.ParallelLayout(world, {0: world})
    groups = parallel.build_process_groups(layout, rank, ranks_per_node=rpn)
    moe = MoE(**args, **parallel.make_moe_kwargs(layout, groups, hierarchical=bool(rpn), ranks_per_node=rpn)(0, E))
    reduces = _count_all_reduces(moe.dispatcher)
    parallel.load_full_state_dict(moe, ref.state_dict())
    T = [7, 0, 12, 3][rank % 4]
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(rank))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, l_aux, _ = moe(xa)
    (y.square().sum() + l_aux).backward()
    y_ref, l_ref, _ = ref(xb)
    (y_ref.square().sum() + l_ref).backward()
    g_ref = ref.experts.w1.grad.clone()
    dist.all_reduce(g_ref)  # the experts' grads from every rank's tokens
    mine = torch.as_tensor(moe.experts.global_expert_ids)

    def diff(a, b):
        return float((a - b).abs().max()) if a.numel() else 0.0

    return {"T": T, "capacity": moe.last_stats.capacity, "ref_capacity": ref.last_stats.capacity,
            "y": diff(y, y_ref), "x_grad": diff(xa.grad, xb.grad) if T else 0.0,
            "w1_grad": diff(moe.experts.w1.grad, g_ref[mine]), "dropped": float(moe.last_stats.dropped_fraction),
            "route": moe.dispatcher.last_route, "all_reduces": reduces[0]}


def _count_all_reduces(dispatcher) -> list[int]:
    """Counts the dispatcher's all-reduces (in a one-element list the caller reads after its forwards)."""
    n, inner = [0], dispatcher.all_reduce_max

    def counted(t):
        n[0] += 1
        return inner(t)
    dispatcher.all_reduce_max = counted
    return n


JOBS = {"train": train, "relayout": relayout, "undo": undo, "zero_tokens": zero_tokens, "uneven_tokens": uneven_tokens}


def _run_job(rank: int, world: int, job: dict):
    return JOBS[job["kind"]](rank, world, job)


def spawn(world: int, jobs: list[dict], timeout: float = gloo_world.SPAWN_TIMEOUT_S,
          run_job=_run_job) -> list[list[dict]]:
    """Run ``jobs`` in a fresh gloo world of ``world`` processes; results[rank][job]. ``run_job(rank, world,
    job)``: a module-level function running one job (default: this module's jobs)."""
    return gloo_world.spawn(world, run_job, jobs, timeout)


def run_local(jobs: list[dict], run_job=_run_job) -> list[dict]:
    """World 1 in this process (no process group): gradient accumulation over the same micro-batches."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same as the workers; shared 2-core machines punish OpenMP spinning
    try:
        return [run_job(0, 1, job) for job in jobs]
    finally:
        torch.set_num_threads(torch_threads)
