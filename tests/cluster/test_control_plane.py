"""The coordinator with injected no-op shards (benchmarks/control_plane.py): the SPMD run reaches the end, every
step's record arrives from rank 0, and the final checkpoint is committed; the fan-out comparison runs too."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "control_plane.py"


@pytest.mark.slow
def test_control_plane_benchmark_runs_both_designs():
    out = subprocess.run([sys.executable, str(BENCH), "--shards", "1", "3", "--steps", "8", "--step-ms", "1"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "3"]
    for _, fanout, spmd, _ in rows:
        float(fanout), float(spmd)  # both designs measured (no timing is asserted)
