"""Activation checkpointing (train.activation_checkpointing): same losses, gradients and MoE side effects as none,
fewer activations kept for the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from raymoe.platform.activation_checkpoint import apply_activation_checkpointing
from raymoe.platform.model import GPT, GPTConfig

BASE = dict(vocab_size=61, block_size=16, n_head=2, d_model=32, d_ff=64, expert_ffn=48, n_layer=3, min_capacity=1)
CONFIGS = {
    # the paper's GPT-MoE with everything random: dropout, jitter noise, capacity drops with Random Token Selection
    "gpt_moe_random": dict(BASE, dropout=0.1, expert_interval=2, num_experts=4, k=1, capacity_factor=1.0,
                           drop_tokens=True, use_rts=True, noisy_gate_policy="Jitter", z_loss_coef=1e-3),
    # residual MoE, top-2 with the sampled second expert
    "residual_top2": dict(BASE, expert_interval=1, num_experts=4, k=2, capacity_factor=1.25, use_residual=True),
    # DeepSeek-V3-style: sigmoid group routing, correction bias (expert-load counters), shared expert, SwiGLU
    "deepseek": dict(BASE, moe_layers=[1, 2], num_experts=8, norm="rmsnorm", bias=False, position="rope",
                     mlp="swiglu", k=2, router="sigmoid_group", n_group=4, topk_group=2, norm_topk_prob=True,
                     shared_expert_ffn=16, expert_bias=True, expert_bias_update_rate=1e-2, drop_tokens=False),
}


def _run(model: GPT, x, y, seed: int):
    """One forward + backward in training mode; loss, grads, expert-load counters and routed counts."""
    model.train()
    torch.manual_seed(seed)
    out = model(x, y)
    loss = out.loss + 0.01 * out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.expert_load.clone() for m in model.moe_modules()]
    counts = [s.exp_counts.clone() for s in out.stats]
    return loss.detach(), grads, loads, counts


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["moe", "full"])
def test_checkpointing_changes_nothing_but_memory(config, mode):
    torch.manual_seed(0)
    ref = GPT(GPTConfig.from_dict(CONFIGS[config]))
    ac = apply_activation_checkpointing(copy.deepcopy(ref), mode)
    x = torch.randint(0, 61, (4, 16))
    y = torch.randint(0, 61, (4, 16))
    loss_r, grads_r, loads_r, counts_r = _run(ref, x, y, seed=7)
    loss_a, grads_a, loads_a, counts_a = _run(ac, x, y, seed=7)
    torch.testing.assert_close(loss_a, loss_r, rtol=0, atol=0)
    assert grads_a.keys() == grads_r.keys() and grads_r
    for name in grads_r:
        torch.testing.assert_close(grads_a[name], grads_r[name], rtol=1e-6, atol=1e-7, msg=name)
    # counters of aux-loss-free balancing are bumped once per forward, not again by the recomputation
    for a, r in zip(loads_a + counts_a, loads_r + counts_r):
        assert torch.equal(a, r)
    assert all(load.sum() > 0 for load in loads_a)


def _saved_bytes(model: GPT, x, y) -> int:
    """Bytes of the tensors autograd keeps for the backward (checkpointed regions keep only their inputs)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, y)
    out.loss.backward()
    return total


def test_checkpointing_keeps_fewer_activations():
    cfg = dict(CONFIGS["residual_top2"], d_model=64, expert_ffn=256)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(cfg))
    x = torch.randint(0, 61, (4, 16))
    y = torch.randint(0, 61, (4, 16))
    saved = {}
    for mode in ("none", "moe", "full"):
        apply_activation_checkpointing(model, mode)
        saved[mode] = _saved_bytes(model, x, y)
    assert saved["full"] < saved["moe"] < saved["none"], saved


def test_inference_and_kv_cache_paths_ignore_the_mode():
    torch.manual_seed(0)
    model = apply_activation_checkpointing(GPT(GPTConfig.from_dict(CONFIGS["deepseek"])), "full").eval()
    ref = copy.deepcopy(model)
    apply_activation_checkpointing(ref, "none")
    x = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_bad_mode_names_the_field():
    with pytest.raises(ValueError, match=r"train.activation_checkpointing='some'.*none, moe, full"):
        apply_activation_checkpointing(GPT(GPTConfig.from_dict(BASE)), "some")
