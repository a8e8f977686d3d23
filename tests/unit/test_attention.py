"""Attention and RoPE against transformers (the oracle; tiny configs built by its config classes, nothing
downloaded): GQA + RoPE (Mixtral), q/k norm per head (Qwen3-MoE) and over all heads (OLMoE), q/k/v bias
(Qwen2-MoE), DeepSeek-V3 multi-head latent attention with and without a q latent, interleaved RoPE, linear
and YaRN scaling (DeepSeek's mscale_all_dim included). Each on a left-padded batch, and prefill followed by
token-by-token decoding through the KV cache equals the full forward. A whole tiny MLA model generates the
same greedy tokens with and without the KV cache."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as hf_mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe as hf_olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_qwen2  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3  # noqa: E402

from raymoe.platform.attention import MLAttention, make_attention  # noqa: E402
from raymoe.platform.generate import generate  # noqa: E402
from raymoe.platform.kv_cache import KVCache  # noqa: E402
from raymoe.platform.model import GPT, GPTConfig  # noqa: E402
from raymoe.platform.rope import apply_rope, make_rope  # noqa: E402

D, MAX_POS, V = 32, 64, 97
TOL = dict(rtol=1e-5, atol=1e-5)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
# DeepSeek-V3's form (legacy "type" key; mscale == mscale_all_dim: cos/sin unscaled, the softmax scale corrected)
DS_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}
LINEAR = {"rope_type": "linear", "factor": 4.0}


def _params(theta: float, scaling) -> dict:
    return {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}


def _hf_config(cls, **kw):
    cfg = cls(hidden_size=D, num_attention_heads=4, max_position_embeddings=MAX_POS, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def _ours(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=MAX_POS, n_layer=1, n_head=4, d_model=D, expert_interval=0, num_experts=1,
                position="rope", norm="rmsnorm", bias=False)
    base.update(kw)
    return GPTConfig(**base)


# ---- families: (transformers config, raymoe config, transformers attention class, rotary class) ----------

def mixtral(scaling=None, theta=1e6):
    hf = _hf_config(MixtralConfig, num_key_value_heads=2, head_dim=8,
                    rope_parameters=_params(theta, copy.deepcopy(scaling)))
    ours = _ours(n_kv_head=2, rope_theta=theta, rope_scaling=copy.deepcopy(scaling), norm_eps=hf.rms_norm_eps)
    return hf, ours, hf_mixtral.MixtralAttention, hf_mixtral.MixtralRotaryEmbedding


def qwen3(scaling=None, theta=1e6):  # q/k RMSNorm per head; head_dim != d_model / n_head
    hf = _hf_config(Qwen3MoeConfig, num_key_value_heads=2, head_dim=12, rope_parameters=_params(theta, scaling))
    ours = _ours(n_kv_head=2, head_dim=12, qk_norm="head", rope_theta=theta, rope_scaling=copy.deepcopy(scaling),
                 norm_eps=hf.rms_norm_eps)
    return hf, ours, hf_qwen3.Qwen3MoeAttention, hf_qwen3.Qwen3MoeRotaryEmbedding


def olmoe(scaling=None, theta=1e4):  # q/k RMSNorm over all heads
    hf = _hf_config(OlmoeConfig, num_key_value_heads=4, rope_parameters=_params(theta, scaling))
    ours = _ours(qk_norm="full", rope_theta=theta, rope_scaling=copy.deepcopy(scaling), norm_eps=hf.rms_norm_eps)
    return hf, ours, hf_olmoe.OlmoeAttention, hf_olmoe.OlmoeRotaryEmbedding


def qwen2(scaling=None, theta=1e6):  # q/k/v biases, no output bias
    hf = _hf_config(Qwen2MoeConfig, num_key_value_heads=2, rope_parameters=_params(theta, scaling))
    ours = _ours(n_kv_head=2, qkv_bias=True, rope_theta=theta, rope_scaling=copy.deepcopy(scaling),
                 norm_eps=hf.rms_norm_eps)
    return hf, ours, hf_qwen2.Qwen2MoeAttention, hf_qwen2.Qwen2MoeRotaryEmbedding


def deepseek(scaling=None, theta=1e4, q_lora_rank=24, interleave=True):
    dims = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=q_lora_rank)
    hf = _hf_config(DeepseekV3Config, num_key_value_heads=4, rope_interleave=interleave, attention_bias=False,
                    rope_parameters=_params(theta, copy.deepcopy(scaling)), **dims)
    ours = _ours(attention="mla", rope_theta=theta, rope_scaling=copy.deepcopy(scaling), rope_interleave=interleave,
                 norm_eps=hf.rms_norm_eps, **dims)
    return hf, ours, hf_deepseek.DeepseekV3Attention, hf_deepseek.DeepseekV3RotaryEmbedding


def _build(family):
    hf_cfg, cfg, attn_cls, rope_cls = family
    torch.manual_seed(0)
    hf_attn = attn_cls(hf_cfg, 0).eval()
    with torch.no_grad():
        for name, p in hf_attn.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    attn = make_attention(cfg).eval()
    _copy_weights(hf_attn, attn)
    return hf_attn, rope_cls(hf_cfg), attn, make_rope(cfg), cfg


@torch.no_grad()
def _copy_weights(hf, ours) -> None:
    if isinstance(ours, MLAttention):
        names = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b_proj": "q_b_proj",
                 "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b_proj": "kv_b_proj",
                 "c_proj": "o_proj"}
        ours_params = dict(ours.named_parameters())
        hf_params = dict(hf.named_parameters())
        assert len(ours_params) == len(hf_params)
        for name, p in ours_params.items():
            mod, leaf = name.rsplit(".", 1)
            p.copy_(hf_params[f"{names[mod]}.{leaf}"])
        return
    ours.c_attn.weight.copy_(torch.cat([hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight]))
    if ours.c_attn.bias is not None:
        ours.c_attn.bias.copy_(torch.cat([hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias]))
    ours.c_proj.weight.copy_(hf.o_proj.weight)
    assert ours.c_proj.bias is None and getattr(hf.o_proj, "bias", None) is None
    if hasattr(hf, "q_norm"):
        ours.q_norm.weight.copy_(hf.q_norm.weight)
        ours.k_norm.weight.copy_(hf.k_norm.weight)


# ---- running both -----------------------------------------------------------------------------------------

def _batch(B=3, T=10, pads=(0, 3, 6)):
    torch.manual_seed(1)
    x_BTD = torch.randn(B, T, D)
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    for i, p in enumerate(pads):
        mask_BT[i, :p] = False
    return x_BTD, mask_BT


def _positions_and_mask(mask_BT, cache=None):
    B, T = mask_BT.shape
    idx_BT = torch.zeros(B, T, dtype=torch.long)
    start = cache.length if cache is not None else 0
    return (GPT._default_positions(idx_BT, mask_BT, cache),
            GPT._attention_mask(B, T, start, mask_BT, cache, mask_BT.device))


@torch.no_grad()
def _hf_forward(hf_attn, hf_rope, x_BTD, mask_BT):
    pos_BT, mask_B1TL = _positions_and_mask(mask_BT)
    additive = torch.zeros(mask_B1TL.shape).masked_fill(~mask_B1TL, torch.finfo(torch.float32).min)
    return hf_attn(x_BTD, hf_rope(x_BTD, pos_BT), additive)[0]


@torch.no_grad()
def _forward(attn, rope, x_BTD, mask_BT):
    pos_BT, mask_B1TL = _positions_and_mask(mask_BT)
    return attn(x_BTD, mask_B1TL, None, 0, rope(pos_BT, x_BTD.dtype))


@torch.no_grad()
def _forward_cached(attn, rope, cfg, x_BTD, mask_BT, prefill: int):
    """Prefill `prefill` tokens, then one token per call, through a KVCache sized from cfg.kv_dims()."""
    B, T = mask_BT.shape
    heads, k_dim, v_dim = cfg.kv_dims()
    cache = KVCache(1, B, heads, k_dim, T, v_dim=v_dim)
    outs = []
    for s, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]:
        m_BT = mask_BT[:, s:e]
        pos_BT, mask_B1TL = _positions_and_mask(m_BT, cache)
        cache.begin(e - s, m_BT)
        outs.append(attn(x_BTD[:, s:e], mask_B1TL, cache, 0, rope(pos_BT, x_BTD.dtype)))
        cache.end(e - s, m_BT)
    assert cache.k[0].shape == (B, heads, T, k_dim) and cache.v[0].shape == (B, heads, T, v_dim)
    return torch.cat(outs, 1)


CASES = {
    "mixtral_gqa": lambda: mixtral(),
    "mixtral_linear": lambda: mixtral(LINEAR),
    "mixtral_yarn": lambda: mixtral(YARN, theta=100.0),
    "qwen3_qk_norm_head": lambda: qwen3(),
    "qwen3_yarn": lambda: qwen3({**YARN, "mscale": 0.9, "mscale_all_dim": 0.6}, theta=100.0),
    "olmoe_qk_norm_full": lambda: olmoe(),
    "qwen2_qkv_bias": lambda: qwen2(),
    "mla_q_lora": lambda: deepseek(),
    "mla_no_q_lora": lambda: deepseek(q_lora_rank=None),
    "mla_not_interleaved": lambda: deepseek(interleave=False),
    "mla_yarn_deepseek": lambda: deepseek(DS_YARN, theta=100.0),
    "mla_yarn_mscale": lambda: deepseek({**DS_YARN, "mscale": 0.8, "mscale_all_dim": 0.5}, q_lora_rank=None),
    "mla_linear": lambda: deepseek({**LINEAR, "mscale_all_dim": 0.7}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_transformers_on_left_padded_batch(case):
    hf_attn, hf_rope, attn, rope, cfg = _build(CASES[case]())
    x_BTD, mask_BT = _batch()
    if isinstance(attn, MLAttention):
        assert attn.scale == pytest.approx(hf_attn.scaling, rel=1e-6)
    ours = _forward(attn, rope, x_BTD, mask_BT)
    theirs = _hf_forward(hf_attn, hf_rope, x_BTD, mask_BT)
    torch.testing.assert_close(ours[mask_BT], theirs[mask_BT], **TOL)


@pytest.mark.parametrize("case", ["mixtral_gqa", "qwen3_qk_norm_head", "olmoe_qk_norm_full", "qwen2_qkv_bias",
                                  "mla_q_lora", "mla_no_q_lora", "mla_yarn_deepseek"])
def test_prefill_then_decode_through_kv_cache_equals_full_forward(case):
    _, _, attn, rope, cfg = _build(CASES[case]())
    x_BTD, mask_BT = _batch()
    full = _forward(attn, rope, x_BTD, mask_BT)
    cached = _forward_cached(attn, rope, cfg, x_BTD, mask_BT, prefill=7)
    torch.testing.assert_close(cached, full, **TOL)


# ---- RoPE tables ------------------------------------------------------------------------------------------

ROPE_SCALINGS = {
    "default": None,
    "linear": LINEAR,
    "linear_legacy_type": {"type": "linear", "factor": 2.5},
    "yarn": YARN,
    "yarn_no_factor": {**YARN, "factor": None},  # factor = max positions / original
    "yarn_no_original": {"rope_type": "yarn", "factor": 4.0},  # original = max positions
    "yarn_no_truncate": {**YARN, "truncate": False},
    "yarn_betas": {**YARN, "beta_fast": 8, "beta_slow": 2},
    "yarn_mscale_ratio": {**YARN, "mscale": 0.9, "mscale_all_dim": 0.6},
    "yarn_attention_factor": {**YARN, "attention_factor": 0.5},
    "yarn_deepseek": DS_YARN,
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
@pytest.mark.parametrize("family", [mixtral, deepseek])
def test_rope_tables_equal_transformers(family, name):
    hf_cfg, cfg, _, rope_cls = family(copy.deepcopy(ROPE_SCALINGS[name]), theta=100.0)
    hf_rope, rope = rope_cls(hf_cfg), make_rope(cfg)
    assert rope.attention_scaling == pytest.approx(hf_rope.attention_scaling, rel=1e-6)
    torch.testing.assert_close(rope.inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)
    pos_BT = torch.stack([torch.arange(2 * MAX_POS), torch.arange(2 * MAX_POS).flip(0)])  # past the context too
    x = torch.zeros(1)
    for ours, theirs in zip(rope(pos_BT, torch.float32), hf_rope(x, pos_BT)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_interleaved_rope_is_rope_on_adjacent_pairs():
    """Dims (2i, 2i+1) rotate by frequency i; the output is de-interleaved (evens, then odds) for q and k alike."""
    torch.manual_seed(0)
    cfg = _ours(attention="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=4)
    rope = make_rope(cfg)
    pos_BT = torch.tensor([[0, 3, 9]])
    cos_BTR, sin_BTR = rope(pos_BT, torch.float32)
    x_BHTR = torch.randn(1, 2, 3, 6)
    got = apply_rope(x_BHTR, cos_BTR, sin_BTR, interleave=True)
    pairs = torch.view_as_complex(x_BHTR.reshape(1, 2, 3, 3, 2).contiguous())
    angle_BTR2 = pos_BT[..., None].float() * rope.inv_freq
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle_BTR2), angle_BTR2)[:, None])
    torch.testing.assert_close(got, torch.cat([rotated[..., 0], rotated[..., 1]], -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type"),
    ({"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, "low_freq_factor"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_rope_scaling_is_an_error(scaling, match):
    with pytest.raises(ValueError, match=match):
        make_rope(_ours(rope_scaling=scaling))


# ---- the whole model -----------------------------------------------------------------------------------

def _spicy(**kw) -> GPT:
    """Tiny dense model with large random weights, so greedy tokens vary."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, d_model=D, expert_interval=0,
                      num_experts=1, position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                      tie_embeddings=False, **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


MODELS = {
    "mla": dict(attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6, rope_interleave=True, rope_scaling={**DS_YARN, "original_max_position_embeddings": 10}),
    "mla_no_q_lora": dict(attention="mla", kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "gqa_qk_norm": dict(n_kv_head=2, qk_norm="head", rope_scaling=LINEAR),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_model_greedy_tokens_same_with_and_without_kv_cache(kind):
    m = _spicy(**MODELS[kind])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [7]]
    cached = generate(m, prompts, 12, temperature=0.0)
    recomputed = generate(m, prompts, 12, temperature=0.0, use_cache=False)
    assert cached == recomputed
    assert len({t for row in cached for t in row}) > 3  # the weights make the tokens vary
