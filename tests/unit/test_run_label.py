"""Every training metric carries the run's name (label ``run`` = run.name), and the Grafana dashboard templates
on it: two runs on one Ray cluster are separate series and separate lines."""

import json
import re
from pathlib import Path

from raymoe.platform.metrics import SERVING_METRICS, TRAINING_METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster_configs" / "grafana" / "raymoe.json"
TRAINING_SERIES = re.compile(r"\bray_(raymoe_[a-z0-9_]+)")


def test_every_training_metric_has_the_run_label():
    assert [m.name for m in TRAINING_METRICS if "run" not in m.labels] == []
    assert [m.name for m in SERVING_METRICS if "run" in m.labels] == []  # serving has no run


def _training_base(series: str) -> bool:
    """Whether an exported series (without ray_) belongs to a training metric (histogram/counter suffixes)."""
    names = {m.name for m in TRAINING_METRICS}
    return any(series.removesuffix(suffix) in names for suffix in ("", "_bucket", "_sum", "_count", "_total"))


def test_dashboard_templates_on_run():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    run = variables["run"]
    assert run["type"] == "query" and ", run)" in run["definition"] and run["multi"]
    training_exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            if any(_training_base(s) for s in TRAINING_SERIES.findall(target["expr"])):
                training_exprs.append((panel["title"], target))
    assert len(training_exprs) >= 18
    for title, target in training_exprs:
        expr = target["expr"]
        # every selector filters on the chosen runs, every aggregation keeps the runs apart
        selectors = re.findall(r"ray_raymoe_[a-z0-9_]+\{([^}]*)\}", expr)
        assert selectors and all('run=~"$run"' in sel for sel in selectors), (title, expr)
        aggregations = re.findall(r"\b(?:max|sum|avg)\s*(?:by \(([^)]*)\))?\s*\(", expr)
        assert aggregations and all("run" in (a or "").split(", ") for a in aggregations), (title, expr)
        assert "{{run}}" in target["legendFormat"], title
