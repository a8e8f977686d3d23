"""Hot-expert replication (raymoe.platform.moe.replication): the placement planner on hand-computed cases, and
an expert-parallel MoE layer (EP=2, gloo, spawned) whose outputs are the same with hot experts copied to the
other shard, with the copied expert's rows split between its copies."""

from __future__ import annotations

import pytest
import torch

import gloo_world  # noqa: E402  (tests/gloo_world.py)
from raymoe.platform.moe.replication import (EMPTY, copies_of, home_placement, plan_placement, replan_placement,
                                              shard_loads)

X = EMPTY


def test_home_placement_and_shard_loads():
    assert home_placement(4, 2, 1) == [0, 1, X, 2, 3, X]
    assert home_placement(4, 2, 0) == [0, 1, 2, 3]
    assert shard_loads([0, 1, X, 2, 3, 0], [10, 2, 1, 1], 2) == [7.0, 7.0]  # expert 0 split in two halves
    assert copies_of([0, 1, X, 2, 3, 0], 4) == [2, 1, 1, 1]


def test_plan_copies_the_hot_expert_to_the_idle_shard():
    # shard 0 holds 10 + 2, shard 1 holds 1 + 1: one copy of expert 0 on shard 1 gives 5 + 2 | 5 + 1 + 1
    assert plan_placement([10, 2, 1, 1], 2, 1) == [0, 1, X, 2, 3, 0]


def test_plan_leaves_a_balanced_load_alone():
    # any copy would make its new shard the busiest (2 -> 2.5): the slots stay empty
    assert plan_placement([1, 1, 1, 1], 2, 1) == [0, 1, X, 2, 3, X]
    assert plan_placement([0, 0, 0, 0], 2, 2) == [0, 1, X, X, 2, 3, X, X]


def test_plan_spreads_a_hot_expert_over_several_shards():
    # EP=4, one expert per shard, loads 8 4 2 2: expert 0 goes to shard 2 (max 8 -> 6), then to shard 3
    # (8/3 per copy: max 6 -> 4.67); a fourth copy (on shard 1: 4 + 2 = 6) or a copy of expert 2 (shard 3 stays
    # at 4.67) would not lower the busiest shard: the last slots stay empty
    placement = plan_placement([8, 4, 2, 2], 4, 1)
    assert placement == [0, X, 1, X, 2, 0, 3, 0]
    assert max(shard_loads(placement, [8, 4, 2, 2], 4)) == pytest.approx(2 + 8 / 3)


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="ep_size=3"):
        plan_placement([1, 1, 1, 1], 3, 1)
    with pytest.raises(ValueError, match="redundant_experts"):
        plan_placement([1, 1, 1, 1], 2, -1)


def _layer_job(rank: int, world: int, job: dict) -> dict:
    """An EP MoE layer (E=4, k=2, dropless, eval): outputs before and after copying experts 0 and 3."""
    from raymoe.platform.moe import MoE
    from raymoe.platform.moe.comm import AllToAllDispatcher
    from raymoe.platform.moe.replication import ReplicatedExperts

    E, D, F = 4, 16, 24
    torch.manual_seed(0)
    w1, w2 = torch.randn(E, D, F), torch.randn(E, F, D)  # the same global weights on every rank
    disp = AllToAllDispatcher(torch.distributed.group.WORLD, world, rank, E)
    moe = MoE(D, expert=F, num_experts=E, ep_size=world, k=2, dispatcher=disp)
    with torch.no_grad():
        moe.experts.w1.copy_(w1[rank * 2:rank * 2 + 2])
        moe.experts.w2.copy_(w2[rank * 2:rank * 2 + 2])
        moe.gate.wg.weight.copy_(torch.randn(E, D))
    moe.eval()
    moe.set_dropless(True)
    torch.manual_seed(10 + rank)
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        plain = moe(x)[0]
        moe.replicas = ReplicatedExperts(moe, job["redundant"])
        home = moe(x)[0]  # replicas installed, no copies yet
        moe.replicas.set_placement(job["placement"])
        copied = moe(x)[0]
    return {"plain": plain, "home": home, "copied": copied, "load": moe.replicas.load_P.clone(),
            "slots": moe.replicas.experts.w1.clone()}


@pytest.mark.slow
def test_replicated_layer_equals_plain_layer_ep2():
    # rank 0 owns experts 0 1 (+1 slot), rank 1 owns 2 3 (+1 slot): copy 3 onto rank 0 and 0 onto rank 1
    placement = [0, 1, 3, 2, 3, 0]
    out = gloo_world.spawn(2, _layer_job, [{"redundant": 1, "placement": placement}], timeout=90)
    torch.manual_seed(0)
    w1 = torch.randn(4, 16, 24)
    for r in range(2):
        res = out[r][0]
        torch.testing.assert_close(res["home"], res["plain"], rtol=0, atol=0)
        torch.testing.assert_close(res["copied"], res["plain"], rtol=1e-5, atol=1e-5)
    # the copies hold their owners' weights bit for bit
    assert torch.equal(out[0][0]["slots"][2], w1[3]) and torch.equal(out[1][0]["slots"][2], w1[0])
    # rows of experts 0 and 3 went to both their copies (home slot and the other rank's redundant slot)
    load = out[0][0]["load"] + out[1][0]["load"]
    assert all(load[p] > 0 for p in (0, 2, 4, 5))


def test_replan_keeps_the_placement_unless_the_new_one_gains_enough():
    current = [0, 1, X, 2, 3, 0]
    # the load moved a little (expert 0: 10 -> 9): the fresh plan is the same copy; no change either way
    assert replan_placement(current, [9, 2, 1, 1], 2, 1) == current
    # expert 2 became the hot one: copying it instead lowers the busiest shard from 2 + 10 to 1 + 5 + 1
    assert replan_placement(current, [1, 1, 10, 2], 2, 1) == [0, 1, 2, 2, 3, X]
    # copies of experts 0 and 2 lower the busiest shard from 8 to 6.5 (19%): enough for the default 5%, not
    # for 50%
    assert replan_placement(None, [6, 2, 3, 1], 2, 1) == [0, 1, 2, 2, 3, 0]
    assert replan_placement(None, [6, 2, 3, 1], 2, 1, min_gain=0.5) == [0, 1, X, 2, 3, X]
