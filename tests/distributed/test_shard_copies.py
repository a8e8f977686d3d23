"""Elastic recovery's in-memory copies of a rank's shards (raymoe.platform.reshard.local_shards): every rank's
copy, put back together without a process group (full_parts), gives the same checkpoint files as the
collective export of the live world: uneven FSDP shards (257 embedding rows over 4 ranks), experts sharded over
their EDP group at EP=2, dense-only sharding (one spawned gloo world of 4)."""

from __future__ import annotations

import pytest
from safetensors.torch import load as st_load

import ep_harness as H
from raymoe.platform import reshard

SHARD = {"dense": "shard", "experts": "shard"}
CASES = {"ep1s": dict(ep=1, sharding=SHARD), "ep2s": dict(ep=2, sharding=SHARD),
         "ep2d": dict(ep=2, sharding={"dense": "shard"})}


def copies_job(rank: int, world: int, job: dict) -> dict:
    """Two steps; then this rank's copy of its shards, the files it exports with the others (collective), and
    the bytes of the training state it holds."""
    from raymoe.actors.shard_state import ShardState
    from raymoe.platform.fsdp import local_bytes

    run = H._Run(rank, world, job)
    run.steps(0, 2)
    state = ShardState(run.model, run.opt, keep_undo=False)
    held = local_bytes(run.model.state_dict().values()) + local_bytes(
        v for st in run.opt.state.values() for v in st.values())
    return {"copy": state.shard_copy(), "parts": state.export_parts(2, dense=rank == 0), "held_bytes": held}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = H.token_file(tmp_path_factory)
    per_rank = H.gloo_world.spawn(4, copies_job, [dict(config="k1_drop", data=d, **kw) for kw in CASES.values()],
                                  timeout=300)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(CASES)}


def _copy_bytes(copy: dict) -> int:
    return sum(t.numel() * t.element_size() for part in ("tensors", "opt") for t in copy[part].values())


@pytest.mark.parametrize("name", list(CASES))
def test_copies_of_every_rank_rebuild_the_exported_files(results, name):
    ranks = results[name]
    rebuilt = reshard.full_parts({r: res["copy"] for r, res in enumerate(ranks)}, 2)
    expected: dict[str, bytes] = {}
    for res in ranks:
        expected.update(res["parts"])
    assert sorted(rebuilt) == sorted(expected)
    for file in (f for f in expected if f.endswith(".safetensors")):
        want, got = st_load(expected[file]), st_load(rebuilt[file])
        assert want.keys() == got.keys(), file
        assert all(want[k].equal(got[k]) for k in want), file
    # a copy is what its rank holds of the parameters, buffers and AdamW state: a fraction of the whole
    sizes = [_copy_bytes(res["copy"]) for res in ranks]
    assert all(s <= res["held_bytes"] for s, res in zip(sizes, ranks))
    assert max(sizes) < 0.5 * sum(sizes)
    # without a lost rank's copy there is nothing to rebuild its shards from
    with pytest.raises(ValueError, match=r"no copy of rank\(s\) \[1\]: their shards are lost"):
        reshard.full_parts({r: res["copy"] for r, res in enumerate(ranks) if r != 1}, 2)
