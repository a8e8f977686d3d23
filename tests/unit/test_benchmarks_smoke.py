"""The benchmark scripts still run (smoke sizes): they are user-facing tools, not tests of speed."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*argv: str, timeout: float = 240.0) -> str:
    out = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_moe_layer_quick_prints_both_tables():
    text = _run("moe_layer.py", "--quick")
    assert "dense-eq" in text and "ref/fast" in text
    assert text.count("fwd+bwd") >= 2 * 3 * 2  # both shapes, three modes, both tables


@pytest.mark.slow
def test_all_to_all_smoke():
    text = _run("all_to_all.py", "--worlds", "2", "--reps", "2", "--shapes", "T1024_D128_E16_k2")
    assert "ratio" in text and "cap:all_to_all" in text
