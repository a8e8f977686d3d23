"""Elastic training with FSDP2 sharding on a multi-node local cluster (tests/cluster/elastic_scenarios.py)."""

import pytest
from test_elastic import _run, _same_losses

from raymoe.platform.model_io import load_model


@pytest.mark.slow
def test_sharded_world_loses_a_node_and_recovers_from_the_copies(tmp_path):
    # dense and expert state sharded over 2 shards (EP=1): the survivor holds half of it, so the state comes
    # from the in-memory copies (every step; a shard that dies between its own copy and its peer's hand-over
    # leaves the previous step's complete), and the losses are those of an uninterrupted run
    res = _run("remove_node_sharded", tmp_path)
    [event] = res["events"]
    assert event["source"] == "buddy" and event["lost_shards"] == 1 and 0 <= event["lost_steps"] <= 2
    assert res["world"] == 1
    _same_losses(res)
    # the checkpoint written by the sharded world (step 2) loads into one unsharded process
    model = load_model(tmp_path / "elastic" / "checkpoints" / "step_00000002")
    assert model.config.n_layer == 2
