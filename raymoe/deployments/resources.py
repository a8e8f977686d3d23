"""Check the cluster's resources against what a serving application needs, before deploying it.

Without this, an application that cannot be placed (``raymoe serve --ep-size 2`` on a 2-CPU machine needs 1 CPU
for the replica and 1 per shard) waits forever: Ray only warns that a placement group "has taken more than 30s
to be scheduled" and ``/healthz`` never answers. `check_resources` compares, per resource (CPU, GPU, ...):

- every placement-group bundle of a replica (its own, and one per expert-parallel shard) with the largest
  alive node (a bundle is never split over nodes); with ``STRICT_PACK`` the replica's whole group must fit one
  node;
- the total of the replicas at start (``num_replicas``, or ``min_replicas`` when autoscaling) and the split
  layout's ingress replicas with the cluster's total.

A shortfall raises ValueError with both numbers. Resources that exist but are in use right now (another
application) are not an error: the deployment then waits for them, and the message of a shortfall shows what
is available now too. Clusters that add nodes on demand (the Ray autoscaler, KubeRay) can have less than the
application needs before it starts: ``check_resources: false`` (``raymoe serve --no-resource-check``) skips the
check there. We do not try to detect an autoscaler: Ray has no stable public API that says whether one runs.
"""

from __future__ import annotations

from typing import Optional

_EPS = 1e-9


def replica_bundles(args) -> list[dict[str, float]]:
    """The resources of one engine replica: its placement-group bundles (expert-parallel), else one bundle of
    its ``ray_actor_options``."""
    from raymoe.deployments.app import placement_bundles

    if args.ep_size > 1:
        return args.llm_server_options.get("placement_group_bundles") or placement_bundles(args)
    opts = {**args.ray_actor_options, **args.llm_server_options.get("ray_actor_options", {})}
    bundle = {"CPU": float(opts.get("num_cpus", 1) or 0), "GPU": float(opts.get("num_gpus", 0) or 0),
              **{k: float(v) for k, v in (opts.get("resources") or {}).items()}}
    return [{k: v for k, v in bundle.items() if v}]


def _replicas_at_start(args) -> int:
    if args.autoscaling_config is not None:
        return int(args.autoscaling_config.get("min_replicas", 1))
    return args.num_replicas or 1


def _fmt(res: dict[str, float], keys=None) -> str:
    """``res`` as text; ``keys``: only these resources (a node also lists memory, node ids, ...)."""
    keys = sorted(res) if keys is None else sorted(keys)
    return "{" + ", ".join(f"{k}: {res.get(k, 0.0):g}" for k in keys) + "}"


def _add(a: dict[str, float], b: dict[str, float], times: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v * times
    return out


def _short(need: dict[str, float], have: dict[str, float]) -> bool:
    return any(v > have.get(k, 0.0) + _EPS for k, v in need.items())


def check_resources(args, nodes: Optional[list[dict[str, float]]] = None,
                    available: Optional[dict[str, float]] = None) -> None:
    """ValueError when the application of ``args`` (`ServeArgs`) can never be placed on the cluster (see the
    module docstring). ``nodes``: each alive node's resources, ``available``: the cluster's free resources
    (default: asked from the Ray this process is connected to)."""
    if not args.check_resources:
        return
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        available = ray.available_resources()
    bundles = replica_bundles(args)
    group = {}
    for b in bundles:
        group = _add(group, b)
    total = _add({}, group, _replicas_at_start(args))
    if not args.single_deployment:
        total = _add(total, {"CPU": args.ingress_num_cpus}, args.ingress_num_replicas)
    have = {}
    for n in nodes:
        have = _add(have, n)
    hint = ("lower --num-replicas / --ep-size / --ep-shard-cpus (ServeArgs: num_replicas, ep_size, "
            "ep_shard_cpus, ray_actor_options), add nodes, or on a cluster that adds nodes on demand pass "
            "--no-resource-check (check_resources: false)")
    what = f"a replica ({len(bundles)} placement bundle(s): {', '.join(_fmt(b) for b in bundles)})"
    fits_node = (lambda need: any(not _short(need, n) for n in nodes))
    need_per_node = [group] if args.ep_placement_strategy == "STRICT_PACK" and args.ep_size > 1 else bundles
    for need in need_per_node:
        if not fits_node(need):
            raise ValueError(f"not enough resources on any node: {what} needs {_fmt(need)} on one node; the "
                             f"nodes have {', '.join(_fmt(n, need) for n in nodes[:4]) or 'nothing'}; {hint}")
    if _short(total, have):
        raise ValueError(f"not enough resources: {_replicas_at_start(args)} replica(s) at start, {what} each, "
                         f"need {_fmt(total)} in total; "
                         f"the cluster has {_fmt(have, total)} ({_fmt(available or {}, total)} available now); {hint}")
