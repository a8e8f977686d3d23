"""Fine-tuning a Hugging Face folder on Ray: two ExpertShard actors at EP=2 start from the folder's weights
(each reads only its experts) and train as one process does from the same folder; their checkpoint resumes
in one process exactly."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raymoe.config import load_config  # noqa: E402
from raymoe.platform.model_io import load_model  # noqa: E402
from raymoe.platform.trainer import LocalTrainer  # noqa: E402

RUN = ["model.block_size=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=3",
       "train.eval_interval=3", "train.eval_batches=2", "train.log_interval=1", "train.progress=false",
       "train.steps=3", "train.lr=3e-3", "train.threads=1", "sample.max_new_tokens=0", "cluster.num_workers=2",
       "cluster.cpus_per_worker=1", "cluster.collective_timeout_s=60", "cluster.start_timeout_s=120",
       "checkpoint.interval=3"]


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    """A tiny random Mixtral (GQA, RoPE, SwiGLU experts, softmax top-2) saved by transformers; vocab holds the
    byte tokenizer's 257 ids (no tokenizer.json: the run uses bytes)."""
    cfg = transformers.MixtralConfig(vocab_size=260, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return path


def _cfg(tmp_path, folder, name, mode, *extra):
    return load_config(None, RUN + [f"model.init_from={folder}", f"run.output_dir={tmp_path}", f"run.name={name}",
                                    f"data.cache_dir={tmp_path / 'cache'}", f"cluster.mode={mode}",
                                    "cluster.ep_size=2", *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.mark.slow
def test_fine_tune_hf_folder_at_ep2_on_ray_matches_one_process(ray_cluster, tmp_path, mixtral_folder):
    from raymoe.actors.launch import train_on_ray

    summary = train_on_ray(_cfg(tmp_path, mixtral_folder, "ep2", "ray"))
    assert summary["world"] == 2 and set(summary["ep_sizes"].values()) == {2}
    LocalTrainer(_cfg(tmp_path, mixtral_folder, "local", "local")).run()
    ray_recs = [r for r in _records(tmp_path / "ep2") if "loss" in r]
    local_recs = [r for r in _records(tmp_path / "local") if "loss" in r]
    assert [r["step"] for r in ray_recs] == [1, 2, 3]
    # step 1 runs on the folder's weights: the same loss proves both started from them
    for a, b in zip(ray_recs, local_recs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    a = load_model(tmp_path / "ep2" / "checkpoints").state_dict()
    b = load_model(tmp_path / "local" / "checkpoints").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

    # the EP=2 checkpoint is layout-free: one process resumes it (a resumed checkpoint wins over init_from)
    # and ends where an uninterrupted one-process run of 6 steps ends (steps 1-3 are warm-up in both schedules)
    half = tmp_path / "ep2" / "checkpoints" / "step_00000003"
    LocalTrainer(_cfg(tmp_path, mixtral_folder, "resumed", "local", "train.steps=6",
                      f"checkpoint.resume={half}")).run()
    LocalTrainer(_cfg(tmp_path, mixtral_folder, "whole", "local", "train.steps=6")).run()
    a = load_model(tmp_path / "resumed" / "checkpoints").state_dict()
    b = load_model(tmp_path / "whole" / "checkpoints").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
