"""FSDP2 sharding is a memory choice, not a numerics choice: replicate == shard, EP=1 == EP=2 == EP=4 sharded,
and checkpoints written sharded load replicated at another EP size and back (spawned gloo worlds).

Each world runs all its cases in one process group; every run is compared with the replicated EP=1 run of its
config in the same world, to the tolerance of tests/distributed/test_expert_parallel.py.
"""

from __future__ import annotations

import pytest

import ep_harness as H

TOL = 1e-5
SHARD = {"dense": "shard", "experts": "shard"}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return H.token_file(tmp_path_factory)


_train = H.train_job


@pytest.fixture(scope="module")
def runs(data_path, tmp_path_factory):
    d = data_path
    # the replicated EP=1 reference of each config, and sharded runs at EP=1 and EP=2
    world2 = [_train(f"ep1/{c}", c, d) for c in ("k1_drop", "k2_dropless")]
    world2 += [_train(f"ep{ep}s/{c}", c, d, ep=ep, sharding=SHARD) for c in ("k1_drop", "k2_dropless") for ep in (1, 2)]
    world2 += [_train("ep2s/mixtral", "mixtral", d, ep=2, sharding=SHARD), _train("ep1/mixtral", "mixtral", d)]
    # DeepSeek-style (MLA, sigmoid group router with expert bias, shared expert) with activation checkpointing:
    # the recomputed MoE sublayer gathers its sharded experts again inside the backward
    world2 += [_train("ep2sac/deepseek", "deepseek", d, ep=2, sharding=SHARD, ac="moe"),
               _train("ep1/deepseek", "deepseek", d)]
    # written at EP=2 sharded, continued at EP=1 replicated, then at EP=2 sharded again
    world2 += [("relayout/k2_dropless", dict(kind="relayout", config="k2_dropless", data=d, train={"steps": 4},
                                             dir=str(tmp_path_factory.mktemp("ckpt2")),
                                             phases=[dict(steps=2, ep=2, sharding=SHARD), dict(steps=1, ep=1),
                                                     dict(steps=1, ep=2, sharding=SHARD)])),
               _train("ep1/k2_dropless/4", "k2_dropless", d, train={"steps": 4})]
    # world 4: EP=2 leaves two replicas of each expert to shard over (EDP=2); EP=4 leaves none
    world4 = [_train("ep1/k1_drop", "k1_drop", d)]
    world4 += [_train(f"ep{ep}s/k1_drop", "k1_drop", d, ep=ep, sharding=SHARD) for ep in (1, 2, 4)]
    world4 += [_train("ep2e/k1_drop", "k1_drop", d, ep=2, sharding={"experts": "shard"}),
               _train("ep2d/k1_drop", "k1_drop", d, ep=2, sharding={"dense": "shard"}),
               _train("ep2/k1_drop", "k1_drop", d, ep=2),
               _train("ep1/pyramid", "pyramid", d),
               _train("prs/pyramid", "pyramid", d, ep={1: 2, 3: 4}, sharding=SHARD)]
    world4 += [("relayout/k1_drop", dict(kind="relayout", config="k1_drop", data=d,
                                         dir=str(tmp_path_factory.mktemp("ckpt4")),
                                         phases=[dict(steps=1, ep=2, sharding=SHARD), dict(steps=1, ep=4),
                                                 dict(steps=1, ep=1, sharding=SHARD)]))]
    # 2 experts at EP=2: one local expert, two ranks to shard it over (sharded along the model dim)
    world4 += [_train(f"ep{ep}{'s' if s else ''}/e2", "k1_drop", d, ep=ep, model={"num_experts": 2},
                      **({"sharding": SHARD} if s else {})) for ep, s in ((1, False), (2, True))]
    world4 += [(f"undo{'s' if s else ''}/k1_drop", dict(kind="undo", config="k1_drop", data=d, ep=2,
                                                          **({"sharding": SHARD} if s else {})))
               for s in (False, True)]
    out = {}
    for world, jobs in ((2, world2), (4, world4)):
        per_rank = H.spawn(world, [j for _, j in jobs], timeout=300)  # every wait inside is bounded too
        out.update({f"w{world}/{name}": [r[i] for r in per_rank] for i, (name, _) in enumerate(jobs)})
    return out


def _assert_same(ref: dict, got: dict, name: str) -> None:
    assert max(abs(a - b) for a, b in zip(ref["losses"], got["losses"])) < TOL, (name, ref["losses"], got["losses"])
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOL), name
    if "eval_loss" in ref and "eval_loss" in got:  # an evaluation forward (no_grad) of the sharded model
        assert abs(ref["eval_loss"] - got["eval_loss"]) < TOL, name
    assert ref["state"].keys() == got["state"].keys()
    for k in ref["state"]:
        diff = float((ref["state"][k].double() - got["state"][k].double()).abs().max())
        assert diff < TOL, (name, k, diff)


@pytest.mark.parametrize("name", ["w2/ep1s/k1_drop", "w2/ep2s/k1_drop", "w2/ep1s/k2_dropless",
                                  "w2/ep2s/k2_dropless", "w2/ep2s/mixtral", "w2/ep2sac/deepseek",
                                  "w4/ep1s/k1_drop", "w4/ep2s/k1_drop",
                                  "w4/ep4s/k1_drop", "w4/ep2e/k1_drop", "w4/ep2d/k1_drop", "w4/prs/pyramid",
                                  "w4/ep2s/e2"])
def test_sharded_equals_replicated(runs, name):
    world, _, config = name.split("/")
    ref = runs[f"{world}/ep1/{config}"][0]
    moved = max(float((ref["state"][k] - ref["init"][k]).abs().max()) for k in ref["state"])
    assert moved > 100 * TOL, "the weights must actually train"
    for rank_result in runs[name]:  # every rank ends with the same full state
        _assert_same(ref, rank_result, name)


@pytest.mark.parametrize("world,ep", [(2, 1), (4, 1), (4, 2)])
def test_sharding_divides_the_state(runs, world, ep):
    # dense sharded over the world, experts over their EDP group (world / ep ranks): bytes per rank
    config = "k1_drop"
    rep = runs[f"w{world}/ep{ep}/{config}" if (world, ep) != (4, 1) else "w4/ep1/k1_drop"]
    shard = runs[f"w{world}/ep{ep}s/{config}"]
    for kind in ("params", "grads", "optim"):
        total_rep = rep[0]["bytes"][kind]
        per_rank = [r["bytes"][kind] for r in shard]
        assert sum(per_rank) <= total_rep * ep * 1.1, (kind, per_rank, total_rep)  # each element held once
        assert max(per_rank) <= total_rep / (world // ep) * 1.1 + 4096, (kind, per_rank, total_rep)


@pytest.mark.parametrize("name,ref", [("w2/relayout/k2_dropless", "w2/ep1/k2_dropless/4"),
                                      ("w4/relayout/k1_drop", "w4/ep1/k1_drop")])
def test_checkpoint_written_sharded_loads_at_another_layout(runs, name, ref):
    # each phase a fresh model at another EP size and sharding, loading weights and AdamW state from the
    # layout-free files the previous phase wrote: the same losses, grad norms and weights as one run
    for rank_result in runs[name]:
        _assert_same(runs[ref][0], rank_result, name)
        assert rank_result["storage_bytes"] <= 1.1 * rank_result["held_bytes"] + 4096, rank_result["held_bytes"]


def test_bad_sharding_mode_names_the_field_and_the_choices():
    from raymoe.config import load_config
    from raymoe.platform.fsdp import apply_sharding
    from raymoe.platform.parallel import ParallelLayout, ProcessGroups

    with pytest.raises(ValueError, match=r"cluster.dense_sharding='full'; allowed: \['replicate', 'shard'\]"):
        apply_sharding(None, ParallelLayout(1, {}), ProcessGroups(1, 0), dense="full")
    with pytest.raises(ValueError, match="cluster.expert_sharding.*'replicate'.*'shard'"):
        load_config(None, ["cluster.expert_sharding=zero3"])


def test_undo_copy_of_a_sharded_model(runs):
    # elastic's per-step undo copy holds this rank's shards: undoing step 3 restores the state after step 2
    # exactly, running it again ends where the replicated run ends, and the copy costs one rank's shard
    rep, shard = runs["w4/undo/k1_drop"], runs["w4/undos/k1_drop"]
    for r in shard:
        assert r["rolled_back_to"] == 1
        for k, v in r["after_two"].items():
            assert r["undone"][k].equal(v), k
        _assert_same(rep[0], r, "undo")
        # the shards of parameters and AdamW state, the (unsharded) buffers, AdamW's scalar step counts
        assert r["undo_bytes"] <= r["param_bytes"] + r["optim_bytes"] + r["buffer_bytes"] + 1024
    assert max(r["undo_bytes"] for r in shard) < 0.6 * rep[0]["undo_bytes"]


def test_one_local_expert_is_split_over_its_replicas(runs):
    # 2 experts at EP=2 in a world of 4: each expert has two replicas but is one row of its w1/w2, so it is
    # sharded along the model dim (Shard(0) would leave one replica all of it and the other nothing)
    held = [r["bytes"]["params"] for r in runs["w4/ep2s/e2"]]
    assert max(held) <= 1.05 * min(held), held
