"""Elastic training on a multi-node local cluster (ray.cluster_utils.Cluster): lose and gain shards.

Each scenario runs in its own process (tests/cluster/elastic_scenarios.py) so its cluster stays apart from
this session's Ray instance. Every scenario also trains the same config uninterrupted in one process: the
sample sequence is a function of (seed, step), so the per-step losses must agree.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.platform import checkpoint as ckpt
from raymoe.platform.model_io import load_model

SCRIPT = Path(__file__).with_name("elastic_scenarios.py")


def _run(scenario: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), scenario, str(out)], capture_output=True, text=True,
                          timeout=400, cwd=Path(__file__).parents[2])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _same_losses(res: dict, tol: float = 1e-4) -> None:
    ref = res["reference_losses"]
    assert sorted(res["losses"], key=int) == sorted(ref, key=int)  # every step ran (re-runs overwrite)
    for step, loss in res["losses"].items():
        assert loss == pytest.approx(ref[step], abs=tol), step
    assert res["final_loss"] == pytest.approx(res["reference_final_loss"], abs=tol)


@pytest.mark.slow
def test_shard_dies_during_checkpoint_write(tmp_path):
    res = _run("save_fault", tmp_path)
    event, regrow = res["events"]
    assert event["source"] == "replicas" and event["lost_steps"] == 0 and event["lost_shards"] == 1
    assert event["world"] == 1 and event["seconds"] < 15
    # the replacement takes the bundle the dead shard left: back to full size
    assert regrow["event"] == "replace" and regrow["from_world"] == 1 and regrow["world"] == 2 and res["world"] == 2
    _same_losses(res)
    root = tmp_path / "elastic" / "checkpoints"
    # the write interrupted at step 4 never got a manifest; the previous checkpoint still loads
    assert not (root / "step_00000004" / "manifest.json").exists()
    with pytest.raises(ckpt.CheckpointError, match="manifest missing"):
        ckpt.read_manifest(root / "step_00000004")
    assert load_model(root / "step_00000002").config.n_layer == 2
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000006", "step_00000008"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["remove_node", "remove_node_family"])
def test_node_removed_experts_restored_from_memory_copies(tmp_path, scenario):
    # remove_node_family: the buddy copies carry what a family adds: SwiGLU expert stacks, the shared expert,
    # the routers' correction bias (a buffer moved by the aux-loss-free updates, not by the optimizer)
    res = _run(scenario, tmp_path)
    [event] = res["events"]
    assert event["source"] == "buddy" and event["lost_shards"] == 1
    assert 0 <= event["lost_steps"] <= 2 and event["seconds"] < 15  # buddy_interval=2
    assert res["world"] == 1
    _same_losses(res)


@pytest.mark.slow
def test_node_removed_without_copies_falls_back_to_the_last_checkpoint(tmp_path):
    res = _run("remove_node_checkpoint", tmp_path)
    [event] = res["events"]
    # removed while held before step 3; the loss shows at step 3 or a little later. The steps since the last
    # checkpoint (every 2 steps) are re-run from it, on the one shard left, and give the same losses
    assert event["source"] == "checkpoint" and event["lost_shards"] == 1 and res["world"] == 1
    assert event["step"] >= 3 and event["resume_step"] % 2 == 0 and 0 <= event["lost_steps"] <= 2
    assert event["resume_step"] + event["lost_steps"] == event["step"]
    _same_losses(res)


@pytest.mark.slow
def test_world_grows_then_a_shard_is_killed_by_pid(tmp_path):
    res = _run("grow_then_kill", tmp_path)
    grow, recovery, regrow = res["events"]
    assert grow["event"] == "grow" and grow["from_world"] == 1 and grow["world"] == 2
    assert res["world_before_kill"] == 2
    assert recovery["event"] == "recovery" and recovery["lost_steps"] == 0 and recovery["source"] == "replicas"
    assert recovery["seconds"] < 15 and recovery["world"] == 1
    # the killed shard's bundle is reused: the world is back to 2 with no new placement group
    assert regrow["event"] == "replace" and regrow["world"] == 2 and res["world"] == 2
    _same_losses(res)


@pytest.mark.slow
def test_killed_shards_are_replaced_in_their_own_bundles(tmp_path):
    """A shard killed by PID three times: each time the world shrinks to 1 and grows back to 2 in the bundle
    the dead shard left, so no placement group is added and none leaks."""
    res = _run("kill_three_times", tmp_path)
    assert res["worlds_after_regrow"] == [2, 2, 2]
    assert [e["event"] for e in res["events"]] == ["recovery", "replace"] * 3
    assert all(e["lost_steps"] == 0 and e["source"] == "replicas" for e in res["events"] if e["event"] == "recovery")
    assert res["placement_groups"] == 1


@pytest.mark.slow
def test_replacement_lost_while_joining_is_named_for_what_happened(tmp_path):
    """A shard dies, then its replacement dies while joining: no "grow" from 1 to 1, but a recovery, a reform of
    the one survivor during the replacement, and the next replacement bringing the world back to 2."""
    res = _run("kill_replacement", tmp_path)
    recovery, reform, replace = res["events"]
    assert recovery["event"] == "recovery" and recovery["world"] == 1 and recovery["lost_shards"] == 1
    assert reform["event"] == "reform" and reform["during"] == "replace"
    assert (reform["joining"], reform["lost_shards"], reform["world"]) == (2, 1, 1)
    assert replace["event"] == "replace" and (replace["from_world"], replace["world"]) == (1, 2)
    assert res["world"] == 2
    _same_losses(res)


@pytest.mark.slow
def test_every_shard_lost_restarts_from_the_last_checkpoint(tmp_path):
    res = _run("all_lost", tmp_path)
    [event] = res["events"]
    assert event["all_lost"] and event["source"] == "checkpoint" and event["lost_shards"] == 2
    assert (event["step"], event["resume_step"], event["lost_steps"]) == (6, 4, 2) and res["world"] == 2
    _same_losses(res)


@pytest.mark.slow
def test_coordinator_process_killed_restarts_from_the_latest_checkpoint(tmp_path):
    """The coordinator's process is killed by PID mid-run (its shards die with it): the driver starts a new
    coordinator, whose new shards resume from the latest checkpoint on a cluster with no spare CPU (so nothing of
    the old world is left holding resources); at most one checkpoint interval is lost, and the run reports it."""
    res = _run("coordinator_killed", tmp_path)
    assert res["coordinators"] == 2 and res["killed_after_step"] >= 10
    [event] = res["events"]
    assert event["event"] == "recovery" and event["coordinator_lost"] and event["source"] == "checkpoint"
    assert event["resume_step"] % 4 == 0 and 0 <= event["lost_steps"] <= 4  # checkpoint.interval=4
    assert event["step"] >= 10 and event["resume_step"] + event["lost_steps"] == event["step"]
    assert event["world"] == 2 and res["world"] == 2 and event["seconds"] < 60
    _same_losses(res)
