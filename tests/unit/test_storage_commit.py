"""The checkpoint commit protocol on a local path, a file:// URI and an S3-compatible server (moto): two writers
each write their part, the commit reads every file back from the storage and checks it against what its writer
wrote, and writes the manifest last. A missing, truncated or corrupted file, a writer that did not finish (a
process killed mid-write) or a ``latest`` naming an uncommitted dir never yields a committed checkpoint, and the
previous one stays the one readers find."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_checkpoint import E, assert_same, make, seed_all, train

from raymoe.platform import checkpoint as ck
from raymoe.platform import storage
from raymoe.platform.checkpoint import CheckpointError, finalize_checkpoint, latest_checkpoint, load_checkpoint

EXPERTS = {1: E}


@pytest.fixture
def root(storage_root):
    """A checkpoint root on a path, a file:// URI and an s3:// URI (tests/s3_server.py)."""
    return storage_root


def write_parts(root, step, seed=0, ranks=(0, 1)):
    """Two expert-parallel writers of one model (experts 0,1 and 2,3); returns (full model, its optimizer)."""
    seed_all(seed)
    full, full_opt = make()
    train(full, full_opt, 2)
    for rank in ranks:
        ids = range(rank * 2, rank * 2 + 2)
        part, opt = make(ids, seed=99)
        part.load_state_dict({k: v[ids.start:ids.stop] if k.startswith("experts.") else v
                              for k, v in full.state_dict().items()})
        ck.save_checkpoint(root, step, part, None, write_dense=rank == 0, write_manifest=False, rank=rank)
    return full


def committed_steps(root):
    return [ck.read_manifest(p)["step"] for p in ck.list_checkpoints(root)]


def test_commit_reads_back_and_loads(root):
    full = write_parts(root, 2)
    path = finalize_checkpoint(storage.join(root, "step_00000002"), writer_ranks=range(2), expected_experts=EXPERTS)
    assert str(path) == str(storage.join(root, "step_00000002"))
    manifest = ck.read_manifest(root)
    assert manifest["step"] == 2 and manifest["experts"] == {"1": [0, 1, 2, 3]}
    assert set(manifest["files"]) == {"dense.safetensors", "rng_rank00000.safetensors", "rng_rank00001.safetensors",
                                      *(f"experts/layer001_expert{g:04d}.safetensors" for g in range(E))}
    m2, _ = make(seed=5)
    assert load_checkpoint(root, m2)["step"] == 2
    assert_same(full, None, m2, None)
    assert ck.inspect_checkpoint(root, verify=True)["params"]["per_expert"] == {1: 2 * 4 * 6}


def _truncate(loc):
    storage.write_bytes(loc, storage.read_bytes(loc)[:-7])


def _corrupt(loc):
    data = bytearray(storage.read_bytes(loc))
    data[-3] ^= 0xFF  # same size, one tensor byte changed
    storage.write_bytes(loc, bytes(data))


@pytest.mark.parametrize("damage,message", [
    (storage.remove_file, "written by a shard but not in the storage"),
    (_truncate, "bytes in the storage but its writer wrote"),
    (_corrupt, "does not match what its writer wrote"),
    (lambda loc: storage.remove_file(loc.parent.parent / ".written" / "rank00001.json"),
     "rank 1 did not finish writing its part"),
])
def test_damaged_checkpoint_is_not_committed(root, damage, message):
    write_parts(root, 2)
    finalize_checkpoint(storage.join(root, "step_00000002"), writer_ranks=range(2), expected_experts=EXPERTS)
    write_parts(root, 4, seed=1)
    step4 = storage.join(root, "step_00000004")
    damage(step4 / ck.expert_file_name(1, 3))  # after the writers, before the commit: the storage differs
    with pytest.raises(CheckpointError, match=message):
        finalize_checkpoint(step4, writer_ranks=range(2), expected_experts=EXPERTS)
    assert not storage.is_file(step4 / ck.MANIFEST)
    assert committed_steps(root) == [2] and ck.read_manifest(root)["step"] == 2  # the previous one is intact


def test_latest_naming_an_uncommitted_dir_is_ignored(root):
    write_parts(root, 2)
    finalize_checkpoint(storage.join(root, "step_00000002"), writer_ranks=range(2), expected_experts=EXPERTS)
    write_parts(root, 4, ranks=(0,))  # rank 1 never wrote: not committed
    storage.write_bytes(storage.join(root, ck.LATEST), b"step_00000004\n")
    assert str(latest_checkpoint(root)) == str(storage.join(root, "step_00000002"))
    assert ck.read_manifest(root)["step"] == 2
    with pytest.raises(CheckpointError, match="manifest missing"):
        ck.read_manifest(storage.join(root, "step_00000004"))
    ck.remove_checkpoint(storage.join(root, "step_00000002"))
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        ck.read_manifest(root)


KILLED_WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {unit!r}]
    from test_checkpoint import make
    from raymoe.actors.faults import FaultPlan

    class Trainer:
        model, _ = make(range(2, 4), seed=7)

    root = sys.argv[1]
    plan = FaultPlan()
    plan.arm("save_expert", 4)
    plan.before_save(4, Trainer, root)  # exits the process in the middle of an expert file
    sys.exit(3)  # not reached
""")


@pytest.mark.parametrize("storage_root", ["path", "s3"], indirect=True)  # (file:// takes the path's code)
def test_writer_killed_mid_write_never_commits(root, tmp_path):
    """A real process (the fault point ``save_expert``) dies while writing an expert file: the commit of that
    checkpoint is refused, the previous one stays the latest, and resuming loads the previous one."""
    full = write_parts(root, 2)
    finalize_checkpoint(storage.join(root, "step_00000002"), writer_ranks=range(2), expected_experts=EXPERTS)
    tests = Path(__file__).resolve().parents[1]
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER.format(tests=str(tests), unit=str(tests / "unit")))
    proc = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    step4 = storage.join(root, "step_00000004")
    assert storage.is_file(step4 / ck.DENSE)  # it got that far
    assert not storage.is_file(step4 / ck.expert_file_name(1, 2))  # the half-written expert never appeared
    with pytest.raises(CheckpointError, match="not committing"):
        finalize_checkpoint(step4, writer_ranks=range(1), expected_experts=EXPERTS)
    assert committed_steps(root) == [2]
    resumed, opt = make(seed=11)
    assert load_checkpoint(root, resumed)["step"] == 2
    assert torch.equal(resumed.experts.w1, full.experts.w1)
