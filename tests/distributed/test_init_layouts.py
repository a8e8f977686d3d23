"""Start-up without the whole model (raymoe.platform.init via distributed.build_rank): every layout starts from
the single-process trainer's initial weights exactly, and a rank only ever generates the dense tensors (one at
a time) and the experts it holds, never the whole model (spawned gloo world of 2)."""

from __future__ import annotations

import functools

import pytest
import torch

import gloo_world

TINY = ["model.block_size=16", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
        "moe.num_experts=4", "moe.expert_interval=1", "moe.k=1", "tokenizer.kind=byte", "run.seed=77"]
SHARD = ["cluster.dense_sharding=shard", "cluster.expert_sharding=shard"]
CASES = {  # name: (EP size, extra overrides)
    "ep2_sharded": (2, SHARD),  # EDP 1: experts whole on their rank, the dense part sharded
    "ep1_sharded": (1, SHARD),  # EDP 2: each rank holds (and draws) half the experts of every layer
    "ep2_replicated": (2, []),  # the dense part whole, this rank's experts only
    "ep1_one_expert": (1, SHARD + ["moe.num_experts=1"]),  # fewer experts than ranks: each expert split along D
    "ep2_mixtral": (2, SHARD + ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false",
                                "model.tie_embeddings=false", "moe.k=2", "moe.router=softmax_topk"]),
}


def _cfg(case: str, tmp: str):
    from raymoe.config import load_config

    return load_config(None, TINY + CASES[case][1] + [f"run.output_dir={tmp}", f"data.cache_dir={tmp}/cache"])


def _build(rank: int, world: int, job: dict) -> dict:
    """build_rank with every draw of the init recorded; the weights gathered to the EP=1 layout."""
    from raymoe.platform import fsdp, init, parallel
    from raymoe.platform.distributed import build_rank
    from raymoe.platform.model_io import gpt_config_from
    from raymoe.platform.reshard import local_tensor

    cfg = _cfg(job["case"], job["tmp"])
    mcfg = gpt_config_from(cfg)
    ep_sizes = {layer: CASES[job["case"]][0] for layer in mcfg.experts_per_layer()}
    drawn, draw = [], init._draw
    init._draw = lambda shape, *a: drawn.append(torch.Size(shape).numel() * 4) or draw(shape, *a)
    try:
        parts = build_rank(cfg, mcfg, rank, world, ep_sizes, None, torch.device("cpu"))
    finally:
        init._draw = draw
    model = parts.model
    held_experts = sum(fsdp.local_bytes([m.experts.w1, m.experts.w2]) for m in model.moe_modules())
    # the whole experts this rank holds all or a slice of (split along D: it draws each whole, keeps its slice)
    touched = sum(local_tensor(w).shape[0] * w[0].numel() * 4 for m in model.moe_modules()
                  for w in (m.experts.w1, m.experts.w2))
    layout = parallel.ParallelLayout(world, ep_sizes, mcfg.experts_per_layer())
    groups = parallel.build_process_groups(layout, rank)
    with fsdp.gathered(model):
        state = {k: v.clone() for k, v in parallel.gather_full_state_dict(model, layout, groups).items()}
    return {"state": state, "drawn": drawn, "params": fsdp.local_bytes(model.parameters()),
            "experts": held_experts, "touched": touched, "buffers": {k: v.clone() for k, v in model.named_buffers()}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("init"))
    results = gloo_world.spawn(2, _build, [dict(case=c, tmp=tmp) for c in CASES])
    return tmp, {c: [results[r][i] for r in range(2)] for i, c in enumerate(CASES)}


@functools.cache
def _local_trainer_model(case: str, tmp: str):
    from raymoe.platform.trainer import LocalTrainer

    return LocalTrainer(_cfg(case, tmp), log=lambda _: None).model


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_starts_from_the_single_process_weights(built, case):
    tmp, runs = built[0], built[1][case]
    ref = _local_trainer_model(case, tmp)
    want = ref.state_dict()
    for rank, run in enumerate(runs):
        assert run["state"].keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(run["state"][k], v), f"rank {rank}: {k}"
        for k, v in ref.named_buffers():  # recomputed after to_empty: RoPE frequencies, load counters
            assert torch.equal(run["buffers"][k], v), f"rank {rank}: buffer {k}"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_never_generates_the_whole_model(built, case):
    """Every tensor a rank draws goes through init._draw: the dense tensors, each whole once, and the experts
    it holds (of a layer sharded along the experts only its own; split along D, each whole once for its slice),
    never another rank's; its peak is its own parameters plus one drawn tensor, below the whole model."""
    tmp, runs = built[0], built[1][case]
    ref = _local_trainer_model(case, tmp)
    whole = sum(p.numel() * 4 for p in ref.parameters())
    experts = sum(m.experts.w1.numel() * 4 + m.experts.w2.numel() * 4 for m in ref.moe_modules())
    dense = whole - experts
    for run in runs:
        assert run["experts"] <= experts // 2  # EP 2, or EP 1 with the experts sharded over the pair
        assert sum(run["drawn"]) == dense + run["touched"]
        if case == "ep1_one_expert":  # the one expert is split along D: each rank draws it whole, once
            assert run["touched"] == experts
        else:
            assert run["touched"] == run["experts"] and sum(run["drawn"]) < whole
        assert run["params"] + max(run["drawn"]) < whole
    if CASES[case][1]:  # sharded: each rank allocates about half the model
        assert all(run["params"] <= 0.6 * whole for run in runs)
