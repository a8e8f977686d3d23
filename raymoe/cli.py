"""`raymoe` command line: thin wrappers that parse, load the config and call the library.

    raymoe train --config cluster_configs/local_tiny.yaml [--set train.steps=100 ...]
    raymoe eval --checkpoint runs/tiny/checkpoints [--config ...]
    raymoe generate --checkpoint runs/tiny/checkpoints --prompt "def "
    raymoe config [--config X] [--set ...] [--fields]
    raymoe report runs/tiny
    raymoe serve --checkpoint runs/tiny/checkpoints [--port 8000] [--num-replicas N] [--ep-size N] [--direct-ingress]
    raymoe serve --follow runs/tiny [--follow-interval 2]     (serve while training: reload each committed checkpoint)
    raymoe serve --follow runs/tiny --live --address auto     (... and the weights training publishes in memory)
    raymoe checkpoint inspect runs/tiny/checkpoints [--verify]
    raymoe checkpoint reshard runs/tiny/checkpoints --workers 4 [--ep-size 4]
    raymoe export --checkpoint runs/tiny/checkpoints --out hf_model [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see cluster_configs/); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raymoe", description="Elastic Mixture-of-Experts training and serving.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (cluster.mode: local = this process, ray = expert shards)")
    _add_config_args(p)

    p = sub.add_parser("eval", help="validation loss / perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or a folder of checkpoints")
    _add_config_args(p)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or a folder of checkpoints")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP endpoints on Ray Serve (blocks; Ctrl-C stops)")
    p.add_argument("--checkpoint", help="checkpoint folder or a folder of checkpoints (required by the real engine)")
    p.add_argument("--follow", default=None, metavar="RUN_DIR_OR_STORAGE_URI",
                   help="serve while training: serve the run's latest committed checkpoint and reload each newer "
                        "one training commits (--reload-policy, default drain: no request fails); instead of "
                        "--checkpoint")
    p.add_argument("--follow-interval", type=float, default=2.0, help="seconds between two looks for a newer "
                                                                      "checkpoint (with --follow)")
    p.add_argument("--live", action="store_true", help="with --follow RUN_DIR and --address of the training's Ray "
                   "cluster: also swap in the weights the run publishes in memory (cluster.publish_interval), "
                   "expert by expert from the object store, whichever is newer than the last checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default="raymoe", help="model name clients put in 'model'")
    p.add_argument("--num-replicas", type=int, default=1, help="LLMServer replicas (min replicas with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale LLMServer between --num-replicas "
                                                                   "and this")
    # engine settings: EngineConfig fields (raymoe.deployments.engine_config); unset flags keep its defaults
    p.add_argument("--max-batch-size", type=int, default=None, help="rows in a replica's running decode batch "
                                                                     "(default 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion in tokens; sizes "
                   "the KV cache (default 4096, capped at the model's context)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests per replica before 429 "
                                                                  "(default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="padded prompt tokens prefilled per step "
                                                                         "(default 2048)")
    p.add_argument("--prefix-cache-mb", type=float, default=None, help="MiB of prefix cache per replica: prompts "
                   "sharing a prefix (system prompt, chat history) reuse its KV (default 0: off; ep-size 1 only)")
    p.add_argument("--prefix-block-size", type=int, default=None, help="tokens per prefix-cache block (default 16)")
    p.add_argument("--reload-policy", default=None, help="drain (default) or immediate")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads of each engine")
    p.add_argument("--engine", default=None, help="engine class 'module:Class' (e.g. "
                                                  "raymoe.deployments.fake_engine:FakeEngine)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel shards per replica (InferenceShard actors "
                                                          "in the replica's placement group); 1 = whole model")
    p.add_argument("--ep-shard-cpus", type=float, default=1.0, help="CPUs reserved per shard (with --ep-size > 1)")
    p.add_argument("--redundant-experts", type=int, default=0, help="hot-expert replication (with --ep-size > 1): "
                   "extra expert slots per shard and MoE layer for copies of the most loaded experts (default 0)")
    p.add_argument("--replan-interval", type=int, default=32, help="engine steps between two placements of the "
                                                                   "expert copies (with --redundant-experts)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--address", default=None, help="Ray to use: 'local' (a new private instance; the default "
                                                   "unless RAY_ADDRESS is set), 'auto' or HOST:PORT of a cluster")
    p.add_argument("--stream-interval", type=float, default=0.0,
                   help="streaming: min seconds between two chunks of one stream (tokens in between are batched "
                        "into the next chunk); 0 = a chunk per token. Fewer, larger SSE events cost the server "
                        "less (benchmarks/serve_load.py --stream-interval)")
    p.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY' (401 otherwise; "
                   "/healthz stays open); default: $RAYMOE_API_KEY, else no key. The variable keeps the key out of "
                   "the process list")
    p.add_argument("--no-resource-check", action="store_true",
                   help="deploy even when the cluster has fewer CPUs/GPUs than the replicas need (a cluster that "
                        "adds nodes on demand); by default raymoe serve fails at once with needed vs available")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Ray Serve's throughput-optimized mode (local Ray only): each ingress replica also answers "
                        "HTTP on its own port from --port+1 up, skipping the proxy hop (printed at start)")

    p = sub.add_parser("config", help="print the resolved config, or --fields to list every field")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its default and description")
    p.add_argument("--markdown", action="store_true", help="with --fields: a Markdown table (docs/config.md)")

    p = sub.add_parser("report", help="plot a run folder (loss curves, expert load)")
    p.add_argument("run_dir")

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    c = csub.add_parser("inspect", help="summarise a checkpoint")
    c.add_argument("path")
    c.add_argument("--verify", action="store_true", help="also check every file's size and sha256")
    c = csub.add_parser("reshard", help="plan + verify loading a checkpoint with another number of shards")
    c.add_argument("path")
    c.add_argument("--workers", type=int, required=True, help="target number of expert shards")
    c.add_argument("--ep-size", type=int, default=None, help="target expert-parallel size (default: largest valid)")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (Mixtral, Qwen2/3-MoE, OLMoE, "
                                      "DeepSeek-V3 configurations)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, folder of checkpoints or HF folder")
    p.add_argument("--out", required=True, help="output folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the model's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    return ap


def _cmd_export(args) -> int:
    import torch

    from raymoe.platform.hf import export_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_checkpoint(args.checkpoint, args.out, dtype=dtype, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite)
    print(f"exported: {out}")
    return 0


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _cmd_train(args) -> int:
    from raymoe.config import load_config
    from raymoe.platform.generate import sample_text
    from raymoe.platform.model_io import load_model
    from raymoe.platform.tokenizer import load_tokenizer
    from raymoe.platform.trainer import LocalTrainer

    cfg = load_config(args.config, args.overrides)
    if cfg.cluster.mode == "ray":
        from raymoe.actors.launch import train_on_ray

        summary = train_on_ray(cfg)
        trainer = None
    else:
        from raymoe.config import in_ray_job_working_dir, resolve_output_dir
        from raymoe.platform.storage import RunOutputs

        if in_ray_job_working_dir(Path.cwd()):  # `ray job submit` of a local-mode run: outputs outlive the job
            cfg.run.output_dir = str(resolve_output_dir(cfg.run.output_dir))
            print(f"outputs: {RunOutputs(cfg.run.output_dir, cfg.run.name)}", flush=True)
        trainer = LocalTrainer(cfg)
        summary = trainer.run()
    print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} nats/token "
          f"({_fmt(summary.get('last_bpb'), '.3f')} bits/byte); val_loss {_fmt(summary.get('val_loss'), '.4f')} "
          f"(ppl {_fmt(summary.get('val_ppl'), '.2f')}, {_fmt(summary.get('val_bpb'), '.3f')} bits/byte)")
    print(f"checkpoint: {summary['checkpoint']}")
    for plot in summary["plots"]:
        print(f"plot: {plot}")
    if cfg.sample.max_new_tokens:
        s = cfg.sample
        model = trainer.model if trainer is not None else load_model(summary["checkpoint"])
        tokenizer = load_tokenizer(summary["checkpoint"])  # the one the checkpoint carries
        print("sample:\n" + sample_text(model, tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                                         s.top_p, seed=cfg.run.seed))
    return 0


def _cmd_eval(args) -> int:
    from raymoe.config import load_config
    from raymoe.platform.model_io import load_model
    from raymoe.platform.training import evaluate_checkpoint_windows

    from raymoe.platform.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    # the same windows and forward sizes as the validation loss logged during training; the text is tokenized
    # with the tokenizer the checkpoint carries
    print(json.dumps(evaluate_checkpoint_windows(cfg, load_model(args.checkpoint),
                                                 tokenizer=load_tokenizer(args.checkpoint))))
    return 0


def _cmd_generate(args) -> int:
    from raymoe.platform.detokenize import IncrementalDetokenizer
    from raymoe.platform.generate import generate
    from raymoe.platform.model_io import load_model
    from raymoe.platform.tokenizer import load_tokenizer

    model = load_model(args.checkpoint)
    tok = load_tokenizer(args.checkpoint)  # the tokenizer the checkpoint carries
    prompts = [tok.encode(p, add_special_tokens=True) for p in args.prompt]
    outs = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, eos_id=tok.stop_ids, seed=args.seed)
    for prompt, ids, out in zip(args.prompt, prompts, outs):
        detok = IncrementalDetokenizer(tok, ids)
        print(prompt + detok.push(out) + detok.flush())
    return 0


def _cmd_serve(args) -> int:
    import os

    from raymoe.deployments.app import ServeArgs, run_blocking

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.num_replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.num_replicas):
        raise ValueError(f"need 1 <= --num-replicas <= --max-replicas; got {args.num_replicas}, {args.max_replicas}")
    if not args.checkpoint and not args.engine and not args.follow:
        raise ValueError("--checkpoint or --follow is required (or --engine, e.g. "
                         "raymoe.deployments.fake_engine:FakeEngine)")
    engine_flags = ("max_batch_size", "max_model_len", "max_waiting", "max_prefill_tokens", "reload_policy", "device",
                    "torch_threads", "prefix_cache_mb", "prefix_block_size")
    fields = {"checkpoint": args.checkpoint, "model_id": args.model_id, "stream_interval_s": args.stream_interval,
              "engine": {k: getattr(args, k) for k in engine_flags if getattr(args, k) is not None},
              "api_key": args.api_key, "check_resources": not args.no_resource_check}
    if args.engine:
        fields["engine_cls"] = args.engine  # otherwise ServeArgs picks the default for the ep_size
    if args.follow:
        fields.update(follow=args.follow, follow_interval_s=args.follow_interval, follow_live=args.live)
    elif args.live:
        raise ValueError("--live needs --follow RUN_DIR (the training run's folder)")
    if args.ep_size != 1 or args.redundant_experts:  # ServeArgs checks it (>= 1) and the shard settings
        fields.update(ep_size=args.ep_size, ep_shard_cpus=args.ep_shard_cpus,
                      ep_redundant_experts=args.redundant_experts, ep_replan_interval_steps=args.replan_interval)
    try:
        sargs = ServeArgs(**fields)
        eng = sargs.engine
        scale = {"num_replicas": args.num_replicas, "autoscaling_config": None}
        if args.max_replicas is not None and args.max_replicas > args.num_replicas:
            scale = {"num_replicas": None, "autoscaling_config": {
                "min_replicas": args.num_replicas, "max_replicas": args.max_replicas,
                "target_ongoing_requests": eng.max_batch_size}}
        sargs = ServeArgs(**fields, **scale, max_ongoing_requests=eng.max_batch_size + eng.max_waiting)
    except ValueError as exc:  # pydantic's ValidationError: one line per field
        errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'serve'}: {e['msg']}" for e in errors)) from None
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local" and args.num_cpus is not None:
        raise ValueError(f"--num-cpus applies to a local Ray instance only, not to --address {address}")
    if args.live and address == "local":
        raise ValueError("--live reads the weights from the training run's Ray cluster: add --address auto (or "
                         "HOST:PORT, or set RAY_ADDRESS); a new local instance has no training run")
    run_blocking(sargs, host=args.host, port=args.port, address=address, num_cpus=args.num_cpus,
                 direct_ingress=args.direct_ingress)
    return 0


def _cmd_config(args) -> int:
    from raymoe.config import describe_fields, load_config

    if args.fields:
        rows = describe_fields()
        if args.markdown:
            print("# Configuration fields\n\nGenerated by `raymoe config --fields --markdown`; "
                  "every YAML file under `cluster_configs/` uses these sections.\n")
            print("| field | default | description |\n|---|---|---|")
            for path, default, desc in rows:
                print(f"| `{path}` | `{default}` | {desc.replace('|', '/')} |")
        else:
            for path, default, desc in rows:
                print(f"{path:32s} {default:14s} {desc}")
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_report(args) -> int:
    from raymoe.platform import storage
    from raymoe.platform.report import plot_run

    run_dir = args.run_dir
    if storage.is_remote(run_dir):  # a run folder at a storage URI: plot its uploaded logs from a local copy
        loc = storage.location(run_dir)
        outputs = storage.RunOutputs(loc.parent, loc.name)
        outputs.pull(refresh=True)
        run_dir = outputs.local
        print(f"{args.run_dir}: logs as of the last checkpoint commit, downloaded to {run_dir}")
    for path in plot_run(run_dir):
        print(path)
    return 0


def _cmd_checkpoint(args) -> int:
    if args.checkpoint_command == "reshard":
        from raymoe.platform.reshard import reshard_plan

        print(json.dumps(reshard_plan(args.path, args.workers, args.ep_size), indent=2, default=str))
        return 0
    from raymoe.platform.checkpoint import inspect_checkpoint

    print(json.dumps(inspect_checkpoint(args.path, verify=args.verify), indent=2, default=str))
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "config": _cmd_config,
            "report": _cmd_report, "checkpoint": _cmd_checkpoint, "serve": _cmd_serve, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `raymoe` console script; user errors print one clear line and exit 2."""
    args = _parser().parse_args(argv)
    if args.command in ("train", "eval", "generate"):  # they run the model in this process (serve: in the engine)
        from raymoe.platform.host_memory import tune_malloc

        tune_malloc()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"raymoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
