"""Serve while training: `--follow` through checkpoints vs `--follow --live` (published weights), in one run.

One local Ray instance trains a small MoE on Ray (``--workers`` shards, expert-parallel) that commits a
checkpoint every ``--checkpoint-interval`` steps and publishes its weights every ``--publish-interval`` steps
(``cluster.publish_interval``), and serves it with two Serve apps at once, both following the run with the
same poll interval: ``ckpt`` (``follow``: the committed checkpoints) and ``live`` (``follow`` +
``follow_live``: whichever is newer of the checkpoints and the weights in the object store). One closed-loop client per app sends greedy completions throughout.
Training holds after its first checkpoint until both apps serve it, then runs ``--steps`` steps.

Printed, per app, measured in this run:

- staleness: the training step (the run's last logged step) minus the served step (``/v1/models``), sampled
  every ``--sample`` seconds while training runs: mean and max;
- time to swap: from the moment a step was in a source the app follows (committed: its manifest's mtime;
  published: the registry's completion time; the live app follows both, so the earlier of the two) to the
  first sample at which the app serves it (so within ``--sample`` seconds): median
  and max over the steps the app served;
- the steps served, and the client's answers by status (any non-200 is a failed request);
- the ratios ckpt / live of mean staleness and median time to swap.

Usage: python benchmarks/serve_follow.py [--steps 60] [--checkpoint-interval 4] [--publish-interval 1]
       [--poll 0.2] [--sample 0.05]
       [--d-model 128] [--layers 4] [--experts 8] [--workers 2] [--num-cpus 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path


def train_config(args, out: str):
    from raymoe.config import load_config

    return load_config(None, [
        "model.block_size=64", f"model.n_layer={args.layers}", "model.n_head=4", f"model.d_model={args.d_model}",
        f"model.d_ff={4 * args.d_model}", f"moe.num_experts={args.experts}", "moe.k=2", "tokenizer.kind=byte",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=2",
        f"train.steps={args.steps + args.checkpoint_interval}", "train.eval_interval=100000", "train.log_interval=1",
        "train.progress=false", "train.threads=1", "sample.max_new_tokens=0", "cluster.mode=ray",
        f"cluster.num_workers={args.workers}", f"cluster.ep_size={args.workers}", "cluster.cpus_per_worker=1",
        f"checkpoint.interval={args.checkpoint_interval}", "checkpoint.keep_last=1000",
        f"cluster.publish_interval={args.publish_interval}", f"run.output_dir={out}", "run.name=follow",
        f"data.cache_dir={out}/cache"])


def get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def served_step(url: str):
    try:
        return get_json(url + "/v1/models")["data"][0]["raymoe"]["step"]
    except Exception:  # noqa: BLE001 - an app still starting
        return None


def training_step(run_dir: Path) -> int:
    """The last step the run logged (metrics.jsonl, one line per step)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines[-5:] if line.startswith("{")]
    return max(steps, default=0)


def client(url: str, stop: threading.Event, statuses: list) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps({"prompt": "The", "max_tokens": 8, "temperature": 0}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        except OSError:
            statuses.append(-1)


def committed_at(ckpt_dir: Path) -> dict[int, float]:
    """step -> wall time its manifest was written (the commit)."""
    out = {}
    for d in ckpt_dir.glob("step_*"):
        m = d / "manifest.json"
        if m.exists():
            out[int(d.name.split("_")[1])] = m.stat().st_mtime
    return out


def summarize(name: str, samples: list, first_seen: dict, made_at: dict, statuses: list) -> dict:
    stale = [t - s for t, s in samples]
    swaps = [first_seen[s] - made_at[s] for s in first_seen if s in made_at]
    return {"app": name, "stale_mean": statistics.mean(stale), "stale_max": max(stale),
            "swap_median": statistics.median(swaps) if swaps else float("nan"),
            "swap_max": max(swaps) if swaps else float("nan"), "served": sorted(first_seen),
            "ok": sum(s == 200 for s in statuses), "failed": sum(s != 200 for s in statuses)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps measured (after the first checkpoint)")
    p.add_argument("--checkpoint-interval", type=int, default=4, help="checkpoint.interval")
    p.add_argument("--publish-interval", type=int, default=1, help="cluster.publish_interval")
    p.add_argument("--poll", type=float, default=0.2, help="follow_interval_s of both apps")
    p.add_argument("--sample", type=float, default=0.05, help="seconds between two staleness samples")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=8)
    args = p.parse_args()

    import os

    import ray
    from ray import serve

    from raymoe.actors.launch import train_on_ray
    from raymoe.actors.weight_registry import find_registry
    from raymoe.deployments.app import build_app
    from raymoe.deployments.proxy_errors import PROXY_ERRORS_ENV

    os.environ.update(PROXY_ERRORS_ENV)
    out = tempfile.mkdtemp(prefix="serve_follow_")
    run_dir, cfg = Path(out) / "follow", train_config(args, out)
    first_step = args.checkpoint_interval  # training holds there until both apps serve it
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    coord, done = [], {}

    def on_start(c, info):
        ray.get(c.hold_before_step.remote(first_step), timeout=60)
        coord.append(c)

    def train():
        try:
            done["summary"] = train_on_ray(cfg, on_start=on_start)
        except BaseException as exc:  # noqa: BLE001 - reported below
            done["error"] = exc

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    first = run_dir / "checkpoints" / f"step_{first_step:08d}" / "manifest.json"
    while not first.exists():
        assert "error" not in done and trainer.is_alive(), done
        time.sleep(0.1)
    urls = {}
    for name, live in (("ckpt", False), ("live", True)):
        serve.run(build_app({"follow": str(run_dir), "follow_live": live, "follow_interval_s": args.poll,
                             "model_id": "bench", "ray_actor_options": {"num_cpus": 0}}),
                  name=name, route_prefix=f"/{name}")
        urls[name] = f"http://127.0.0.1:8123/{name}"
    while any(served_step(u) != first_step for u in urls.values()):
        time.sleep(0.1)
    stop, statuses = threading.Event(), {n: [] for n in urls}
    clients = [threading.Thread(target=client, args=(u, stop, statuses[n]), daemon=True) for n, u in urls.items()]
    for t in clients:
        t.start()
    registry = find_registry("follow")
    samples = {n: [] for n in urls}
    first_seen = {n: {} for n in urls}
    published: dict[int, float] = {}
    ray.get(coord[0].release.remote(), timeout=60)
    while trainer.is_alive():
        now, train_step = time.time(), training_step(run_dir)
        try:
            published.update(ray.get(registry.info.remote(), timeout=10)["published_at"])
        except Exception:  # noqa: BLE001 - the run ended: the registry is gone
            pass
        for n, u in urls.items():
            s = served_step(u)
            if s is not None:
                samples[n].append((train_step, s))
                first_seen[n].setdefault(s, now)
        time.sleep(args.sample)
    stop.set()
    for t in clients:
        t.join(60)
    assert "error" not in done, done
    committed = committed_at(run_dir / "checkpoints")
    # a step exists for an app from the first moment one of the sources it follows has it
    made_at = {"ckpt": committed, "live": {s: min(t for t in (committed.get(s), published.get(s)) if t is not None)
                                           for s in set(committed) | set(published)}}
    rows = [summarize(n, samples[n], {s: t for s, t in first_seen[n].items() if s > first_step},
                      made_at[n], statuses[n]) for n in urls]
    print(f"model d={args.d_model} layers={args.layers} experts={args.experts}, {args.workers} shards, "
          f"{args.steps} steps, checkpoint every {args.checkpoint_interval}, publish every "
          f"{args.publish_interval}, poll {args.poll}s, "
          f"sample {args.sample}s")
    print(f"{'app':5} {'stale mean':>10} {'stale max':>9} {'swap p50 s':>10} {'swap max s':>10} {'ok':>5} "
          f"{'failed':>6}  steps served")
    for r in rows:
        print(f"{r['app']:5} {r['stale_mean']:10.2f} {r['stale_max']:9d} {r['swap_median']:10.3f} "
              f"{r['swap_max']:10.3f} {r['ok']:5d} {r['failed']:6d}  {r['served']}")
    ck, lv = rows
    print(f"ratios ckpt/live: staleness mean {ck['stale_mean'] / max(lv['stale_mean'], 1e-9):.2f}, "
          f"time to swap p50 {ck['swap_median'] / max(lv['swap_median'], 1e-9):.2f}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
