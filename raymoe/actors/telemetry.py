"""Ray-side metric objects built from the definitions in :mod:`raymoe.platform.metrics`.

Ray exports ``ray.util.metrics`` through each node's metrics agent to Prometheus, prefixing every name
with ``ray_`` (so ``raymoe_train_loss`` is scraped as ``ray_raymoe_train_loss``).
"""

from __future__ import annotations

from ray.util import metrics as ray_metrics

from raymoe.platform.metrics import MetricDef

RAY_EXPORT_PREFIX = "ray_"


class RayMetrics:
    """Lazily created ray.util.metrics objects, keyed by metric name; one instance per actor process.

    ``default_tags`` go on every series of a metric that has those labels (the coordinator gives
    ``run=<run.name>``, so every training series names its run)."""

    def __init__(self, defs: tuple[MetricDef, ...], default_tags: dict[str, str] | None = None):
        self._defs = {d.name: d for d in defs}
        self._made: dict[str, object] = {}
        self._default_tags = _str_tags(default_tags or {})

    def _get(self, name: str):
        if name not in self._made:
            d = self._defs[name]
            if d.kind == "gauge":
                self._made[name] = ray_metrics.Gauge(d.name, description=d.description, tag_keys=d.labels)
            elif d.kind == "counter":
                self._made[name] = ray_metrics.Counter(d.name, description=d.description, tag_keys=d.labels)
            else:
                self._made[name] = ray_metrics.Histogram(d.name, description=d.description,
                                                         boundaries=list(d.boundaries), tag_keys=d.labels)
            defaults = {k: v for k, v in self._default_tags.items() if k in d.labels}
            if defaults:
                self._made[name].set_default_tags(defaults)
        return self._made[name]

    def set(self, d: MetricDef, value: float, **tags: str) -> None:
        self._get(d.name).set(float(value), tags=_str_tags(tags) or None)

    def inc(self, d: MetricDef, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._get(d.name).inc(float(value), tags=_str_tags(tags) or None)

    def observe(self, d: MetricDef, value: float, **tags: str) -> None:
        self._get(d.name).observe(float(value), tags=_str_tags(tags) or None)


def _str_tags(tags: dict) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}
