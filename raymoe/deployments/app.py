"""`build_app(args)`: the Serve application (``serve run cluster_configs/serve_local.yaml`` or ``raymoe serve``).

Two layouts. Default (``single_deployment: true``): HTTP proxy -> `OpenAIServer` replicas, each holding the
FastAPI routes and one engine, so a request takes one hop. ``single_deployment: false``: HTTP proxy ->
`OpenAIIngress` (FastAPI, light) -> DeploymentHandle -> `LLMServer` replicas (one engine each); the extra hop
costs CPU and latency on every request (benchmarks/serve_load.py measures both) but lets the ingress fan
the choices of one request (``n``, several prompts) over engine replicas. Engine replicas (OpenAIServer or
LLMServer) are autoscaled by ``autoscaling_config``. `build_app` sets code defaults; a Serve config file's
``deployments:`` entries (by name) override any option, e.g. ``user_config: {checkpoint: DIR}`` for live
reloads.

Engine settings: ``engine`` (`raymoe.deployments.engine_config.EngineConfig`, or the engine class's
``config_cls``), the same typed object ``raymoe serve`` flags fill.

Backpressure. The engine's queue (``engine.max_waiting``) answers 429 with an OpenAI body. Single
layout: a replica takes ``ingress_max_ongoing_requests`` HTTP requests (keep it > max_batch_size +
max_waiting so the engine queue answers first), the proxy queues ``ingress_max_queued_requests`` more and
answers ``ingress_backpressure_status`` beyond (plain text; an OpenAI body with the proxy middleware of
`raymoe.deployments.proxy_errors`, which `run_blocking` installs). Split layout: an LLMServer replica takes at most
``max_ongoing_requests`` calls (>= max_batch_size + max_waiting so the batch fills); beyond that up to
``max_queued_requests`` calls wait at each caller, and more are answered 429 by the ingress (OpenAI body);
the ingress deployment has the ``ingress_*`` limits, past which the proxy answers as above.

Expert-parallel replicas (``ep_size`` > 1): the engine replica gets ``placement_group_bundles`` = [the replica's own
bundle] + ``ep_size`` shard bundles (``ep_shard_cpus``/``ep_shard_gpus`` each; ``ep_placement_strategy``),
and its engine runs the model over ``ep_size`` `InferenceShard` actors started in the last ``ep_size`` bundles
(`raymoe.deployments.ep_runner.EPRunner`). Serve reserves the placement group before it starts the replica
and removes it when the replica stops; the shards are the replica's child actors. So a replica *is* an
expert-parallel group: ``num_replicas`` and ``autoscaling_config`` (min/max/target_ongoing_requests) count
groups, and the autoscaler adds or removes whole groups. ``ep_size`` = 1: the whole model in the replica.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from raymoe.deployments.engine_config import EngineConfig, config_cls_of

API_KEY_ENV = "RAYMOE_API_KEY"
DEFAULT_ENGINE = "raymoe.deployments.proc_engine:ProcessEngine"  # the Engine in a child process of the replica
EP_ENGINE = "raymoe.deployments.engine:Engine"  # the default with ep_size > 1 (its shards are processes already)


class ServeArgs(BaseModel):
    """Arguments of `build_app` (the ``args:`` of a Serve config file; ``raymoe serve`` flags)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = Field(None, description="checkpoint dir or a folder of them (its latest); "
                                                        "required by the real engine")
    follow: Optional[str] = Field(None, description="serve while training: a run dir (its checkpoints/ folder), "
                                  "a folder of checkpoints or a storage URI; replicas serve its latest committed "
                                  "checkpoint and reload (engine.reload_policy, default drain) each newer one "
                                  "training commits. Excludes checkpoint")
    follow_interval_s: float = Field(2.0, gt=0, description="follow: seconds between two looks for a newer "
                                     "committed checkpoint")
    follow_live: bool = Field(False, description="with follow (a run dir) on the training run's Ray cluster: "
                              "also swap in the weights the run publishes in memory every "
                              "cluster.publish_interval steps (expert by expert from the object store, no "
                              "checkpoint), whichever of the two is newer; checkpoints stay the fallback")
    model_id: str = Field("raymoe", description="model name in /v1/models and the 'model' field of requests")
    engine_cls: str = Field(DEFAULT_ENGINE, description="engine class 'module:Class' (injected into the replica; "
                            f"the default becomes {EP_ENGINE} with ep_size > 1); "
                                                        "raymoe.deployments.fake_engine:FakeEngine needs no model")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine settings (max_batch_size, "
                                 "max_waiting, max_prefill_tokens, reload_policy, device, torch_threads, ...): "
                                 "raymoe.deployments.engine_config.EngineConfig, or the engine_cls's config_cls")
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
    single_deployment: bool = Field(True, description="one deployment 'OpenAIServer' holds the routes and the "
                                    "engine (one hop per request); false: 'OpenAIIngress' -> 'LLMServer' replicas")
    ep_size: int = Field(1, ge=1, description="expert-parallel shards per LLMServer replica (1 = the whole model "
                                              "in the replica); must divide every MoE layer's expert count")
    ep_shard_cpus: float = Field(1.0, gt=0, description="CPUs of each shard's placement-group bundle (ep_size > 1)")
    ep_shard_gpus: float = Field(0.0, ge=0, description="GPUs of each shard's placement-group bundle (ep_size > 1)")
    ep_placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="placement-group strategy of a replica and its shards (STRICT_PACK: one node)")
    api_key: Optional[SecretStr] = Field(None, description="clients must send 'Authorization: Bearer <key>' "
                                         f"(401 otherwise; /healthz stays open); default: ${API_KEY_ENV} of the "
                                         "process that builds the app, else no key")
    check_resources: bool = Field(True, description="before deploying, check that the cluster can ever place "
                                  "the replicas (CPUs/GPUs per bundle and in total; "
                                  "raymoe.deployments.resources); false on clusters that add nodes on demand")
    ep_redundant_experts: int = Field(0, ge=0, description="hot-expert replication (ep_size > 1): extra expert "
                                      "slots per shard and MoE layer, filled with copies of the most loaded "
                                      "experts from the observed routing (0: off)")
    ep_replan_interval_steps: int = Field(32, ge=1, description="engine steps between two placements of the "
                                          "expert copies (ep_redundant_experts > 0)")

    @model_validator(mode="before")
    @classmethod
    def _engine_config(cls, data: Any) -> Any:
        """Validate ``engine`` with the config class of the engine that will run (FakeEngine adds fields)."""
        if not isinstance(data, dict):
            return data
        if "engine_kwargs" in data:
            raise ValueError("engine_kwargs was replaced by engine: the same keys, now a typed "
                             f"EngineConfig with fields {sorted(EngineConfig.model_fields)}; rename the key")
        ep_size = data.get("ep_size", 1)
        engine_cls = data.get("engine_cls") or (EP_ENGINE if isinstance(ep_size, int) and ep_size > 1
                                                else DEFAULT_ENGINE)
        config_cls = config_cls_of(_import_engine_cls(engine_cls))
        given = data.get("engine")
        if isinstance(given, config_cls):
            return data
        if isinstance(given, EngineConfig):
            given = given.model_dump(exclude_unset=True)
        try:
            return {**data, "engine": config_cls.model_validate(given if given is not None else {})}
        except ValidationError as e:
            raise ValueError("; ".join(f"engine.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                       for err in e.errors())) from None

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.follow is not None:
            self._follow_latest()
        elif self.follow_live:
            raise ValueError("follow_live needs follow (the training run's folder)")
        if self.ep_size > 1 and "engine_cls" not in self.model_fields_set:
            self.engine_cls = EP_ENGINE
        if self.engine_cls in (DEFAULT_ENGINE, EP_ENGINE) and not self.checkpoint:
            raise ValueError("checkpoint is required with the default engine (or set engine_cls)")
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.ep_size > 1 and not self.checkpoint:
            raise ValueError(f"ep_size={self.ep_size}: expert-parallel replicas load their shards from a "
                             "checkpoint; set checkpoint")
        if self.ep_size == 1 and (self.ep_shard_gpus or self.ep_shard_cpus != 1.0 or self.ep_redundant_experts):
            raise ValueError("ep_shard_cpus / ep_shard_gpus / ep_redundant_experts apply with ep_size > 1 only")
        if self.ep_size > 1 and self.engine.prefix_cache_mb:  # the engine would refuse it in every replica
            raise ValueError(f"engine.prefix_cache_mb={self.engine.prefix_cache_mb} needs ep_size=1: "
                             f"expert-parallel replicas have no prefix cache; set engine.prefix_cache_mb=0")
        bundles = self.llm_server_options.get("placement_group_bundles")
        if self.ep_size > 1 and bundles is not None and len(bundles) < self.ep_size + 1:
            raise ValueError(f"llm_server_options.placement_group_bundles has {len(bundles)} bundles; ep_size="
                             f"{self.ep_size} needs 1 (replica) + {self.ep_size} (shards)")
        if self.checkpoint and "://" not in self.checkpoint:  # replicas may start in another working directory
            self.checkpoint = os.path.abspath(os.path.expanduser(self.checkpoint))
        return self

    def _follow_latest(self) -> None:
        """follow: the checkpoint folder it names, and its latest committed checkpoint as ``checkpoint`` (the
        one replicas start from; each then follows the folder, `raymoe.deployments.follow`)."""
        from raymoe.deployments.follow import follow_root, latest_committed, live_run_name

        if self.checkpoint:
            raise ValueError("set checkpoint or follow, not both: follow serves the latest committed checkpoint "
                             "of the run")
        self.follow = follow_root(os.path.expanduser(self.follow))
        try:
            self.checkpoint = latest_committed(self.follow)
        except (OSError, ValueError):
            self.checkpoint = None
        if self.checkpoint is None:
            raise ValueError(f"follow={self.follow}: no committed checkpoint there yet (a step_* dir with its "
                             "manifest); start serving after training wrote its first checkpoint")
        if self.follow_live:
            live_run_name(self.follow)  # a run's folder, or ValueError

    def ingress_replicas_at_start(self) -> int:
        """Replicas of the HTTP-facing deployment when the app starts (OpenAIServer, or OpenAIIngress with
        ``single_deployment: false``)."""
        if not self.single_deployment:
            return self.ingress_num_replicas
        if self.autoscaling_config is not None:
            return max(1, int(self.autoscaling_config.get("min_replicas", 1)))
        return self.num_replicas or 1


def engine_args_of(args: ServeArgs) -> dict:
    """Keyword arguments of the engine class: its config, plus the expert-parallel settings with ep_size > 1."""
    kw: dict[str, Any] = {"config": args.engine}
    if args.ep_size > 1:
        kw["ep_size"] = args.ep_size
        kw["ep_options"] = {"num_cpus": args.ep_shard_cpus, "num_gpus": args.ep_shard_gpus,
                            "redundant_experts": args.ep_redundant_experts,
                            "replan_interval_steps": args.ep_replan_interval_steps}
    return kw


def _import_engine_cls(engine_cls: str) -> type:
    from raymoe.deployments.server import resolve_engine_cls

    try:
        return resolve_engine_cls(engine_cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine_cls={engine_cls!r} cannot be imported: {e}") from None


def check_ep_size(checkpoint: str, ep_size: int) -> None:
    """ep_size must divide every MoE layer's expert count (checked here when the checkpoint is readable on
    this machine; on a cluster the replicas check it again)."""
    if ep_size == 1 or not os.path.exists(checkpoint):
        return
    from raymoe.deployments.ep_runner import check_ep_size
    from raymoe.platform.model_io import checkpoint_config

    check_ep_size(checkpoint_config(checkpoint), ep_size, checkpoint)  # a native checkpoint or a HF folder


def placement_bundles(args: ServeArgs) -> list[dict]:
    """LLMServer's placement group for ep_size > 1: the replica's bundle, then one per shard."""
    res = args.ray_actor_options
    # a bundle cannot be all zeros: a replica that reserves nothing gets a token 0.01 CPU
    replica = {"CPU": max(float(res.get("num_cpus", 1) or 0), 0.01)}
    if res.get("num_gpus"):
        replica["GPU"] = float(res["num_gpus"])
    shard = {"CPU": args.ep_shard_cpus, **({"GPU": args.ep_shard_gpus} if args.ep_shard_gpus else {})}
    return [replica] + [dict(shard) for _ in range(args.ep_size)]


def check_engine_args(engine_cls: str, engine_args: dict) -> None:
    """Fail at build time (not in every replica, retried by Serve) when the engine cannot take these arguments."""
    import inspect

    cls = _import_engine_cls(engine_cls)
    if engine_args.get("ep_size", 1) > 1 and "ep_size" not in inspect.signature(cls).parameters:
        raise ValueError(f"ep_size={engine_args['ep_size']} needs an engine with expert-parallel support "
                         f"({EP_ENGINE}); {engine_cls} has no ep_size argument")


def llm_server_deployment(args: ServeArgs, single: bool = False):
    """The LLMServer Deployment with options from args (a config file may still override them); ``single``:
    the OpenAIServer deployment (routes and engine in one replica, see `build_app`)."""
    from ray import serve

    from raymoe.deployments.ingress import OpenAIServer
    from raymoe.deployments.server import LLMServer

    limits = dict(max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                  backpressure_config={"status_code": 429})
    if single:  # HTTP requests: the engine's queue (max_waiting) answers 429 first, with an OpenAI body
        limits = dict(max_ongoing_requests=args.ingress_max_ongoing_requests,
                      max_queued_requests=args.ingress_max_queued_requests,
                      backpressure_config={"status_code": args.ingress_backpressure_status})
    opts: dict[str, Any] = dict(
        name="OpenAIServer" if single else "LLMServer", **limits, ray_actor_options=args.ray_actor_options,
        health_check_period_s=10, health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=30, max_constructor_retry_count=3,
    )
    if args.autoscaling_config is not None:
        opts["autoscaling_config"] = args.autoscaling_config
    else:
        opts["num_replicas"] = args.num_replicas or 1
    if args.checkpoint:
        opts["user_config"] = {"checkpoint": args.checkpoint}
    if args.follow:
        opts["user_config"] = {"follow": args.follow, "follow_interval_s": args.follow_interval_s,
                               "follow_live": args.follow_live}
    if args.ep_size > 1:
        opts["placement_group_bundles"] = placement_bundles(args)
        opts["placement_group_strategy"] = args.ep_placement_strategy
    opts.update(args.llm_server_options)
    return serve.deployment(OpenAIServer if single else LLMServer).options(**opts)


def build_app(args: dict | ServeArgs | None = None):
    """The Serve application for ``args`` (a dict as in a Serve config file, or `ServeArgs`)."""
    import ray
    from ray import serve

    from raymoe.deployments.ingress import OpenAIIngress, api_key_digest
    from raymoe.deployments.resources import check_resources

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args or {}))
    engine_args = engine_args_of(a)
    check_engine_args(a.engine_cls, engine_args)
    if a.checkpoint:
        check_ep_size(a.checkpoint, a.ep_size)
    if ray.is_initialized():  # `serve run` / a driver (raymoe serve checks after starting Ray)
        check_resources(a)
    # the replicas get the key's digest only: the key is in no deployment argument (nor in Serve's logs)
    key = a.api_key.get_secret_value() if a.api_key is not None else os.environ.get(API_KEY_ENV)
    digest = api_key_digest(key)
    if a.single_deployment:
        return llm_server_deployment(a, single=True).bind(a.engine_cls, engine_args, a.checkpoint,
                                                          a.stream_interval_s, a.model_id, a.default_max_tokens,
                                                          api_key_sha256=digest)
    server = llm_server_deployment(a).bind(a.engine_cls, engine_args, a.checkpoint, a.stream_interval_s)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=a.ingress_num_replicas,
        max_ongoing_requests=a.ingress_max_ongoing_requests, max_queued_requests=a.ingress_max_queued_requests,
        backpressure_config={"status_code": a.ingress_backpressure_status},
        ray_actor_options={"num_cpus": a.ingress_num_cpus},
    )
    return ingress.bind(server, a.model_id, a.default_max_tokens, digest)


def _print(msg: str) -> None:
    print(msg, flush=True)


DIRECT_INGRESS_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment for Ray Serve's direct ingress (its throughput-optimized mode, Ray >= 2.56): every ingress
    replica also answers HTTP itself, on ports from ``port + 1`` up, without the proxy hop. Must be in the
    environment of the Serve processes, i.e. set before Ray starts (on a cluster: before ``ray start``)."""
    return {**DIRECT_INGRESS_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1000)}


def direct_ingress_urls(host: str, port: int, replicas: int, timeout_s: float = 30.0) -> list[str]:
    """Base URLs of the replicas' direct-ingress servers (ports ``port + 1`` ...), found by asking each
    candidate port's ``/healthz``; waits up to ``timeout_s`` for ``replicas`` of them."""
    import http.client
    import json
    import time
    import urllib.request

    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline, found = time.monotonic() + timeout_s, []
    while True:
        found = []
        for p in range(port + 1, port + 1 + max(4 * replicas, 8)):
            try:
                with urllib.request.urlopen(f"http://{probe}:{p}/healthz", timeout=1.0) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        found.append(f"http://{host}:{p}")
            except (OSError, http.client.HTTPException, ValueError):
                continue  # nothing there, or another server (e.g. a gRPC port answers with binary frames)
        if len(found) >= replicas or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def run_blocking(args: ServeArgs, *, host: str = "127.0.0.1", port: int = 8000, app_name: str = "raymoe",
                 address: str = "local", num_cpus: Optional[int] = None, direct_ingress: bool = False,
                 log=_print) -> None:
    """`raymoe serve`: start Ray and Serve, deploy, block until Ctrl-C, then shut down Serve cleanly.

    address "local" starts a private Ray instance (never joins a cluster that happens to run on this machine);
    "auto" or "HOST:PORT" joins a running cluster (then num_cpus must be None). ``direct_ingress`` (local
    only): Ray Serve's throughput-optimized mode, see :func:`direct_ingress_env`; the proxy still answers on
    ``port``. Shutdown: Serve stops routing new requests, drains each replica
    (``graceful_shutdown_wait_loop_s``), then calls `LLMServer.__del__`, whose engine shutdown lets running
    generations finish. A local Ray gets `raymoe.deployments.proxy_errors.PROXY_ERRORS_ENV`, so the HTTP proxy
    answers its own failures with OpenAI error bodies (on a cluster: set it on every node before ``ray start``).
    """
    import os
    import time

    import ray
    from ray import serve

    from raymoe.deployments.proxy_errors import PROXY_ERRORS_ENV

    app = build_app(args)  # argument errors before anything starts
    if direct_ingress and (address != "local" or ray.is_initialized()):
        raise ValueError("direct ingress is set when Ray starts: with --address local only; on a cluster put "
                         f"{DIRECT_INGRESS_ENV} in every node's environment before `ray start`")
    if direct_ingress:
        os.environ.update(direct_ingress_env(port))
    if not ray.is_initialized():
        if address == "local":
            for k, v in PROXY_ERRORS_ENV.items():  # the proxy's own failures as OpenAI errors (it reads this at start)
                os.environ.setdefault(k, v)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        elif num_cpus is not None:
            raise ValueError(f"--num-cpus applies to a local Ray instance only, not to address={address!r}")
        else:
            ray.init(address=address)
    try:
        from raymoe.deployments.resources import check_resources

        check_resources(args)  # fail now with the numbers, not wait for a placement that never comes
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=app_name, route_prefix="/")
        log(f"serving '{args.model_id}' on http://{host}:{port}/v1 (Ctrl-C to stop)")
        if direct_ingress:
            for url in direct_ingress_urls(host, port, args.ingress_replicas_at_start()):
                log(f"direct ingress (one replica, no proxy hop): {url}/v1")
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
