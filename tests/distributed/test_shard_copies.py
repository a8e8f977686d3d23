"""A membership change moves shards, not whole models (raymoe.platform.reshard): every rank of an old world
keeps its copy (local_shards); the copies are published as pieces (each distinct piece once: choose_sources,
piece_data); each rank of a new world of another size, EP layout and sharding mode, built at its layout, fetches
only the pieces overlapping its own tensors and copies them in (assemble). Its parameters and AdamW state then
equal the old world's gathered state exactly, and it fetched its share plus the rest of the pieces it overlaps,
never the whole state. Old and new worlds are spawned gloo worlds; the object store is a list in this process."""

from __future__ import annotations

import pytest
import torch

import ep_harness as H
from raymoe.platform import reshard

SHARD = {"dense": "shard", "experts": "shard"}
# name: (old world, new world); every case trains 2 steps of k1_drop (4 experts a layer) in the old world
CASES = {
    # expert-sharded at EP=2 -> 3 ranks, EP=1, experts replicated, dense sharded unevenly (257 rows over 3)
    "2to3": (dict(world=2, ep=2, sharding=SHARD), dict(world=3, ep=1, sharding={"dense": "shard"})),
    # 4 experts sharded over 3 ranks (2, 2 and none) -> replicated at EP=2
    "3to2": (dict(world=3, ep=1, sharding=SHARD), dict(world=2, ep=2)),
    # 2 experts over 4 ranks (sharded along the model dim) -> EP=2, one expert a rank, dense sharded
    "4to2": (dict(world=4, ep=1, sharding=SHARD, model={"num_experts": 2}),
             dict(world=2, ep=2, sharding=SHARD, model={"num_experts": 2})),
}


def _layout_free(run) -> dict:
    """Every entry of the model's state and of AdamW's, whole (gathered): dense ones by key, expert entries
    one row per global expert id."""
    from raymoe.platform import fsdp

    out = {}
    with fsdp.gathered(run.model, run.opt):
        rows = {f"{n}.": list(m.global_expert_ids) for n, m in run.model.named_modules()
                if hasattr(m, "global_expert_ids")}
        names = {id(p): n for n, p in run.model.named_parameters()}
        entries = [(("model", n), t) for n, t in run.model.state_dict().items()]
        entries += [(("opt", names[id(p)], s), v) for p, st in run.opt.state.items() for s, v in st.items()]
        for key, t in entries:
            ids = next((ids for prefix, ids in rows.items() if key[1].startswith(prefix)), None)
            if ids is not None and t.dim() and t.shape[0] == len(ids):
                out.update({(*key, int(g)): t[j].detach().clone() for j, g in enumerate(ids)})
            else:
                out[key] = t.detach().clone()
    return out


def old_job(rank: int, world: int, job: dict) -> dict:
    """Two steps; then this rank's copy of what it holds, its layout-free state and the bytes it holds."""
    from raymoe.platform.fsdp import local_bytes

    run = H._Run(rank, world, job)
    run.steps(0, 2)
    held = local_bytes(run.model.state_dict().values()) + local_bytes(
        v for st in run.opt.state.values() for v in st.values())
    return {"copy": reshard.local_shards(run.model, run.opt), "state": _layout_free(run), "held_bytes": held}


def new_job(rank: int, world: int, job: dict) -> dict:
    """A fresh model at the new layout filled from the published copies; without old rank 1's pieces first,
    which must fail (its shards are nowhere else)."""
    run = H._Run(rank, world, job)
    store = job["store"]
    fetch = lambda handles: [store[h] for h in handles]  # noqa: E731
    partial = [c if i != 1 else {**c, "pieces": []} for i, c in enumerate(job["published"])]
    try:
        reshard.assemble(run.model, run.opt, partial, fetch)
        incomplete = None
    except ValueError as exc:
        incomplete = str(exc)
    run.opt.state.clear()
    stats = reshard.assemble(run.model, run.opt, job["published"], fetch)
    return {"state": _layout_free(run), "stats": stats, "incomplete": incomplete}


def _publish(copies: list[dict]) -> tuple[list[dict], list]:
    """The copies' pieces put in a list (the object store), each distinct piece once: as the holders do."""
    store: list = []
    layouts = [reshard.describe(c) for c in copies]
    out = []
    for c, layout, which in zip(copies, layouts, reshard.choose_sources([lay["pieces"] for lay in layouts])):
        refs = []
        for t in reshard.piece_data(c, which):
            refs.append(len(store))
            store.append(t)
        out.append(reshard.published(layout, which, refs))
    return out, store


def world_job(rank: int, world: int, job: dict) -> dict:
    """An "old" or a "new" job (one spawned world runs jobs of both kinds)."""
    return (old_job if job["kind"] == "old" else new_job)(rank, world, job)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = H.token_file(tmp_path_factory)
    old: dict = {}

    def spec(name: str, kind: str) -> dict:
        o, n = CASES[name]
        s = o if kind == "old" else n
        out = dict(kind=kind, config="k1_drop", data=d, **{k: v for k, v in s.items() if k != "world"})
        if kind == "new":
            out["published"], out["store"] = _publish([r["copy"] for r in old[name]])
        return out

    def run(world: int, jobs: list[tuple[str, str]]) -> list:
        ranks = H.gloo_world.spawn(world, world_job, [spec(name, kind) for name, kind in jobs], timeout=240)
        return [[r[i] for r in ranks] for i in range(len(jobs))]

    # four worlds, each running the jobs of its size whose inputs are there
    (old["2to3"],) = run(2, [("2to3", "old")])
    old["3to2"], new_2to3 = run(3, [("3to2", "old"), ("2to3", "new")])
    (old["4to2"],) = run(4, [("4to2", "old")])
    new = dict(zip(("3to2", "4to2"), run(2, [("3to2", "new"), ("4to2", "new")])), **{"2to3": new_2to3})
    return {name: {"old": old[name], "new": new[name],
                   "store_bytes": sum(t.numel() * t.element_size() for t in _publish(
                       [r["copy"] for r in old[name]])[1])} for name in CASES}


def _copy_bytes(copy: dict) -> int:
    return sum(t.numel() * t.element_size() for part in ("tensors", "opt") for t in copy[part].values()
               if torch.is_tensor(t))


@pytest.mark.parametrize("name", list(CASES))
def test_a_new_world_assembles_the_old_worlds_state_from_pieces(results, name):
    res = results[name]
    want: dict = {}
    for r in res["old"]:  # the old world's whole state (replicas agree: any rank's)
        for k, t in r["state"].items():
            want.setdefault(k, t)
    assert any(k[0] == "opt" for k in want)  # AdamW state (exp_avg, exp_avg_sq, step) is compared too
    got: dict = {}
    for rank, r in enumerate(res["new"]):
        for k, t in r["state"].items():
            assert k in want, (rank, k)
            assert t.dtype == want[k].dtype and torch.equal(t, want[k]), (name, rank, k)
            got[k] = t
    assert got.keys() == want.keys()  # every expert of every layer is somewhere in the new world
    whole: dict = {}  # bytes of each whole tensor (an expert entry: all its rows)
    for k, t in want.items():
        tensor = k[:2] if k[0] == "model" else k[:3]  # without the expert id
        whole[tensor] = whole.get(tensor, 0) + t.numel() * t.element_size()
    for rank, r in enumerate(res["new"]):
        st = r["stats"]
        # fetched one tensor's pieces at a time: at most one whole tensor beyond what it holds
        assert 0 < st["largest_fetch_bytes"] <= max(whole.values()), (rank, st)
        # its share, plus the parts of the pieces it overlaps that other ranks need; not the whole state
        assert st["share_bytes"] <= st["fetched_bytes"] <= 3 * st["share_bytes"], (rank, st)
        assert st["fetched_bytes"] < res["store_bytes"], (rank, st, res["store_bytes"])
        # old rank 1's shards are in no other copy
        assert r["incomplete"] is not None and "cover" in r["incomplete"], r["incomplete"]
    # a copy is what its rank holds of the parameters, buffers and AdamW state: a fraction of the whole
    sizes = [_copy_bytes(r["copy"]) for r in res["old"]]
    assert all(s <= r["held_bytes"] for s, r in zip(sizes, res["old"]))
    assert max(sizes) < 0.75 * sum(sizes)
