"""The benchmark scripts still run (smoke sizes): they are user-facing tools, not tests of speed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.platform.host_memory import USER_VARS, malloc_env

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*argv: str, timeout: float = 240.0) -> str:
    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}  # as on a fresh shell
    out = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_moe_layer_quick_prints_both_tables():
    text = _run("moe_layer.py", "--quick")
    assert "dense-eq" in text and "ref/fast" in text
    assert text.count("fwd+bwd") >= 2 * 3 * 2  # both shapes, three modes, both tables
    # it re-executed itself with raymoe's own malloc settings (benchmarks/_host.py)
    assert f"MALLOC_MMAP_THRESHOLD_={malloc_env()['MALLOC_MMAP_THRESHOLD_']}," in text


def test_expert_gemm_ceiling_quick_checks_numerics_and_prints_every_variant():
    text = _run("expert_gemm_ceiling.py", "--quick")
    assert "numerics checked" in text
    for name in ("dense", "padded-bmm", "split-gemms", "experts/thread", "fused/thread"):
        assert f"\n{name} " in text


@pytest.mark.slow
def test_host_memory_quick_compares_default_and_tuned_processes():
    text = _run("host_memory.py", "--quick")
    for name in ("moe-E32", "dense-E32", "tiny-step"):
        assert f"\n{name} " in text
    assert "default/tuned" in text


@pytest.mark.slow
def test_all_to_all_smoke():
    text = _run("all_to_all.py", "--worlds", "2", "--reps", "2", "--shapes", "T1024_D128_E16_k2")
    assert "ratio" in text and "cap:all_to_all" in text


def test_checkpoint_storage_quick():
    assert "save/floor" in _run("checkpoint_storage.py", "--quick")


@pytest.mark.slow
def test_checkpoint_memory_quick_prints_both_ways_per_world():
    text = _run("checkpoint_memory.py", "--quick", "--worlds", "1", "2", timeout=600)
    assert "streamed/gathered" in text
    assert [line.split()[:2] for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])] == \
        [["1", "save"], ["1", "load"], ["2", "save"], ["2", "load"]]


def test_serve_load_clients_start_staggered(monkeypatch):
    # serve_load's closed-loop clients: client i's first request goes out i * stagger_s after the start, so
    # the arrivals are spread in every mode (with 0 they start together)
    import asyncio
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    for stagger in (0.0, 0.05):
        first: dict[str, float] = {}

        async def one(prompt):
            first.setdefault(prompt, time.perf_counter())
            await asyncio.sleep(0.01)
            return mod.Sample(0.01, None, 3)

        t0 = time.perf_counter()
        samples, wall = asyncio.run(mod.drive(one, 4, 0.4, ["c0", "c1", "c2", "c3"], stagger_s=stagger))
        assert len(samples) > 4 and all(s.tokens == 3 for s in samples) and wall >= 0.4
        offsets = [first[f"c{i}"] - t0 for i in range(4)]  # client i sends pool[i] (pool size = clients)
        for i, off in enumerate(offsets):
            assert i * stagger <= off + 1e-3 < i * stagger + 0.04, (stagger, offsets)


@pytest.mark.slow
def test_hf_models_quick_prints_ratios_and_where_decode_time_goes():
    pytest.importorskip("transformers")
    text = _run("hf_models.py", "--quick", "--models", "mixtral-D512-E8-k2")
    assert "prefill tok/s (ours / hf)" in text and "mixtral-D512-E8-k2" in text
    assert "raymoe decode time: attention" in text and "memory floor" in text


@pytest.mark.slow
def test_paper_findings_quick_writes_verdicts_from_intervals(tmp_path):
    text = _run("paper_findings.py", "--quick", "--out", str(tmp_path), timeout=600)
    assert text.count("->") >= 5 and "wrote" in text
    page = (tmp_path / "results.md").read_text()
    assert "## The verdict rule (fixed before the runs)" in page and "## Investigations" in page
    # the anomalies are investigated with measurements: training against validation loss, a dropless first half,
    # the teacher trained twice as long; the page says where its numbers come from
    assert "Training bits/byte over the last 10% of steps" in page and "First-half MoE, dropless" in page
    assert "Teacher trained 2x as long" in page and "training runs it lists" in page
    assert all((tmp_path / "img" / f"{k}.png").stat().st_size > 1000 for k in ("fig1", "phen1", "phen2", "fig4", "mos"))


@pytest.mark.slow
def test_memory_quick_prints_ratios_and_targets():
    text = _run("memory.py", "--quick", "--worlds", "2", timeout=600)  # 4 spawned worlds: slow on a busy machine
    assert "dense/w1" in text and "tok/s sh/rep" in text
    assert "\n    2   2 shard " in text
    # bytes are exact: FSDP2 halves the dense state per rank at world 2, and the undo copy is one rank's share
    assert "world 2: sharded dense state per rank 0.500 of world 1" in text
    assert "undo copy 1.000 of one rank's" in text
    assert "world 2: tokens/s sharded / replicated at 128 tokens per rank and step" in text  # --quick: 4 x 32


def test_prefix_cache_smoke_prints_ratios_and_identical_outputs():
    text = _run("prefix_cache.py", "--clients", "3", "--waves", "1", "--system-len", "40", "--user-len", "6",
                "--max-tokens", "2")
    assert "uncached/cached: ttft p50" in text and "outputs identical: 3/3 requests" in text
    assert "prefix cache: 96/" in text  # 3 requests x the system prompt's 2 whole blocks of 16 tokens


@pytest.mark.slow
def test_reshard_memory_quick_prints_every_new_rank():
    text = _run("reshard_memory.py", "--quick", "--moves", "1")
    assert "fetched/share" in text and "whole state" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("       ")]
    assert [row[0] for row in rows] == ["0", "1", "2"] and all(len(row) == 6 for row in rows)  # 3 new ranks
