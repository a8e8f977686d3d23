"""The elastic per-step undo copy (raymoe.actors.shard_state) on one process: undoing a step restores the model
and the AdamW state exactly, the step then runs again to the same result, and the copy reuses its buffers."""

import pytest
import torch

from raymoe.actors.shard_state import ShardState
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.train_step import build_optimizer, train_step


def _setup(keep_undo=True):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, num_experts=4,
                          moe_layers=[1], tie_embeddings=True))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    return model, opt, ShardState(model, opt, keep_undo=keep_undo)


def _step(model, opt, state, step):
    torch.manual_seed(step)  # the router draws (random token selection): a rerun step draws the same
    x = torch.randint(0, 64, (2, 16))
    state.begin_step(step)
    return train_step(model, opt, [(x, x.roll(1, 1))], lr=1e-2 * (step + 1), grad_clip=1.0).loss


def _snapshot(model, opt):
    # (the learning rate is not compared: the loop sets it before each step)
    sd = opt.state_dict()
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()})


def _assert_equal(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        assert a[0][k].equal(b[0][k]), k
    for i in a[1]:
        for k, v in a[1][i].items():
            assert v.equal(b[1][i][k]) if torch.is_tensor(v) else v == b[1][i][k], (i, k)


def test_rollback_restores_state_and_the_step_reruns_identically():
    ref_model, ref_opt, ref_state = _setup(keep_undo=False)
    ref_losses = [_step(ref_model, ref_opt, ref_state, s) for s in range(3)]
    model, opt, state = _setup()
    losses = [_step(model, opt, state, s) for s in range(2)]
    after_two = _snapshot(model, opt)
    _step(model, opt, state, 2)
    assert state.rollback(2) == 1
    _assert_equal(_snapshot(model, opt), after_two)
    assert state.rollback(2) == 1  # a second undo of the same step changes nothing
    losses.append(_step(model, opt, state, 2))
    assert losses == ref_losses
    _assert_equal(_snapshot(model, opt), _snapshot(ref_model, ref_opt))


def test_rollback_of_the_first_step_clears_adamw_state():
    model, opt, state = _setup()
    before = _snapshot(model, opt)
    _step(model, opt, state, 0)
    assert state.rollback(0) == -1
    assert not opt.state  # AdamW initialises its state again when the step is rerun
    _assert_equal(_snapshot(model, opt), before)


def test_undo_copy_reuses_its_buffers_and_counts_tied_weights_once():
    model, opt, state = _setup()
    for s in range(2):
        _step(model, opt, state, s)
    ptrs = {k: t.data_ptr() for k, t in state._undo["tensors"].items()}
    _step(model, opt, state, 2)
    assert {k: t.data_ptr() for k, t in state._undo["tensors"].items()} == ptrs  # no fresh copy per step
    params = {id(p): p for p in model.parameters()}.values()
    adam = [v for st in opt.state.values() for v in st.values()]
    param_ids = {id(p) for p in params}
    sd = model.state_dict(keep_vars=True)  # persistent buffers only (the others are not model state)
    buffers = [b for b in sd.values() if id(b) not in param_ids]
    expected = sum(t.numel() * t.element_size() for t in [*params, *adam, *buffers])
    assert state.undo_bytes() == expected


def test_state_bytes_projected_before_the_first_step_equal_measured_after():
    model, opt, state = _setup()
    projected = state.state_bytes()
    _step(model, opt, state, 0)
    params = list({id(p): p for p in model.parameters()}.values())
    assert 0 <= state.state_bytes() - projected <= 16 * len(params)  # AdamW's scalar step counts, not projected
    params = sum(p.numel() * p.element_size() for p in params)
    assert projected >= 7 * params  # parameters, gradients, two AdamW tensors, and the undo copy of three


def test_memory_limit_names_the_setting():
    model, opt, state = _setup()
    need = state.state_bytes()
    ShardState(model, opt, keep_undo=False, memory_limit=need)  # without the undo copy it fits
    with pytest.raises(ValueError, match=r"shard 3: training state .* exceeds cluster.memory_per_worker_gb"):
        ShardState(model, opt, keep_undo=True, memory_limit=need - 1, rank=3)
