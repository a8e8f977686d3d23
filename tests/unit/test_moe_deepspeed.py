"""The MoE layer against DeepSpeed 0.19.8's gating (issue 14), item by item, on hand-computed small cases.

Each case builds a layer whose gate gives chosen probabilities: D = S tokens, x = the identity (token s is the
one-hot e_s) and wg = log(P)^T, so the logits of token s are log(P[s]) and softmax gives P[s] back.
"""

import warnings

import pytest
import torch

from raymoe.platform.layers import MLP
from raymoe.platform.moe import MoE, layer as layer_mod
from raymoe.platform.moe.reference import reference_forward

from test_moe_layer import LAYOUTS, _assert_same, _run


def _layer(P, **kw):
    P = torch.tensor(P)
    S, E = P.shape
    m = MoE(S, 6, num_experts=E, **kw)
    with torch.no_grad():
        m.gate.wg.weight.copy_(P.log().t())
    return m, torch.eye(S)


def _expert(m, e, x):
    return m.experts.act(x @ m.experts.w1[e]) @ m.experts.w2[e]


@pytest.fixture
def fresh_warnings():
    layer_mod._WARNED.clear()
    yield
    layer_mod._WARNED.clear()


P_TOP3 = [[0.50, 0.30, 0.15, 0.05], [0.26, 0.27, 0.22, 0.25], [0.45, 0.05, 0.20, 0.30], [0.05, 0.25, 0.60, 0.10]]


@pytest.mark.parametrize("train", [True, False])
def test_item1_topk_drop_policy_probs_is_the_default(train):
    # capacity = ceil(4 / 4 * 0.3 * 3) = 1. probs keeps per expert its highest-probability choice; position
    # the earliest token (hand-computed in test_moe_router.test_topk_drop_policies_hand_computed)
    m, x = _layer(P_TOP3, k=3, capacity_factor=0.3, eval_capacity_factor=0.3, min_capacity=0)
    m.train(train)
    assert m.drop_policy == "probs"
    with torch.no_grad():
        y, l_aux, counts = m(x)
    st = m.last_stats
    assert st.capacity == 1 and counts.tolist() == [3, 3, 3, 3]
    assert st.kept_mask.tolist() == [[True, True, False], [False, False, False], [False, True, False],
                                     [True, False, False]]
    assert l_aux.item() == pytest.approx(1.0, abs=1e-6)  # E*E/k * mean(me * 3/4), sum(me) = 1
    with torch.no_grad():
        want = torch.stack([0.625 * _expert(m, 0, x[0]) + 0.375 * _expert(m, 1, x[0]), torch.zeros(4),
                            _expert(m, 3, x[2]), _expert(m, 2, x[3])])
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
    m.drop_policy = "position"
    m(x)
    assert m.last_stats.kept_mask.tolist() == [[True, True, True], [False, False, True], [False, False, False],
                                               [False, False, False]]
    assert MoE(4, 6, num_experts=4, k=3, drop_policy="position").drop_policy == "position"


@pytest.mark.parametrize("k", [2, 3])
def test_item2_rsample_is_ignored_at_k2_and_above_with_one_warning(k, fresh_warnings):
    with pytest.warns(UserWarning, match="RSample.*no effect"):
        m = MoE(8, 12, num_experts=4, k=k, noisy_gate_policy="RSample", drop_tokens=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second layer (or model) does not warn again
        ref = MoE(8, 12, num_experts=4, k=k, noisy_gate_policy="RSample")
        MoE(8, 12, num_experts=4, k=1, noisy_gate_policy="RSample")  # top-1: in effect, no warning
    ref = MoE(8, 12, num_experts=4, k=k, drop_tokens=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(16, 8)
    assert m.draw_noise(16).gumbel1_SE is None
    torch.manual_seed(5)
    y = m(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(y, ref(x)[0], rtol=0, atol=0)  # the same draws (top-2's gumbel2), same result


def test_item3_second_expert_is_sampled_in_eval_and_deterministic_turns_it_off():
    torch.manual_seed(0)
    m = MoE(8, 12, num_experts=4, k=2, drop_tokens=False).eval()
    x = torch.randn(32, 8)
    noise = m.draw_noise(32)
    assert noise.gumbel2_SE is not None  # DeepSpeed's top2gating samples whenever the option is set
    logits = x @ m.gate.wg.weight.t()
    first = logits.argmax(1)
    m(x, noise=noise)
    kept_first = logits.scatter(1, first[:, None], float("-inf"))
    sampled = (logits + noise.gumbel2_SE).scatter(1, first[:, None], float("-inf")).argmax(1)
    counts = torch.bincount(torch.cat([first, sampled]), minlength=4)
    assert torch.equal(m.last_stats.exp_counts, counts)
    assert not torch.equal(sampled, kept_first.argmax(1))  # the draw changed some second choices
    m.set_deterministic(True)  # generation / serving
    assert m.draw_noise(32).gumbel2_SE is None
    m(x)
    assert torch.equal(m.last_stats.exp_counts, torch.bincount(torch.cat([first, kept_first.argmax(1)]),
                                                               minlength=4))
    m.set_dropless(False)
    assert not m.deterministic  # set_dropless is the inference switch: it sets both
    m.set_dropless(True, deterministic=False)
    assert not m.deterministic and not m.drop_tokens
    m.top2_2nd_expert_sampling = False
    assert m.draw_noise(32).gumbel2_SE is None


@pytest.mark.parametrize("train", [True, False])
def test_item4_rts_only_at_top1_in_training_and_eval(train):
    # k=1: RTS (random kept set) in training and in eval
    m, x = _layer([[0.9, 0.1]] * 8, k=1, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=0)
    m.train(train)
    assert m.draw_noise(8).rts_order_KS is not None
    noise = m.draw_noise(8)
    noise.rts_order_KS = torch.tensor([[7, 5, 3, 1, 0, 2, 4, 6]])  # capacity ceil(8 / 2 * 0.5) = 2
    m(x, noise=noise)
    assert m.last_stats.kept_mask[:, 0].nonzero().squeeze(1).tolist() == [5, 7]
    # k=2: top2gating has no RTS: every first choice before any second choice, then position
    m2, x2 = _layer([[0.6, 0.3, 0.1]] * 8, k=2, capacity_factor=0.25, eval_capacity_factor=0.25,
                    min_capacity=0, top2_2nd_expert_sampling=False)
    m2.train(train)
    assert m2.draw_noise(8).rts_order_KS is None and m2.use_rts
    m2(x2)
    assert m2.last_stats.capacity == 2  # ceil(8 / 3 * 0.5) = ceil(1.33)
    kept = m2.last_stats.kept_mask
    assert kept[:2].all() and not kept[2:].any()


def test_item5_used_token_is_deepspeeds_top1_mask():
    P = [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]]
    m, x = _layer(P, k=1, capacity_factor=0.6, min_capacity=0, use_rts=False)
    used = torch.tensor([1, 1, 0, 1])
    with torch.no_grad():
        y, l_aux, counts = m(x, used_token=used)
    # the gate sees all 4 tokens: capacity ceil(4 / 2 * 0.6) = 2 (3 used tokens would give 1); token 2 is not
    # routed; l_aux = E * sum(me * ce), me = mean over all 4 = [.6, .4], ce = counts / 4 = [3/4, 0] -> 0.9
    assert m.last_stats.capacity == 2 and counts.tolist() == [3, 0]
    assert l_aux.item() == pytest.approx(0.9, abs=1e-6)
    assert m.last_stats.kept_mask[:, 0].tolist() == [True, True, False, False]
    with torch.no_grad():
        want = torch.stack([0.7 * _expert(m, 0, x[0]), 0.6 * _expert(m, 0, x[1]), torch.zeros(4), torch.zeros(4)])
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
    # raymoe's token_mask: the masked tokens alone (capacity 1, l_aux over the 3 tokens)
    _, l_mask, _ = m(x, token_mask=used.bool())
    assert m.last_stats.capacity == 1 and l_mask.item() == pytest.approx(2 * 2.2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="not both"):
        m(x, token_mask=used.bool(), used_token=used)


def test_item5_used_token_is_ignored_at_k2_like_deepspeed(fresh_warnings):
    torch.manual_seed(0)
    m = MoE(8, 12, num_experts=4, k=2, top2_2nd_expert_sampling=False)
    x = torch.randn(10, 8)
    y = m(x)[0]
    with pytest.warns(UserWarning, match="used_token has no effect"):
        y_used = m(x, used_token=torch.zeros(10))[0]
    torch.testing.assert_close(y_used, y, rtol=0, atol=0)


def test_item6_capacity_rounds_in_float32():
    m = MoE(4, 6, num_experts=1, k=1, capacity_factor=1.2, min_capacity=0)
    m(torch.randn(25, 4))
    assert m.last_stats.capacity == 31  # DeepSpeed; the float64 formula gave 30


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_item7_residual_mlp_is_a_copy_of_the_expert(activation):
    m = MoE(8, 12, num_experts=2, k=1, use_residual=True, activation=activation)
    assert isinstance(m.mlp, MLP)
    names = {n: tuple(p.shape) for n, p in m.named_parameters() if n.startswith(("mlp.", "coefficient."))}
    G = 24 if activation == "swiglu" else 12
    assert names == {"mlp.c_fc.weight": (G, 8), "mlp.c_proj.weight": (8, 12), "coefficient.weight": (2, 8),
                     "coefficient.bias": (2,)}  # no MLP biases (the experts have none); DeepSpeed's Linear(D, 2)
    with torch.no_grad():  # the expert's weights in the MLP: the same function
        m.mlp.c_fc.weight.copy_(m.experts.w1[1].t())
        m.mlp.c_proj.weight.copy_(m.experts.w2[1].t())
    x = torch.randn(5, 8)
    torch.testing.assert_close(m.mlp(x), _expert(m, 1, x), atol=1e-6, rtol=1e-5)


def test_item8_top1_without_rts_keeps_the_first_tokens():
    # DeepSpeed takes topk over tied ones here (a kernel-dependent set); raymoe keeps the earliest tokens
    m, x = _layer([[0.9, 0.1]] * 8, k=1, capacity_factor=0.5, min_capacity=0, use_rts=False)
    m(x)
    assert m.last_stats.kept_mask[:, 0].tolist() == [True, True] + [False] * 6
    assert "by position" in MoE.__doc__


# -- fast == reference for the options the items added --------------------------------------------------
CASES = {
    "k3_probs_train": dict(k=3, drop_policy="probs", train=True),
    "k3_position_eval": dict(k=3, drop_policy="position", train=False),
    "k3_probs_masked": dict(k=3, drop_policy="probs", train=True, masked=True),
    "k2_eval_sampled": dict(k=2, train=False),
    "k2_eval_deterministic": dict(k=2, train=False, deterministic=True),
    "k1_rts_eval": dict(k=1, train=False),
    "k1_used_rts_train": dict(k=1, train=True, used=True),
    "k1_used_eval_residual": dict(k=1, train=False, used=True, use_residual=True),
    "k1_used_dropless": dict(k=1, train=True, used=True, drop_tokens=False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_fast_equals_reference_deepspeed_options(case, layout):
    c = dict(CASES[case])
    train, masked, used, det = (c.pop(key, False) for key in ("train", "masked", "used", "deterministic"))
    torch.manual_seed(len(case))
    m = MoE(8, 12, num_experts=4, capacity_factor=0.6, eval_capacity_factor=0.7, min_capacity=1, z_loss_coef=0.1,
            capacity_layout_min_fill=LAYOUTS[layout], **c)
    m.train(train)
    m.set_deterministic(det)
    x = torch.randn(3, 7, 8)
    mask = torch.rand(3, 7) > 0.3 if masked else None
    used_token = (torch.rand(3, 7) > 0.3).float() if used else None
    noise = m.draw_noise(int(mask.sum()) if masked else 21)
    a = _run(m, x, mask, noise, "fast", used_token)
    b = _run(m, x, mask, noise, "ref", used_token)
    _assert_same(a, b)
    if m.drop_tokens:
        assert not a["kept"].all()
    if used:
        assert not a["kept"][used_token.reshape(-1) == 0].any()


def test_reference_is_deepspeeds_used_token_form():
    m, x = _layer([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], k=1, capacity_factor=0.6, min_capacity=0,
                  use_rts=False)
    o = reference_forward(m, x, used_token=torch.tensor([1, 1, 0, 1]))
    assert o.capacity == 2 and o.l_aux.item() == pytest.approx(0.9, abs=1e-6)
