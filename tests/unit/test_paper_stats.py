"""The verdict rule of benchmarks/paper_findings.py (benchmarks/paper_stats.py): hand-computed intervals."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import paper_stats as S  # noqa: E402


def test_t_interval_by_hand():
    ci = S.interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    half = 4.303 / math.sqrt(3)
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.lo == pytest.approx(2 - half) and ci.hi == pytest.approx(2 + half)
    five = S.interval([-0.10, -0.12, -0.08, -0.11, -0.09])  # sd 0.0158, t(4) = 2.776
    assert five.hi == pytest.approx(-0.1 + 2.776 * 0.015811388 / math.sqrt(5))
    assert S.t975(40) == 1.96
    with pytest.raises(ValueError):
        S.t975(0)


def test_one_seed_is_no_evidence():
    ci = S.interval([-0.5])
    assert S.verdict_lower(ci) == S.INCONCLUSIVE
    assert S.verdict_matches(ci, 0.02) == S.INCONCLUSIVE


@pytest.mark.parametrize("lo, hi, lower, matches, not_worse", [
    (-0.05, -0.01, "held", "inconclusive", "held"),         # below 0; crosses -margin
    (-0.015, -0.005, "held", "held", "held"),               # inside the band
    (0.005, 0.015, "not reproduced", "held", "held"),       # above 0 but equivalent within the margin
    (-0.01, 0.01, "inconclusive", "held", "held"),
    (0.01, 0.05, "not reproduced", "inconclusive", "inconclusive"),
    (0.03, 0.05, "not reproduced", "not reproduced", "not reproduced"),
    (-0.06, -0.03, "held", "not reproduced", "held"),
])
def test_rules(lo, hi, lower, matches, not_worse):
    ci = S.Interval((lo + hi) / 2, lo, hi, 5)
    assert S.verdict_lower(ci) == lower
    assert S.verdict_matches(ci, 0.02) == matches
    assert S.verdict_not_worse(ci, 0.02) == not_worse


def test_combined_claims():
    assert S.combine(["held", "held"]) == "held"
    assert S.combine(["held", "inconclusive"]) == "inconclusive"
    assert S.combine(["inconclusive", "not reproduced", "held"]) == "not reproduced"
    assert S.combine([]) == "inconclusive"
