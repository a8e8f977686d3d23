"""raymoe.platform.init: a model built on the meta device and materialised has the constructor's buffers and
parameter kinds, GPT-2's distributions, tied weights, and weights that depend on (seed, name, global expert id)
only, for every family the decoder supports (the native tiny configs and the Hugging Face cases of
tests/unit/test_hf_models.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raymoe.config import load_config
from raymoe.platform import init
from raymoe.platform.model import GPT, GPTConfig

BASE = dict(vocab_size=61, block_size=16, n_head=2, d_model=32, d_ff=64, expert_ffn=48, n_layer=3, min_capacity=1)
NATIVE = {
    "gpt_moe": dict(BASE, expert_interval=2, num_experts=4, k=1),
    "pyramid_residual": dict(BASE, n_layer=4, expert_interval=2, num_experts=[4, 8], k=2, use_residual=True),
    "expert_bias": dict(BASE, expert_interval=1, num_experts=8, k=2, drop_tokens=False, expert_bias=True),
    "qkv_bias_qk_norm_full": dict(BASE, expert_interval=1, num_experts=4, position="rope", norm="rmsnorm",
                                  qkv_bias=True, qk_norm="full", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "deepseek_mla_yarn": dict(BASE, moe_layers=[1, 2], num_experts=8, norm="rmsnorm", bias=False, position="rope",
                              attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8, mlp="swiglu", k=2, router="sigmoid_group", n_group=4,
                              topk_group=2, shared_expert_ffn=16, drop_tokens=False,
                              rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                            "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _hf_cases() -> list[str]:
    try:
        from test_hf_models import CASES
    except Exception:  # transformers missing: the native configs still run
        return []
    return sorted(CASES)


FAMILIES = [f"native:{n}" for n in NATIVE] + [f"hf:{n}" for n in _hf_cases()]


def _config(family: str) -> GPTConfig:
    kind, name = family.split(":")
    if kind == "native":
        return GPTConfig.from_dict(NATIVE[name])
    from test_hf_models import hf_dict

    from raymoe.platform.hf.config import gpt_config_from_hf

    return gpt_config_from_hf(hf_dict(name))


def _run_cfg(seed: int = 3):
    return load_config(None, [f"run.seed={seed}"])


def _built(config: GPTConfig, seed: int = 3, **kw) -> GPT:
    model = init.meta_model(config, **kw)
    init.materialize(model, "cpu", _run_cfg(seed))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_materialised_model_matches_the_constructor_in_kind_and_distribution(family):
    config = _config(family)
    torch.manual_seed(0)
    ref, model = GPT(config), _built(config)
    assert [(k, v.shape, v.dtype) for k, v in model.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in ref.state_dict().items()]
    assert all(p.device.type == "cpu" for p in model.parameters())
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(buf, want), name  # recomputed after to_empty (RoPE, expert bias, load counters)
    assert (model.lm_head.weight is model.wte.weight) == config.tie_embeddings
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if torch.equal(q, torch.zeros_like(q)) or torch.equal(q, torch.ones_like(q)):  # biases, norms
            assert torch.equal(p, q), name
        elif q.numel() >= 256:  # normal(0, 0.02) or 0.02 / sqrt(2 n_layer): the same std as the constructor's
            assert 0.8 < float(p.std() / q.std()) < 1.25, name
            assert abs(float(p.mean())) < 4 * float(q.std()) / q.numel() ** 0.5, name


def test_weights_depend_on_seed_name_and_global_expert_only():
    config = GPTConfig.from_dict(NATIVE["pyramid_residual"])
    whole = _built(config)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), _built(config).state_dict().values()))
    other = _built(config, seed=4)
    assert not torch.equal(other.wte.weight, whole.wte.weight)
    # a rank of EP 2 holding the second half of each layer's experts (the dispatcher is never called here)
    half = _built(config, moe_kwargs=lambda layer, n: {"ep_size": 2, "dispatcher": object(),
                                                        "global_expert_ids": list(range(n // 2, n))})
    want, got = whole.state_dict(), half.state_dict()
    for name, v in got.items():
        if name.endswith(("experts.w1", "experts.w2")):
            assert torch.equal(v, want[name][v.shape[0]:]), name
        else:
            assert torch.equal(v, want[name]), name
    # distinct draws for distinct tensors and experts
    assert not torch.equal(whole.blocks[1].mlp.experts.w1[0], whole.blocks[1].mlp.experts.w1[1])
    assert not torch.equal(whole.blocks[0].attn.c_attn.weight, whole.blocks[2].attn.c_attn.weight)


def test_unknown_buffers_and_parameters_are_errors_not_garbage():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(2))

    model = init.meta_model(GPTConfig.from_dict(NATIVE["gpt_moe"]))
    model.blocks[0].extra = Counter()
    with pytest.raises(TypeError, match=r"blocks.0.extra \(Counter\) has buffers \['n'\] but no reset_buffers"):
        init.materialize(model, "cpu", _run_cfg())
    model = init.meta_model(GPTConfig.from_dict(NATIVE["gpt_moe"]))
    model.blocks[0].scale = nn.Parameter(torch.empty(3))
    with pytest.raises(TypeError, match=r"no initialisation rule for parameter blocks.0.scale of Block"):
        init.materialize(model, "cpu", _run_cfg())
