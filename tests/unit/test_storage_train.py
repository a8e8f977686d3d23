"""Local training with run.output_dir at an S3 URI (moto server, tests/s3_server.py): checkpoints and logs go to
the bucket, a run resumed on a machine without the local log copy continues exactly, and model_io loads the
checkpoint from the URI."""

import json
from types import SimpleNamespace

import gloo_world
import torch
from test_trainer import TINY

from raymoe.actors.inference_shard import InferenceShard

from raymoe.cli import main
from raymoe.platform import checkpoint as ck
from raymoe.platform import storage
from raymoe.platform.model_io import checkpoint_step, load_model
from raymoe.platform.tokenizer import ByteTokenizer, load_tokenizer


def _train(output_dir, name, cache, *extra):
    argv = ["train"]
    for s in TINY + [f"run.output_dir={output_dir}", f"run.name={name}", f"data.cache_dir={cache}",
                     "checkpoint.interval=2", "checkpoint.keep_last=1",
                     "train.lr=3e-3", "train.min_lr=3e-3", *extra]:  # constant: 2 steps start a 4-step run
        argv += ["--set", s]
    assert main(argv) == 0


def _ep_shard_experts(rank, world, job):
    """What an expert-parallel serving shard of rank ``rank`` loads from the checkpoint (its own loading code)."""
    shard = SimpleNamespace(rank=rank, world=world, device=torch.device("cpu"), redundant_experts=0)
    model, step = InferenceShard._load(shard, job["checkpoint"])
    return {"step": step, **{f"{m.layer_id}.{k}": v for m in model.moe_modules()
                             for k, v in m.experts.state_dict().items()},
            "ids": {m.layer_id: list(m.experts.global_expert_ids) for m in model.moe_modules()}}


def test_local_training_to_s3_resumes_and_loads(s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYMOE_RESULTS_DIR", str(tmp_path / "results"))  # the local copy of the logs
    cache = tmp_path / "cache"
    _train(tmp_path / "runs", "ref", cache, "train.steps=4")  # the uninterrupted run, on a local path

    uri = s3_server.uri(s3_server.bucket(), "runs")
    _train(uri, "r", cache, "train.steps=2")
    run = storage.RunOutputs(uri, "r")
    assert [ck.read_manifest(p)["step"] for p in ck.list_checkpoints(run.checkpoints)] == [2]
    assert storage.is_file(run.location / "summary.json") and storage.is_file(run.location / "loss.png")
    storage.remove_tree(run.local)  # resume where the first run's local log copy is not: it comes back first
    _train(uri, "r", cache, "train.steps=4", "checkpoint.resume=must")
    assert "resumed from s3://" in capsys.readouterr().out

    assert [ck.read_manifest(p)["step"] for p in ck.list_checkpoints(run.checkpoints)] == [4]  # step 2 pruned
    records = [json.loads(line) for line in storage.read_text(run.location / "metrics.jsonl").splitlines()]
    ref_records = [json.loads(line) for line in (tmp_path / "runs" / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 5))
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]  # the resume continued exactly
    model = load_model(str(run.checkpoints))
    ref = load_model(tmp_path / "runs" / "ref" / "checkpoints")
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert checkpoint_step(str(run.checkpoints)) == 4
    assert isinstance(load_tokenizer(str(run.checkpoints)), ByteTokenizer)
    assert ck.inspect_checkpoint(str(run.checkpoints), verify=True)["step"] == 4
    # the user commands on the URI: eval, generate (the checkpoint's tokenizer) and report (the uploaded logs)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run.checkpoints)]) == 0
    assert main(["generate", "--checkpoint", str(run.checkpoints), "--prompt", "The", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    storage.remove_tree(run.local)
    assert main(["report", str(run.location)]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out or "loss" in out
    assert (run.local / "loss.png").stat().st_size > 1000 and (run.local / "metrics.jsonl").is_file()

    # each of 2 expert-parallel serving shards reads only its experts from the bucket
    full = {m.layer_id: m.experts.state_dict() for m in model.moe_modules()}
    for rank, [got] in enumerate(gloo_world.spawn(2, _ep_shard_experts, [{"checkpoint": str(run.checkpoints)}])):
        assert got["step"] == 4 and got["ids"]
        for lid, ids in got["ids"].items():
            assert ids == [2 * rank, 2 * rank + 1]
            for k, rows in full[lid].items():
                assert torch.equal(got[f"{lid}.{k}"], rows[ids[0]:ids[-1] + 1]), (rank, lid, k)


def test_export_from_s3(s3_server, tmp_path):
    """`raymoe export` of a checkpoint in a bucket: the weights and the checkpoint's tokenizer files."""
    from test_hf_models import hf_dict

    from raymoe.cli import main as cli_main
    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_dict("mixtral")))
    torch.manual_seed(0)
    model = GPT(hf.config_from_folder(folder))
    root = storage.location(s3_server.uri(s3_server.bucket(), "ckpts"))
    step = ck.save_checkpoint(root, 3, model, rng=False, write_manifest=False)
    storage.write_bytes(step / "tokenizer_config.json", b'{"eos_token": "<e>"}')
    ck.finalize_checkpoint(step, extra={"model_config": model.config.to_dict()})
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(root), "--out", str(out)]) == 0
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "<e>"}'
    back = hf.load_hf_model(out)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_serving_reload_target_resolves_a_uri_root_to_its_latest_step(s3_server):
    """A Serve reload compares the step dir a root URI points at now with the one loaded: a newer commit in the
    bucket is a new target (it compared the root itself, so a reload to a newer checkpoint was skipped)."""
    from raymoe.deployments.server import _resolved
    from raymoe.platform.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, d_model=16, d_ff=32, num_experts=2))
    root = storage.location(s3_server.uri(s3_server.bucket(), "serve"))
    ck.finalize_checkpoint(ck.save_checkpoint(root, 1, model, rng=False, write_manifest=False))
    first = _resolved(str(root))
    assert first.endswith("step_00000001") or "step_00000001?" in first
    ck.finalize_checkpoint(ck.save_checkpoint(root, 2, model, rng=False, write_manifest=False))
    second = _resolved(str(root))
    assert second != first and "step_00000002" in second
    assert _resolved(second) == second  # a step dir is its own target
