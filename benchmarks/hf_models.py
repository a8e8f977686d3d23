"""raymoe vs transformers on the same Hugging Face weights: prefill and batched-decode tokens/s, same run.

For a small Mixtral-shaped and an OLMoE-shaped model (random weights made by transformers' config classes,
saved with ``save_pretrained`` and loaded by raymoe from that folder), in one process with the same threads:

- prefill: one forward over a batch of prompts that produces the next-token logits (transformers:
  ``model(ids, use_cache=True, logits_to_keep=1)``; raymoe: the engine's runner ``prefill``), tokens/s;
- decode: ``generate`` of N new tokens for a batch of 8 short prompts, greedy (transformers:
  ``generate(do_sample=False)``, its KV cache and loop; raymoe: ``raymoe.platform.generate.generate``, the
  serving engine's KV cache and decode loop), generated tokens/s; prefill time of the decode prompts included
  on both sides;
- where decode time goes in raymoe: the share of one decode step spent in attention, the MoE layers and the
  rest (torch.profiler on a few steps).

Measurements alternate between the two libraries (``--repeats`` rounds; the median of each side is used), so
machine noise hits both alike; the printed ratios are raymoe / transformers.

    python benchmarks/hf_models.py [--quick] [--threads 2] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import reexec_with_tuned_malloc  # noqa: E402

SHAPES = {
    # name: (transformers config class name, kwargs)
    "mixtral-D512-E8-k2": ("MixtralConfig", dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
        max_position_embeddings=4096)),
    "olmoe-D512-E64-k8": ("OlmoeConfig", dict(
        hidden_size=512, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, num_experts=64, num_experts_per_tok=8, vocab_size=4096,
        max_position_embeddings=4096)),
}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def build_pair(name: str, folder: Path, device, dtype):
    """(transformers model, raymoe model) with the same weights, both in eval mode."""
    import torch
    import transformers

    from raymoe.platform.model_io import load_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls_name, kw = SHAPES[name]
    cfg = getattr(transformers, cls_name)(**kw, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    hf.save_pretrained(folder)
    hf = hf.to(device=device, dtype=dtype).eval()
    ours = load_model(folder, device=device).to(dtype=dtype).eval()
    return hf, ours


def bench_model(name: str, args, device, dtype) -> dict:
    import torch

    from raymoe.platform.generate import generate
    from raymoe.platform.runner import LocalRunner

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_pair(name, Path(tmp), device, dtype)
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(1)
    pre_ids = torch.randint(0, V, (args.prefill_batch, args.prefill_len), generator=g).to(device)
    dec_prompts = torch.randint(0, V, (args.decode_batch, args.decode_prompt), generator=g)
    new = args.new_tokens
    mask = torch.ones_like(pre_ids, dtype=torch.bool)

    def hf_prefill():
        hf(pre_ids, use_cache=True, logits_to_keep=1)

    def ours_prefill():
        runner = LocalRunner(ours, args.prefill_batch)
        runner.prefill(pre_ids, mask)

    def hf_decode():
        out = hf.generate(dec_prompts.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)
        assert out.shape[1] == args.decode_prompt + new

    def ours_decode():
        out = generate(ours, dec_prompts.tolist(), max_new_tokens=new, temperature=0.0)
        assert all(len(o) == new for o in out)

    times = {k: [] for k in ("hf_prefill", "ours_prefill", "hf_decode", "ours_decode")}
    fns = {"hf_prefill": hf_prefill, "ours_prefill": ours_prefill, "hf_decode": hf_decode,
           "ours_decode": ours_decode}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up (kernel probes, allocator)
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(_timed(fn, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        where = decode_breakdown(ours, dec_prompts, min(new, 8)) if args.breakdown else {}
    pre_tokens = args.prefill_batch * args.prefill_len
    dec_tokens = args.decode_batch * new
    return {
        "model": name,
        "prefill_tok_s": (pre_tokens / med["ours_prefill"], pre_tokens / med["hf_prefill"]),
        "decode_tok_s": (dec_tokens / med["ours_decode"], dec_tokens / med["hf_decode"]),
        "where": where,
    }


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory (a sum over a tensor far larger than the caches), best of N."""
    import torch

    big = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_breakdown(model, prompts, steps: int) -> dict:
    """Share of raymoe's decode time in attention, MoE layers, and the rest (a few greedy steps, profiled
    by module hooks with wall-clock timers), and the MoE layers' memory floor: the bytes of the experts each
    forward actually ran (an expert with no token is not read) at the machine's read bandwidth, over the MoE
    layers' measured time (1.0: the layers take no longer than reading their weights once)."""
    from raymoe.platform.generate import generate

    spent = {"attention": 0.0, "moe": 0.0}
    starts = {}
    expert_bytes = [0]

    def count_bytes(mod, inp, out):
        per_expert = sum(p.numel() * p.element_size() for p in mod.experts.parameters()) // mod.num_local_experts
        expert_bytes[0] += int((mod.last_stats.exp_counts > 0).sum()) * per_expert

    def pre(kind):
        def hook(mod, inp):
            starts[id(mod)] = time.perf_counter()
        return hook

    def post(kind):
        def hook(mod, inp, out):
            spent[kind] += time.perf_counter() - starts.pop(id(mod))
        return hook

    handles = []
    for block in model.blocks:
        for kind, mod in (("attention", block.attn), ("moe" if block.is_moe else "dense_mlp", block.mlp)):
            spent.setdefault(kind, 0.0)
            handles += [mod.register_forward_pre_hook(pre(kind)), mod.register_forward_hook(post(kind))]
            if block.is_moe:
                handles.append(block.mlp.register_forward_hook(count_bytes))
    try:
        t0 = time.perf_counter()
        generate(model, prompts.tolist(), max_new_tokens=steps, temperature=0.0)
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    out = {k: v / total for k, v in spent.items()}
    out["rest"] = max(0.0, 1.0 - sum(out.values()))
    floor = expert_bytes[0] / read_bandwidth() / spent["moe"] if spent["moe"] else None
    return {"shares": out, "moe_memory_floor": floor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--models", nargs="*", default=list(SHAPES))
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.prefill_len, args.new_tokens, args.prefill_batch = 1, 32, 8, 2
    reexec_with_tuned_malloc()
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(f"raymoe vs transformers, same weights, {device.type} {str(dtype).replace('torch.', '')}, "
          f"{args.threads} threads, median of {args.repeats} alternating rounds")
    print(f"prefill: batch {args.prefill_batch} x {args.prefill_len} tokens; decode: batch {args.decode_batch}, "
          f"{args.decode_prompt}-token prompts, {args.new_tokens} new tokens, greedy")
    print(f"{'model':22s} {'prefill tok/s (ours / hf)':>28s} {'ratio':>6s} {'decode tok/s (ours / hf)':>28s} "
          f"{'ratio':>6s}")
    for name in args.models:
        r = bench_model(name, args, device, dtype)
        (po, ph), (do, dh) = r["prefill_tok_s"], r["decode_tok_s"]
        print(f"{name:22s} {po:12.0f} / {ph:<13.0f} {po / ph:6.2f} {do:12.0f} / {dh:<13.0f} {do / dh:6.2f}")
        if r["where"]:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in r["where"]["shares"].items())
            print(f"{'':22s} raymoe decode time: {parts}; MoE layers at {r['where']['moe_memory_floor']:.2f} "
                  "of their memory floor (expert bytes read / read bandwidth)")


if __name__ == "__main__":
    main()
