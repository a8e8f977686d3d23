"""The modern routers (softmax_topk, sigmoid_group) and the shared expert: hand-computed values, and the whole
MoE block against transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 blocks (test oracle only)."""

import math

import pytest
import torch

from raymoe.platform.moe import MoE, sigmoid_group_topk, softmax_topk
from raymoe.platform.moe.routers import switch_aux_loss

from test_moe_layer import LAYOUTS, _assert_same, _run


def _logit(p):
    p = torch.tensor(p)
    return (p / (1 - p)).log()


def test_softmax_topk_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
    idx, w, probs = softmax_topk(logits, 2, norm_topk_prob=False)
    assert idx.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.3], [0.6, 0.3]]))
    _, w, _ = softmax_topk(logits, 2, norm_topk_prob=True, routed_scaling_factor=2.0)
    torch.testing.assert_close(w, 2 * torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9]]))
    # l_aux = E * sum_e(count_e / S * mean p_e): counts [1, 2, 1], mean p [.3, .45, .25] -> 3 * 0.725
    assert switch_aux_loss(probs, torch.tensor([1, 2, 1])).item() == pytest.approx(2.175)
    idx_b, w_b, _ = softmax_topk(logits, 2, norm_topk_prob=False, bias_E=torch.tensor([0.0, 0.0, 0.35]))
    assert idx_b.tolist() == [[2, 0], [2, 1]]  # the bias steers the choice, the weights stay the probs
    torch.testing.assert_close(w_b, torch.tensor([[0.2, 0.5], [0.3, 0.6]]))


def test_sigmoid_group_hand_computed():
    logits = _logit([[0.9, 0.2, 0.6, 0.7]])
    bias = torch.tensor([0.0, 0.0, 0.25, 0.0])  # biased scores [.9, .2, .85, .7]
    idx, w, scores = sigmoid_group_topk(logits, 2, bias_E=bias, n_group=1, topk_group=1, norm_topk_prob=False)
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.6]]))  # unbiased scores
    # 2 groups: {e0, e1} scores 0.9 + 0.2 = 1.1, {e2, e3} 0.85 + 0.7 = 1.55 -> only the second group
    idx, w, _ = sigmoid_group_topk(logits, 2, bias_E=bias, n_group=2, topk_group=1, norm_topk_prob=True,
                                   routed_scaling_factor=2.0)
    assert idx.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[2 * 0.6 / 1.3, 2 * 0.7 / 1.3]]))
    # l_aux with the normalised scores: p = s / sum(s) = [.9, .2, .6, .7] / 2.4, counts [0, 0, 1, 1], S = 1
    m = MoE(4, 6, num_experts=4, k=2, router="sigmoid_group", n_group=2, topk_group=1)
    with torch.no_grad():
        m.gate.wg.weight.copy_(torch.diag(logits[0]))
        m.gate.expert_bias.copy_(bias)
    _, l_aux, counts = m(torch.ones(1, 4))
    assert counts.tolist() == [0, 0, 1, 1]
    assert l_aux.item() == pytest.approx(4 * (0.6 + 0.7) / 2.4, abs=1e-6)


def test_modern_routers_are_dropless_by_default_and_take_drop_tokens():
    assert not MoE(8, num_experts=4, router="softmax_topk").drop_tokens
    assert not MoE(8, num_experts=4, router="sigmoid_group").drop_tokens
    assert MoE(8, num_experts=4).drop_tokens  # DeepSpeed's default
    assert MoE(8, num_experts=4, router="softmax_topk", drop_tokens=True).drop_tokens
    m = MoE(8, num_experts=4, k=2, router="softmax_topk")
    assert m.draw_noise(5) == type(m.draw_noise(5))()  # no noise at all


def test_modern_router_validation():
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        MoE(8, num_experts=8, k=2, router="sigmoid_group", n_group=3)
    with pytest.raises(ValueError, match="k=3 must be <= topk_group"):
        MoE(8, num_experts=8, k=3, router="sigmoid_group", n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="topk_group=3 must be <= moe.n_group=2"):
        MoE(8, num_experts=8, k=2, router="sigmoid_group", n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="use_residual and moe.shared_expert_ffn"):
        MoE(8, num_experts=4, use_residual=True, shared_expert_ffn=16)


def test_expert_bias_is_saved_with_sigmoid_group_and_moved_only_with_expert_bias():
    m = MoE(8, 6, num_experts=4, k=2, router="sigmoid_group")
    assert "gate.expert_bias" in m.state_dict()  # DeepSeek-V3's e_score_correction_bias
    assert "gate.expert_bias" not in MoE(8, 6, num_experts=4, k=2).state_dict()
    m(torch.randn(16, 8))
    m.update_expert_bias()
    assert m.gate.expert_bias.abs().max() == 0  # not updated without expert_bias
    m2 = MoE(8, 6, num_experts=4, k=2, router="sigmoid_group", expert_bias=True, expert_bias_update_rate=0.1)
    with torch.no_grad():
        m2.gate.wg.weight[0] += 3.0
    m2(torch.rand(16, 8))
    m2.update_expert_bias()
    assert m2.gate.expert_bias[0] < 0


SHARED = {
    "softmax_norm": dict(router="softmax_topk", norm_topk_prob=True),
    "softmax_shared_gate_drop": dict(router="softmax_topk", shared_expert_ffn=10, shared_expert_gate=True,
                                     drop_tokens=True, routed_scaling_factor=1.5),
    "softmax_bias_drop": dict(router="softmax_topk", expert_bias=True, drop_tokens=True),
    "sigmoid_group_shared": dict(router="sigmoid_group", n_group=2, topk_group=1, norm_topk_prob=True,
                                 routed_scaling_factor=2.5, shared_expert_ffn=12),
    "sigmoid_group_drop": dict(router="sigmoid_group", n_group=2, topk_group=2, drop_tokens=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", SHARED)
def test_fast_equals_reference_modern_routers(case, layout):
    torch.manual_seed(len(case))
    m = MoE(8, 12, num_experts=4, k=2, activation="swiglu", capacity_factor=0.7, min_capacity=1,
            z_loss_coef=0.1, capacity_layout_min_fill=LAYOUTS[layout], **SHARED[case])
    with torch.no_grad():
        m.gate.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(3, 7, 8)
    for mask in (None, torch.rand(3, 7) > 0.3):
        noise = m.draw_noise(21)
        a, b = _run(m, x, mask, noise, "fast"), _run(m, x, mask, noise, "ref")
        _assert_same(a, b)
        assert a["kept"].all() != m.drop_tokens


# -- transformers as the oracle ------------------------------------------------------------------------
def _hf_block(family, **over):
    """(transformers block, raymoe MoE with the same weights) for a tiny random config."""
    torch.manual_seed(0)
    D, F, E, K = 8, 6, 8, 2
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
        block, kw = MixtralSparseMoeBlock(cfg), dict(router="softmax_topk", norm_topk_prob=True)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
        cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                             shared_expert_intermediate_size=10, **over)
        block = Qwen2MoeSparseMoeBlock(cfg)
        kw = dict(router="softmax_topk", norm_topk_prob=cfg.norm_topk_prob, shared_expert_ffn=10,
                  shared_expert_gate=True)
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, **over)
        block, kw = Qwen3MoeSparseMoeBlock(cfg), dict(router="softmax_topk", norm_topk_prob=cfg.norm_topk_prob)
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock
        cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K, **over)
        block, kw = OlmoeSparseMoeBlock(cfg), dict(router="softmax_topk", norm_topk_prob=cfg.norm_topk_prob)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE
        cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
                               n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, **over)
        block = DeepseekV3MoE(cfg)
        kw = dict(router="sigmoid_group", n_group=4, topk_group=2, norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=2.5, shared_expert_ffn=2 * F)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
        for b in block.buffers():  # DeepSeek-V3's score-correction bias
            b.normal_(0.0, 0.1)
    m = MoE(D, F, num_experts=E, k=K, activation="swiglu", **kw).eval()
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    with torch.no_grad():
        m.gate.wg.weight.copy_(block.gate.weight)
        m.experts.w1.copy_(block.experts.gate_up_proj.transpose(1, 2))
        m.experts.w2.copy_(block.experts.down_proj.transpose(1, 2))
        if shared is not None:
            m.mlp.c_fc.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            m.mlp.c_proj.weight.copy_(shared.down_proj.weight)
        if hasattr(block, "shared_expert_gate"):
            m.shared_gate.weight.copy_(block.shared_expert_gate.weight)
        if hasattr(block.gate, "e_score_correction_bias"):
            m.gate.expert_bias.copy_(block.gate.e_score_correction_bias)
    return block.eval(), m


FAMILIES = [("mixtral", {}), ("qwen2_moe", {"norm_topk_prob": False}), ("qwen2_moe", {"norm_topk_prob": True}),
            ("qwen3_moe", {"norm_topk_prob": True}), ("olmoe", {"norm_topk_prob": False}),
            ("deepseek_v3", {"norm_topk_prob": True}), ("deepseek_v3", {"norm_topk_prob": False})]


@pytest.mark.parametrize("family,over", FAMILIES)
def test_moe_block_equals_transformers(family, over):
    block, m = _hf_block(family, **over)
    x = torch.randn(2, 9, 8)
    xh, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = block(xh)
    got, l_aux, counts = m(xr)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.sum() == 2 * 18 and m.last_stats.kept_mask.all()
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(xr.grad, xh.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.experts.w1.grad, block.experts.gate_up_proj.grad.transpose(1, 2),
                               atol=1e-5, rtol=1e-5)
    logits, scores, idx = block.gate(x.reshape(-1, 8))
    if family != "deepseek_v3":  # one layer of transformers' load_balancing_loss_func
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        hf_aux = load_balancing_loss_func((logits,), 8, 2)
        torch.testing.assert_close(l_aux, hf_aux, atol=1e-6, rtol=1e-5)
    else:  # transformers' DeepSeek-V3 has no aux loss: the Switch form on the normalised scores
        s = logits.sigmoid()
        p = s / s.sum(-1, keepdim=True)
        want_aux = 8 * (torch.bincount(idx.reshape(-1), minlength=8) / 18 * p.mean(0)).sum()
        torch.testing.assert_close(l_aux, want_aux, atol=1e-6, rtol=1e-5)


def test_mixtral_softmax_over_topk_logits_is_norm_topk_prob():
    # Mixtral's original form: softmax over the k selected logits == renormalised top-k probs
    logits = torch.randn(16, 8)
    top = logits.topk(2, dim=-1)
    _, w, _ = softmax_topk(logits, 2, norm_topk_prob=True)
    torch.testing.assert_close(w, top.values.softmax(-1))
    assert math.isclose(float(w.sum(-1).mean()), 1.0, rel_tol=1e-6)


def test_shared_expert_gate_scales_the_shared_mlp():
    torch.manual_seed(0)
    m = MoE(8, 6, num_experts=4, k=2, router="softmax_topk", shared_expert_ffn=10, shared_expert_gate=True)
    assert {n for n, _ in m.named_parameters() if not n.startswith(("experts.", "gate."))} == {
        "mlp.c_fc.weight", "mlp.c_proj.weight", "shared_gate.weight"}
    assert m.mlp.c_fc.weight.shape == (20, 8) and m.mlp.kind == "swiglu"
    x = torch.randn(5, 8)
    y = m(x)[0]
    shared = m.mlp(x)
    m.shared_expert_ffn = 0
    routed = m(x)[0]
    torch.testing.assert_close(y, routed + torch.sigmoid(m.shared_gate(x)) * shared)
