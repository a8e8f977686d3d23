"""Every metric raymoe exports, named and defined in one place.

Names follow Prometheus conventions: a ``raymoe_`` prefix, unit suffixes (``_seconds``, ``_total``) and
low-cardinality labels (layer and expert ids are fine; request ids never). Every training series carries
``run`` (``run.name``), so two runs on one Ray cluster are two series, not one. Inside Ray processes the
actors export these through ``ray.util.metrics``; local runs and tools use prometheus-client
(:func:`prometheus_registry`). This module imports neither Ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricDef:
    """One metric: its Prometheus name, kind, help text and label names."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    description: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- training -------------------------------------------------------------------------------------------
RUN = ("run",)  # the run.name label every training series carries
TRAIN_LOSS = MetricDef("raymoe_train_loss", "gauge", "Training loss (cross-entropy + aux losses) of the last step.",
                       RUN)
TRAIN_CE_LOSS = MetricDef("raymoe_train_ce_loss", "gauge", "Training cross-entropy of the last step.", RUN)
VAL_LOSS = MetricDef("raymoe_val_loss", "gauge", "Validation cross-entropy at the last evaluation.", RUN)
AUX_LOSS = MetricDef("raymoe_moe_aux_loss", "gauge", "Load-balancing loss (l_aux) of an MoE layer.", (*RUN, "layer"))
LEARNING_RATE = MetricDef("raymoe_learning_rate", "gauge", "Learning rate of the last step.", RUN)
GRAD_NORM = MetricDef("raymoe_grad_norm", "gauge", "Global gradient norm before clipping.", RUN)
TOKENS_PER_SECOND = MetricDef("raymoe_train_tokens_per_second", "gauge", "Training throughput in tokens/s.", RUN)
TOKENS_TOTAL = MetricDef("raymoe_train_tokens_total", "counter", "Tokens trained on.", RUN)
STEPS_TOTAL = MetricDef("raymoe_train_steps_total", "counter", "Optimizer steps completed.", RUN)
STEP_SECONDS = MetricDef(
    "raymoe_train_step_seconds", "histogram", "Wall time of one optimizer step.", RUN, _SECONDS_BUCKETS
)
ALL_TO_ALL_SECONDS = MetricDef(
    "raymoe_all_to_all_seconds", "histogram", "Time in MoE all-to-all exchanges per step.", (*RUN, "layer"),
    _SECONDS_BUCKETS,
)
EXPERT_LOAD = MetricDef(
    "raymoe_expert_load_fraction", "gauge", "Fraction of a layer's token-choices routed to an expert.",
    (*RUN, "layer", "expert"),
)
EXPERT_LOAD_MAX_OVER_MEAN = MetricDef(
    "raymoe_expert_load_max_over_mean", "gauge", "Max expert load / mean expert load of a layer (1 = balanced).",
    (*RUN, "layer"),
)
DROPPED_FRACTION = MetricDef(
    "raymoe_dropped_tokens_fraction", "gauge", "Fraction of token-choices dropped by capacity in a layer.",
    (*RUN, "layer"),
)
WORLD_SIZE = MetricDef("raymoe_world_size", "gauge", "Number of expert shards training.", RUN)
RECOVERIES_TOTAL = MetricDef("raymoe_recoveries_total", "counter", "Recoveries from lost workers.", RUN)
RECOVERY_SECONDS = MetricDef(
    "raymoe_recovery_seconds", "histogram", "Time from a lost worker to training again.", RUN, _SECONDS_BUCKETS
)
LOST_STEPS_TOTAL = MetricDef("raymoe_lost_steps_total", "counter", "Optimizer steps redone after a failure.", RUN)
SHARD_PEAK_RSS = MetricDef(
    "raymoe_shard_peak_rss_over_baseline_bytes", "gauge",
    "A shard's peak RSS above its process baseline (the runtime before the model was built), measured after "
    "every optimizer step when cluster.memory_per_worker_gb is set (compare with it).", (*RUN, "shard"),
)

TRAINING_METRICS = (
    TRAIN_LOSS, TRAIN_CE_LOSS, VAL_LOSS, AUX_LOSS, LEARNING_RATE, GRAD_NORM, TOKENS_PER_SECOND, TOKENS_TOTAL,
    STEPS_TOTAL, STEP_SECONDS, ALL_TO_ALL_SECONDS, EXPERT_LOAD, EXPERT_LOAD_MAX_OVER_MEAN, DROPPED_FRACTION,
    WORLD_SIZE, RECOVERIES_TOTAL, RECOVERY_SECONDS, LOST_STEPS_TOTAL, SHARD_PEAK_RSS,
)

# --- serving (raymoe.deployments; exported by Serve replicas through ray.util.metrics) -----------------
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SERVE_REQUESTS = MetricDef(
    "raymoe_serve_requests_total", "counter", "HTTP requests answered by the OpenAI ingress.",
    ("route", "status"),
)
SERVE_PROMPT_TOKENS = MetricDef("raymoe_serve_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
SERVE_GENERATED_TOKENS = MetricDef("raymoe_serve_generated_tokens_total", "counter", "Tokens generated (released).")
SERVE_TTFT = MetricDef(
    "raymoe_serve_time_to_first_token_seconds", "histogram",
    "Time from a request entering the engine to its first generated token.", (), _SECONDS_BUCKETS,
)
SERVE_ITL = MetricDef(
    "raymoe_serve_inter_token_latency_seconds", "histogram",
    "Time between two consecutive outputs of one request.", (), _SECONDS_BUCKETS,
)
SERVE_REQUEST_LATENCY = MetricDef(
    "raymoe_serve_request_latency_seconds", "histogram", "Time from a request entering the engine to its end.",
    ("finish_reason",), _SECONDS_BUCKETS,
)
SERVE_BATCH_SIZE = MetricDef(
    "raymoe_serve_batch_size", "histogram", "Rows in the running batch per decode step.", (), _BATCH_BUCKETS,
)
SERVE_QUEUE_LENGTH = MetricDef("raymoe_serve_queue_length", "gauge", "Requests waiting to join the batch.")
SERVE_RUNNING = MetricDef("raymoe_serve_running_requests", "gauge", "Requests in the running decode batch.")
SERVE_EXPERT_LOAD = MetricDef(
    "raymoe_serve_expert_load_fraction", "gauge",
    "Fraction of a layer's token-choices routed to an expert at inference (last window).", ("layer", "expert"),
)
SERVE_RELOADS = MetricDef("raymoe_serve_weight_reloads_total", "counter", "Live weight swaps (reconfigure).")
SERVE_CHECKPOINT_STEP = MetricDef("raymoe_serve_checkpoint_step", "gauge",
                                  "Training step of the checkpoint a replica serves (raymoe serve --follow: "
                                  "advances as training commits checkpoints).")
SERVE_PREFIX_QUERY_TOKENS = MetricDef("raymoe_serve_prefix_cache_query_tokens_total", "counter",
                                      "Prompt tokens looked up in the prefix cache (engine.prefix_cache_mb > 0).")
SERVE_PREFIX_HIT_TOKENS = MetricDef("raymoe_serve_prefix_cache_hit_tokens_total", "counter",
                                    "Prompt tokens whose keys/values came from the prefix cache instead of a "
                                    "prefill (hit rate: this / the query tokens).")

SERVING_METRICS = (
    SERVE_REQUESTS, SERVE_PROMPT_TOKENS, SERVE_GENERATED_TOKENS, SERVE_TTFT, SERVE_ITL, SERVE_REQUEST_LATENCY,
    SERVE_BATCH_SIZE, SERVE_QUEUE_LENGTH, SERVE_RUNNING, SERVE_EXPERT_LOAD, SERVE_RELOADS, SERVE_CHECKPOINT_STEP,
    SERVE_PREFIX_QUERY_TOKENS, SERVE_PREFIX_HIT_TOKENS,
)

ALL_METRICS = TRAINING_METRICS + SERVING_METRICS


def prometheus_registry(metrics=ALL_METRICS):
    """A prometheus-client registry with these metrics; returns (registry, {name: metric})."""
    import prometheus_client as pc

    registry = pc.CollectorRegistry()
    made = {}
    for m in metrics:
        # prometheus-client appends _total to counters itself
        base = m.name.removesuffix("_total") if m.kind == "counter" else m.name
        if m.kind == "gauge":
            made[m.name] = pc.Gauge(base, m.description, m.labels, registry=registry)
        elif m.kind == "counter":
            made[m.name] = pc.Counter(base, m.description, m.labels, registry=registry)
        else:
            made[m.name] = pc.Histogram(base, m.description, m.labels, registry=registry, buckets=m.boundaries)
    return registry, made
