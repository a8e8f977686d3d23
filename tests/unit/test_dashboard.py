"""The Grafana dashboard (cluster_configs/grafana/raymoe.json) is valid and matches raymoe's metric names."""

import json
import re
from pathlib import Path

import pytest

import raymoe.platform.metrics as metrics_mod
from raymoe.platform.metrics import ALL_METRICS, MetricDef

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster_configs" / "grafana" / "raymoe.json"
# Ray prefixes every exported name with ray_; the dashboard must only use raymoe names that Ray exports
NAME_RE = re.compile(r"\bray_(raymoe_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
DEFS = {m.name: m for m in ALL_METRICS}


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # panels nested in collapsed rows


def _exprs(dash):
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]


def metric_for(exported: str):
    """The MetricDef behind a Prometheus series name (without ray_), or None.

    Histograms export NAME_bucket/_sum/_count; counters export NAME_total (Ray's exporter adds _total to a
    counter whose name lacks it and keeps one that already ends in _total).
    """
    if exported in DEFS and DEFS[exported].kind != "histogram":
        return DEFS[exported]
    for suffix in HISTOGRAM_SUFFIXES:
        base = exported.removesuffix(suffix)
        if base != exported and DEFS.get(base) is not None and DEFS[base].kind == "histogram":
            return DEFS[base]
    base = exported.removesuffix("_total")
    if base != exported and DEFS.get(base) is not None and DEFS[base].kind == "counter":
        return DEFS[base]
    return None


def _balanced(expr: str) -> bool:
    pairs, stack, in_str = {")": "(", "]": "[", "}": "{"}, [], False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_str


def test_dashboard_structure(dashboard):
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, key
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dashboard):
        grid = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p["title"]
        assert "${datasource}" in json.dumps(p["datasource"]), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert _balanced(t["expr"]), f"unbalanced brackets in {p['title']!r}: {t['expr']}"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_panels_do_not_overlap(dashboard):
    cells = {}
    for p in _panels(dashboard):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def _strings(node):
    """Every string value anywhere in the dashboard JSON (panel targets, nested rows, template queries)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _referenced(dash) -> set[str]:
    """The ray_raymoe_* series the dashboard mentions anywhere, without the ray_ prefix."""
    return {n for s in _strings(dash) for n in NAME_RE.findall(s)}


def test_the_metric_list_is_every_metric_defined():
    # a MetricDef left out of TRAINING_METRICS / SERVING_METRICS would escape the dashboard check below
    defined = {v.name for v in vars(metrics_mod).values() if isinstance(v, MetricDef)}
    assert defined == set(DEFS), (f"defined but not in ALL_METRICS: {sorted(defined - set(DEFS))}; "
                                  f"in ALL_METRICS but not defined at module level: {sorted(set(DEFS) - defined)}")
    assert len(DEFS) == len(ALL_METRICS), "two metrics share a name"


def test_every_queried_metric_is_defined(dashboard):
    names = _referenced(dashboard)
    assert names, "the dashboard queries no ray_raymoe_* series"
    unknown = sorted(n for n in names if metric_for(n) is None)
    assert not unknown, f"not defined in raymoe.platform.metrics (or wrong suffix for their kind): {unknown}"
    # no bare raymoe_ names in queries: Ray always exports them with the ray_ prefix
    bare = [e for e in _exprs(dashboard) if re.search(r"(?<!ray_)\braymoe_", e)]
    assert not bare, bare


def test_every_defined_metric_is_on_the_dashboard(dashboard):
    shown = {m.name for m in map(metric_for, _referenced(dashboard)) if m is not None}
    missing = sorted(set(DEFS) - shown)
    assert not missing, f"metrics in raymoe/platform/metrics.py without a panel: {missing}"


@pytest.mark.parametrize("exported, expected", [
    ("raymoe_train_loss", "raymoe_train_loss"),
    ("raymoe_train_step_seconds_bucket", "raymoe_train_step_seconds"),
    ("raymoe_train_tokens_total", "raymoe_train_tokens_total"),
    ("raymoe_train_step_seconds", None),          # a histogram has no plain series
    ("raymoe_train_loss_total", None),            # a gauge gets no _total
    ("raymoe_no_such_metric", None),
])
def test_name_mapping(exported, expected):
    m = metric_for(exported)
    assert (m.name if m else None) == expected
