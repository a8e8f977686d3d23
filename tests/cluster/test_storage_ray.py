"""Distributed training with run.output_dir at an S3 URI (moto server, tests/s3_server.py): the shards write their
experts straight to the bucket, the coordinator commits after reading them back. A shard killed in the middle of
writing an expert object leaves that checkpoint uncommitted; training recovers, later checkpoints commit, and a
run resumed from the bucket continues as the distributed run did."""

import json

import pytest
import ray
from elastic_scenarios import TINY

from raymoe.actors.coordinator import remote_coordinator
from raymoe.config import load_config
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import storage
from raymoe.platform.model_io import load_model
from raymoe.platform.trainer import LocalTrainer


@pytest.mark.slow
def test_shard_killed_mid_write_to_s3_is_not_committed(ray_cluster, s3_server, tmp_path, monkeypatch):
    results = str(tmp_path / "results")  # where the coordinator keeps its local copy of the logs
    monkeypatch.setenv("RAYMOE_RESULTS_DIR", results)
    uri = s3_server.uri(s3_server.bucket(), "runs")
    sets = TINY + [f"run.output_dir={uri}", f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.interval=2"]
    cfg = load_config(None, sets + ["cluster.mode=ray", "run.name=s3run", "cluster.num_workers=2",
                                    "cluster.ep_size=1"])
    coord = remote_coordinator().options(runtime_env={"env_vars": {"RAYMOE_RESULTS_DIR": results}}).remote(
        cfg.model_dump(mode="json"))
    try:
        ray.get(coord.start.remote(), timeout=180)
        ray.get(coord.inject_fault.remote(1, "save_expert", 4), timeout=30)  # dies mid-write of an expert
        summary = ray.get(coord.run.remote(), timeout=300)
        ray.get(coord.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coord)
    event = summary["events"][0]
    assert event["event"] == "recovery" and event["step"] == 4 and event["lost_shards"] == 1

    run = storage.RunOutputs(uri, "s3run")
    step4 = run.checkpoints / "step_00000004"
    assert storage.is_file(step4 / ckpt.DENSE) and not storage.is_file(step4 / ckpt.MANIFEST)
    with pytest.raises(ckpt.CheckpointError, match="manifest missing"):
        ckpt.read_manifest(step4)
    assert [p.name for p in ckpt.list_checkpoints(run.checkpoints)] == ["step_00000002", "step_00000006",
                                                                        "step_00000008"]
    for path in ckpt.list_checkpoints(run.checkpoints):
        ckpt.inspect_checkpoint(path, verify=True)  # every committed file is in the bucket as the manifest says
    records = [json.loads(x) for x in storage.read_text(run.location / "metrics.jsonl").splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 9)) and any(r.get("event") == "recovery" for r in records)

    # resume from the bucket's step-6 checkpoint in one process: steps 7 and 8 as the distributed run did them
    step6 = run.checkpoints / "step_00000006"
    resumed = LocalTrainer(load_config(None, sets + ["run.name=resumed", f"checkpoint.resume={step6}"])).run()
    assert resumed["last_loss"] == pytest.approx(losses[8], abs=1e-4)
    assert load_model(str(storage.RunOutputs(uri, "resumed").checkpoints)).config.n_layer == 2
