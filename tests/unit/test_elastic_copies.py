"""Which copies elastic recovery takes a lost world's state from (Elastic._from_copies), with fake shards:
the survivors' live state and own copies, the lost ranks' copies at their buddies, all at one step."""

from __future__ import annotations

from types import SimpleNamespace

from raymoe.actors import elastic as E
from raymoe.platform.reshard import choose_sources


class _Call:
    def __init__(self, fn):
        self.remote = fn


class _Shard:
    """A survivor of rank ``rank`` holding ``held`` copies: (kind, rank, step); its live state is at ``live``."""

    def __init__(self, rank: int, live: int, held: list[tuple]):
        self.held = [{"kind": "live", "rank": rank, "step": live}] + [
            {"kind": k, "rank": r, "step": s} for k, r, s in held]
        self.copies_held = _Call(lambda: self.held)


def _elastic(world: int, alive: list) -> E.Elastic:
    group = SimpleNamespace(shards=[None] * world, gather=lambda refs, timeout=None: refs)
    return E.Elastic(None, group, {1: 4}, None, None, lambda event: None)


def test_the_lost_shard_comes_from_its_buddy_at_the_step_the_survivors_are_at():
    # world 3, rank 1 lost at step 4: rank 2 (its buddy) holds its copy of step 4 and, for a moment, of step 5
    alive = [_Shard(0, 4, [("buddy", 2, 4)]), _Shard(2, 4, [("buddy", 1, 4), ("buddy", 1, 5)])]
    found = _elastic(3, alive)._from_copies(alive, 4)
    assert found["step"] == 4
    assert found["sources"] == [(alive[0], "live", 0, 4), (alive[1], "buddy", 1, 4), (alive[1], "live", 2, 4)]
    assert found["copies"] == {"step": 4, "live": [0, 2], "buddy": [1]}


def test_a_shard_lost_with_its_buddy_leaves_no_complete_set():
    # world 3, ranks 1 and 2 lost: rank 1's copy was at rank 2; rank 0 holds only rank 2's
    alive = [_Shard(0, 4, [("buddy", 2, 4)])]
    assert _elastic(3, alive)._from_copies(alive, 4) == {"copies_missing": [1]}


def test_copies_every_few_steps_go_back_to_the_newest_step_every_rank_has():
    # buddy_interval 2: the survivors are at step 3, the copies (own and buddy) at step 2
    alive = [_Shard(0, 3, [("own", 0, 2), ("buddy", 2, 2)]), _Shard(2, 3, [("own", 2, 2), ("buddy", 1, 2)])]
    found = _elastic(3, alive)._from_copies(alive, 3)
    assert found["step"] == 2 and [s[1:] for s in found["sources"]] == [("own", 0, 2), ("buddy", 1, 2),
                                                                        ("own", 2, 2)]
    assert found["copies"] == {"step": 2, "own": [0, 2], "buddy": [1]}


def test_each_piece_is_published_once_and_replicas_are_spread_over_their_holders():
    def piece(name, region, nbytes=8):
        return {"key": ("model", name), "region": region, "nbytes": nbytes}
    # two copies: a replicated tensor each holds whole (two of them), a sharded one split between them
    a = [piece("r1", ((0, 4),)), piece("r2", ((0, 4),)), piece("s", ((0, 2),), 4)]
    b = [piece("r1", ((0, 4),)), piece("r2", ((0, 4),)), piece("s", ((2, 4),), 4)]
    which = choose_sources([a, b])
    chosen = [(c, layout[i]["key"][1]) for c, (layout, w) in enumerate(zip([a, b], which)) for i in w]
    assert sorted(name for _, name in chosen) == ["r1", "r2", "s", "s"]  # each replica once, both shards
    assert {name for c, name in chosen if name != "s"} == {"r1", "r2"} and len({c for c, n in chosen
                                                                               if n != "s"}) == 2
