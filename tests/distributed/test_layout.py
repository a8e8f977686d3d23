"""Placement, layout validation, group lists, segment re-sorting and noise seeds (no processes)."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform import parallel
from raymoe.platform.moe.comm import transpose_segments
from raymoe.platform.model import GPT, GPTConfig


def test_expert_placement_is_contiguous():
    assert parallel.expert_placement(8, 4, 0) == [0, 1]
    assert parallel.expert_placement(8, 4, 3) == [6, 7]
    assert sum((parallel.expert_placement(12, 3, r) for r in range(3)), []) == list(range(12))
    with pytest.raises(ValueError, match="ep_size=3"):
        parallel.expert_placement(8, 3, 0)
    with pytest.raises(ValueError, match="ep_rank=4"):
        parallel.expert_placement(8, 4, 4)


@pytest.mark.parametrize("experts,world,max_ep,want", [
    (8, 4, None, 4), (8, 6, None, 2), (6, 4, None, 2), (7, 4, None, 1), (16, 8, 4, 4), (64, 12, None, 4),
    (8, 1, None, 1),
])
def test_choose_ep_size(experts, world, max_ep, want):
    assert parallel.choose_ep_size(experts, world, max_ep) == want


def test_layout_validation_names_layer_ep_and_world():
    with pytest.raises(ValueError, match=r"layer 3: ep_size=3 must .* world_size=4"):
        parallel.ParallelLayout(4, {1: 2, 3: 3})
    with pytest.raises(ValueError, match=r"layer 1: ep_size=4 must divide its num_experts=6"):
        parallel.ParallelLayout(4, {1: 4}, num_experts={1: 6})
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, d_model=16, num_experts=[4, 8])
    lay = parallel.ParallelLayout.from_config(cfg, 8)
    assert lay.ep_sizes == {1: 4, 3: 8} and lay.edp_size(1) == 2 and lay.ep_size(0) == 1
    assert parallel.ParallelLayout.from_config(cfg, 4, 2).ep_sizes == {1: 2, 3: 2}
    with pytest.raises(ValueError, match="not MoE layers"):
        parallel.ParallelLayout.from_config(cfg, 4, {0: 2})
    with pytest.raises(ValueError, match="layer 1: ep_size=8"):
        parallel.ParallelLayout.from_config(cfg, 8, 8)


def test_group_lists_follow_deepspeed_layout():
    lay = parallel.ParallelLayout(8, {1: 4, 3: 2})
    groups = parallel._group_lists(lay, ranks_per_node=2)
    by = {}
    for kind, ep, ranks in groups:
        by.setdefault((kind, ep), []).append(ranks)
    assert by[("ep", 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # contiguous
    assert by[("edp", 4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # strided
    assert by[("ep", 2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert by[("edp", 2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert by[("intra", 4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert by[("inter", 4)] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ("intra", 2) not in by  # an EP group inside one node needs no hierarchy
    assert groups == parallel._group_lists(lay, ranks_per_node=2)  # same order on every rank


def test_world1_needs_no_process_group():
    lay = parallel.ParallelLayout(1, {1: 1})
    pg = parallel.build_process_groups(lay, 0)
    assert pg.world is None and pg.is_first_expert_replica
    kw = parallel.make_moe_kwargs(lay, pg)
    assert kw(1, 4) == {"ep_size": 1}


def _reference_transpose(counts_AB):
    A, B = counts_AB.shape
    starts = torch.cumsum(counts_AB.reshape(-1), 0) - counts_AB.reshape(-1)
    idx = []
    for b in range(B):
        for a in range(A):
            s = int(starts[a * B + b])
            idx += range(s, s + int(counts_AB[a, b]))
    return torch.tensor(idx, dtype=torch.long)


@pytest.mark.parametrize("shape", [(2, 3), (4, 2), (3, 5)])
def test_transpose_segments_matches_reference_and_inverts(shape):
    g = torch.Generator().manual_seed(sum(shape))
    counts = torch.randint(0, 4, shape, generator=g)
    counts[0, 0] = 0  # empty segments anywhere
    idx = transpose_segments(counts)
    assert torch.equal(idx, _reference_transpose(counts))
    inv = transpose_segments(counts.t())
    assert torch.equal(idx[inv], torch.arange(int(counts.sum())))
    assert transpose_segments(counts[:1]) is None


def test_noise_seeds_follow_the_global_micro_batch_index():
    assert parallel.micro_batch_seed(1, 2, 3) == parallel.micro_batch_seed(1, 2, 3)
    assert len({parallel.micro_batch_seed(1, s, i) for s in range(4) for i in range(4)}) == 16
    cfg = GPTConfig.from_dict(dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, num_experts=4,
                    noisy_gate_policy="RSample"))
    model = GPT(cfg)
    draws = []
    model.blocks[1].mlp.register_forward_pre_hook(lambda m, a: draws.append(torch.rand(1).item()))
    x = torch.zeros(1, 8, dtype=torch.long)
    # world 1 with 4 micro-batches vs rank 1 of world 2 (2 micro-batches each): same draws for micro 2, 3
    parallel.seed_router_noise(7, 5, 0, model=model, micro_batches=4)
    for _ in range(4):
        model(x)
    w1 = list(draws)
    draws.clear()
    parallel.seed_router_noise(7, 5, 1, model=model, micro_batches=2)
    model(x)
    model(x)
    assert draws == w1[2:]
    model.eval()
    draws.clear()
    model(x)  # eval forwards are not reseeded and do not advance the micro-batch counter
    with pytest.raises(ValueError, match="micro_batches"):
        parallel.seed_router_noise(7, 5, 1, model=model)
