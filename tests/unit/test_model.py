"""GPT(-MoE) model: config validation, MoE schedule, shapes, causality, padding, losses, parameter counts."""

import pytest
import torch

from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.moe import MoE

V = 257


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=4, n_head=2, d_model=32, expert_interval=2, num_experts=4)
    base.update(kw)
    return GPTConfig.from_dict(base)


def model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw))


# ---- config --------------------------------------------------------------------------------------------

def test_moe_schedule_interval_and_explicit():
    assert tiny(expert_interval=2).moe_layer_ids() == [1, 3]
    assert tiny(expert_interval=1).moe_layer_ids() == [0, 1, 2, 3]
    assert tiny(n_layer=6, expert_interval=3).moe_layer_ids() == [2, 5]
    assert tiny(expert_interval=0).moe_layer_ids() == []
    cfg = tiny(moe_layers=[2, 0], num_experts=[2, 8])
    assert cfg.moe_layer_ids() == [0, 2]
    assert cfg.experts_per_layer() == {0: 2, 2: 8}
    m = GPT(cfg)
    kinds = [isinstance(b.mlp, MoE) for b in m.blocks]
    assert kinds == [True, False, True, False]
    assert [(x.layer_id, x.num_experts) for x in m.moe_modules()] == [(0, 2), (2, 8)]
    assert m.moe_layers() == m.moe_modules()


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, n_head=4), "d_model"),
    (dict(num_experts=[2, 4, 8]), "num_experts"),
    (dict(num_experts=[2, 4], k=3), "k"),
    (dict(moe_layers=[4]), "moe_layers"),
    (dict(moe_layers=[1, 1]), "moe_layers"),
    (dict(noisy_gate_policy="Gumbel"), "noisy_gate_policy"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(expert_interval=-1), "expert_interval"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_config_dict_round_trip_and_defaults():
    cfg = tiny(num_experts=[2, 4])
    assert cfg.d_ff == 128 and cfg.expert_ffn_size == 128 and cfg.n_embd == 32
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embed": 3})


def test_student_config_keeps_schedule_pattern():
    teacher = tiny(n_layer=6, num_experts=[2, 2, 4])  # MoE layers 1, 3, 5
    s = teacher.student(4)
    assert s.n_layer == 4 and s.moe_layer_ids() == [1, 3] and s.num_experts == [2, 4]
    assert s.d_model == teacher.d_model and s.expert_interval == 2
    explicit = tiny(n_layer=6, moe_layers=[0, 5], num_experts=[2, 4])
    s2 = explicit.student(3)
    assert s2.moe_layer_ids() == [0, 2] and s2.num_experts == [2, 4]
    assert tiny(num_experts=4).student(1).moe_layer_ids() == []
    for bad in (0, 5):
        with pytest.raises(ValueError, match="num_layers"):
            tiny().student(bad)


# ---- forward -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, True])
def test_shapes_and_tying(moe):
    m = model(expert_interval=2 if moe else 0)
    idx = torch.randint(0, V, (3, 7))
    out = m(idx, idx)
    assert out.logits.shape == (3, 7, V)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert len(out.stats) == (2 if moe else 0)
    assert m(idx, last_logits_only=True).logits.shape == (3, 1, V)
    assert m.lm_head.weight is m.wte.weight
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("moe", [False, True])
def test_causal(moe):
    m = model(expert_interval=2 if moe else 0).eval()
    m.set_dropless(True)  # capacity dropping lets later tokens evict earlier ones; causality is about attention
    a = torch.randint(0, V, (2, 10))
    b = a.clone()
    b[:, 6:] = torch.randint(0, V, (2, 4))
    la, lb = m(a).logits, m(b).logits
    torch.testing.assert_close(la[:, :6], lb[:, :6], rtol=0, atol=1e-5)
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


@pytest.mark.parametrize("moe", [False, True])
def test_left_padding_is_invisible(moe):
    """A left-padded row (token_mask False on the pads) gives the same logits as the row alone."""
    m = model(expert_interval=2 if moe else 0, k=2).eval()
    m.set_dropless(True)
    row = torch.randint(0, V, (1, 5))
    alone = m(row).logits
    padded = torch.cat([torch.full((1, 3), 9), row], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    out = m(padded, token_mask_BT=mask)
    torch.testing.assert_close(out.logits[:, 3:], alone, rtol=0, atol=1e-5)
    for st in out.stats:  # pads are never routed: k choices per real token only
        assert int(st.exp_counts.sum()) == 5 * 2


def test_positions_beyond_block_size_rejected():
    m = model(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ---- losses --------------------------------------------------------------------------------------------

def test_loss_includes_aux_and_z_loss():
    m = model(num_experts=[2, 4], aux_loss_coef=0.1, z_loss_coef=0.01)
    idx = torch.randint(0, V, (2, 12))
    out = m(idx, idx)
    l_aux = [x.last_stats.l_aux for x in m.moe_modules()]
    z = [x.last_stats.z_loss for x in m.moe_modules()]
    torch.testing.assert_close(out.aux_loss, l_aux[0] + l_aux[1])
    torch.testing.assert_close(out.z_loss, z[0] + z[1])
    assert out.aux_loss > 0 and out.z_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.1 * out.aux_loss + out.z_loss)
    ce_ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), idx.reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce_ref)
    # the gate only gets gradient through routing weights + aux/z losses; check the aux path carries it
    m.zero_grad()
    out.aux_loss.backward()
    assert m.moe_modules()[0].gate.wg.weight.grad.abs().sum() > 0


def test_dense_model_has_zero_aux_and_ignore_index():
    m = model(expert_interval=0)
    idx = torch.randint(0, V, (2, 6))
    tgt = idx.clone()
    tgt[:, :3] = -1
    out = m(idx, tgt)
    assert out.aux_loss.item() == 0.0 and out.stats == []
    ref = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, V), idx[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_set_dropless_and_context_manager():
    m = model()
    assert all(x.drop_tokens for x in m.moe_modules())
    with m.dropless():
        assert not any(x.drop_tokens for x in m.moe_modules())
    assert all(x.drop_tokens for x in m.moe_modules())
    m.set_dropless(True)
    assert not any(x.drop_tokens for x in m.moe_modules())


def test_moe_kwargs_callable_per_layer():
    seen = []

    def extra(layer_id, num_experts):
        seen.append((layer_id, num_experts))
        return {"global_expert_ids": list(range(10, 10 + num_experts))}

    m = GPT(tiny(num_experts=[2, 4]), moe_kwargs=extra)
    assert seen == [(1, 2), (3, 4)]
    assert m.blocks[3].mlp.experts.global_expert_ids == [10, 11, 12, 13]


# ---- parameter counts ----------------------------------------------------------------------------------

def test_pyramid_residual_param_counts_by_hand():
    D, F, Fe, Vb, T = 32, 64, 48, V, 16
    cfg = tiny(block_size=T, d_ff=F, expert_ffn=Fe, num_experts=[2, 4], k=1, use_residual=True)
    m = GPT(cfg)
    emb = Vb * D + T * D
    ln = 2 * D
    attn = ln + (D * 3 * D + 3 * D) + (D * D + D)
    dense_mlp = ln + (D * F + F) + (F * D + D)
    expert = D * Fe + Fe * D  # w1 + w2, no biases

    def moe(E):  # gate (no bias) + experts + residual MLP (a copy of the expert: no biases) + Linear(D, 2)
        return ln + E * D + E * expert + expert + (2 * D + 2)

    total = emb + 4 * attn + 2 * dense_mlp + moe(2) + moe(4) + ln  # + ln_f; lm_head tied
    active = total - (2 - 1) * expert - (4 - 1) * expert
    counts = m.num_parameters()
    assert counts == {"total": total, "active": active, "embedding": emb}

    k2 = GPT(tiny(block_size=T, d_ff=F, expert_ffn=Fe, num_experts=[2, 4], k=2)).num_parameters()
    assert k2["total"] - k2["active"] == (4 - 2) * expert  # layer with 2 experts: both active


def test_gpt2_init_scales_residual_projections():
    m = model(n_layer=4, d_model=64, num_experts=8)
    std = 0.02 / (2 * 4) ** 0.5
    assert abs(m.blocks[0].attn.c_proj.weight.std().item() - std) < 0.2 * std
    assert abs(m.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.1 * 0.02
    assert abs(m.blocks[1].mlp.experts.w2.std().item() - std) < 0.1 * std
    assert m.blocks[0].attn.c_attn.bias.abs().sum() == 0


def test_moe_args_are_one_object_passed_down():
    from raymoe.config import MoEArgs

    args = MoEArgs(k=2, capacity_factor=1.5, noisy_gate_policy="Jitter", drop_tokens=False, z_loss_coef=0.1)
    m = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, d_model=16, num_experts=[4], moe=args))
    [layer] = m.moe_modules()
    assert layer.args == args and layer.k == 2 and layer.capacity_factor == 1.5 and not layer.drop_tokens
    # DeepSpeed-style keywords build the same object
    assert MoE(16, 32, num_experts=4, k=2, capacity_factor=1.5, noisy_gate_policy="Jitter", drop_tokens=False,
               z_loss_coef=0.1).args == args


def test_checkpoint_configs_with_flat_routing_keys_still_load():
    """Checkpoints written before the routing options were grouped store them at the top level."""
    flat = {**tiny(num_experts=4).to_dict(), "k": 2, "noisy_gate_policy": "RSample"}
    del flat["moe"]
    cfg = GPTConfig.from_dict(flat)
    assert cfg.moe.k == 2 and cfg.moe.noisy_gate_policy == "RSample"
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_validation_and_inference_routing_draw_nothing_and_settings_are_restored(tmp_path):
    import numpy as np

    from raymoe.platform.data import TokenDataset
    from raymoe.platform.training import window_loss_sums

    m = GPT(tiny(num_experts=4, k=2, drop_tokens=False))  # DeepSpeed top-2 samples its 2nd expert in eval too
    m.eval()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(1)
        a = m(idx).logits
        torch.manual_seed(2)
        assert not torch.equal(a, m(idx).logits)  # eval mode draws, as in DeepSpeed
        with m.deterministic_routing():
            torch.manual_seed(1)
            b = m(idx).logits
            torch.manual_seed(2)
            assert torch.equal(b, m(idx).logits)
    assert not any(x.deterministic for x in m.moe_modules())  # restored
    with m.dropless():
        assert all(x.deterministic and not x.drop_tokens for x in m.moe_modules())
    assert not any(x.deterministic for x in m.moe_modules())

    np.save(tmp_path / "tokens.npy", (np.arange(400) * 7 % V).astype(np.uint16))
    ds = TokenDataset(tmp_path / "tokens.npy")
    torch.manual_seed(1)
    first = window_loss_sums(m, ds, [0, 16, 32], block_size=16, micro_batch=2)
    torch.manual_seed(2)
    assert window_loss_sums(m, ds, [0, 16, 32], block_size=16, micro_batch=2) == first
