"""Hugging Face folders in and out: config mapping, streaming safetensors (sharded, bf16, expert-parallel
shards), export (CLI, native checkpoints, tokenizer files) and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from test_hf_models import CASES, build_hf, hf_dict, hf_logits, our_logits, padded_batch  # noqa: E402

from raymoe import cli  # noqa: E402
from raymoe.platform import checkpoint as ckpt  # noqa: E402
from raymoe.platform import hf, model_io  # noqa: E402
from raymoe.platform.hf.safetensors_io import INDEX, read_header  # noqa: E402
from raymoe.platform.model import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers model, single-file folder, sharded folder) of the Qwen2-MoE case."""
    model = build_hf("qwen2_moe")
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="40KB")
    return model, single, sharded


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ---- config mapping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trip(name):
    cfg = hf.gpt_config_from_hf(hf_dict(name))
    assert hf.family_for(cfg) == hf.ARCHITECTURES[hf_dict(name)["architectures"][0]]
    back = hf.gpt_config_from_hf(hf.hf_config_from_gpt(cfg))
    assert back.to_dict() == cfg.to_dict()


def test_config_schedules_and_options():
    q = hf.gpt_config_from_hf(hf_dict("qwen2_moe"))
    assert q.moe_layer_ids() == [0, 2] and q.qkv_bias and q.moe.shared_expert_ffn == 40 and q.moe.shared_expert_gate
    assert hf.gpt_config_from_hf(hf_dict("qwen2_moe_step2")).moe_layer_ids() == [1]
    d = hf.gpt_config_from_hf(hf_dict("deepseek_v3"))
    assert d.moe_layer_ids() == [1, 2] and d.attention == "mla" and d.moe.router == "sigmoid_group"
    assert (d.moe.n_group, d.moe.topk_group, d.moe.shared_expert_ffn, d.moe.expert_bias) == (2, 1, 16, True)
    m = hf.gpt_config_from_hf(hf_dict("mixtral_tied"))
    assert m.tie_embeddings and m.moe.norm_topk_prob and m.moe.router == "softmax_topk" and not m.moe.drop_tokens
    assert hf.gpt_config_from_hf(hf_dict("qwen3_moe")).head_dim == 16


def test_config_older_key_spellings():
    """transformers 4 files: rope_theta + rope_scaling ('type'), Qwen3's num_experts, no qkv_bias key."""
    d = hf_dict("mixtral")
    d.pop("rope_parameters")
    d.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = hf.gpt_config_from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    q3 = hf_dict("qwen3_moe")
    q3["num_experts"] = q3.pop("num_local_experts", None) or q3.pop("num_experts")
    assert hf.gpt_config_from_hf(q3).num_experts == 8
    q2 = hf_dict("qwen2_moe")
    q2.pop("qkv_bias")
    assert hf.gpt_config_from_hf(q2).qkv_bias
    ds = hf_dict("deepseek_v3", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                              "mscale": 1.0, "mscale_all_dim": 1.0}, rope_theta=1e4)
    ds.pop("rope_parameters")
    assert hf.gpt_config_from_hf(ds).rope_scaling["rope_type"] == "yarn"


BAD_FIELDS = [
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ("olmoe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
]


@pytest.mark.parametrize("name,patch,field", BAD_FIELDS, ids=[f"{n}-{f}" for n, _, f in BAD_FIELDS])
def test_unsupported_config_field_is_one_clear_error(tmp_path, name, patch, field):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict(name, **patch)))
    with pytest.raises(ValueError) as e:
        hf.config_from_folder(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and field in msg and "supported" in msg, msg


def test_unsupported_architecture_never_runs_folder_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "auto_map": {"AutoModelForCausalLM": "modeling_x.Model"}}))
    (tmp_path / "modeling_x.py").write_text("raise SystemExit('folder code was executed')\n")
    assert hf.is_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*never executed.*MixtralForCausalLM"):
        model_io.load_model(tmp_path)


# ---- loading ---------------------------------------------------------------------------------------------

def test_sharded_folder_with_index_loads_like_single_file(qwen):
    _, single, sharded = qwen
    assert (sharded / INDEX).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    a, b = hf.load_hf_model(single), hf.load_hf_model(sharded)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_bf16_weights_are_converted_to_the_model_dtype(tmp_path):
    ref = build_hf("qwen3_moe").to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    assert {i.dtype for i in read_header(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    ours = hf.load_hf_model(tmp_path).eval()
    assert ours.wte.weight.dtype == torch.float32
    assert torch.equal(ours.wte.weight, ref.model.embed_tokens.weight.float())
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx, mask = padded_batch()
    keep = mask.bool()
    assert (our_logits(ours, idx, mask)[keep] - hf_logits(ref32, idx, mask)[keep]).abs().max() < 1e-4
    half = hf.load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert half.wte.weight.dtype == torch.bfloat16 and torch.equal(half.wte.weight, ref.model.embed_tokens.weight)


class _NoExchange:
    """Stands in for the all-to-all dispatcher: these tests only build and load shards."""
    local_expert_ids = None


def _shard(cfg: GPTConfig, rank: int, ep: int = 2) -> GPT:
    def kwargs(layer_id, n):
        per = n // ep
        return {"ep_size": ep, "dispatcher": _NoExchange(), "global_expert_ids": list(range(rank * per,
                                                                                            (rank + 1) * per))}
    return GPT(cfg, moe_kwargs=kwargs)


def test_expert_parallel_shard_reads_only_its_experts(qwen):
    _, single, _ = qwen
    whole = hf.load_hf_model(single)
    full = hf.load_weights(GPT(whole.config), single)["bytes_read"]
    expert_bytes = sum(m.experts.w1.numel() + m.experts.w2.numel() for m in whole.moe_modules()) * 4
    for rank in (0, 1):
        shard = _shard(whole.config, rank)
        read = hf.load_weights(shard, single)["bytes_read"]
        assert read == full - expert_bytes // 2
        for m, w in zip(shard.moe_modules(), whole.moe_modules()):
            ids = m.experts.global_expert_ids
            assert ids == [3 * rank, 3 * rank + 1, 3 * rank + 2]
            assert torch.equal(m.experts.w1, w.experts.w1[ids]) and torch.equal(m.experts.w2, w.experts.w2[ids])
        assert torch.equal(shard.wte.weight, whole.wte.weight)


def test_missing_shard_file(qwen, tmp_path):
    folder = _copy(qwen[2], tmp_path / "m")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim}: shard file missing"):
        hf.load_hf_model(folder)


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_tensor(qwen, tmp_path):
    folder = _copy(qwen[1], tmp_path / "m")
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' has shape \[23, 32\].*\[24, 32\]"):
        hf.load_hf_model(folder)


def test_missing_tensor(qwen, tmp_path):
    folder = _copy(qwen[1], tmp_path / "m")
    key = "model.layers.0.mlp.shared_expert_gate.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"tensors missing from the safetensors files: \\['{key}'\\]"):
        hf.load_hf_model(folder)


def test_tensor_the_config_does_not_describe(qwen, tmp_path):
    folder = _copy(qwen[1], tmp_path / "m")
    key = "model.layers.1.mlp.experts.0.up_proj.weight"  # layer 1 is dense (mlp_only_layers)
    _rewrite(folder / "model.safetensors", lambda t: t.update({key: torch.zeros(24, 32)}))
    with pytest.raises(ValueError, match=f"model.safetensors: tensors that config.json does not account for.*{key}"):
        hf.load_hf_model(folder)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict("olmoe")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        hf.load_hf_model(tmp_path)


def test_model_io_takes_a_folder_wherever_it_takes_a_checkpoint(qwen):
    _, single, _ = qwen
    assert model_io.is_hf_folder(single) and model_io.checkpoint_step(single) is None
    assert model_io.checkpoint_config(single).to_dict() == hf.config_from_folder(single).to_dict()
    model = model_io.load_model(single)
    other = GPT(model.config)
    model_io.load_weights(other, single)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


# ---- export ----------------------------------------------------------------------------------------------

def test_export_refuses_models_without_a_family(tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face equivalent.*DeepSpeed"):
        hf.export_model(GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, num_experts=4)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_an_expert_shard_and_an_occupied_folder(qwen, tmp_path):
    _, single, _ = qwen
    cfg = hf.config_from_folder(single)
    with pytest.raises(ValueError, match="not an expert shard"):
        hf.export_model(_shard(cfg, 1), tmp_path / "shard")
    model = GPT(cfg)
    hf.export_model(model, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a model"):
        hf.export_model(model, tmp_path / "out")
    hf.export_model(model, tmp_path / "out", overwrite=True)


def test_cli_exports_a_native_checkpoint(qwen, tmp_path, capsys):
    """load HF -> native raymoe checkpoint (with tokenizer files) -> `raymoe export` -> transformers."""
    ref, single, _ = qwen
    model = hf.load_hf_model(single).eval()
    step = ckpt.save_checkpoint(tmp_path / "ckpt", 7, model, rng=False, write_manifest=False)
    files = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"eos_token": "<e>"}',
             "chat_template.jinja": "{{ messages }}", "generation_config.json": '{"eos_token_id": 3}'}
    for name, text in files.items():
        (step / name).write_text(text)
    ckpt.finalize_checkpoint(step, extra={"model_config": model.config.to_dict()})
    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                     "--max-shard-size", "30KB"]) == 0
    assert (out / INDEX).is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    for name, text in files.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx, mask = padded_batch()
    keep = mask.bool()
    assert (hf_logits(back.eval(), idx, mask)[keep] - hf_logits(ref, idx, mask)[keep]).abs().max() < 1e-5
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert {i.dtype for i in read_header(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_hf_load_benchmark_quick_runs():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_load.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for case in ("single", "sharded", "bf16->fp32", "ep2-rank0", "whole-file"):
        assert f"\n{case} " in out.stdout
    assert "peak/model" in out.stdout and "read/file" in out.stdout
