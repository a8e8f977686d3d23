"""`raymoe report RUN_DIR`: plots drawn from a metrics.jsonl alone (no training needed)."""

import json

import pytest

from raymoe.cli import main
from raymoe.platform.report import plot_run, read_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, n_steps=6, moe=True, torn_tail=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, n_steps + 1):
        rec = {"step": step, "loss": 5.0 - 0.3 * step, "ce_loss": 4.9 - 0.3 * step, "lr": 1e-3,
               "tokens_per_s": 1000.0}
        if step % 3 == 0:
            rec["val_loss"] = 5.0 - 0.25 * step
        if moe:  # two MoE layers with 4 and 8 experts (a pyramid)
            rec["expert_counts"] = [[10 + step, 10, 8, 4], [4] * 7 + [4 + step]]
            rec["dropped_fraction"] = [0.05, 0.01 * step]
            rec["l_aux"] = [1.1, 1.0 + 0.01 * step]
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"step": 7, "loss"'  # a run killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_moe_run_gets_loss_expert_load_and_routing_plots(tmp_path):
    run = _write_metrics(tmp_path / "run", torn_tail=True)
    assert len(read_records(run)) == 6  # the torn last line is skipped
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "expert_load.png", "routing.png"]
    assert all(_is_png(p) for p in paths)


def test_dense_run_gets_only_the_loss_plot(tmp_path):
    paths = plot_run(_write_metrics(tmp_path / "dense", moe=False))
    assert [p.name for p in paths] == ["loss.png"] and _is_png(paths[0])


def test_single_record_run(tmp_path):
    paths = plot_run(_write_metrics(tmp_path / "one", n_steps=1))
    assert all(_is_png(p) for p in paths) and len(paths) == 3


def test_cli_report_prints_the_paths(tmp_path, capsys):
    run = _write_metrics(tmp_path / "cli")
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / n) for n in ("loss.png", "expert_load.png", "routing.png")]


def test_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nope")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "raymoe run folder" in capsys.readouterr().err


def test_replayed_steps_count_once_and_the_replay_wins(tmp_path):
    """After a recovery from an older state, metrics.jsonl holds steps 3-4 twice; plots and readers take the
    replay (written later) and skip the membership event."""
    from raymoe.platform.report import step_records

    run = _write_metrics(tmp_path / "replay", n_steps=4)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "recovery", "step": 5, "resume_step": 2, "lost_steps": 3}) + "\n")
        for step in (3, 4, 5):
            f.write(json.dumps({"step": step, "loss": 9.0 + step, "ce_loss": 9.0, "lr": 1e-3}) + "\n")
    recs = step_records(read_records(run))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs[2:]] == [12.0, 13.0, 14.0]
    assert all(_is_png(p) for p in plot_run(run))
