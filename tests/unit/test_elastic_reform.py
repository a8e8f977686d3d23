"""Elastic.configure when shards die while a new world forms, with a fake shard group: the survivors re-form
from the same published pieces, unless pieces were lost with them (a node that held some died, or a shard's
fetch found an object lost): then from the latest checkpoint, as nothing else holds that state any more."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from raymoe.actors import elastic as E


class _Group:
    """Forms a world; the first ``fail`` forms raise ``error`` after the shards in ``dies`` died."""

    def __init__(self, error: BaseException, dies: set, fail: int = 1):
        self.error, self.dies, self.fail, self.dead, self.forms, self.world = error, dies, fail, set(), [], 0

    def form(self, shards, experts_per_layer, state_ref, step, ckpt_path):
        self.forms.append({"shards": list(shards), "state_ref": state_ref, "step": step, "ckpt": ckpt_path})
        if len(self.forms) <= self.fail:
            self.dead |= self.dies
            raise self.error
        self.world = len(shards)
        return {"world": len(shards)}

    def settle(self, timeout_s):
        pass

    def alive(self, shards):
        return [s for s in shards if s not in self.dead]

    def kill(self, shards):
        self.dead |= set(shards)


class _Metrics:
    def __init__(self):
        self.counts = {}

    def set(self, metric, value, **labels):
        pass

    def inc(self, metric, value=1, **labels):
        self.counts[metric.name] = self.counts.get(metric.name, 0) + value


def _elastic(group, events, holders=("node-b",)):
    cluster = SimpleNamespace(elastic=True, start_timeout_s=1, min_workers=1, max_workers=None, num_workers=3,
                              ranks_per_node=None)
    e = E.Elastic(SimpleNamespace(cluster=cluster), group, {1: 4}, "/ckpts", _Metrics(), events.append)
    e._holder_nodes = set(holders)
    return e


@pytest.fixture
def checkpoint_at_4(monkeypatch):
    monkeypatch.setattr(E.ckpt, "latest_checkpoint", lambda d: f"{d}/step_00000004")
    monkeypatch.setattr(E.ckpt, "read_manifest", lambda path: {"step": 4})


def test_pieces_lost_with_their_node_send_the_world_back_to_the_checkpoint(monkeypatch, checkpoint_at_4):
    # recovery at step 6 published the survivors' pieces; shard "c" and its node (holding pieces) die meanwhile
    monkeypatch.setattr(E, "_nodes_gone", lambda ids: "node-b" in ids)
    group, events = _Group(ray.exceptions.RayActorError(), {"c"}), []
    e = _elastic(group, events)
    info = e.configure(["a", "b", "c"], "published", 6, None, during="recovery")
    retry = group.forms[1]
    assert retry == {"shards": ["a", "b"], "state_ref": None, "step": 4, "ckpt": "/ckpts/step_00000004"}
    assert info["step"] == 4 and info["fallback"] == "checkpoint" and info["world"] == 2
    (event,) = events
    assert event["event"] == "reform" and event["pieces_lost"] and event["resume_step"] == 4
    assert event["lost_steps"] == 2 and e.metrics.counts["raymoe_lost_steps_total"] == 2


def test_pieces_still_there_are_fetched_again_by_the_survivors(monkeypatch, checkpoint_at_4):
    monkeypatch.setattr(E, "_nodes_gone", lambda ids: False)
    group, events = _Group(ray.exceptions.RayActorError(), {"c"}), []
    info = _elastic(group, events).configure(["a", "b", "c"], "published", 6, None, during="grow")
    assert group.forms[1] == {"shards": ["a", "b"], "state_ref": "published", "step": 6, "ckpt": None}
    assert info["step"] == 6 and info["fallback"] is None and "pieces_lost" not in events[0]


def test_a_fetch_that_found_a_piece_lost_falls_back_even_if_nobody_died(monkeypatch, checkpoint_at_4):
    # the node is not reported dead yet, but a shard's fetch already failed on a lost object
    monkeypatch.setattr(E, "_nodes_gone", lambda ids: False)
    lost = ray.exceptions.RayTaskError("start", "traceback", ray.exceptions.ObjectLostError("ab" * 14, "owner", ""))
    group, events = _Group(lost, set()), []
    info = _elastic(group, events).configure(["a", "b"], "published", 6, None, during="recovery")
    assert group.forms[1]["state_ref"] is None and info["step"] == 4 and info["fallback"] == "checkpoint"


def test_a_failure_with_nobody_lost_and_the_pieces_there_is_raised(monkeypatch):
    monkeypatch.setattr(E, "_nodes_gone", lambda ids: False)
    group = _Group(ray.exceptions.RayActorError(), set())
    with pytest.raises(ray.exceptions.RayActorError):
        _elastic(group, []).configure(["a", "b"], "published", 6, None)
