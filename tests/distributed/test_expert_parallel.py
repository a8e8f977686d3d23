"""Expert parallelism is a layout choice, not a numerics choice: EP=1 == EP=2 == EP=4, flat == hierarchical.

Each spawned world (gloo, 127.0.0.1, bounded waits) runs all its cases in one process group: world 1 runs in
this process with gradient accumulation over the same micro-batches the ranks of the larger worlds read.
"""

from __future__ import annotations

import pytest
import torch

import ep_harness as H

TOL = 1e-5


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return H.token_file(tmp_path_factory)


_train = H.train_job


@pytest.fixture(scope="module")
def runs(data_path):
    d = data_path
    local = [_train(f"w1/{c}", c, d) for c in H.CONFIGS]
    world2 = [_train(f"w2ep{ep}/{c}", c, d, ep=ep) for c in ("k1_drop", "k2_dropless") for ep in (1, 2)]
    # "auto" (the default) is the source-order route on CPU; "a" runs re-sort after the all_to_all
    world2 += [_train(f"w2ep2/{c}", c, d, ep=2) for c in ("mixtral", "deepseek")]
    world2 += [_train("w2ep2ac/k1_drop", "k1_drop", d, ep=2, ac="full"),
               _train("w2ep2ac/deepseek", "deepseek", d, ep=2, ac="moe")]
    world2 += [_train("w2ep2p/k2_dropless", "k2_dropless", d, ep=2, exchange="p2p"),
               _train("w2ep2a/k2_dropless", "k2_dropless", d, ep=2, exchange="all_to_all"),
               ("w2/uneven", dict(kind="uneven_tokens")),
               ("w2/zero", dict(kind="zero_tokens")), ("w2p/zero", dict(kind="zero_tokens", exchange="p2p")),
               ("w2a/zero", dict(kind="zero_tokens", exchange="all_to_all"))]
    world4 = [_train(f"w4ep{ep}/{c}", c, d, ep=ep) for c in ("k1_drop", "k2_dropless") for ep in (2, 4)]
    world4 += [_train(f"w4ep4h/{c}", c, d, ep=4, hierarchical=True, ranks_per_node=2)
               for c in ("k1_drop", "k2_dropless")]
    world4 += [_train("w4ep4p/k2_dropless", "k2_dropless", d, ep=4, exchange="p2p"),
               _train("w4ep4a/k2_dropless", "k2_dropless", d, ep=4, exchange="all_to_all")]
    world4 += [_train("w4pr/pyramid", "pyramid", d, ep={1: 2, 3: 4}),
               _train("w4prh/pyramid", "pyramid", d, ep={1: 2, 3: 4}, hierarchical=True, ranks_per_node=2),
               ("w4/zero", dict(kind="zero_tokens", ranks_per_node=2)),
               ("w4h/uneven", dict(kind="uneven_tokens", ranks_per_node=2))]
    out = dict(zip([n for n, _ in local], H.run_local([j for _, j in local])))
    for world, jobs in ((2, world2), (4, world4)):
        per_rank = H.spawn(world, [j for _, j in jobs])
        for i, (name, _) in enumerate(jobs):
            out[name] = [r[i] for r in per_rank] if name.endswith(("zero", "uneven")) else per_rank[0][i]
    return out


def _max_diff(a: dict, b: dict) -> tuple[float, float, str]:
    loss = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    assert a["state"].keys() == b["state"].keys()
    worst = max(a["state"], key=lambda k: float((a["state"][k].double() - b["state"][k].double()).abs().max()))
    return loss, float((a["state"][worst].double() - b["state"][worst].double()).abs().max()), worst


@pytest.mark.parametrize("config", ["k1_drop", "k2_dropless"])
def test_ep_sizes_and_world_sizes_agree(runs, config):
    ref = runs[f"w1/{config}"]
    moved = max(float((ref["state"][k] - ref["init"][k]).abs().max()) for k in ref["state"])
    assert moved > 100 * TOL, "the weights must actually train"
    for name in ("w2ep1", "w2ep2", "w4ep2", "w4ep4"):
        got = runs[f"{name}/{config}"]
        loss, weight, key = _max_diff(ref, got)
        assert loss < TOL, (name, ref["losses"], got["losses"])
        assert weight < TOL, (name, key, weight)
        assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOL), name
        assert len(got["state"]) == len(ref["state"])


@pytest.mark.parametrize("config", ["mixtral", "deepseek"])
def test_modern_families_train_the_same_at_ep2(runs, config):
    # the modern routers, SwiGLU experts, shared experts, MLA and RoPE scaling under expert parallelism
    ref, got = runs[f"w1/{config}"], runs[f"w2ep2/{config}"]
    moved = max(float((ref["state"][k] - ref["init"][k]).abs().max()) for k in ref["state"])
    assert moved > 100 * TOL, "the weights must actually train"
    loss, weight, key = _max_diff(ref, got)
    assert loss < TOL and weight < TOL, (key, loss, weight)


def test_capacity_dropping_really_drops(runs):
    # RTS + capacity factor 1.0 must drop something, else the k=1 case would not test dropping at all
    assert max(max(step) for step in runs["w1/k1_drop"]["dropped_fraction"]) > 0
    assert all(max(step) == 0 for step in runs["w1/k2_dropless"]["dropped_fraction"])


@pytest.mark.parametrize("flat,other", [
    ("w4ep4/k1_drop", "w4ep4h/k1_drop"), ("w4ep4a/k2_dropless", "w4ep4h/k2_dropless"),
    ("w4ep4a/k2_dropless", "w4ep4p/k2_dropless"), ("w2ep2a/k2_dropless", "w2ep2p/k2_dropless"),
])
def test_other_routes_equal_flat_all_to_all_bitwise(runs, flat, other):
    # hierarchical (2 simulated nodes x 2 ranks) and point-to-point segments move the same rows to the same
    # places as the flat all_to_all_single + re-sort: the results are identical, not just close
    a, b = runs[flat], runs[other]
    assert a["routes"] == ["all_to_all"] and b["routes"] == (["hierarchical"] if "h/" in other else ["p2p"])
    assert a["losses"] == b["losses"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


@pytest.mark.parametrize("world", [2, 4])
def test_source_order_route_equals_resorted(runs, world):
    # the default CPU route skips the re-sort: the experts run (source rank, expert) segments instead, so the
    # weight gradients sum in another order - equal to rounding, and to EP=1 (test_ep_sizes_and_world_sizes_agree)
    a, b = runs[f"w{world}ep{world}a/k2_dropless"], runs[f"w{world}ep{world}/k2_dropless"]
    assert b["routes"] == ["source_order"]
    loss, weight, key = _max_diff(a, b)
    assert loss < TOL and weight < TOL, (key, loss, weight)


@pytest.mark.parametrize("name,route", [("w2/uneven", "all_to_all"), ("w4h/uneven", "hierarchical")])
def test_capacity_layout_with_uneven_token_counts(runs, name, route):
    # drop mode exchanges fixed [E, C, D] slot buffers: ranks with different token counts (one with none)
    # must agree on the buffer size, and each rank still gets exactly what EP=1 computes on its own tokens
    per_rank = runs[name]
    assert sorted(r["T"] for r in per_rank)[:2] == [0, 3 if len(per_rank) == 4 else 7]
    for r in per_rank:
        assert r["route"] == route
        assert r["capacity"] == r["ref_capacity"]  # drops follow each rank's own token count
        assert r["y"] < TOL and r["x_grad"] < TOL and r["w1_grad"] < TOL, r
    assert any(r["dropped"] > 0 for r in per_rank), "capacity factor 1.0 must drop something here"


def test_per_layer_ep_pyramid_equals_world1(runs):
    ref = runs["w1/pyramid"]
    for name in ("w4pr/pyramid", "w4prh/pyramid"):
        loss, weight, key = _max_diff(ref, runs[name])
        assert loss < TOL and weight < TOL, (name, key, loss, weight)
    assert runs["w4pr/pyramid"]["state"]["blocks.3.mlp.experts.w1"].shape[0] == 8


def test_all_to_all_time_is_recorded(runs):
    assert runs["w2ep2/k1_drop"]["comm_seconds"] > 0
    assert runs["w2ep1/k1_drop"]["comm_seconds"] == 0


@pytest.mark.parametrize("name,route", [("w2/zero", "source_order"), ("w2p/zero", "p2p"), ("w2a/zero", "all_to_all"),
                                        ("w4/zero", "hierarchical")])
def test_zero_token_experts_do_not_hang(runs, name, route):
    per_rank = runs[name]
    assert all(r["route"] == route for r in per_rank)
    assert all(r["counts_dim"] == (2 if route == "source_order" else 1) for r in per_rank)
    for rank, r in enumerate(per_rank):
        assert r["rows"] == (8 if rank == 0 else 0)
        assert r["local_counts"] == ([8, 0] if rank == 0 else [0, 0])
        assert r["grad_ok"] and r["y_ok"] and r["finite"]
        # rank 0 routes every token to expert 0; the experts of every other rank get no token
        assert r["expert_grad_zero"] == ([False, True] if rank == 0 else [True, True])
        assert r["y_zero"] == (rank != 0)
        assert r["capacity"] == 12  # dropless: the max count over the EP group (rank 0's 12 tokens)


@pytest.mark.parametrize("name,expected", [("w2/zero", 0), ("w4/zero", 0), ("w2/uneven", 1), ("w4h/uneven", 1)])
def test_layer_collectives_besides_the_exchange(runs, name, expected):
    # dropless learns the group's largest count from dispatch's count exchange (no all-reduce of its own);
    # drop mode without uniform_tokens agrees on the slot count with one all-reduce per forward
    assert [r["all_reduces"] for r in runs[name]] == [expected] * len(runs[name])


@pytest.mark.parametrize("config", ["k1_drop", "deepseek"])
def test_activation_checkpointing_under_expert_parallelism_changes_nothing(runs, config):
    """The recomputed forward runs its all-to-alls again inside the backward: same losses and weights."""
    a, b = runs[f"w2ep2ac/{config}"], runs[f"w2ep2/{config}"]
    assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in b["state"])
