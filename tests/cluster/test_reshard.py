"""Checkpoints are layout-free: written at one expert-parallel size, resumed at another (weights + optimizer).

Router noise is seeded per (step, micro-batch) and the global batch is planned per step, so a run that
changes its world size at a checkpoint must continue exactly like an uninterrupted single-process run.
"""

import pytest
import torch

from raymoe.config import load_config
from raymoe.platform.model_io import load_model
from raymoe.platform.trainer import LocalTrainer

TINY = [
    "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
    "moe.num_experts=4", "moe.k=2", "moe.min_capacity=2", "moe.capacity_factor=1.0", "moe.use_rts=true",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2", "train.eval_interval=100",
    "train.eval_batches=1", "train.log_interval=1", "train.progress=false", "train.steps=4", "train.threads=1",
    "sample.max_new_tokens=0", "cluster.cpus_per_worker=1", "checkpoint.keep_last=5",
    "cluster.collective_timeout_s=60", "cluster.start_timeout_s=120",
]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                     f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _assert_same_weights(a_dir, b_dir):
    a, b = load_model(a_dir).state_dict(), load_model(b_dir).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_resume_at_other_expert_parallel_sizes(ray_cluster, tmp_path):
    from raymoe.actors.launch import train_on_ray

    LocalTrainer(_cfg(tmp_path, "ref", "checkpoint.interval=2")).run()  # uninterrupted, one process, EP=1
    # first half with 2 shards (EP=2: each shard owns 2 of 4 experts per layer), checkpoint at step 2
    train_on_ray(_cfg(tmp_path, "ep2", "cluster.mode=ray", "cluster.num_workers=2", "cluster.ep_size=2",
                      "train.steps=2"))
    half = tmp_path / "ep2" / "checkpoints" / "step_00000002"
    # second half: 4 shards with EP=4 (a=2 -> b=4), and a single process (a=2 -> b=1)
    train_on_ray(_cfg(tmp_path, "ep4", "cluster.mode=ray", "cluster.num_workers=4", "cluster.ep_size=4",
                      f"checkpoint.resume={half}"))
    LocalTrainer(_cfg(tmp_path, "ep1", f"checkpoint.resume={half}")).run()
    # and the single process's own half-way checkpoint continued by 2 shards (a=1 -> b=2)
    ref_half = tmp_path / "ref" / "checkpoints" / "step_00000002"
    train_on_ray(_cfg(tmp_path, "from1", "cluster.mode=ray", "cluster.num_workers=2", "cluster.ep_size=2",
                      f"checkpoint.resume={ref_half}"))
    for name in ("ep4", "ep1", "from1"):
        _assert_same_weights(tmp_path / "ref" / "checkpoints" / "step_00000004", tmp_path / name / "checkpoints")
