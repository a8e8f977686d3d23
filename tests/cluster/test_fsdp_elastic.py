"""Elastic training with FSDP2 sharding on a multi-node local cluster (tests/cluster/elastic_scenarios.py)."""

import pytest
from test_elastic import _run, _same_losses

from raymoe.platform.model_io import load_model


@pytest.mark.slow
def test_sharded_world_grows_loses_a_shard_without_losing_a_step_and_grows_back(tmp_path):
    # dense and expert state sharded (EP=1): a node joins and the sharded world grows 2 -> 3; then shard 1 dies in
    # the checkpoint write of step 4. No survivor holds its shards, but its buddy (rank 2) holds a copy of them
    # taken after the step's update (buddy_interval: 1), so the survivors' own shards and that copy make the whole
    # state at step 4: no step is lost. A replacement joins in the bundle the dead shard left (2 -> 3 again), and
    # the per-step losses are those of an uninterrupted run through every change
    res = _run("sharded_grow_save_fault", tmp_path)
    grow, recovery, *rest = res["events"]
    assert grow["event"] == "grow" and (grow["from_world"], grow["world"]) == (2, 3)
    assert recovery["event"] == "recovery" and recovery["lost_shards"] == 1 and recovery["world"] == 2
    assert recovery["source"] == "buddy" and recovery["lost_steps"] == 0
    assert (recovery["step"], recovery["resume_step"]) == (4, 4)
    assert recovery["copies"] == {"step": 4, "live": [0, 2], "buddy": [1]}
    assert [(e["event"], e["from_world"], e["world"]) for e in rest] == [("replace", 2, 3)] and res["world"] == 3
    _same_losses(res)
    # the checkpoint written by the sharded world (step 2) loads into one unsharded process
    model = load_model(tmp_path / "elastic" / "checkpoints" / "step_00000002")
    assert model.config.n_layer == 2
