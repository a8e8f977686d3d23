"""Loading expert optimizer state file by file (raymoe.platform.checkpoint_load): a state some expert's file
lacks, or a scalar step the files disagree on, is an error naming it (strict=False skips that parameter's
state); what the files agree on loads exactly. Sharded (DTensor) loads: tests/distributed/test_sharded_checkpoint.py.
"""

import json

import pytest
import torch
from safetensors import safe_open
from test_checkpoint import assert_same, make, seed_all, train

from raymoe.platform import sharded_io
from raymoe.platform.checkpoint import CheckpointError, expert_file_name, load_checkpoint, save_checkpoint


def _rewrite(ckpt, rel: str, change) -> None:
    """Rewrite file ``rel`` of checkpoint ``ckpt`` with ``change(tensors)`` applied, and list it so in the
    manifest (a consistent checkpoint whose content is wrong)."""
    with safe_open(str(ckpt / rel), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()
    change(tensors)
    info = sharded_io.write_files([ckpt / rel], tensors, [meta])[0]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][rel] = info
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved(tmp_path):
    seed_all()
    model, opt = make()
    train(model, opt, 2)
    return save_checkpoint(tmp_path, 2, model, opt), model, opt


def test_expert_state_loads_exactly(saved):
    ckpt, model, opt = saved
    m2, o2 = make(seed=3)
    load_checkpoint(ckpt, m2, o2)
    assert_same(model, opt, m2, o2)


def test_state_missing_from_one_expert_file_names_it(saved):
    ckpt, _, _ = saved
    _rewrite(ckpt, expert_file_name(1, 2), lambda t: t.pop("exp_avg.w1"))
    with pytest.raises(CheckpointError, match=r"layer 1 'w1': optimizer state 'exp_avg' is missing from some"):
        load_checkpoint(ckpt, *make(seed=3))
    m2, o2 = make(seed=3)
    load_checkpoint(ckpt, m2, o2, strict=False)  # that parameter's state is skipped, the rest loads
    assert m2.experts.w1 not in o2.state and "exp_avg" in o2.state[m2.experts.w2]


def test_step_that_differs_between_expert_files_names_the_file(saved):
    ckpt, _, _ = saved
    rel = expert_file_name(1, 3)
    _rewrite(ckpt, rel, lambda t: t["step.w2"].add_(1))
    with pytest.raises(CheckpointError, match=f"{rel}: 'step.w2' differs from the other experts' files"):
        load_checkpoint(ckpt, *make(seed=3))


def test_a_model_holding_some_experts_reads_only_their_files(saved):
    ckpt, model, _ = saved
    (ckpt / expert_file_name(1, 0)).write_bytes(b"not read")  # a file the model does not need is never opened
    part, opt = make([2, 3], seed=3)
    load_checkpoint(ckpt, part, opt)
    assert torch.equal(part.experts.w1, model.experts.w1[2:].detach())
    assert torch.equal(opt.state[part.experts.w1]["exp_avg_sq"],
                       saved[2].state[model.experts.w1]["exp_avg_sq"][2:])
