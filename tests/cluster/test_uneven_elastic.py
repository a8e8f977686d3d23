"""Elastic training into a world that does not divide the micro-batches of a step (multi-node local cluster,
tests/cluster/elastic_scenarios.py)."""

import json

import pytest
from test_elastic import _run, _same_losses


def _val_losses(metrics) -> dict:
    return {r["step"]: r["val_loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "val_loss" in r}


@pytest.mark.slow
def test_losing_one_of_three_shards_leaves_two_that_split_three_micro_batches(tmp_path):
    # 3 shards, 3 micro-batches a step; a node is removed: 2 shards are kept (not 1, which would divide 3), they
    # run 2 and 1 micro-batches at EP=2 (the auto size at 2 shards) and the losses are those of one process
    res = _run("remove_node_uneven", tmp_path)
    [event] = res["events"]
    assert event["event"] == "recovery" and event["source"] == "replicas" and event["lost_shards"] == 1
    assert event["world"] == 2 and set(event["ep_sizes"].values()) == {2} and res["world"] == 2
    _same_losses(res)
    # the final evaluation splits its 3 micro-batches of windows the same way (a padding forward on one shard)
    got = _val_losses(tmp_path / "elastic" / "metrics.jsonl")
    want = _val_losses(tmp_path / "reference" / "metrics.jsonl")
    assert got.keys() == want.keys() == {24}
    assert got[24] == pytest.approx(want[24], abs=1e-5)
