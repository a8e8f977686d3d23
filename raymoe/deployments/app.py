"""`build_app(args)`: the Serve application (``serve run cluster_configs/serve_local.yaml`` or ``raymoe serve``).

Graph: HTTP proxy -> `OpenAIIngress` (FastAPI, light) -> DeploymentHandle -> `LLMServer` replicas (one
engine each; autoscaled by ``autoscaling_config``). `build_app` sets code defaults; a Serve config file's
``deployments:`` entries (by name: ``OpenAIIngress``, ``LLMServer``) override any option, e.g.
``user_config: {checkpoint: DIR}`` for live reloads.

Backpressure: an LLMServer replica takes at most ``max_ongoing_requests`` calls (set it >= the engine's
max_batch_size + max_waiting so the continuous batch fills); beyond that up to ``max_queued_requests`` calls
wait at each caller, and more are answered 429 by the ingress (OpenAI error body). The engine's own queue
(``engine_kwargs.max_waiting``) also answers 429. The ingress deployment has its own limits; if those are
exceeded, Serve's proxy answers with ``ingress_backpressure_status`` (plain-text body, no OpenAI shape).

Extension point, expert-parallel replicas (not implemented): pass ``engine_cls`` = an engine that builds its
model's MoE layers over `ExpertShard` actors, and ``llm_server_options`` = ``{"placement_group_bundles":
[{"CPU": 1}, ...one per shard], "placement_group_strategy": "STRICT_PACK"}``: each replica then owns a
placement group holding its whole EP group, so Serve's autoscaler adds and removes whole groups.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_ENGINE = "raymoe.deployments.engine:Engine"


class ServeArgs(BaseModel):
    """Arguments of `build_app` (the ``args:`` of a Serve config file; ``raymoe serve`` flags)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = Field(None, description="checkpoint dir or a folder of them (its latest); "
                                                        "required by the real engine")
    model_id: str = Field("raymoe", description="model name in /v1/models and the 'model' field of requests")
    engine_cls: str = Field(DEFAULT_ENGINE, description="engine class 'module:Class' (injected into LLMServer); "
                                                        "raymoe.deployments.fake_engine:FakeEngine needs no model")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the engine "
                                          "(max_batch_size, max_waiting, max_prefill_tokens, reload_policy, ...)")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of /v1/completions when omitted")
    stream_interval_s: float = Field(0.0, ge=0, description="streaming: min seconds between two chunks of one "
                                     "request (0 = every step; larger = fewer, larger messages)")
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed LLMServer replicas (excludes autoscaling)")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling_config of LLMServer")
    max_ongoing_requests: int = Field(48, ge=1, description="calls one LLMServer replica takes at once")
    max_queued_requests: int = Field(64, description="calls waiting per caller for LLMServer before 429 (-1: no "
                                                     "limit)")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1},
                                              description="LLMServer actor resources")
    llm_server_options: dict[str, Any] = Field(default_factory=dict, description="more LLMServer deployment "
                                               "options (health_check_period_s, placement_group_bundles, ...)")
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="requests one ingress replica takes at once")
    ingress_max_queued_requests: int = Field(512, description="requests the proxy queues for the ingress "
                                                              "(-1: no limit)")
    ingress_backpressure_status: Literal[429, 503] = Field(503, description="proxy status past the ingress queue")
    ingress_num_replicas: int = Field(1, ge=1, description="ingress replicas")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per ingress replica")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.engine_cls == DEFAULT_ENGINE and not self.checkpoint:
            raise ValueError("checkpoint is required with the default engine (or set engine_cls)")
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.checkpoint:  # replicas may start in another working directory
            self.checkpoint = os.path.abspath(os.path.expanduser(self.checkpoint))
        return self


def check_engine_args(engine_cls: str, engine_kwargs: dict) -> None:
    """Fail at build time (not in every replica, retried by Serve) on an unknown engine or keyword."""
    import inspect

    from raymoe.deployments.server import resolve_engine_cls

    try:
        cls = resolve_engine_cls(engine_cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine_cls={engine_cls!r} cannot be imported: {e}") from None
    try:
        inspect.signature(cls).bind(None, **engine_kwargs, observer=None)
    except TypeError as e:
        raise ValueError(f"engine_kwargs {sorted(engine_kwargs)} do not fit {cls.__name__}: {e}") from None


def llm_server_deployment(args: ServeArgs):
    """The LLMServer Deployment with options from args (a config file may still override them)."""
    from ray import serve

    from raymoe.deployments.server import LLMServer

    opts: dict[str, Any] = dict(
        name="LLMServer", max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, ray_actor_options=args.ray_actor_options,
        backpressure_config={"status_code": 429}, health_check_period_s=10, health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=30, max_constructor_retry_count=3,
    )
    if args.autoscaling_config is not None:
        opts["autoscaling_config"] = args.autoscaling_config
    else:
        opts["num_replicas"] = args.num_replicas or 1
    if args.checkpoint:
        opts["user_config"] = {"checkpoint": args.checkpoint}
    opts.update(args.llm_server_options)
    return serve.deployment(LLMServer).options(**opts)


def build_app(args: dict | ServeArgs | None = None):
    """The Serve application for ``args`` (a dict as in a Serve config file, or `ServeArgs`)."""
    from ray import serve

    from raymoe.deployments.ingress import OpenAIIngress

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args or {}))
    check_engine_args(a.engine_cls, a.engine_kwargs)
    server = llm_server_deployment(a).bind(a.engine_cls, a.engine_kwargs, a.checkpoint, a.stream_interval_s)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=a.ingress_num_replicas,
        max_ongoing_requests=a.ingress_max_ongoing_requests, max_queued_requests=a.ingress_max_queued_requests,
        backpressure_config={"status_code": a.ingress_backpressure_status},
        ray_actor_options={"num_cpus": a.ingress_num_cpus},
    )
    return ingress.bind(server, a.model_id, a.default_max_tokens)


def _print(msg: str) -> None:
    print(msg, flush=True)


def run_blocking(args: ServeArgs, *, host: str = "127.0.0.1", port: int = 8000, app_name: str = "raymoe",
                 address: str = "local", num_cpus: Optional[int] = None, log=_print) -> None:
    """`raymoe serve`: start Ray and Serve, deploy, block until Ctrl-C, then shut down Serve cleanly.

    address "local" starts a private Ray instance (never joins a cluster that happens to run on this machine);
    "auto" or "HOST:PORT" joins a running cluster (then num_cpus must be None). Shutdown: Serve stops routing
    new requests, drains each replica (``graceful_shutdown_wait_loop_s``), then calls `LLMServer.__del__`,
    whose engine shutdown lets running generations finish.
    """
    import time

    import ray
    from ray import serve

    app = build_app(args)  # argument errors before anything starts
    if not ray.is_initialized():
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        elif num_cpus is not None:
            raise ValueError(f"--num-cpus applies to a local Ray instance only, not to address={address!r}")
        else:
            ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=app_name, route_prefix="/")
        log(f"serving '{args.model_id}' on http://{host}:{port}/v1 (Ctrl-C to stop)")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log("shutting down (draining in-flight requests)...")
    finally:
        try:
            serve.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: skip the drain
            log("interrupted again: stopping without draining")
        finally:
            ray.shutdown()
        log("stopped")
