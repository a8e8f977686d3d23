"""A world that does not divide the micro-batches of a step trains exactly as one process (spawned gloo world).

The global batch is 4 micro-batches (tests/distributed/ep_harness.py: 8 sequences, micro-batches of 2); a world
of 3 runs 2, 1 and 1 of them, the last two ranks each one padding pass (weight 0) so every rank runs the same
forwards and backwards. Per-step losses, grad norms and final weights equal the world-1 run accumulating all
four, with jitter and random token selection (router noise seeded per global micro-batch), dropless routing
with aux-loss-free expert bias, expert parallelism over all 3 ranks (6 experts: the padding passes join the
all-to-alls) and FSDP2 sharding (gradients reduce-scattered as sums).
"""

from __future__ import annotations

import pytest

import ep_harness as H

TOL = 1e-5
SHARD = {"dense": "shard", "experts": "shard"}
E6 = {"num_experts": 6}


@pytest.fixture(scope="module")
def runs(data_path):
    d = data_path
    world1 = [H.train_job("k1_drop", "k1_drop", d), H.train_job("k1_drop/e6", "k1_drop", d, model=E6),
              H.train_job("k2_dropless/e6", "k2_dropless", d, model=E6)]
    world3 = [H.train_job("k1_drop", "k1_drop", d),
              H.train_job("k1_drop/e6", "k1_drop", d, ep=3, model=E6),
              H.train_job("k2_dropless/e6", "k2_dropless", d, ep=3, model=E6),
              H.train_job("k1_drop/sharded", "k1_drop", d, sharding=SHARD),
              H.train_job("k1_drop/e6/sharded", "k1_drop", d, ep=3, model=E6, sharding={"dense": "shard"})]
    out = {f"w1/{name}": r for (name, _), r in zip(world1, H.run_local([j for _, j in world1]))}
    per_rank = H.spawn(3, [j for _, j in world3], timeout=300)  # every wait inside is bounded too
    out.update({f"w3/{name}": [r[i] for r in per_rank] for i, (name, _) in enumerate(world3)})
    return out


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return H.token_file(tmp_path_factory)


@pytest.mark.parametrize("name,ref", [("k1_drop", "k1_drop"), ("k1_drop/e6", "k1_drop/e6"),
                                      ("k2_dropless/e6", "k2_dropless/e6"), ("k1_drop/sharded", "k1_drop"),
                                      ("k1_drop/e6/sharded", "k1_drop/e6")])
def test_world_of_three_equals_world_one(runs, name, ref):
    want = runs[f"w1/{ref}"]
    moved = max(float((want["state"][k] - want["init"][k]).abs().max()) for k in want["state"])
    assert moved > 100 * TOL, "the weights must actually train"
    for got in runs[f"w3/{name}"]:  # every rank ends with the same full state
        assert max(abs(a - b) for a, b in zip(want["losses"], got["losses"])) < TOL, (want["losses"], got["losses"])
        assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=TOL)
        assert want["state"].keys() == got["state"].keys()
        for k in want["state"]:
            diff = float((want["state"][k].double() - got["state"][k].double()).abs().max())
            assert diff < TOL, (k, diff)


def test_capacity_dropping_really_drops_in_the_uneven_world(runs):
    # RTS at capacity factor 1.0 drops tokens: the equality above covers which ones (per source rank and pass)
    assert any(max(step) > 0 for r in runs["w3/k1_drop/e6"] for step in r["dropped_fraction"])
