"""Mixture-of-Students: KD loss against hand computation, staged schedule, student config."""

import math

import pytest
import torch

from raymoe.platform.distill import KDSchedule, build_student_config, kd_loss, kd_loss_terms
from raymoe.platform.model import GPT, GPTConfig


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation():
    s = [[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
    t = [[1.0, 1.0, 0.0], [0.0, 2.0, -1.0]]
    y = [0, 2]
    beta, T = 0.7, 2.0
    ce = sum(-math.log(softmax(s[i])[y[i]]) for i in range(2)) / 2
    kl_st = kl_ts = 0.0
    for i in range(2):
        ps, pt = softmax([v / T for v in s[i]]), softmax([v / T for v in t[i]])
        kl_st += sum(a * math.log(a / b) for a, b in zip(ps, pt)) / 2
        kl_ts += sum(b * math.log(b / a) for a, b in zip(ps, pt)) / 2
    S, Tt, Y = torch.tensor(s), torch.tensor(t), torch.tensor(y)
    terms = kd_loss_terms(S, Tt, Y, beta, T)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.kl.item() == pytest.approx(kl_st, rel=1e-5)
    assert kd_loss(S, Tt, Y, beta, T).item() == pytest.approx(ce + beta * T * T * kl_st, rel=1e-5)
    rev = kd_loss(S, Tt, Y, beta, T, direction="teacher_student")
    assert rev.item() == pytest.approx(ce + beta * T * T * kl_ts, rel=1e-5)
    assert abs(kl_st - kl_ts) > 1e-3  # the two directions really differ on this example


def test_kl_zero_for_equal_logits_and_teacher_gets_no_grad():
    logits = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    terms = kd_loss_terms(logits, logits.clone(), y, beta=1.0, temperature=3.0)
    assert abs(terms.kl.item()) < 1e-6
    torch.testing.assert_close(terms.loss, terms.ce)
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11, requires_grad=True)
    kd_loss(s, t, y, 1.0, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_ignore_index_masks_kl_too():
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    y = torch.tensor([[1, 2, -1, -1]])
    full = kd_loss_terms(s[:, :2], t[:, :2], y[:, :2], 1.0, 1.0)
    masked = kd_loss_terms(s, t, y, 1.0, 1.0)
    torch.testing.assert_close(masked.kl, full.kl)
    torch.testing.assert_close(masked.loss, full.loss)


@pytest.mark.parametrize("kw", [dict(beta=-1.0), dict(temperature=0.0), dict(direction="forward")])
def test_kd_loss_validation(kw):
    args = {"beta": 1.0, "temperature": 1.0, **kw}
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1.0)


def test_schedule_switches_off_after_stop_step():
    sch = KDSchedule(kd_stop_step=3, beta=0.5, temperature=2.0)
    assert [sch.active(s) for s in range(6)] == [True, True, True, False, False, False]
    assert KDSchedule(None).active(10 ** 9) and not KDSchedule(0).active(0)
    with pytest.raises(ValueError, match="kd_stop_step"):
        KDSchedule(-1)

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=257, block_size=16, n_layer=4, n_head=2, d_model=32, num_experts=[2, 4])
    student = GPT(build_student_config(cfg, 2))
    idx = torch.randint(0, 257, (2, 8))
    out = student(idx, idx)
    teacher_logits = torch.randn_like(out.logits)
    on = sch.loss(2, out, teacher_logits, idx)
    moe = out.loss - out.ce_loss
    expected = kd_loss(out.logits, teacher_logits, idx, 0.5, 2.0) + moe
    torch.testing.assert_close(on.loss, expected)
    assert on.kl > 0
    off = sch.loss(3, out, None, idx)  # the teacher is not needed once KD is off
    torch.testing.assert_close(off.loss, out.loss)
    assert off.kl.item() == 0.0
    with pytest.raises(ValueError, match="teacher_logits"):
        sch.loss(0, out, None, idx)


def test_build_student_config():
    teacher = GPTConfig.from_dict(dict(vocab_size=257, block_size=16, n_layer=8, n_head=2, d_model=32,
                        num_experts=[2, 2, 4, 8], use_residual=True))
    s = build_student_config(teacher, 6)
    assert (s.n_layer, s.moe_layer_ids(), s.num_experts) == (6, [1, 3, 5], [2, 4, 8])
    assert s.moe.use_residual and s.d_model == 32 and s.vocab_size == 257
    model = GPT(s)
    assert [m.num_experts for m in model.moe_modules()] == [2, 4, 8]
    with pytest.raises(ValueError, match="num_layers"):
        build_student_config(teacher, 9)
    with pytest.raises(TypeError):
        build_student_config(teacher.to_dict(), 4)
