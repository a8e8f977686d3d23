"""Micro-batches of a step over any world size: each rank a contiguous run, counts differing by at most one,
every micro-batch once; padding passes even the ranks out; a padding pass changes nothing of a step."""

import numpy as np
import pytest
import torch

from raymoe.platform.data import (TokenDataset, build_token_file, micro_batch_assignment, padding_passes,
                                  rank_micro_batches, rank_window_starts, sample_batch)


@pytest.mark.parametrize("num_micro", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_assignment_covers_every_micro_batch_once_counts_within_one(num_micro, world):
    parts = [micro_batch_assignment(num_micro, world, r) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(num_micro))  # contiguous, in rank order, each once
    counts = [len(p) for p in parts]
    assert max(counts) - min(counts) <= 1
    passes = [c + padding_passes(num_micro, world, r) for r, c in enumerate(counts)]
    assert passes == [-(-num_micro // world)] * world  # every rank runs the same number of passes
    if num_micro % world == 0:  # the even split is unchanged: rank r runs r*n .. (r+1)*n - 1
        n = num_micro // world
        assert parts == [range(r * n, (r + 1) * n) for r in range(world)]


def test_assignment_argument_errors():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\)"):
        micro_batch_assignment(4, 3, 3)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        micro_batch_assignment(4, 0, 0)
    with pytest.raises(ValueError, match="micro_batch=3 must divide the 8 windows"):
        rank_window_starts(np.arange(8), 3, 2, 0)


def test_padding_windows_repeat_a_real_micro_batch():
    starts = np.arange(100, 108)  # 4 micro-batches of 2 windows
    assert [rank_window_starts(starts, 2, 3, r)[1] for r in range(3)] == [0, 1, 1]
    rows, pad = rank_window_starts(starts, 2, 3, 2)  # micro-batch 3, then a repeat of it
    assert pad == 1 and rows.tolist() == [106, 107, 106, 107]
    rows, pad = rank_window_starts(starts, 4, 3, 2)  # 2 micro-batches, 3 ranks: rank 2 only pads
    assert pad == 1 and rows.tolist() == [100, 101, 102, 103]


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
    return TokenDataset(build_token_file(None, tmp_path_factory.mktemp("tok"))).split(0.1, block_size=16)[0]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_rows_stacked_equal_world1(train_ds, world):
    x1, y1 = sample_batch(train_ds, 5, 2, 0, 1, 8, 16)
    parts = [sample_batch(train_ds, 5, 2, r, world, 8, 16, micro_batch=2) for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)
    for r in range(world):
        passes = rank_micro_batches(train_ds, 5, 2, r, world, 8, 2, 16)
        assert passes.first == micro_batch_assignment(4, world, r).start
        real = passes.batches[:len(passes.batches) - passes.padding]
        assert torch.equal(torch.cat([b[0] for b in real]), parts[r][0])


def test_padding_pass_changes_nothing(train_ds):
    """train_step with a padding pass (weight 0) after the real micro-batches: the same loss, metrics, grads,
    weights and expert-bias loads as without it, on a model with jitter, RTS dropping and expert bias."""
    from raymoe.platform.model import GPT, GPTConfig
    from raymoe.platform.train_step import build_optimizer, train_step

    cfg = GPTConfig.from_dict(dict(vocab_size=257, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                   expert_ffn=32, num_experts=4, k=1, capacity_factor=1.0, min_capacity=1,
                                   use_rts=True, noisy_gate_policy="Jitter", expert_bias=True, dropout=0.0))
    batches = rank_micro_batches(train_ds, 1, 0, 0, 1, 4, 2, 16).batches
    results = []
    for padding in (0, 1):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
        loads = []  # what each layer's expert-bias update sees
        for m in model.moe_modules():
            m.update_expert_bias = lambda m=m, update=m.update_expert_bias: (loads.append(m.expert_load.clone()),
                                                                            update())
        torch.manual_seed(1)  # the same draws for the real passes; the padding pass comes after them
        res = train_step(model, opt, batches + batches[:padding], lr=1e-2, total_micro_batches=2, padding=padding)
        results.append((res, {k: v.clone() for k, v in model.state_dict().items()}, loads))
    (a, wa, la), (b, wb, lb) = results
    assert (a.loss, a.ce_loss, a.aux_loss, a.grad_norm, a.tokens) == (b.loss, b.ce_loss, b.aux_loss, b.grad_norm,
                                                                         b.tokens)
    assert (a.expert_counts, a.dropped_fraction, a.l_aux) == (b.expert_counts, b.dropped_fraction, b.l_aux)
    assert all(x.equal(y) for x, y in zip(la, lb)) and la[0].sum() > 0  # the padding pass's loads are undone
    for k in wa:
        assert wa[k].equal(wb[k]), k


def test_train_step_rejects_bad_counts(train_ds):
    from raymoe.platform.model import GPT, GPTConfig
    from raymoe.platform.train_step import build_optimizer, train_step

    model = GPT(GPTConfig.from_dict(dict(vocab_size=257, block_size=16, n_layer=1, n_head=2, d_model=16)))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    batches = rank_micro_batches(train_ds, 1, 0, 0, 1, 4, 2, 16).batches
    with pytest.raises(ValueError, match="total_micro_batches"):
        train_step(model, opt, batches, lr=1e-2, total_micro_batches=1)
    with pytest.raises(ValueError, match="padding"):
        train_step(model, opt, batches, lr=1e-2, padding=3)


def test_config_allows_any_world_and_names_the_field_when_the_default_micro_batch_cannot_split():
    from raymoe.config import load_config

    # 3 shards, 4 micro-batches of 2: fine (2, 1 and 1 per shard)
    load_config(None, ["cluster.mode=ray", "cluster.num_workers=3", "train.global_batch_size=8",
                       "train.micro_batch_size=2"])
    with pytest.raises(ValueError, match=r"train.micro_batch_size is unset.*num_workers=3 does not divide "
                                         r"train.global_batch_size=8.*one of \[1, 2, 4, 8\]"):
        load_config(None, ["cluster.mode=ray", "cluster.num_workers=3", "train.global_batch_size=8"])
    with pytest.raises(ValueError, match=r"cluster.ranks_per_node=2 must divide cluster.num_workers=3.*\[1, 3\]"):
        load_config(None, ["cluster.mode=ray", "cluster.num_workers=3", "train.micro_batch_size=2",
                           "cluster.ranks_per_node=2"])


def test_elastic_keeps_the_largest_world_whether_or_not_it_divides_the_micro_batches():
    from raymoe.actors.elastic import Elastic
    from raymoe.config import load_config

    base = ["cluster.mode=ray", "cluster.num_workers=16", "train.global_batch_size=16", "cluster.min_workers=2"]
    elastic = Elastic(load_config(None, base), None, {}, None, None, None)
    assert [elastic.choose_world(n) for n in (20, 16, 15, 7, 2)] == [16, 16, 15, 7, 2]  # losing 1 of 16 keeps 15
    with pytest.raises(RuntimeError, match="cluster.min_workers=2"):
        elastic.choose_world(1)
    per_node = Elastic(load_config(None, base + ["cluster.ranks_per_node=4"]), None, {}, None, None, None)
    assert per_node.choose_world(15) == 12  # EP groups of whole nodes
