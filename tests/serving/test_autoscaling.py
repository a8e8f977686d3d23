"""Autoscaling, exercised: load makes Serve add a replica (a whole expert-parallel group with ep_size > 1), idleness
makes it remove one, and no request fails on the way up or down. The settings are the README's."""

from __future__ import annotations

import threading
import time

import pytest

requests = pytest.importorskip("requests")
serve = pytest.importorskip("ray.serve")

from raymoe.deployments.app import build_app  # noqa: E402
from serving_helpers import wait_until  # noqa: E402

FAKE = "raymoe.deployments.fake_engine:FakeEngine"
# what the README gives for `raymoe serve --max-replicas`-style autoscaling, with short delays for a test
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2.0, "look_back_period_s": 1.0}
T = 30  # seconds: bound on every HTTP call


def running(app: str) -> int:
    status = serve.status().applications[app].deployments["OpenAIServer"]
    return status.replica_states.get("RUNNING", 0)


class Load:
    """``clients`` threads posting completions back to back until stopped; every status code is kept."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.url, self.max_tokens, self.codes, self.stop = url, max_tokens, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        while not self.stop.is_set():
            r = requests.post(f"{self.url}/v1/completions", json={
                "model": "fake", "prompt": "scale", "max_tokens": self.max_tokens}, timeout=T)
            self.codes.append(r.status_code)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(T)


def _scale_up_and_down(serve_url: str, name: str, clients: int, max_tokens: int, timeout_s: float, after_down=None,
                       **args):
    args.setdefault("ray_actor_options", {"num_cpus": 0})
    serve.run(build_app(dict(args, autoscaling_config=AUTOSCALING, model_id="fake")), name=name,
              route_prefix=f"/{name}")
    url = f"{serve_url}/{name}"
    try:
        assert running(name) == 1
        with Load(url, clients, max_tokens) as load:
            wait_until(lambda: running(name) == 2, timeout_s=timeout_s)
            time.sleep(1.0)  # both replicas take requests
        # idle: back to min_replicas; a trickle of requests meanwhile must all succeed
        trickle = []
        wait_until(lambda: trickle.append(requests.post(f"{url}/v1/completions", json={
            "model": "fake", "prompt": "idle", "max_tokens": 2}, timeout=T).status_code) or running(name) == 1,
            timeout_s=timeout_s, interval_s=0.5)
        assert load.codes and set(load.codes) == {200}, {c: load.codes.count(c) for c in set(load.codes)}
        assert trickle and set(trickle) == {200}
        if after_down is not None:
            after_down()
    finally:
        serve.delete(name)


def test_whole_model_replicas_scale_up_under_load_and_back_when_idle(serve_url):
    _scale_up_and_down(serve_url, "autoscale", clients=8, max_tokens=40, timeout_s=60, engine_cls=FAKE,
                       engine={"token_delay_s": 0.02, "block_size": 64, "max_batch_size": 4})


@pytest.mark.slow
def test_expert_parallel_groups_scale_as_units(serve_url, checkpoints):
    """ep_size 2: each replica is a placement group of its own bundle + two shard bundles, reserved when Serve
    adds the replica and removed with it."""
    from ray.util import placement_group_table

    def groups() -> int:  # the app's expert-parallel groups: placement groups of 1 + ep_size bundles
        return sum(1 for pg in placement_group_table().values()
                   if pg["state"] == "CREATED" and len(pg["bundles"]) == 3)

    before = groups()
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(groups() - before)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _scale_up_and_down(serve_url, "autoscale_ep", clients=6, max_tokens=24, timeout_s=180,
                           checkpoint=str(checkpoints["a"]), ep_size=2, ep_shard_cpus=0.5,
                           engine={"max_batch_size": 2},
                           after_down=lambda: wait_until(lambda: groups() - before == 1, timeout_s=30))
        assert max(seen) == 2  # two groups at the peak, one after scaling down
    finally:
        stop.set()
        watcher.join(T)
    wait_until(lambda: groups() == before, timeout_s=60)  # deleting the app removed the last group
