"""docs/design.md#expert-parallel-numerics says what "the same losses whatever the EP size" guarantees and what each
test checks: the tests it names exist and use the tolerances it states (so the page changes when they do)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (REPO / "docs" / "design.md").read_text()
    start = text.index("### Expert-parallel numerics")
    return text[start:text.index("\n### ", start + 1)]


def test_the_numerics_section_names_existing_tests_with_their_tolerances():
    section = _section()
    named = re.findall(r"`(tests/[\w/]+\.py)`", section)
    assert len(named) == 4, named
    stated = {"tests/distributed/test_expert_parallel.py": r"^TOL = 1e-5$",
              "tests/cluster/test_ep_training.py": r"abs=1e-5",
              "tests/cluster/test_reshard.py": r"atol=2e-5",
              "tests/cluster/test_elastic.py": r"tol: float = 1e-4"}
    for path in named:
        source = (REPO / path).read_text()
        assert re.search(stated[path], source, re.M), (path, stated[path])
        tolerance = re.search(r"\d+e-\d+", stated[path]).group(0)
        bullet = section[section.index(path):].split("\n- ")[0]
        assert tolerance in bullet, (path, tolerance)
    assert "No test claims equality over hundreds of steps" in section
    # the README states the guarantee and points here
    readme = (REPO / "README.md").read_text()
    assert "docs/design.md#expert-parallel-numerics" in readme and "drift apart" in readme
