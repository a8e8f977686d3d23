"""cluster_configs/ray_larger_than_worker.yaml: a model whose training state is over twice one worker's memory
limit (cluster.memory_per_worker_gb) trains on 4 shards with dense and expert sharding, checkpoints and resumes;
replicated, it fails naming the setting. The test shrinks the model (CI time) and sets the limit from the
shrunk model's state so that it is still more than twice the limit."""

from pathlib import Path

import pytest
import torch

from raymoe.actors.shard_state import ShardState
from raymoe.config import load_config
from raymoe.platform.model import GPT
from raymoe.platform.model_io import gpt_config_from, load_model
from raymoe.platform.train_step import build_optimizer

CONFIG = Path(__file__).resolve().parents[2] / "cluster_configs" / "ray_larger_than_worker.yaml"
SMALL = ["model.block_size=32", "model.d_model=64", "model.d_ff=256", "model.n_head=2", "tokenizer.kind=byte",
         "train.steps=4", "checkpoint.interval=2", "train.eval_interval=4", "cluster.collective_timeout_s=60",
         "cluster.start_timeout_s=120", "moe.use_rts=false"]


def _cfg(tmp_path, name, *extra):
    return load_config(CONFIG, SMALL + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                        f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _full_state_bytes(cfg) -> int:
    """The whole model's training state in one process (parameters, gradients, AdamW, the undo copy)."""
    model = GPT(gpt_config_from(cfg))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    return ShardState(model, opt, keep_undo=True).state_bytes()


def _losses(run_dir: Path) -> dict[int, float]:
    import json

    recs = (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
def test_model_over_twice_the_worker_limit_trains_sharded_and_resumes(ray_cluster, tmp_path):
    from raymoe.actors.launch import train_on_ray

    full = _full_state_bytes(_cfg(tmp_path, "probe"))
    limit = [f"cluster.memory_per_worker_gb={full / 2.2 / 2**30!r}"]
    shipped = load_config(CONFIG)
    assert shipped.cluster.dense_sharding == shipped.cluster.expert_sharding == "shard"
    assert _full_state_bytes(shipped) > 2 * shipped.cluster.memory_per_worker_gb * 2**30
    # replicated, a shard holds the whole dense part and half the experts: over the limit, a clear error
    with pytest.raises(ValueError, match=r"exceeds cluster.memory_per_worker_gb=.*cluster.dense_sharding=shard"):
        train_on_ray(_cfg(tmp_path, "replicated", *limit, "cluster.dense_sharding=replicate",
                          "cluster.expert_sharding=replicate"))
    # sharded: trains, checkpoints at step 2; a run resumed from that checkpoint continues exactly
    train_on_ray(_cfg(tmp_path, "sharded", *limit))
    half = tmp_path / "sharded" / "checkpoints" / "step_00000002"
    train_on_ray(_cfg(tmp_path, "resumed", *limit, f"checkpoint.resume={half}"))
    whole, resumed = _losses(tmp_path / "sharded"), _losses(tmp_path / "resumed")
    assert sorted(whole) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6)
    a = load_model(tmp_path / "sharded" / "checkpoints").state_dict()
    b = load_model(tmp_path / "resumed" / "checkpoints").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
