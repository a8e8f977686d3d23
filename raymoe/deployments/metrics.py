"""Serving metrics through ``ray.util.metrics`` (names and definitions: raymoe.platform.metrics).

Only usable inside a Ray process (a Serve replica); Ray exports them to Prometheus with a ``ray_`` prefix.
"""

from __future__ import annotations

from typing import Optional

from raymoe.deployments.protocol import EngineObserver
from raymoe.platform import metrics as M


def make_ray_metric(d: M.MetricDef):
    """A ray.util.metrics object for a MetricDef (counters lose ``_total``: Ray's exporter appends it)."""
    from ray.util import metrics as rm

    if d.kind == "counter":
        return rm.Counter(d.name.removesuffix("_total"), d.description, tag_keys=d.labels)
    if d.kind == "gauge":
        return rm.Gauge(d.name, d.description, tag_keys=d.labels)
    return rm.Histogram(d.name, d.description, boundaries=list(d.boundaries), tag_keys=d.labels)


class RayEngineObserver(EngineObserver):
    """Engine hooks -> Ray metrics (called from the engine's loop thread)."""

    def __init__(self):
        self.prompt_tokens = make_ray_metric(M.SERVE_PROMPT_TOKENS)
        self.tokens = make_ray_metric(M.SERVE_GENERATED_TOKENS)
        self.ttft = make_ray_metric(M.SERVE_TTFT)
        self.itl = make_ray_metric(M.SERVE_ITL)
        self.latency = make_ray_metric(M.SERVE_REQUEST_LATENCY)
        self.batch = make_ray_metric(M.SERVE_BATCH_SIZE)
        self.queue = make_ray_metric(M.SERVE_QUEUE_LENGTH)
        self.running = make_ray_metric(M.SERVE_RUNNING)
        self.expert_load = make_ray_metric(M.SERVE_EXPERT_LOAD)
        self.reloads = make_ray_metric(M.SERVE_RELOADS)
        self.checkpoint_step = make_ray_metric(M.SERVE_CHECKPOINT_STEP)
        self.prefix_query = make_ray_metric(M.SERVE_PREFIX_QUERY_TOKENS)
        self.prefix_hit = make_ray_metric(M.SERVE_PREFIX_HIT_TOKENS)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_tokens(self, n: int, inter_token_s: Optional[float]) -> None:
        self.tokens.inc(n)
        if inter_token_s is not None:
            self.itl.observe(inter_token_s)

    def on_step(self, batch_size: int, waiting: int, running: int) -> None:
        if batch_size:
            self.batch.observe(batch_size)
        self.queue.set(waiting)
        self.running.set(running)

    def on_finish(self, finish_reason: str, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.latency.observe(latency_s, tags={"finish_reason": finish_reason})
        self.prompt_tokens.inc(prompt_tokens)

    def on_expert_load(self, layer: int, fractions: list[float]) -> None:
        for e, f in enumerate(fractions):
            self.expert_load.set(f, tags={"layer": str(layer), "expert": str(e)})

    def on_reload(self) -> None:
        self.reloads.inc()

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_query.inc(query_tokens)
        if hit_tokens:
            self.prefix_hit.inc(hit_tokens)

    def on_checkpoint_step(self, step: int) -> None:
        """The training step of the served checkpoint (set by the server at start and after each reload)."""
        self.checkpoint_step.set(step)


class RequestCounter:
    """raymoe_serve_requests_total{route, status} for the ingress."""

    def __init__(self):
        self._m = make_ray_metric(M.SERVE_REQUESTS)

    def inc(self, route: str, status: int) -> None:
        self._m.inc(1, tags={"route": route, "status": str(status)})
