"""Elastic training with FSDP2 sharding on a multi-node local cluster (tests/cluster/elastic_scenarios.py)."""

import pytest
from test_elastic import _run, _same_losses

from raymoe.platform.model_io import load_model


@pytest.mark.slow
def test_sharded_world_loses_a_shard_without_losing_a_step_and_grows_back(tmp_path):
    # dense and expert state sharded over 3 shards (EP=1): shard 2 dies in the checkpoint write of step 4. No
    # survivor holds its shards, but its buddy (rank 0) holds a copy of them taken after the step's update
    # (buddy_interval: 1), so the survivors' own shards and that copy make the whole state at step 4: no step is
    # lost. Then a replacement joins in the bundle the dead shard left: the sharded world grows 2 -> 3
    res = _run("sharded_save_fault", tmp_path)
    recovery, *rest = res["events"]
    assert recovery["event"] == "recovery" and recovery["lost_shards"] == 1 and recovery["world"] == 2
    assert recovery["source"] == "buddy" and recovery["lost_steps"] == 0
    assert (recovery["step"], recovery["resume_step"]) == (4, 4)
    assert recovery["copies"] == {"step": 4, "live": [0, 1], "buddy": [2]}
    assert [(e["event"], e["from_world"], e["world"]) for e in rest] == [("replace", 2, 3)] and res["world"] == 3
    _same_losses(res)
    # the checkpoint written by the sharded world (step 2) loads into one unsharded process
    model = load_model(tmp_path / "elastic" / "checkpoints" / "step_00000002")
    assert model.config.n_layer == 2
