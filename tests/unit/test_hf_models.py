"""Every supported family against transformers (the reference): tiny random models built with transformers'
config classes (nothing downloaded), saved with save_pretrained, loaded by raymoe.

Per case: logits on a left-padded batch, greedy generation of 32 tokens, export back to a folder transformers
loads with no missing/unexpected keys, and a few raymoe training steps then export (transformers gives
raymoe's logits). The cases cover the family options: norm_topk_prob on and off, shared experts (Qwen2-MoE's
gated one, DeepSeek-V3's n_shared_experts), group-limited routing, first_k_dense_replace, mlp_only_layers,
decoder_sparse_step, tied embeddings, head_dim != hidden/heads, MLA with and without q compression, YaRN.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raymoe.platform import hf  # noqa: E402
from raymoe.platform.generate import generate  # noqa: E402

VOCAB, BLOCK = 160, 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=BLOCK, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_DS = dict(_COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

CASES = {
    "mixtral": ("MixtralConfig", dict(_COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "mixtral_tied": ("MixtralConfig", dict(_COMMON, num_hidden_layers=2, intermediate_size=40, num_local_experts=4,
                                           num_experts_per_tok=1, tie_word_embeddings=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_COMMON, num_hidden_layers=3, intermediate_size=48,
                                         moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                                         num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen2_moe_step2": ("Qwen2MoeConfig", dict(_COMMON, num_hidden_layers=3, intermediate_size=48,
                                               moe_intermediate_size=24, shared_expert_intermediate_size=32,
                                               num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                               decoder_sparse_step=2, qkv_bias=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=48,
                                         moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8,
                                  num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", dict(_DS, num_hidden_layers=3, q_lora_rank=16, n_routed_experts=8,
                                             num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                             n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "deepseek_v3_yarn": ("DeepseekV3Config", dict(_DS, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8,
                                                  num_experts_per_tok=3, n_group=4, topk_group=2,
                                                  first_k_dense_replace=0, n_shared_experts=2, norm_topk_prob=False,
                                                  routed_scaling_factor=1.5, rope_parameters=_YARN)),
}


def hf_dict(name: str, **patch) -> dict:
    """The config.json dict of case ``name`` (as save_pretrained writes it), with ``patch`` applied."""
    cls_name, kwargs = CASES[name]
    d = getattr(transformers, cls_name)(**kwargs).to_dict()
    d["architectures"] = [cls_name.replace("Config", "ForCausalLM")]
    d.update(patch)
    return d


PARAMS = list(CASES)


def build_hf(name: str, seed: int = 0):
    """A tiny random transformers model of case ``name`` in eval mode; every weight is perturbed (norms are
    not all ones, routers and DeepSeek's correction bias are not zeros) so each mapped tensor matters."""
    cls_name, kwargs = CASES[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (transformers model, its save_pretrained folder), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build_hf(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            cache[name] = (model, folder)
        return cache[name]
    return get


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return idx * mask, mask


def hf_logits(model, idx, mask):
    with torch.no_grad():
        return model(input_ids=idx, attention_mask=mask).logits


def our_logits(model, idx, mask):
    with torch.no_grad():
        return model(idx, token_mask_BT=mask.bool()).logits


def assert_close_on_real(a, b, mask, atol=1e-4):
    keep = mask.bool()
    err = (a[keep] - b[keep]).abs().max().item()
    assert err < atol, f"max |logit difference| on real tokens = {err:.3g}"


@pytest.mark.parametrize("name", PARAMS)
def test_logits_match_transformers(saved, name):
    ref, folder = saved(name)
    ours = hf.load_hf_model(folder).eval()
    idx, mask = padded_batch()
    assert_close_on_real(our_logits(ours, idx, mask), hf_logits(ref, idx, mask), mask)


@pytest.mark.slow
@pytest.mark.parametrize("name", PARAMS)
def test_greedy_generation_matches_transformers(saved, name):
    ref, folder = saved(name)
    ours = hf.load_hf_model(folder)
    prompts = [[5, 17, 33, 2, 90, 11, 7], [42, 8, 150]]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(input_ids=idx, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    expected = out[:, width:].tolist()
    assert generate(ours, prompts, max_new_tokens=32, temperature=0.0) == expected


def _reload_with_info(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", PARAMS)
def test_export_loads_in_transformers(saved, name, tmp_path):
    _, folder = saved(name)
    ours = hf.load_hf_model(folder).eval()
    out = hf.export_model(ours, tmp_path / "export")
    back = _reload_with_info(out)
    idx, mask = padded_batch(2)
    assert_close_on_real(hf_logits(back, idx, mask), our_logits(ours, idx, mask), mask)


@pytest.mark.parametrize("name", PARAMS)
def test_trained_then_exported_matches_transformers(saved, name, tmp_path):
    _, folder = saved(name)
    model = hf.load_hf_model(folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        idx = torch.randint(0, VOCAB, (4, 17), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias()
    model.eval()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training changed nothing"
    back = _reload_with_info(hf.export_model(model, tmp_path / "trained"))
    idx, mask = padded_batch(4)
    assert_close_on_real(hf_logits(back, idx, mask), our_logits(model, idx, mask), mask)
