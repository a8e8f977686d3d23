"""Training from a Hugging Face folder (model.init_from): the folder sets the architecture and the first weights;
the result exports back to a folder transformers loads with raymoe's logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raymoe.cli import main  # noqa: E402
from raymoe.config import ConfigError, load_config  # noqa: E402
from raymoe.platform.model_io import gpt_config_from, load_model  # noqa: E402

TRAIN = ["model.block_size=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=0",
         "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1", "train.progress=false",
         "train.threads=2", "sample.max_new_tokens=4", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Qwen2-MoE (gated shared expert, a dense layer, GQA, qkv bias) saved by transformers."""
    cfg = transformers.Qwen2MoeConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                      mlp_only_layers=[0], max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("qwen2moe")
    model.save_pretrained(path)
    return path


def _argv(tmp_path, folder, *extra):
    argv = ["train"]
    for s in TRAIN + [f"model.init_from={folder}", f"run.output_dir={tmp_path}", "run.name=ft",
                      f"data.cache_dir={tmp_path / 'cache'}", *extra]:
        argv += ["--set", s]
    return argv


def test_init_from_sets_the_architecture(folder):
    cfg = load_config(None, [f"model.init_from={folder}", "model.block_size=32", "model.dropout=0.1",
                             "moe.aux_loss_coef=0.02"])
    g = gpt_config_from(cfg)
    assert (g.vocab_size, g.n_layer, g.n_kv_head, g.moe.router, g.moe_layers) == (300, 2, 2, "softmax_topk", [1])
    assert g.block_size == 64 and g.dropout == 0.1 and g.aux_loss_coef == 0.02


def test_init_from_rejects_architecture_fields_it_would_ignore(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"remove \['model.n_layer', 'moe.num_experts'\]"):
        load_config(None, [f"model.init_from={folder}", "model.n_layer=3", "moe.num_experts=6", "model.bias=true"])
    cfg = load_config(None, [f"model.init_from={folder}", "model.block_size=128"])
    with pytest.raises(ValueError, match="model.block_size=128 exceeds the context of model.init_from"):
        gpt_config_from(cfg)
    with pytest.raises(ValueError, match="config.json"):
        gpt_config_from(load_config(None, [f"model.init_from={tmp_path}"]))


def test_fine_tune_from_hf_folder_then_export_matches_transformers(folder, tmp_path, capsys):
    # a vanishing learning rate: the checkpoint must hold the folder's weights (they were loaded, not re-drawn)
    assert main(_argv(tmp_path, folder, "train.steps=2", "train.lr=1e-30", "train.min_lr=0")) == 0
    ckpt_dir = tmp_path / "ft" / "checkpoints"
    ours = load_model(ckpt_dir)
    ref = load_model(folder)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    recs = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]

    # real steps, then export: transformers loads the result and computes raymoe's logits
    assert main(_argv(tmp_path, folder, "train.steps=4", "train.lr=1e-2", "run.name=ft2")) == 0
    # raymoe eval of the fine-tuned RoPE model uses the training context (model.block_size), not the model's
    # whole position range, and finds the validation loss training logged
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(tmp_path / "ft2" / "checkpoints")]
    for s in TRAIN + [f"data.cache_dir={tmp_path / 'cache'}"]:
        argv += ["--set", s]
    assert main(argv) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = [json.loads(line) for line in (tmp_path / "ft2" / "metrics.jsonl").read_text().splitlines()][-1]
    assert evaluated["val_loss"] == pytest.approx(logged["val_loss"], abs=1e-4)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tmp_path / "ft2" / "checkpoints"), "--out", str(out)]) == 0
    trained = load_model(tmp_path / "ft2" / "checkpoints").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trained(idx).logits, hf(idx).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(trained(idx).logits, ref.eval()(idx).logits, atol=1e-3)  # it did train
