"""Checkpoints of FSDP2-sharded state without whole tensors on every rank (spawned gloo worlds).

A world of 2 at EP=2, dense sharded, writes checkpoint 2 and trains on; worlds of 1 (replicated), 2 (replicated
and sharded) and 4 (EP=4 and EP=2, sharded) load it, write it again and train the same steps. Every load
continues with the uninterrupted run's losses and writes byte-identical files (the same weights and AdamW
state: the files are layout-free); while saving, a rank holds at most one whole tensor beyond its shards, and
while loading it reads only the bytes of what it holds. Experts sharded along the model dim (one local expert,
two replicas) are written and read too, a copy at an S3 URI (tests/s3_server.py) loads sharded, and
``model.init_from`` loads into a sharded rank (build_rank) the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckpt_harness as C
import ep_harness as H

from raymoe.platform import storage

TOL = 1e-5
SHARD = {"dense": "shard", "experts": "shard"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server):
    data = H.token_file(tmp_path_factory)
    d = lambda name: str(tmp_path_factory.mktemp(name))  # noqa: E731
    src, src2 = d("written"), d("written_e2")
    two = {"num_experts": 2}

    def resume(name, **kw):
        return name, dict(kind="resume", config="k1_drop", data=data, dir=src, out=d(name.replace("/", "_")), **kw)

    world2 = [("save", dict(kind="save", config="k1_drop", data=data, dir=src, ep=2, sharding=SHARD)),
              resume("w2/ep1"), resume("w2/ep1s", sharding=SHARD),
              ("w2/init_from", dict(kind="init_from", dir=src, out=d("init_from"), ep=1))]
    world1 = [resume("w1/ep1")]
    remote = s3_server.uri(s3_server.bucket(), "written")  # a copy of it at a storage URI, read sharded too
    world4 = [resume("w4/ep4s", ep=4, sharding=SHARD), resume("w4/ep2s", ep=2, sharding=SHARD),
              ("w4/s3", dict(kind="resume", config="k1_drop", data=data, dir=remote, out=d("s3"), ep=2,
                             sharding=SHARD)),
              # one local expert and two replicas: experts sharded along the model dim, saved and loaded so
              ("save_e2", dict(kind="save", config="k1_drop", data=data, dir=src2, ep=2, sharding=SHARD, model=two)),
              ("w4/e2", dict(kind="resume", config="k1_drop", data=data, dir=src2, out=d("e2"), ep=1,
                             sharding=SHARD, model=two))]
    out = {}
    per_rank = H.spawn(2, [j for _, j in world2], timeout=240, run_job=C.run_job)
    out.update({name: [r[i] for r in per_rank] for i, (name, _) in enumerate(world2)})
    for rel in storage.list_files(Path(src)):
        storage.upload(Path(src) / rel, storage.join(remote, rel))
    out.update({name: [r] for (name, _), r in zip(world1, H.run_local([j for _, j in world1], run_job=C.run_job))})
    per_rank = H.spawn(4, [j for _, j in world4], timeout=240, run_job=C.run_job)
    out.update({name: [r[i] for r in per_rank] for i, (name, _) in enumerate(world4)})
    jobs = dict(world2 + world1 + world4)
    return out, {name: (src if jobs[name]["dir"] == remote else jobs[name]["dir"], jobs[name].get("out"))
                 for name in jobs}


LOADS = ["w2/ep1", "w2/ep1s", "w1/ep1", "w4/ep4s", "w4/ep2s", "w4/e2", "w4/s3"]


def test_init_from_reads_only_the_slices_of_a_sharded_rank(runs):
    # build_rank with model.init_from, dense and experts sharded over 2 ranks (EP 1): no gather, each rank reads
    # the bytes of its shards only, and the weights it holds are the checkpoint's
    from safetensors.torch import load_file

    results, dirs = runs
    for r in results["w2/init_from"]:
        assert r["load"]["gathers"] == 0 and r["state"] - 1024 <= r["load"]["reads"] <= r["state"] + 1024, r
    src, out = (_files(x) for x in dirs["w2/init_from"])
    assert out["dense.safetensors"] == src["dense.safetensors"]
    experts = [rel for rel in src if rel.startswith("experts/")]
    assert experts and sorted(experts) == sorted(rel for rel in out if rel.startswith("experts/"))
    for rel in experts:
        want, got = load_file(f"{dirs['w2/init_from'][0]}/step_00000002/{rel}"), \
            load_file(f"{dirs['w2/init_from'][1]}/step_00000002/{rel}")
        assert got.keys() == {"w1", "w2"} and all(torch.equal(got[k], want[k]) for k in got), rel


def _files(root: str) -> dict[str, bytes]:
    step = Path(root) / "step_00000002"
    return {p.relative_to(step).as_posix(): p.read_bytes() for p in sorted(step.rglob("*.safetensors"))}


@pytest.mark.parametrize("name", LOADS)
def test_loaded_anywhere_continues_like_the_uninterrupted_run(runs, name):
    results, _ = runs
    want = results["save_e2" if name == "w4/e2" else "save"][0]["losses"]
    for r in results[name]:
        assert max(abs(a - b) for a, b in zip(r["losses"], want)) < TOL, (name, r["losses"], want)


@pytest.mark.parametrize("name", LOADS)
def test_written_again_the_files_are_byte_identical(runs, name):
    # the weights and AdamW state loaded, written from another world and layout: the same files, byte for byte
    _, dirs = runs
    src, out = dirs[name]
    written, again = _files(src), _files(out)
    assert {"dense.safetensors", "optim_dense.safetensors"} <= written.keys()
    assert written.keys() == again.keys()
    for rel in written:
        assert written[rel] == again[rel], (name, rel)


@pytest.mark.parametrize("name", ["save", "save_e2", *LOADS])
def test_a_rank_gathers_one_whole_tensor_at_a_time(runs, name):
    results, _ = runs
    sharded = name in ("save", "save_e2", "w2/ep1s", "w4/ep4s", "w4/ep2s", "w4/e2", "w4/s3")
    for r in results[name]:
        s, largest = r["save"], r["held"]["largest"]
        assert (s["gathers"] + s["sends"] > 0) == sharded, (name, s)  # every rank takes part, writer or not
        assert s["max_live"] <= largest, (name, s, largest)
        if not s["writes"]:  # a rank that writes no file sends its shards to the writer, never holds a whole one
            assert s["gathers"] == 0, (name, s)


def test_a_rank_that_writes_no_file_sends_its_shards_and_never_holds_a_whole_tensor(runs):
    # EP 2 over 4 ranks: ranks 2 and 3 are the experts' second replicas and write nothing; every sharded tensor
    # is gathered to the one rank that writes it (rank 0 for the dense file, the first replica for experts)
    results, _ = runs
    idle = [r["save"] for name in ("w4/ep2s", "w4/s3") for r in results[name] if not r["save"]["writes"]]
    assert len(idle) == 4 and all(s["gathers"] == 0 and s["sends"] > 0 for s in idle), idle


@pytest.mark.parametrize("name", LOADS)
def test_a_rank_reads_only_what_it_holds(runs, name):
    # no gather at all while loading, and the bytes read are those of this rank's shards, experts and AdamW
    # state (AdamW's step scalar is in every expert file: a few bytes more)
    results, _ = runs
    for r in results[name]:
        load, held = r["load"], r["held"]
        assert load["gathers"] == 0, (name, load)
        assert load["reads"] <= held["state"] + held["optim"] + 1024, (name, load, held)
        assert load["reads"] >= held["state"] + held["optim"] - 1024, (name, load, held)
        assert load["max_read"] <= held["largest"]
    world = len(results[name])
    if world > 1 and name.endswith("s"):  # the dense part is split over the world: each reads about 1/world
        whole = results["w1/ep1"][0]["load"]["reads"]
        assert max(r["load"]["reads"] for r in results[name]) < 0.75 * whole, name
