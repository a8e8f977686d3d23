"""Gating and dispatch tables on hand-computed values."""

import math

import pytest
import torch

from raymoe.platform.moe import compute_capacity, draw_router_noise, gate_weights, plan_dispatch
from raymoe.platform.moe.router import RouterNoise, load_balancing_loss, select_experts


@pytest.mark.parametrize("S,E,k,cf,min_cap,expected", [
    (10, 4, 1, 1.0, 4, 4),      # ceil(2.5) = 3 < min 4
    (10, 4, 1, 1.0, 0, 3),      # ceil(2.5)
    (10, 4, 2, 1.25, 1, 7),     # ceil(6.25)
    (100, 8, 1, 1.0, 4, 13),    # ceil(12.5)
    (10, 1, 1, 1.1, 0, 11),     # 11.000000000000002 in binary must not become 12
    (64, 64, 8, 1.25, 4, 10),   # ceil(10.0)
    (7, 3, 3, 1.0, 0, 7),       # k*S/E = 7 exactly
    (4096, 32, 4, 1.0, 4, 512),
    (0, 8, 2, 1.0, 4, 4),
    # DeepSpeed's _capacity runs in float32 (issue 14, item 6): f32(1.2) * 25 = 30.0000019 -> 31 (float64: 30)
    (25, 1, 1, 1.2, 0, 31),
    (25, 1, 2, 0.6, 0, 31),     # torch.tensor(0.6 * 2) is f32(1.2) as well
    (10, 1, 1, 1.1, 0, 11),     # f32(1.1) * 10 rounds back to 11.0
])
def test_capacity_hand_computed(S, E, k, cf, min_cap, expected):
    assert compute_capacity(S, E, k, cf, min_cap) == expected


def test_capacity_is_deepspeeds_float32_formula():
    # ceil(f32(S / E) * f32(cf * k)), the product rounded to float32 (DeepSpeed 0.19.8 sharded_moe.py _capacity)
    import numpy as np

    for S in (7, 25, 100, 333, 4096):
        for E in (1, 3, 8):
            for k in (1, 2, 3):
                for cf in (0.7, 1.0, 1.1, 1.2, 1.25, 1.3, 2.0):
                    want = math.ceil(float(np.float32(S / E) * np.float32(cf * k)))
                    assert compute_capacity(S, E, k, cf, 0) == want, (S, E, k, cf)


def _logits_from_probs(rows):
    return torch.tensor(rows, dtype=torch.float32).log()


def test_l_aux_top1_top2_hand_computed():
    probs = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]]
    logits = _logits_from_probs(probs)
    p = logits.softmax(1)
    idx1 = select_experts(logits, p, 1, RouterNoise(), training=False)
    assert idx1[:, 0].tolist() == [0, 1, 2, 0]
    idx2 = select_experts(logits, p, 2, RouterNoise(), training=False, deterministic=True)
    assert idx2[:, 1].tolist() == [1, 2, 1, 2]
    me = [1.3 / 4, 1.2 / 4, 1.5 / 4]
    ce = [0.5, 0.25, 0.25]  # first choices only
    want = 3 * sum(a * b for a, b in zip(me, ce))  # 0.99375
    counts1 = torch.bincount(idx1.flatten(), minlength=3)
    counts2 = torch.bincount(idx2.flatten(), minlength=3)
    assert load_balancing_loss(p, idx1, counts1, 1).item() == pytest.approx(want, abs=1e-6)
    # top-2: mean(me*ce) * E * E with ce from the first choice
    assert load_balancing_loss(p, idx2, counts2, 2).item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.99375)


def test_l_aux_topk_hand_computed():
    probs = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.05, 0.3, 0.4]]
    logits = _logits_from_probs(probs)
    p = logits.softmax(1)
    idx = select_experts(logits, p, 3, RouterNoise(), training=False)
    assert [sorted(r) for r in idx.tolist()] == [[0, 1, 2], [1, 2, 3], [0, 2, 3]]
    assert idx[:, 0].tolist() == [0, 3, 3]  # choice-major: column 0 is the top choice
    counts = torch.bincount(idx.flatten(), minlength=4)
    me = [0.75 / 3, 0.55 / 3, 0.8 / 3, 0.9 / 3]
    ce = [2 / 3, 2 / 3, 1.0, 2 / 3]  # k-hot mask mean
    want = sum(a * b for a, b in zip(me, ce)) / 4 * 4 * 4 / 3
    assert load_balancing_loss(p, idx, counts, 3).item() == pytest.approx(want, abs=1e-6)


def test_top2_second_choice_uses_gumbel_on_logits_and_excludes_first():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(1)
    g2 = torch.tensor([[100.0, 0.0, 0.0, 5.0]])  # would pick expert 0 again if it were not masked
    noise = RouterNoise(gumbel2_SE=g2)
    idx = select_experts(logits, p, 2, noise, training=True, top2_2nd_expert_sampling=True)
    assert idx.tolist() == [[0, 3]]
    # DeepSpeed's top2gating samples whenever top2_2nd_expert_sampling is set: in eval too (issue 14, item 3)
    assert select_experts(logits, p, 2, noise, training=False).tolist() == [[0, 3]]
    idx_eval = select_experts(logits, p, 2, RouterNoise(), training=False, deterministic=True)
    assert idx_eval.tolist() == [[0, 1]]
    assert select_experts(logits, p, 2, noise, training=True, deterministic=True).tolist() == [[0, 3]]
    assert select_experts(logits, p, 2, RouterNoise(), training=True, top2_2nd_expert_sampling=False).tolist() \
        == [[0, 1]]


def test_rsample_top1_and_bias_only_steer_selection():
    logits = torch.tensor([[3.0, 0.0, 0.0]])
    p = logits.softmax(1)
    noise = RouterNoise(gumbel1_SE=torch.tensor([[0.0, 10.0, 0.0]]))
    assert select_experts(logits, p, 1, noise, training=True, noisy_gate_policy="RSample").item() == 1
    assert select_experts(logits, p, 1, noise, training=False, noisy_gate_policy="RSample").item() == 0
    bias = torch.tensor([0.0, 0.0, 1.0])
    assert select_experts(logits, p, 1, RouterNoise(), training=False, bias_E=bias).item() == 2
    with pytest.raises(ValueError, match="gumbel1_SE"):
        select_experts(logits, p, 1, RouterNoise(), training=True, noisy_gate_policy="RSample")


def test_draw_router_noise_fields_follow_options():
    # DeepSpeed 0.19.8: Jitter any k (training); RSample top-1 only (training); the 2nd expert sampled at top-2
    # in training and eval; RTS at top-1 only, in training and eval
    n = draw_router_noise(5, 4, 8, k=2, noisy_gate_policy="Jitter", use_rts=True, training=True)
    assert n.jitter_SD.shape == (5, 8) and n.gumbel1_SE is None and n.gumbel2_SE.shape == (5, 4)
    assert n.rts_order_KS is None  # no RTS at k=2 (top2gating has none)
    assert ((n.jitter_SD >= 0.99) & (n.jitter_SD <= 1.01)).all()
    n = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="RSample", use_rts=True, training=False)
    assert n.jitter_SD is None and n.gumbel1_SE is None and n.rts_order_KS.shape == (1, 5)
    assert (n.rts_order_KS.sort(dim=1).values == torch.arange(5)).all()  # a permutation
    n = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="RSample", training=False, deterministic=True)
    assert n.rts_order_KS is None and n.gumbel1_SE is None
    n = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="RSample", use_rts=True, training=True)
    assert n.gumbel1_SE.shape == (5, 4) and n.rts_order_KS.shape == (1, 5)
    n = draw_router_noise(5, 4, 8, k=3, noisy_gate_policy="RSample", use_rts=True, training=True)
    assert n.gumbel1_SE is None and n.gumbel2_SE is None and n.rts_order_KS is None  # RSample ignored, k >= 2
    n = draw_router_noise(5, 4, 8, k=2, training=False)
    assert n.gumbel2_SE.shape == (5, 4)  # eval samples too
    assert draw_router_noise(5, 4, 8, k=2, training=False, deterministic=True).gumbel2_SE is None
    for router in ("softmax_topk", "sigmoid_group"):  # the modern routers draw nothing
        n = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="Jitter", router=router)
        assert n == RouterNoise()
    g = torch.Generator().manual_seed(3)
    a = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="RSample", generator=g)
    g = torch.Generator().manual_seed(3)
    b = draw_router_noise(5, 4, 8, k=1, noisy_gate_policy="RSample", generator=g)
    assert torch.equal(a.gumbel1_SE, b.gumbel1_SE) and torch.equal(a.rts_order_KS, b.rts_order_KS)
    assert torch.isfinite(a.gumbel1_SE).all()


IDX_SK = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1], [0, 2]])  # S=5, K=2, E=3


def test_plan_dispatch_choice_major_position_order():
    plan = plan_dispatch(IDX_SK, 3, capacity=3)
    assert plan.counts_E.tolist() == [5, 4, 1]
    assert plan.kept_counts_E.tolist() == [3, 3, 1]
    # expert 0: 1st choices of t0,t1,t3 kept, t4 over; 2nd choice of t2 comes after all 1st choices.
    # expert 1: 1st choice of t2, then 2nd choices of t0, t1; t3's is over capacity.
    assert plan.kept_KS.tolist() == [[True, True, True, True, False], [True, True, False, False, True]]
    assert plan.choice_M.tolist() == [0, 1, 3, 2, 5, 6, 9]
    assert plan.token_M.tolist() == [0, 1, 3, 2, 0, 1, 4]


def test_plan_dispatch_rts_priority_and_dropless():
    order = torch.tensor([[4, 0, 1, 2, 3], [4, 3, 2, 1, 0]])  # priority order per choice rank
    plan = plan_dispatch(IDX_SK, 3, capacity=3, order_KS=order)
    # expert 0 first choices in priority order: t4, t0, t1 kept; t3 (last) dropped.
    assert plan.kept_KS[0].tolist() == [True, True, True, False, True]
    # expert 1 (t2's 1st choice first), then second choices in priority order: t3, t1; t0 dropped.
    assert plan.kept_KS[1].tolist() == [False, True, False, True, True]
    assert plan.choice_M.tolist()[:3] == [4, 0, 1]
    dl = plan_dispatch(IDX_SK, 3, capacity=None)
    assert dl.kept_KS.all() and dl.kept_counts_E.tolist() == [5, 4, 1] and dl.choice_M.numel() == 10


def test_gate_weights_k1_raw_and_k2_renormalized():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    g1 = gate_weights(probs, torch.tensor([[0], [1]]), torch.tensor([[True, False]]))
    assert g1.tolist() == [[0.5, 0.0]]
    g2 = gate_weights(probs, torch.tensor([[0, 1], [1, 2]]), torch.tensor([[True, True], [True, False]]))
    assert g2[:, 0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    assert g2[:, 1].tolist() == pytest.approx([1.0, 0.0])  # 2nd token: only its 1st choice kept
    g0 = gate_weights(probs, torch.tensor([[0, 1], [1, 2]]), torch.zeros(2, 2, dtype=torch.bool))
    assert g0.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # all dropped: 0 / clamp(0, eps), not NaN
    assert not math.isnan(g0.sum().item())


# Top-3 case of issue 14, item 1 (capacity 1): gate probabilities and each token's top-3 (by probability)
P_TOP3 = [[0.50, 0.30, 0.15, 0.05],   # t0: e0, e1, e2
          [0.26, 0.27, 0.22, 0.25],   # t1: e1, e0, e3
          [0.45, 0.05, 0.20, 0.30],   # t2: e0, e3, e2
          [0.05, 0.25, 0.60, 0.10]]   # t3: e2, e1, e3


def test_topk_drop_policies_hand_computed():
    p = torch.tensor(P_TOP3)
    idx = select_experts(p.log(), p, 3, RouterNoise(), training=False)
    assert idx.tolist() == [[0, 1, 2], [1, 0, 3], [0, 3, 2], [2, 1, 3]]
    # probs (DeepSpeed's default): each expert keeps its highest-probability choice:
    # e0 {t0 .50, t1 .26, t2 .45} -> t0; e1 {t0 .30, t1 .27, t3 .25} -> t0; e2 {t0 .15, t2 .20, t3 .60} -> t3;
    # e3 {t1 .25, t2 .30, t3 .10} -> t2
    probs = plan_dispatch(idx, 4, 1, score_SK=p.gather(1, idx))
    assert probs.kept_KS.t().tolist() == [[True, True, False], [False, False, False], [False, True, False],
                                          [True, False, False]]
    # position: the earliest token of each expert: e0 t0, e1 t0, e2 t0, e3 t1
    pos = plan_dispatch(idx, 4, 1, token_major=True)
    assert pos.kept_KS.t().tolist() == [[True, True, True], [False, False, True], [False, False, False],
                                        [False, False, False]]
    # raymoe's old order (choice rank, then position) keeps yet another set: e0 t0, e1 t1, e2 t3, e3 t2
    old = plan_dispatch(idx, 4, 1)
    assert old.kept_KS.t().tolist() == [[True, False, False], [True, False, False], [False, True, False],
                                        [True, False, False]]
    for plan in (probs, pos, old):
        assert plan.counts_E.tolist() == [3, 3, 3, 3] and plan.kept_counts_E.tolist() == [1, 1, 1, 1]
        assert sorted(plan.choice_M.tolist()) == sorted((plan.kept_KS.reshape(-1)).nonzero().squeeze(1).tolist())
        assert torch.equal(plan.token_M, plan.choice_M % 4)
    # gate weights renormalised over the kept choices (topkgating's gates_masked / denom)
    g = gate_weights(p, idx, probs.kept_KS)
    assert g.t().tolist()[0] == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0])
    assert g.t().tolist()[1] == [0.0, 0.0, 0.0] and g.t().tolist()[2] == pytest.approx([0.0, 1.0, 0.0])
    me = [1.26 / 4, 0.87 / 4, 1.17 / 4, 0.70 / 4]  # l_aux = E*E/k * mean(me * 3/4) = 16/3 * 0.75/4 = 1.0
    assert load_balancing_loss(p, idx, probs.counts_E, 3).item() == pytest.approx(
        sum(m * 0.75 for m in me) / 4 * 16 / 3)


def test_probs_priority_ties_break_by_position_and_scores_order_by_value():
    idx = torch.tensor([[0], [0], [0], [0]])
    score = torch.tensor([[0.3], [0.5], [0.5], [1e-30]])
    plan = plan_dispatch(idx, 1, 2, score_SK=score)
    assert plan.kept_KS[0].tolist() == [False, True, True, False]
    assert plan_dispatch(idx, 1, 1, score_SK=score).kept_KS[0].tolist() == [False, True, False, False]
    tiny = torch.tensor([[1e-30], [2e-30], [0.0], [-0.0]])  # tiny values keep their order; -0.0 == 0.0
    assert plan_dispatch(idx, 1, 1, score_SK=tiny).kept_KS[0].tolist() == [False, True, False, False]


def test_plan_dispatch_valid_tokens_only():
    # DeepSpeed's used_token: the other tokens' choices are neither counted nor kept
    idx = torch.tensor([[0], [1], [0], [0], [1]])
    valid = torch.tensor([True, True, False, True, True])
    plan = plan_dispatch(idx, 2, 1, valid_S=valid)
    assert plan.counts_E.tolist() == [2, 2] and plan.kept_counts_E.tolist() == [1, 1]
    assert plan.kept_KS[0].tolist() == [True, True, False, False, False]
    order = torch.tensor([[3, 2, 0, 4, 1]])  # RTS: t3 before t0 for expert 0, t4 before t1 for expert 1
    plan = plan_dispatch(idx, 2, 1, order, valid_S=valid)
    assert plan.kept_KS[0].tolist() == [False, False, False, True, True]
    dl = plan_dispatch(idx, 2, None, valid_S=valid)
    assert dl.counts_E.tolist() == [2, 2] and dl.kept_KS[0].tolist() == valid.tolist()
    assert sorted(dl.token_M.tolist()) == [0, 1, 3, 4]
