"""Expert-parallel training on a local Ray instance: Coordinator + ExpertShard actors over gloo."""

import json
import time
import urllib.request

import pytest
import torch

from raymoe.config import load_config
from raymoe.platform.model_io import load_model
from raymoe.platform.trainer import LocalTrainer

TINY = [
    "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
    "moe.num_experts=4", "moe.k=1", "moe.min_capacity=2", "moe.use_rts=false", "moe.capacity_factor=1.0",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2", "train.eval_interval=4",
    "train.eval_batches=2", "train.log_interval=1", "train.progress=false", "train.steps=4",
    "train.threads=1", "sample.max_new_tokens=0", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
    "cluster.collective_timeout_s=60", "cluster.start_timeout_s=120",
]


def _cfg(tmp_path, name, *extra, mode="ray"):
    return load_config(None, TINY + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                     f"data.cache_dir={tmp_path / 'cache'}", f"cluster.mode={mode}", *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ep2_on_ray_matches_single_process(ray_cluster, tmp_path):
    from raymoe.actors.launch import train_on_ray

    summary = train_on_ray(_cfg(tmp_path, "ep2", "cluster.ep_size=2"))
    assert summary["world"] == 2 and set(summary["ep_sizes"].values()) == {2}
    LocalTrainer(_cfg(tmp_path, "local", mode="local")).run()
    dist_recs, local_recs = _records(tmp_path / "ep2"), _records(tmp_path / "local")
    assert [r["step"] for r in dist_recs] == [1, 2, 3, 4]
    for a, b in zip(dist_recs, local_recs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["expert_counts"] == b["expert_counts"]
    assert dist_recs[-1]["val_loss"] == pytest.approx(local_recs[-1]["val_loss"], abs=1e-4)
    # the checkpoint written by 2 shards (each with 2 of the 4 experts) loads into one full model
    a = load_model(tmp_path / "ep2" / "checkpoints").state_dict()
    b = load_model(tmp_path / "local" / "checkpoints").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_metrics_are_exported_to_prometheus(ray_cluster, tmp_path):
    """Two runs on one Ray instance: every training series carries its run's name (run.name), so the two
    runs' steps are counted apart."""
    from prometheus_client.parser import text_string_to_metric_families

    from raymoe.actors.launch import train_on_ray
    from raymoe.platform.metrics import TRAINING_METRICS

    train_on_ray(_cfg(tmp_path, "metrics_a", "train.steps=2", "train.eval_interval=2"))
    train_on_ray(_cfg(tmp_path, "metrics_b", "train.steps=3", "train.eval_interval=3"))
    url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
    wanted = {"ray_raymoe_train_loss", "ray_raymoe_train_tokens_per_second", "ray_raymoe_expert_load_fraction",
              "ray_raymoe_dropped_tokens_fraction", "ray_raymoe_world_size", "ray_raymoe_all_to_all_seconds",
              "ray_raymoe_train_step_seconds", "ray_raymoe_moe_aux_loss"}

    def steps_by_run(found: dict) -> dict:
        family = found.get("ray_raymoe_train_steps") or found.get("ray_raymoe_train_steps_total")
        out: dict = {}
        for s in family.samples if family else []:
            if s.name.endswith("_total"):
                out[s.labels.get("run")] = out.get(s.labels.get("run"), 0) + s.value
        return out

    deadline = time.monotonic() + 60
    found: dict = {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("ray_raymoe")}
        steps = steps_by_run(found)
        if wanted <= set(found) and (steps.get("metrics_a"), steps.get("metrics_b")) == (2, 3):
            break
        time.sleep(1)
    assert wanted <= set(found), sorted(found)
    # the two runs' step counters are apart (2 and 3 steps), each series names its run
    steps = steps_by_run(found)
    assert (steps.get("metrics_a"), steps.get("metrics_b")) == (2, 3), steps
    training = {"ray_" + m.name.removesuffix("_total") for m in TRAINING_METRICS}
    for name, family in found.items():
        if name in training:  # (other tests' runs on this Ray instance may still be exported: any run name)
            assert all(s.labels.get("run") for s in family.samples), name
    # one series per (run, exporting process, layer, expert); each one's layer-1 loads sum to 1 over 4 experts
    by_process: dict = {}
    for s in found["ray_raymoe_expert_load_fraction"].samples:
        if s.labels["layer"] == "1":
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "expert"))
            by_process.setdefault(key, {})[s.labels["expert"]] = s.value
    assert {"metrics_a", "metrics_b"} <= {dict(k)["run"] for k in by_process}
    for loads in by_process.values():
        assert sorted(loads) == ["0", "1", "2", "3"] and sum(loads.values()) == pytest.approx(1.0)
    assert any(s.value == 2 for s in found["ray_raymoe_world_size"].samples)


def test_mixture_of_students_on_ray_matches_local(ray_cluster, tmp_path):
    """Staged KD with cluster.mode=ray: every shard holds the frozen teacher, and the losses equal local mode."""
    from raymoe.actors.launch import train_on_ray

    LocalTrainer(_cfg(tmp_path, "teacher", "train.steps=2", "model.n_layer=4", mode="local")).run()
    kd = [f"distill.teacher_checkpoint={tmp_path / 'teacher' / 'checkpoints'}", "distill.student_layers=3",
          "distill.kd_stop_step=2", "distill.beta=0.5", "model.n_layer=4"]
    train_on_ray(_cfg(tmp_path, "student_ray", *kd, "cluster.ep_size=2"))
    LocalTrainer(_cfg(tmp_path, "student_local", *kd, mode="local")).run()
    ray_recs, local_recs = _records(tmp_path / "student_ray"), _records(tmp_path / "student_local")
    assert [r["kd"] for r in ray_recs] == [True, True, False, False]
    for a, b in zip(ray_recs, local_recs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    assert load_model(tmp_path / "student_ray" / "checkpoints").config.n_layer == 3
