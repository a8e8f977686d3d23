"""MoE layer: fast path == dense reference for every option, and the layer's behavioural contract."""

import collections
import itertools
import re

import pytest
import torch

from raymoe.platform.moe import LocalDispatcher, MoE, TokenDispatcher, plan_dispatch
from raymoe.platform.moe.dispatch import DEFAULT_MIN_FILL
from raymoe.platform.moe.reference import reference_forward

D, FFN, E = 8, 12, 4


def _run(m, x, mask, noise, path, used_token=None):
    """One forward+backward; returns everything the two paths must agree on."""
    xx = x.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    if path == "fast":
        y, l_aux, counts = m(xx, mask, used_token=used_token, noise=noise)
        st = m.last_stats
        kept, cap, zl = st.kept_mask, st.capacity, st.z_loss
    else:
        o = reference_forward(m, xx, mask, noise, used_token)
        y, l_aux, counts, kept, cap, zl = o.y, o.l_aux, o.exp_counts, o.kept_mask, o.capacity, o.z_loss
    w = torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()  # a non-uniform upstream gradient
    ((y * w).sum() + l_aux + zl).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return dict(y=y.detach(), l_aux=l_aux.detach(), zl=zl.detach(), counts=counts, kept=kept, cap=cap,
                gx=xx.grad, grads=grads)


def _assert_same(a, b, atol=1e-5):
    assert torch.equal(a["counts"], b["counts"])
    assert torch.equal(a["kept"], b["kept"])
    assert a["cap"] == b["cap"]
    for key in ("y", "l_aux", "zl", "gx"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)
    assert a["grads"].keys() == b["grads"].keys()
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], atol=atol, rtol=1e-5, msg=n)


OPTIONS = list(itertools.product((1, 2, 3), (True, False), (True, False), (None, "Jitter", "RSample"),
                                 (True, False)))
# capacity_layout_min_fill: 0 always runs the capacity layout ([E, C, D] slots, batched GEMMs), 2 never (variable
# segments, grouped GEMM); the default picks by how full the slots are
LAYOUTS = {"slots": 0.0, "segments": 2.0}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,drop,rts,policy,train", OPTIONS)
def test_fast_equals_reference(k, drop, rts, policy, train, layout):
    torch.manual_seed(1000 * k + 10 * drop + rts)
    for residual, masked in ((False, False), (True, True)):
        m = MoE(D, FFN, num_experts=E, k=k, drop_tokens=drop, use_rts=rts, noisy_gate_policy=policy,
                use_residual=residual, capacity_factor=0.7, eval_capacity_factor=0.9, min_capacity=1,
                z_loss_coef=0.1, capacity_layout_min_fill=LAYOUTS[layout])
        m.train(train)
        x = torch.randn(3, 7, D)
        mask = torch.rand(3, 7) > 0.3 if masked else None
        noise = m.draw_noise(int(mask.sum()) if masked else 21)
        a, b = _run(m, x, mask, noise, "fast"), _run(m, x, mask, noise, "ref")
        _assert_same(a, b)
        if drop and train:
            assert not a["kept"].all()  # capacity 0.7 must actually drop something here
        if not drop:
            assert a["kept"].all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ffn", [4, FFN])  # gate scale folded into the activation (F <= D) or the output
def test_fast_equals_reference_with_expert_bias_and_fallback_experts(ffn, layout):
    torch.manual_seed(5)
    m = MoE(D, ffn, num_experts=E, k=2, expert_bias=True, capacity_factor=1.0, min_capacity=1,
            capacity_layout_min_fill=LAYOUTS[layout])
    m.gate.expert_bias.copy_(torch.tensor([0.0, 0.5, -0.5, 0.2]))
    x = torch.randn(16, D)
    noise = m.draw_noise(16)
    a = _run(m, x, None, noise, "fast")
    _assert_same(a, _run(m, x, None, noise, "ref"))
    m.experts.force_fallback = True
    _assert_same(a, _run(m, x, None, noise, "fast"))


def test_leading_dims_and_dtype_kept():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=2)
    x = torch.randn(2, 3, 5, D)
    y, l_aux, counts = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert counts.dtype == torch.int64 and counts.shape == (E,) and counts.sum() == 2 * 30
    m.eval()
    m.set_deterministic(True)  # DeepSpeed samples top-2's second expert in eval too
    y_flat, _, _ = m(x.reshape(-1, D))
    torch.testing.assert_close(m(x)[0].reshape(-1, D), y_flat)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_token_experts_safe(layout):
    torch.manual_seed(0)
    for drop, fallback in itertools.product((True, False), (False, True)):
        m = MoE(D, FFN, num_experts=E, k=1, drop_tokens=drop, min_capacity=1,
                capacity_layout_min_fill=LAYOUTS[layout])
        with torch.no_grad():
            m.gate.wg.weight.zero_()
            m.gate.wg.weight[2] = 1.0
        x = (torch.rand(10, D) + 0.1).requires_grad_()  # positive x: every token picks expert 2
        m.experts.force_fallback = fallback
        y, l_aux, counts = m(x)
        assert counts.tolist() == [0, 0, 10, 0]
        y.sum().backward()  # stride-0 upstream gradient
        for t in (y, x.grad, m.experts.w1.grad, m.experts.w2.grad, m.gate.wg.weight.grad):
            assert torch.isfinite(t).all()
        for e in (0, 1, 3):
            assert m.experts.w1.grad[e].abs().max() == 0 and m.experts.w2.grad[e].abs().max() == 0
        assert m.experts.w1.grad[2].abs().max() > 0
        kept = m.last_stats.kept_counts.tolist()
        assert kept == ([0, 0, m.last_stats.capacity, 0] if drop else [0, 0, 10, 0])


def test_all_tokens_masked():
    m = MoE(D, FFN, num_experts=E, k=2)
    x = torch.randn(2, 4, D, requires_grad=True)
    y, l_aux, counts = m(x, token_mask=torch.zeros(2, 4, dtype=torch.bool))
    (y.sum() + l_aux).backward()
    assert y.abs().max() == 0 and counts.sum() == 0 and l_aux.item() == 0
    assert torch.isfinite(m.experts.w1.grad).all()


def test_token_mask_excludes_tokens_from_capacity_and_output():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=1, min_capacity=0, capacity_factor=1.0)
    x = torch.randn(1, 12, D)
    mask = torch.tensor([[True] * 8 + [False] * 4])
    y, _, counts = m(x, token_mask=mask)
    assert counts.sum() == 8 and m.last_stats.capacity == 2  # ceil(8 / 4)
    assert y[0, 8:].abs().max() == 0
    m.eval()
    m.set_deterministic(True)  # no RTS in eval: position order
    y_sub, _, _ = m(x[:, :8])
    y_masked, _, _ = m(x, token_mask=mask)
    torch.testing.assert_close(y_masked[:, :8], y_sub)


def test_layout_choice_follows_slot_fill(monkeypatch):
    # slots compute their padding too: one [E, C] buffer only when the kept rows fill it
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=1, capacity_factor=1.0, min_capacity=1)  # CPU default: DEFAULT_MIN_FILL
    x = torch.randn(64, D)
    m(x)
    kept = m.last_stats.kept_counts
    fill = kept.sum().item() / (E * kept.max().item())
    assert m.last_stats.layout == ("slots" if fill >= DEFAULT_MIN_FILL else "segments")
    m.capacity_layout_min_fill = 0.0
    m(x)
    assert m.last_stats.layout == "slots"
    m.capacity_layout_min_fill = 2.0
    m(x)
    assert m.last_stats.layout == "segments"
    m.set_dropless(True)
    m.capacity_layout_min_fill = 1.0  # dropless pads every expert to the max count: full only if balanced
    m(x)
    kept = m.last_stats.kept_counts
    assert m.last_stats.layout == ("slots" if bool((kept == kept.max()).all()) else "segments")


def test_local_slots_pad_to_the_largest_kept_count(monkeypatch):
    # cf 2.0: the capacity is far above every expert's count; a local layer's slots stop at the largest count
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=2, capacity_factor=2.0, min_capacity=1, capacity_layout_min_fill=0.0)
    shapes = []
    monkeypatch.setattr(m.experts, "forward_capacity", lambda x, *a, **kw: shapes.append(tuple(x.shape)) or
                        type(m.experts).forward_capacity(m.experts, x, *a, **kw))
    m(torch.randn(32, D))
    st = m.last_stats
    assert st.layout == "slots" and st.capacity == 32  # ceil(2 * 32 / 4 * 2.0)
    assert shapes == [(1, E, int(st.kept_counts.max()), D)] and int(st.kept_counts.max()) < st.capacity


def test_dropless_drops_nothing():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=2, drop_tokens=False)
    with torch.no_grad():
        m.gate.wg.weight[0] += 2.0  # heavy imbalance
    x = torch.rand(64, D)
    y, _, counts = m(x)
    st = m.last_stats
    assert st.kept_mask.all() and st.dropped_fraction.item() == 0.0
    assert torch.equal(st.kept_counts, counts) and st.capacity == int(counts.max())
    m.set_dropless(False)
    m(x)
    assert m.last_stats.dropped_fraction.item() > 0 and m.drop_tokens


def test_rts_drops_at_random_not_by_position():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=2, k=1, capacity_factor=0.5, min_capacity=1, use_rts=True)
    with torch.no_grad():
        m.gate.wg.weight.zero_()
        m.gate.wg.weight[0] = 1.0
    x = torch.rand(64, D) + 0.1  # all 64 tokens pick expert 0; capacity ceil(64 / 2 * 0.5) = 16
    m(x)
    kept = m.last_stats.kept_mask[:, 0]
    assert m.last_stats.capacity == 16 and kept.sum() == 16
    assert not kept[:16].all()  # not position order
    kept_pos = kept.nonzero().squeeze(1).float()
    assert 15 < kept_pos.mean().item() < 48  # spread over the sequence (position order gives 7.5)
    torch.manual_seed(1)
    m(x)
    assert not torch.equal(m.last_stats.kept_mask[:, 0], kept)  # another draw, another subset
    m.use_rts = False
    m(x)
    assert m.last_stats.kept_mask[:16, 0].all() and not m.last_stats.kept_mask[16:, 0].any()
    m.use_rts = True
    m.eval()  # DeepSpeed applies RTS in eval too (top1gating has no training condition)
    m.eval_capacity_factor = 0.5
    m(x)
    assert m.last_stats.kept_mask[:, 0].sum() == 16 and not m.last_stats.kept_mask[:16, 0].all()
    m.set_deterministic(True)  # serving's setting: position order in eval
    m(x)
    assert m.last_stats.kept_mask[:16, 0].all()
    m.train()
    m(x)
    assert not m.last_stats.kept_mask[:16, 0].all()  # training is unaffected by the switch


def test_expert_bias_steers_selection_not_gate_values_and_balances():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=1, drop_tokens=False, expert_bias=True, expert_bias_update_rate=0.05)
    x = torch.randn(32, D)
    m.eval()
    m.gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    y_bias, _, counts = m(x)
    assert counts.tolist() == [0, 0, 0, 32]
    p3 = torch.softmax(x @ m.gate.wg.weight.t(), dim=1)[:, 3:4]
    expected = p3 * m.experts.act(x @ m.experts.w1[3]) @ m.experts.w2[3]  # clean prob, not biased
    torch.testing.assert_close(y_bias, expected, atol=1e-6, rtol=1e-5)
    # balancing: start from a skewed gate and let the bias correct it
    m.train()
    m.gate.expert_bias.zero_()
    with torch.no_grad():
        m.gate.wg.weight[1] += 0.5 * x.mean(0) / x.mean(0).norm() ** 2
    first = None
    for _ in range(60):
        _, _, counts = m(x)
        first = counts.clone() if first is None else first
        m.update_expert_bias()
    assert counts.max() < first.max()
    assert m.gate.expert_bias[1] < 0 and m.expert_load.sum() == 0
    assert m.gate.expert_bias.requires_grad is False
    assert "gate.expert_bias" not in dict(m.named_parameters())


def test_residual_moe_mixes_mlp_and_moe():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=1, use_residual=True, drop_tokens=False).eval()
    x = torch.randn(5, D)
    y, _, _ = m(x)
    coef = torch.softmax(m.coefficient(x), dim=-1)
    m.use_residual = False
    y_moe, _, _ = m(x)
    torch.testing.assert_close(y, y_moe * coef[:, :1] + m.mlp(x) * coef[:, 1:])


def test_z_loss_and_stats():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=2, z_loss_coef=0.5)
    x = torch.randn(10, D)
    m(x)
    st = m.last_stats
    logits = x @ m.gate.wg.weight.t()
    torch.testing.assert_close(st.z_loss, 0.5 * torch.logsumexp(logits, 1).square().mean())
    assert st.z_loss.requires_grad and not st.dropped_fraction.requires_grad
    assert st.kept_counts.sum() == st.kept_mask.sum()
    m.z_loss_coef = 0.0
    m(x)
    assert m.last_stats.z_loss.item() == 0.0


def test_gate_runs_fp32_under_autocast_and_bf16_module():
    torch.manual_seed(0)
    m = MoE(D, FFN, num_experts=E, k=2)
    x = torch.randn(6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, l_aux, _ = m(x)
    assert l_aux.dtype == torch.float32 and y.shape == x.shape
    mb = MoE(D, FFN, num_experts=E, k=2).to(torch.bfloat16)
    y, l_aux, _ = mb(x.bfloat16())
    assert y.dtype == torch.bfloat16 and l_aux.dtype == torch.float32 and torch.isfinite(y.float()).all()


def test_argument_validation():
    with pytest.raises(ValueError, match="ep_size"):
        MoE(D, FFN, num_experts=4, ep_size=2)
    with pytest.raises(ValueError, match="noisy_gate_policy"):
        MoE(D, FFN, num_experts=4, noisy_gate_policy="gumbel")
    with pytest.raises(ValueError, match="k=5"):
        MoE(D, FFN, num_experts=4, k=5)
    with pytest.raises(TypeError, match="expert"):
        MoE(D, torch.nn.Linear(2, 2), num_experts=4)
    with pytest.raises(ValueError, match="hidden_size"):
        MoE(D, FFN, num_experts=4)(torch.randn(3, D + 1))
    assert MoE(D, num_experts=2).experts.w1.shape == (2, D, 4 * D)


class _CountingDispatcher:
    """A custom TokenDispatcher: the local one behind a call counter; ``folds_gate=False`` makes the layer
    scale the combined rows instead (the expert-parallel order of operations, run in one process)."""

    def __init__(self, folds_gate: bool = True):
        self.inner, self.folds_gate, self.calls = LocalDispatcher(), folds_gate, collections.Counter()
        self.local_expert_ids = None

    def __getattr__(self, name):  # every protocol method: count, then run the local one
        fn = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return counted


def test_dispatchers_implement_the_protocol():
    from raymoe.platform.moe.comm import AllToAllDispatcher

    for d in (LocalDispatcher(), AllToAllDispatcher(None, 2, 0, 4), _CountingDispatcher()):
        assert isinstance(d, TokenDispatcher)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("folds_gate", [True, False])
def test_custom_dispatcher_runs_through_the_protocol(layout, drop, folds_gate):
    torch.manual_seed(3)
    args = dict(num_experts=E, k=2, drop_tokens=drop, capacity_factor=1.0, min_capacity=1,
                capacity_layout_min_fill=LAYOUTS[layout])
    ref = MoE(D, FFN, **args)
    d = _CountingDispatcher(folds_gate)
    m = MoE(D, FFN, dispatcher=d, **args)
    m.load_state_dict(ref.state_dict())
    x, mask = torch.randn(2, 9, D), torch.rand(2, 9) > 0.2
    noise = ref.draw_noise(int(mask.sum()))
    a, b = _run(m, x, mask, noise, "fast"), _run(ref, x, mask, noise, "fast")
    _assert_same(a, b)
    if folds_gate:  # the same calls in the same order: bitwise the local layer
        assert torch.equal(a["y"], b["y"]) and torch.equal(a["gx"], b["gx"])
    assert m.last_stats.layout == ref.last_stats.layout == layout
    pair = ("dispatch_capacity", "combine_capacity") if layout == "slots" else ("dispatch", "combine")
    assert d.calls == collections.Counter({"plan_layout": 1, pair[0]: 1, pair[1]: 1,
                                           **({} if drop else {"group_capacity": 1})})


def test_all_to_all_dispatcher_layout_is_static():
    # expert-parallel ranks cannot see each other's fill: slots exactly in drop mode with cf <= 1/0.9; with
    # uniform_tokens and no mask the slot count is the local capacity (no collective, so no process group here)
    from raymoe.platform.moe.comm import AllToAllDispatcher

    d = AllToAllDispatcher(None, 2, 0, 4, uniform_tokens=True)
    plan = plan_dispatch(torch.tensor([[0], [3], [3]]), 4, 2)
    assert d.plan_layout(plan, 2, capacity_factor=1.0, min_fill=None, masked=False) == 2
    assert d.plan_layout(plan, 2, capacity_factor=1.25, min_fill=None, masked=False) is None
    assert d.plan_layout(plan, None, capacity_factor=1.0, min_fill=0.0, masked=False) is None
    assert d.plan_layout(plan, 2, capacity_factor=2.0, min_fill=0.0, masked=False) == 2
    assert d.folds_gate is False and LocalDispatcher.folds_gate is True


def test_layer_has_no_dispatcher_type_checks():
    # one layer code path for every dispatcher: the protocol's members, never the dispatcher's type or flags
    import inspect

    for name, fn in vars(MoE).items():
        if callable(fn) and name != "_check_args":
            src = inspect.getsource(fn)
            assert not re.search(r"\b(isinstance|getattr|hasattr|type)\(", src), name
    assert "uniform_tokens" not in inspect.getsource(MoE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("drop", [True, False])
def test_swiglu_fast_equals_reference(layout, drop):
    torch.manual_seed(11)
    m = MoE(D, FFN, num_experts=E, k=2, activation="swiglu", drop_tokens=drop, capacity_factor=0.8,
            min_capacity=1, capacity_layout_min_fill=LAYOUTS[layout])
    x = torch.randn(2, 9, D)
    noise = m.draw_noise(18)
    _assert_same(_run(m, x, None, noise, "fast"), _run(m, x, None, noise, "ref"))
    assert m.last_stats.layout == layout
