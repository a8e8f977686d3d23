"""GroupedExperts: grouped_mm path == segment-loop fallback == per-expert dense math."""

import pytest
import torch

from raymoe.platform.moe import GroupedExperts, MoE, grouped_mm, iter_expert_params
import raymoe.platform.moe.experts as experts_mod
from raymoe.platform.moe.experts import _probe_grouped_mm


def _fwd_bwd(ex, x, counts, fallback):
    ex.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y = ex(xx, counts, force_fallback=fallback)
    y.sum().backward()  # stride-0 upstream gradient on purpose
    return y.detach(), xx.grad, ex.w1.grad.clone(), ex.w2.grad.clone()


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [4, 3, 2, 1]])
def test_fallback_equals_grouped_mm_and_dense(counts):
    torch.manual_seed(0)
    ex = GroupedExperts(4, 6, 10)
    x = torch.randn(10, 6)
    c = torch.tensor(counts)
    fast = _fwd_bwd(ex, x, c, False)
    slow = _fwd_bwd(ex, x, c, True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    start = 0
    for e, n in enumerate(counts):  # dense per-expert math
        seg = x[start:start + n]
        torch.testing.assert_close(fast[0][start:start + n], ex.act(seg @ ex.w1[e]) @ ex.w2[e])
        if n == 0:
            assert fast[2][e].abs().max() == 0 and fast[3][e].abs().max() == 0
        start += n


def test_rows_past_counts_and_empty_input():
    torch.manual_seed(0)
    w = torch.randn(2, 4, 3, requires_grad=True)
    x = torch.randn(7, 4, requires_grad=True)
    c = torch.tensor([2, 3])  # 2 trailing rows belong to no expert
    for fb in (False, True):
        y = grouped_mm(x, w, c, force_fallback=fb)
        assert y.shape == (7, 3)
        torch.testing.assert_close(y[:5], torch.cat([x[:2] @ w[0], x[2:5] @ w[1]]))
        if fb:
            assert y[5:].abs().max() == 0  # the fallback defines them; _grouped_mm leaves them unspecified
    ex = GroupedExperts(3, 4, 5)
    for fb in (False, True):
        y = ex(torch.zeros(0, 4), torch.zeros(3, dtype=torch.long), force_fallback=fb)
        y.sum().backward()
        assert y.shape == (0, 4) and ex.w1.grad.abs().max() == 0


def test_grouped_mm_probe_cpu_fp32():
    assert _probe_grouped_mm(torch.device("cpu"), torch.float32) == hasattr(torch, "_grouped_mm")


def test_init_shapes_and_iter_expert_params():
    m = torch.nn.Sequential(MoE(8, 16, num_experts=4, layer_id=3), torch.nn.Linear(8, 8))
    found = list(iter_expert_params(m))
    assert [(n, lid, ids) for n, _, lid, ids in found] == [
        ("0.experts.w1", 3, [0, 1, 2, 3]), ("0.experts.w2", 3, [0, 1, 2, 3])]
    assert found[0][1].shape == (4, 8, 16) and found[1][1].shape == (4, 16, 8)
    assert abs(found[0][1].std().item() - 0.02) < 0.005
    ex = GroupedExperts(2, 4, 4, global_expert_ids=[6, 7], layer_id=1)
    assert ex.global_expert_ids == [6, 7]
    with pytest.raises(ValueError, match="global_expert_ids"):
        GroupedExperts(2, 4, 4, global_expert_ids=[1])
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(2, 4, 4, activation="tanh")


@pytest.mark.parametrize("ffn", [4, 12])  # scale folded into the activation (F <= D) or the output (F > D)
def test_scale_rows_equals_scaling_output(ffn):
    torch.manual_seed(0)
    ex = GroupedExperts(3, 8, ffn)
    x = torch.randn(9, 8)
    c = torch.tensor([4, 0, 5])
    s = torch.rand(9)
    outs = []
    for fused in (True, False):
        ex.zero_grad(set_to_none=True)
        xx, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        y = ex(xx, c, ss) if fused else ex(xx, c) * ss[:, None]
        (y * torch.arange(y.numel()).view_as(y).cos()).sum().backward()
        outs.append((y.detach(), xx.grad, ss.grad, ex.w1.grad.clone(), ex.w2.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_grouped_mm_probe_leaves_the_global_rng_alone():
    # resumed and distributed runs rely on router noise drawn from an exactly seeded global RNG
    experts_mod._GROUPED_MM_OK.clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert experts_mod._probe_grouped_mm(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grouped_mm_probe_and_segment_loop_under_no_grad_and_inference_mode(mode, monkeypatch):
    # serving runs the model under no_grad / inference_mode: the first probe must still find the kernel (it
    # runs a backward; it used to fail there and disable the kernel for the process), and the segment loop
    # works there too
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    monkeypatch.setattr(experts_mod, "_GROUPED_MM_OK", {})
    with ctx():
        assert experts_mod._probe_grouped_mm(torch.device("cpu"), torch.float32) == hasattr(torch, "_grouped_mm")
    torch.manual_seed(0)
    ex = GroupedExperts(4, 6, 10)
    x, counts = torch.randn(12, 6), torch.tensor([5, 0, 4, 3])
    want = ex(x, counts, force_fallback=False).detach()
    with ctx():
        got = ex(x, counts, force_fallback=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("Q,C", [(1, 5), (3, 2), (2, 0)])
@pytest.mark.parametrize("scaled", [False, True])
def test_capacity_layout_equals_per_slot_dense_math(Q, C, scaled):
    # forward_capacity: x[q, e] (C slots of local expert e from rank q) times expert e's weights; the weight
    # gradient sums over every source rank's slots
    torch.manual_seed(3)
    ex = GroupedExperts(4, 6, 10)
    x = torch.randn(Q, 4, C, 6, requires_grad=True)
    s = torch.rand(Q, 4, C) if scaled else None
    g = torch.randn(Q, 4, C, 6)
    y = ex.forward_capacity(x, s)
    y.backward(g)
    w1 = ex.w1.detach().clone().requires_grad_()
    w2 = ex.w2.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    h = ex.act(torch.einsum("qecd,edf->qecf", xr, w1))
    yr = torch.einsum("qecf,efd->qecd", h, w2)
    if scaled:
        yr = yr * s.unsqueeze(-1)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    for got, want in ((x.grad, xr.grad), (ex.w1.grad, w1.grad), (ex.w2.grad, w2.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts_QE", [[[3, 0, 5, 2], [1, 4, 0, 2]], [[0, 0, 6, 0], [0, 0, 0, 0], [2, 0, 1, 0]]])
def test_source_order_segments_equal_expert_sorted_rows(counts_QE):
    # [Q, E] counts: rows in (source rank, expert) order (the expert-parallel exchange without its re-sort);
    # the same as running the rows re-sorted by expert, forward and backward (an expert's weight gradient
    # sums over its segments; an expert without rows gets zeros)
    torch.manual_seed(4)
    ex = GroupedExperts(4, 6, 10)
    c_QE = torch.tensor(counts_QE)
    M = int(c_QE.sum())
    x = torch.randn(M, 6)
    scale = torch.rand(M)
    expert_of_row = torch.cat([torch.full((int(n),), e) for row in counts_QE for e, n in enumerate(row)])
    order = torch.sort(expert_of_row, stable=True).indices  # source order -> expert order
    g = torch.randn(M, 6)

    def run(xx, counts, s, gg):
        ex.zero_grad(set_to_none=True)
        xx = xx.clone().requires_grad_()
        y = ex(xx, counts, s)
        y.backward(gg)
        return y.detach(), xx.grad, ex.w1.grad.clone(), ex.w2.grad.clone()

    y, gx, gw1, gw2 = run(x, c_QE, scale, g)
    ys, gxs, gw1s, gw2s = run(x[order], c_QE.sum(0), scale[order], g[order])
    torch.testing.assert_close(y[order], ys, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx[order], gxs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw1, gw1s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw2, gw2s, atol=1e-6, rtol=1e-5)
    for e in range(4):
        assert (gw1[e].abs().max() == 0) == (int(c_QE[:, e].sum()) == 0)


def _swiglu_loop(x_MD, w1, w2, counts, scale=None):
    """Per-expert loop written from the definition: h = silu(x @ w1[:, :F]) * (x @ w1[:, F:]), y = h @ w2."""
    Fd = w2.shape[1]
    out, start = [], 0
    for e, n in enumerate(counts):
        seg = x_MD[start:start + n]
        h = torch.nn.functional.silu(seg @ w1[e][:, :Fd]) * (seg @ w1[e][:, Fd:])
        out.append(h @ w2[e])
        start += n
    y = torch.cat(out)
    return y if scale is None else y * scale[:, None]


@pytest.mark.parametrize("ffn", [4, 12])  # gate scale folded into the activation (F <= D) or the output
@pytest.mark.parametrize("path", ["grouped", "fallback", "capacity"])
def test_swiglu_experts_equal_a_per_expert_loop(path, ffn):
    torch.manual_seed(7)
    D = 8
    ex = GroupedExperts(4, D, ffn, activation="swiglu")
    assert ex.w1.shape == (4, D, 2 * ffn) and ex.w2.shape == (4, ffn, D) and "ffn=%d" % ffn in repr(ex)
    counts = [3, 0, 5, 2]  # expert 1 gets no rows
    x = torch.randn(sum(counts), D)
    s = torch.rand(sum(counts))
    g = torch.randn(sum(counts), D)
    xx, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    if path == "capacity":  # [Q=1, E, C, D] slots, unused slots zero with scale 0
        C = max(counts)
        x_ECD, s_EC = torch.zeros(4, C, D), torch.zeros(4, C)
        start = 0
        for e, n in enumerate(counts):
            x_ECD[e, :n], s_EC[e, :n] = x[start:start + n], s[start:start + n]
            start += n
        x_ECD.requires_grad_()
        s_EC.requires_grad_()
        y_ECD = ex.forward_capacity(x_ECD.unsqueeze(0), s_EC.unsqueeze(0))[0]
        y = torch.cat([y_ECD[e, :n] for e, n in enumerate(counts)])
        y.backward(g)
        gx = torch.cat([x_ECD.grad[e, :n] for e, n in enumerate(counts)])
        gs = torch.cat([s_EC.grad[e, :n] for e, n in enumerate(counts)])
    else:
        y = ex(xx, torch.tensor(counts), ss, force_fallback=path == "fallback")
        y.backward(g)
        gx, gs = xx.grad, ss.grad
    w1 = ex.w1.detach().clone().requires_grad_()
    w2 = ex.w2.detach().clone().requires_grad_()
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    yr = _swiglu_loop(xr, w1, w2, counts, sr)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    for got, want in ((gx, xr.grad), (gs, sr.grad), (ex.w1.grad, w1.grad), (ex.w2.grad, w2.grad)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ex.w1.grad[1].abs().max() == 0 and ex.w2.grad[1].abs().max() == 0  # the zero-token expert


def test_swiglu_moe_layer_uses_gated_experts():
    torch.manual_seed(0)
    m = MoE(8, 6, num_experts=4, k=2, activation="swiglu", drop_tokens=False, top2_2nd_expert_sampling=False).eval()
    assert m.experts.w1.shape == (4, 8, 12)
    x = torch.randn(10, 8)
    y, _, _ = m(x)
    probs = torch.softmax(x @ m.gate.wg.weight.t(), dim=1)
    top = probs.topk(2, dim=1)
    want = torch.zeros_like(x)
    for t in range(10):
        w = top.values[t] / top.values[t].sum()
        for c in range(2):
            e = int(top.indices[t, c])
            want[t] += w[c] * _swiglu_loop(x[t:t + 1], m.experts.w1, m.experts.w2, [0] * e + [1] + [0] * (3 - e))[0]
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
