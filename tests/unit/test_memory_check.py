"""The shard's memory check (raymoe.actors.shard_state): the training state over cluster.memory_per_worker_gb is
an error at once; after the first optimizer step the process's peak RSS above its baseline is measured, handed
to ``on_peak_rss`` (the shard's metric) and printed, with a warning when it is over the limit; after every later
step it is handed on again, with one warning the first time it is over."""

import pytest
import torch

from raymoe.actors import shard_state
from raymoe.actors.shard_state import ShardState, peak_rss, rss_baseline
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.train_step import build_optimizer, train_step


def _state(limit):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=32, num_experts=2))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    return model, opt, ShardState(model, opt, keep_undo=False, memory_limit=limit, rank=3)


def _first_step(model, opt):
    x = torch.randint(0, 64, (2, 16))
    train_step(model, opt, [(x, x.roll(1, 1))], lr=1e-2, grad_clip=1.0)


def test_baseline_is_taken_once_and_rss_is_in_bytes():
    base = rss_baseline()
    assert rss_baseline() == base and 0 < base <= peak_rss()
    assert peak_rss() > 10 * 2**20  # a Python process with torch: bytes, not KiB


@pytest.mark.parametrize("over", [False, True])
def test_peak_rss_above_the_baseline_is_checked_after_the_first_step(monkeypatch, capsys, over):
    limit = 256 * 2**20  # the tiny model's state and step are far below; the baseline puts its RSS above or not
    monkeypatch.setattr(shard_state, "_rss_baseline", peak_rss() - (2 * limit if over else 0))
    model, opt, state = _state(limit)
    seen = []
    state.on_peak_rss = seen.append
    assert not seen and "peak RSS" not in capsys.readouterr().out  # before any step: the state only
    _first_step(model, opt)
    out = capsys.readouterr()
    assert len(seen) == 1 and (seen[0] > limit) == over
    assert "shard 3: peak RSS" in (out.err if over else out.out)
    assert ("WARNING" in out.err and "over the limit" in out.err) == over
    _first_step(model, opt)  # every later step reports its peak again, warning at most once
    out = capsys.readouterr()
    assert len(seen) == 2 and "WARNING" not in out.err and "peak RSS" not in out.out


def test_a_later_step_over_the_limit_warns_once(monkeypatch, capsys):
    # under the limit after the first step; a later peak (a checkpoint write, an evaluation) goes over it
    limit = 256 * 2**20
    monkeypatch.setattr(shard_state, "_rss_baseline", peak_rss())
    model, opt, state = _state(limit)
    seen = []
    state.on_peak_rss = seen.append
    _first_step(model, opt)
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.setattr(shard_state, "_rss_baseline", peak_rss() - 2 * limit)
    state.begin_step(1)
    _first_step(model, opt)
    state.begin_step(2)
    _first_step(model, opt)
    err = capsys.readouterr().err
    assert len(seen) == 3 and seen[1] > limit and seen[2] > limit
    assert err.count("WARNING") == 1 and "shard 3: peak RSS" in err and "by step 2" in err


def test_training_state_over_the_limit_is_an_error():
    with pytest.raises(ValueError, match=r"shard 3: training state .* exceeds cluster.memory_per_worker_gb"):
        _state(1024)
