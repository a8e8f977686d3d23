"""Where a run's outputs go (run.output_dir) and what checkpoint.resume does when no checkpoint is there."""

from pathlib import Path

import pytest

from raymoe.config import load_config, resolve_output_dir
from raymoe.platform import checkpoint as ckpt
from raymoe.platform.training import resume_source

JOB_DIR = "/tmp/ray/session_2026-01-01_00-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_relative_output_dir_is_absolute_against_the_current_directory(tmp_path):
    assert resolve_output_dir("runs", cwd=tmp_path) == tmp_path / "runs"
    assert resolve_output_dir("../x/runs", cwd=tmp_path / "a") == tmp_path / "x" / "runs"
    assert resolve_output_dir(str(tmp_path / "abs")) == tmp_path / "abs"


def test_relative_output_dir_in_a_ray_job_working_dir_outlives_the_job(tmp_path, monkeypatch):
    # Ray deletes its copy of the working dir with the job: relative outputs go to a stable default
    monkeypatch.delenv("RAYMOE_RESULTS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_output_dir("runs", cwd=Path(JOB_DIR)) == tmp_path / "raymoe_results" / "runs"
    assert resolve_output_dir("runs", cwd=Path(JOB_DIR) / "sub") == tmp_path / "raymoe_results" / "runs"
    monkeypatch.setenv("RAYMOE_RESULTS_DIR", str(tmp_path / "shared"))
    assert resolve_output_dir("runs", cwd=Path(JOB_DIR)) == tmp_path / "shared" / "runs"
    assert resolve_output_dir("/data/runs", cwd=Path(JOB_DIR)) == Path("/data/runs")  # absolute: as given


def _cfg(tmp_path, resume):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", f"checkpoint.resume={resume}"])


def test_resume_must_fails_without_a_checkpoint_and_names_where_it_looked(tmp_path):
    root = tmp_path / "r" / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match=r"resume=must: no committed checkpoint in .*r/checkpoints"):
        resume_source(_cfg(tmp_path, "must"), root)
    assert resume_source(_cfg(tmp_path, "true"), root) is None  # true: start fresh (the caller warns)


def test_resume_must_takes_the_latest_checkpoint(tmp_path):
    from raymoe.platform.model import GPT, GPTConfig

    root = tmp_path / "r" / "checkpoints"
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, d_model=8, moe_layers=[]))
    ckpt.save_checkpoint(root, 3, model)
    assert resume_source(_cfg(tmp_path, "must"), root) == root / "step_00000003"


def test_train_on_ray_with_resume_must_and_no_checkpoint_fails_before_starting_ray(tmp_path, capsys):
    from raymoe.cli import main

    cfg = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "ep_cpu.yaml")
    assert main(["train", "--config", cfg, "--set", f"run.output_dir={tmp_path}",
                 "--set", "checkpoint.resume=must"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.resume=must: no committed checkpoint in {tmp_path}/ep_cpu/checkpoints" in err


def test_resume_true_without_a_checkpoint_warns_with_the_absolute_folder(tmp_path, monkeypatch):
    from raymoe.actors.launch import check_resume, with_absolute_outputs

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_outputs(load_config(None, ["run.output_dir=runs", "run.name=r", "checkpoint.resume=true"]))
    assert cfg.run.output_dir == str(tmp_path / "runs")
    warning = check_resume(cfg)
    assert warning.startswith("WARNING: checkpoint.resume=true but there is no checkpoint in "
                              f"{tmp_path}/runs/r/checkpoints: starting at step 0")


def test_local_mode_run_inside_a_ray_job_working_dir_writes_outside_it(tmp_path, monkeypatch, capsys):
    """`ray job submit --working-dir . -- raymoe train` of a local-mode config: the outputs go to
    $RAYMOE_RESULTS_DIR, not into Ray's temporary copy of the working dir."""
    from raymoe.cli import main

    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAYMOE_RESULTS_DIR", str(tmp_path / "results"))
    argv = ["train"]
    for s in ["model.block_size=16", "model.n_layer=1", "model.d_model=16", "model.n_head=2", "train.steps=1",
              "train.global_batch_size=2", "train.progress=false", "sample.max_new_tokens=0",
              f"data.cache_dir={tmp_path / 'cache'}", "run.name=job"]:
        argv += ["--set", s]
    assert main(argv) == 0
    assert f"outputs: {tmp_path / 'results' / 'runs' / 'job'}" in capsys.readouterr().out
    assert (tmp_path / "results" / "runs" / "job" / "metrics.jsonl").exists()
    assert not (job_dir / "runs").exists()
