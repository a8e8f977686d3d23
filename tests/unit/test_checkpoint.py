"""Checkpoint tests: round trip, bit-identical resume, resharding experts, corruption and incompleteness."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raymoe.platform import checkpoint as ck
from raymoe.platform.checkpoint import (CheckpointError, finalize_checkpoint, inspect_checkpoint,
                                        latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint)
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.moe.experts import GroupedExperts

D, F, E = 4, 6, 4


class ToyExperts(nn.Module):
    """Stands in for GroupedExperts: w1 [E_local, D, F], w2 [E_local, F, D], layer_id, global_expert_ids."""

    def __init__(self, global_ids, layer_id=1):
        super().__init__()
        self.layer_id, self.global_expert_ids = layer_id, list(global_ids)
        self.w1 = nn.Parameter(torch.randn(len(global_ids), D, F) * 0.3)
        self.w2 = nn.Parameter(torch.randn(len(global_ids), F, D) * 0.3)


class ToyMoE(nn.Module):
    """Dense mixture over the local experts (no routing needed) + dropout, a buffer and tied weights."""

    def __init__(self, global_ids=range(E), dtype=torch.float32, d=D):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = ToyExperts(global_ids)
        self.out = nn.Linear(d, d, bias=False)
        self.out.weight = self.inp.weight  # tied, like wte / lm_head
        self.register_buffer("scale", torch.tensor([1.5]))
        self.drop = nn.Dropout(0.2)
        self.to(dtype)

    def forward(self, x):
        h = self.drop(torch.tanh(self.inp(x)))
        p = torch.softmax(self.gate(h), -1)[:, self.experts.global_expert_ids]
        y = torch.einsum("td,edf->etf", h, self.experts.w1).relu()
        y = torch.einsum("etf,efd->etd", y, self.experts.w2)
        return self.out((p.t()[..., None] * y).sum(0)) * self.scale


def make(global_ids=range(E), seed=0, **kw):
    torch.manual_seed(seed)
    model = ToyMoE(global_ids, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        # torch, numpy and python RNG all feed the data, dropout uses torch's: resume must restore all three
        x = torch.randn(8, D) + float(np.random.randn()) * random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s == 1:
            opt.param_groups[0]["lr"] *= 0.5  # a schedule change only a restored param_group knows about


def seed_all(seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def assert_same(m1, o1, m2, o2):
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    if o1 is not None:
        s1, s2 = o1.state_dict(), o2.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for i in s1["state"]:
            for k in s1["state"][i]:
                assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)


def test_round_trip_weights_optimizer_layout(tmp_path):
    seed_all()
    m1, o1 = make()
    train(m1, o1, 3)
    path = save_checkpoint(tmp_path, 3, m1, o1, config={"d": D}, extra={"tokens": 123})
    assert path == tmp_path / "step_00000003"
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 3 and manifest["experts"] == {"1": [0, 1, 2, 3]}
    assert set(manifest["files"]) == {"dense.safetensors", "optim_dense.safetensors", "rng.safetensors",
                                      *(f"experts/layer001_expert{g:04d}.safetensors" for g in range(E))}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (path / rel).stat().st_size and len(entry["sha256"]) == 64
    assert manifest["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    from safetensors.torch import load_file
    e2 = load_file(path / "experts/layer001_expert0002.safetensors")
    assert set(e2) == {"w1", "w2", "exp_avg.w1", "exp_avg_sq.w1", "step.w1", "exp_avg.w2", "exp_avg_sq.w2",
                       "step.w2"}
    assert torch.equal(e2["w1"], m1.experts.w1[2].detach())
    assert torch.equal(e2["exp_avg_sq.w2"], o1.state[m1.experts.w2]["exp_avg_sq"][2])
    dense = load_file(path / "dense.safetensors")
    assert "inp.weight" in dense and "out.weight" not in dense and "scale" in dense  # tied weight stored once

    m2, o2 = make(seed=1)
    info = load_checkpoint(tmp_path, m2, o2)
    assert info["step"] == 3 and info["extra"] == {"tokens": 123} and info["config"] == {"d": D}
    assert m2.out.weight is m2.inp.weight
    assert_same(m1, o1, m2, o2)
    assert o2.param_groups[0]["lr"] == pytest.approx(5e-3) and o2.param_groups[0]["betas"] == (0.9, 0.999)


def test_resume_is_bit_identical(tmp_path):
    seed_all(3)
    ref, ref_opt = make()
    train(ref, ref_opt, 6)

    seed_all(3)
    m, o = make()
    train(m, o, 3)
    save_checkpoint(tmp_path, 3, m, o)
    torch.randn(100), np.random.randn(7), random.random()  # disturb every RNG
    m2, o2 = make(seed=42)
    assert load_checkpoint(tmp_path, m2, o2)["step"] == 3
    train(m2, o2, 3, start=3)
    assert_same(ref, ref_opt, m2, o2)


def test_reshard_experts_across_models(tmp_path):
    seed_all()
    full, full_opt = make()
    train(full, full_opt, 2)
    save_checkpoint(tmp_path, 2, full, full_opt)
    for ids in ([0, 1], [2, 3], [3, 0]):
        part, part_opt = make(ids, seed=7)
        load_checkpoint(tmp_path, part, part_opt)
        assert torch.equal(part.experts.w1, full.experts.w1[ids])
        assert torch.equal(part.experts.w2, full.experts.w2[ids])
        assert torch.equal(part.inp.weight, full.inp.weight)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(part_opt.state[part.experts.w1][name], full_opt.state[full.experts.w1][name][ids])
        assert torch.equal(part_opt.state[part.experts.w1]["step"], full_opt.state[full.experts.w1]["step"])


def test_distributed_writers_then_finalize(tmp_path):
    seed_all()
    full, full_opt = make()
    train(full, full_opt, 2)
    shards = []
    for ids in ([0, 1], [2, 3]):  # two shards hold the same dense replica and half the experts each
        m, o = make(ids, seed=5)
        load_checkpoint(save_checkpoint(tmp_path / "src", 2, full, full_opt), m, o)
        shards.append((m, o))
    for rank, (m, o) in enumerate(shards):
        d = save_checkpoint(tmp_path, 2, m, o, write_dense=rank == 0, write_manifest=False, rank=rank)
    with pytest.raises(CheckpointError, match="manifest missing"):
        load_checkpoint(d, make()[0])
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="layer 1 should have experts 0..4"):
        finalize_checkpoint(d, expected_experts={1: 5})
    finalize_checkpoint(d, config={"ep": 2}, expected_experts={1: E})
    m, o = make(seed=9)
    info = load_checkpoint(tmp_path, m, o, rank=1)
    assert info["step"] == 2 and info["config"] == {"ep": 2}
    assert_same(full, full_opt, m, o)
    assert {"rng_rank00000.safetensors", "rng_rank00001.safetensors"} <= set(
        json.loads((d / "manifest.json").read_text())["files"])


def test_corrupted_file_names_it(tmp_path):
    m, o = make()
    train(m, o, 1)
    path = save_checkpoint(tmp_path, 1, m, o)
    f = path / "experts/layer001_expert0002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"layer001_expert0002\.safetensors.*sha256.*corrupted"):
        load_checkpoint(path, make()[0])
    load_checkpoint(path, make([0, 1])[0])  # files that are not read are not checked
    with pytest.raises(CheckpointError, match="expert0002"):
        inspect_checkpoint(path, verify=True)


def test_truncated_file(tmp_path):
    m, o = make()
    path = save_checkpoint(tmp_path, 0, m, o)
    f = path / "dense.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"dense\.safetensors.*bytes but the manifest says.*truncated"):
        load_checkpoint(path, make()[0])


def test_missing_manifest(tmp_path):
    m, _ = make()
    path = save_checkpoint(tmp_path, 5, m)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest missing.*did not complete"):
        load_checkpoint(path, m)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        load_checkpoint(tmp_path, m)  # latest points at it, and it is the only one
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope", m)


def test_mismatches(tmp_path):
    m, o = make()
    path = save_checkpoint(tmp_path, 1, m, o)
    with pytest.raises(CheckpointError, match=r"dense\.safetensors.*'inp\.weight'.*shape \[4, 4\].*\[8, 8\]"):
        load_checkpoint(path, ToyMoE(d=8))
    with pytest.raises(CheckpointError, match="dtype torch.float32 .* torch.float64"):
        load_checkpoint(path, ToyMoE(dtype=torch.float64))
    m64 = ToyMoE(dtype=torch.float64)
    load_checkpoint(path, m64, strict=False)
    assert torch.equal(m64.experts.w1, m.experts.w1.double())
    with pytest.raises(CheckpointError, match=r"layer001_expert0007\.safetensors.*not in the checkpoint"):
        load_checkpoint(path, make([0, 7])[0])
    extra = ToyMoE()
    extra.register_buffer("new_buf", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"missing \['new_buf'\]"):
        load_checkpoint(path, extra)
    load_checkpoint(path, extra, strict=False)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(save_checkpoint(tmp_path, 2, m), *make())


def test_latest_list_and_inspect(tmp_path):
    m, o = make()
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    for step in (10, 2, 30):
        save_checkpoint(tmp_path, step, m, o, rng=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010", "step_00000030"]
    assert (tmp_path / "latest").read_text() == "step_00000030\n"
    assert load_checkpoint(tmp_path, m, o)["step"] == 30
    (tmp_path / "latest").write_text("step_00000010\n")
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    shutil.rmtree(tmp_path / "step_00000010")  # stale pointer: fall back to the newest committed one
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    (tmp_path / "step_00000030" / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert not list(Path(tmp_path).rglob(".*tmp*"))  # no temp files left behind

    info = inspect_checkpoint(tmp_path)
    assert info["step"] == 2 and info["num_moe_layers"] == 1 and info["experts_per_layer"] == {1: E}
    assert info["params"]["per_expert"] == {1: 2 * D * F}
    assert info["params"]["experts"] == E * 2 * D * F
    assert info["params"]["dense"] == D * D + D + E * D + 1  # tied weight counted once
    assert info["has_optimizer"] and not info["has_rng"] and info["bytes"]["total"] > info["bytes"]["dense"] > 0


def test_grouped_experts_round_trip(tmp_path):
    class Net(nn.Module):
        def __init__(self, ids):
            super().__init__()
            self.proj = nn.Linear(D, D)
            self.experts = GroupedExperts(len(ids), D, F, layer_id=3, global_expert_ids=ids)

    torch.manual_seed(0)
    full = Net([0, 1, 2, 3])
    save_checkpoint(tmp_path, 1, full)
    assert inspect_checkpoint(tmp_path)["expert_ids"] == {3: [0, 1, 2, 3]}
    part = Net([3, 1])
    load_checkpoint(tmp_path, part)
    assert torch.equal(part.experts.w1, full.experts.w1[[3, 1]])
    assert torch.equal(part.experts.w2, full.experts.w2[[3, 1]])


def test_never_unpickles(tmp_path, monkeypatch):
    import pickle
    src = Path(ck.__file__).read_text()
    assert "torch.load(" not in src and "import pickle" not in src and "import ray" not in src

    def refuse(*a, **k):
        raise AssertionError("unpickling")
    m, o = make()
    train(m, o, 1)
    save_checkpoint(tmp_path, 1, m, o)
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    load_checkpoint(tmp_path, *make())
    inspect_checkpoint(tmp_path, verify=True)


def test_param_groups_tensor_lr_and_resave(tmp_path):
    def build(ids, seed):
        torch.manual_seed(seed)
        m = ToyMoE(ids)
        expert_params = list(m.experts.parameters())
        dense = [p for p in m.parameters() if all(p is not q for q in expert_params)]
        # DeepSpeed-style: experts in their own group; a tensor lr must come back as a tensor
        o = torch.optim.AdamW([{"params": dense}, {"params": expert_params, "weight_decay": 0.0}],
                              lr=torch.tensor(0.02), foreach=False)
        return m, o

    seed_all()
    m, o = build(range(E), 0)
    train(m, o, 2)
    save_checkpoint(tmp_path, 2, m, o, extra={"a": 1})
    train(m, o, 1, start=2)
    save_checkpoint(tmp_path, 2, m, o, extra={"a": 2})  # re-saving a step replaces it
    part, part_opt = build([1, 2], 5)
    assert load_checkpoint(tmp_path, part, part_opt)["extra"] == {"a": 2}
    assert torch.equal(part.experts.w2, m.experts.w2[[1, 2]])
    assert torch.is_tensor(part_opt.param_groups[0]["lr"]) and part_opt.param_groups[1]["weight_decay"] == 0.0
    assert float(part_opt.param_groups[0]["lr"]) == float(o.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert torch.equal(part_opt.state[part.experts.w2]["exp_avg"], o.state[m.experts.w2]["exp_avg"][[1, 2]])
    with pytest.raises(CheckpointError, match="manifest.json: 2 optimizer param groups, the optimizer has 1"):
        load_checkpoint(tmp_path, *make())  # one group vs two
    with pytest.raises(ValueError, match="extra must be JSON-serializable"):
        save_checkpoint(tmp_path, 3, m, extra={"x": object()})


def test_remove_checkpoint_and_read_manifest(tmp_path):
    m, _ = make()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, m, extra={"s": step})
    assert ck.read_manifest(tmp_path)["extra"] == {"s": 2}
    ck.remove_checkpoint(tmp_path / "step_00000002")
    assert not (tmp_path / "step_00000002").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ck.read_manifest(tmp_path)["step"] == 1  # latest pointer is stale: newest committed one
    with pytest.raises(ValueError, match="refusing"):
        ck.remove_checkpoint(tmp_path)


def test_gpt_moe_resume_and_reshard(tmp_path):
    cfg = GPTConfig(vocab_size=257, block_size=8, n_layer=2, n_head=2, d_model=16, d_ff=32,
                    num_experts=4, expert_interval=2)

    def build(seed):
        torch.manual_seed(seed)
        m = GPT(cfg)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    def run(m, o, steps):
        for _ in range(steps):  # routing draws RTS priorities from the global RNG
            x = torch.randint(0, 257, (2, 8))
            loss = m(x, x).loss
            o.zero_grad()
            loss.backward()
            o.step()

    ref, ref_opt = build(0)
    run(ref, ref_opt, 4)
    m, o = build(0)
    run(m, o, 2)
    save_checkpoint(tmp_path, 2, m, o)
    m2, o2 = build(1)
    load_checkpoint(tmp_path, m2, o2)
    run(m2, o2, 2)
    assert_same(ref, ref_opt, m2, o2)
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    assert manifest["experts"] == {"1": [0, 1, 2, 3]}
    dense = ck._header(tmp_path / "step_00000002" / "dense.safetensors")
    assert ("lm_head.weight" in dense) != ("wte.weight" in dense)  # tied: stored once
