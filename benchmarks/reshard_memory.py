"""What a rank of a new world holds while it takes its state from an old world's copies (a membership change:
:func:`raymoe.platform.reshard.assemble`), CPU + gloo.

An old world (``build_rank`` at its layout, one optimizer step on random tokens so AdamW has state) hands
back every rank's copy of what it holds (``reshard.local_shards``); this process publishes the copies as
pieces, each distinct piece once (``choose_sources``, ``piece_data``), one file each (the object store's
stand-in: a fetch reads a piece into the new rank's memory as a ``ray.get`` would). Each rank of a new world of
another size, EP layout and sharding, built by ``build_rank``, assembles its state from the pieces and reports
its share (its parameters, buffers and AdamW state at the new layout), the bytes it fetched, the most it
fetched at once, and its resident memory above what it had before assembling (the most seen after any fetch,
malloc trimmed before: AdamW's moments it creates are part of its share). Printed per new rank as ratios:

- fetched / share (>= 1: the rest is parts of pieces other ranks need), share / whole state;
- most fetched at once / whole state (one tensor's pieces), RSS growth / share (its share's new tensors plus
  one tensor's pieces: near 1 when no rank ever holds more).

    python benchmarks/reshard_memory.py [--quick] [--moves N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile

import torch
from _gloo import run_world

from raymoe.platform import reshard

MODEL = dict(vocab_size=2048, block_size=64, n_layer=4, n_head=4, d_model=384, d_ff=1536, expert_ffn=768,
             num_experts=8, expert_interval=2, k=1, capacity_factor=1.25, dropout=0.0)
QUICK = dict(MODEL, n_layer=2, d_model=64, d_ff=128, expert_ffn=64, num_experts=4, block_size=32, vocab_size=512)
SHARD = ("shard", "shard")
# (old world, EP, (dense, experts) sharding) -> (new world, EP, sharding)
MOVES = [((2, 2, SHARD), (3, 1, ("shard", "replicate"))), ((3, 1, SHARD), (2, 2, ("replicate", "replicate"))),
         ((4, 2, SHARD), (2, 2, SHARD)), ((4, 4, ("replicate", "replicate")), (2, 1, SHARD))]


def _rss() -> int:
    """Resident bytes now, free heap handed back first (Linux; 0 elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError):
        return 0


def _build(rank: int, world: int, quick: bool, ep: int, sharding: tuple[str, str]):
    from raymoe.config import load_config
    from raymoe.platform.distributed import build_rank
    from raymoe.platform.model import GPTConfig

    cfg = load_config(None, ["run.seed=0", f"cluster.dense_sharding={sharding[0]}",
                             f"cluster.expert_sharding={sharding[1]}"])
    model_config = GPTConfig.from_dict(QUICK if quick else MODEL)
    return model_config, build_rank(cfg, model_config, rank, world, {lid: ep for lid in
                                                                      model_config.experts_per_layer()},
                                    None, torch.device("cpu"))


def old_rank(rank: int, world: int, quick: bool, ep: int, sharding: tuple[str, str], folder: str) -> str:
    """One optimizer step at this layout; the file of this rank's copy of what it holds."""
    from raymoe.platform.train_step import train_step

    mc, parts = _build(rank, world, quick, ep, sharding)
    x = torch.randint(mc.vocab_size, (2, mc.block_size), generator=torch.Generator().manual_seed(rank))
    train_step(parts.model, parts.optimizer, [(x, x.roll(-1, 1))], lr=1e-3, grad_clip=1.0,
               grad_sync=parts.grad_sync if world > 1 else None, grad_norm_fn=parts.grad_norm if world > 1 else None,
               total_micro_batches=world)
    path = os.path.join(folder, f"copy{rank}.pt")
    torch.save(reshard.local_shards(parts.model, parts.optimizer), path)
    return path


def new_rank(rank: int, world: int, quick: bool, ep: int, sharding: tuple[str, str], published: list) -> dict:
    """Build at this layout, then assemble from the published pieces (files); what it fetched and held."""
    _, parts = _build(rank, world, quick, ep, sharding)
    before = peak = _rss()

    def fetch(paths):
        nonlocal peak
        got = [torch.load(p, weights_only=True) for p in paths]
        peak = max(peak, _rss())
        return got

    return {**reshard.assemble(parts.model, parts.optimizer, published, fetch), "rss_growth": peak - before}


def _publish(copies: list[dict], folder: str) -> tuple[list[dict], int]:
    """The copies' pieces, each distinct one once, one file each; (published copies, whole state bytes)."""
    layouts = [reshard.describe(c) for c in copies]
    out, whole = [], 0
    for i, (c, layout, which) in enumerate(zip(copies, layouts,
                                               reshard.choose_sources([lay["pieces"] for lay in layouts]))):
        paths = []
        for j, t in enumerate(reshard.piece_data(c, which)):
            paths.append(os.path.join(folder, f"c{i}_{j}.pt"))
            torch.save(t, paths[-1])
            whole += t.numel() * t.element_size()
        out.append(reshard.published(layout, which, paths))
    return out, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model (a smoke run)")
    ap.add_argument("--moves", type=int, default=len(MOVES), help="run the first N of the membership changes")
    args = ap.parse_args()
    header = (f"{'new rank':>8} {'share MiB':>9} {'share/whole':>11} {'fetched/share':>13} "
              f"{'most at once/whole':>18} {'RSS growth/share':>16}")
    for (ow, oep, osh), (nw, nep, nsh) in MOVES[:args.moves]:
        with tempfile.TemporaryDirectory() as folder:
            copies = [torch.load(p, weights_only=False) for p in run_world(ow, old_rank, args.quick, oep, osh,
                                                                           folder)]
            published, whole = _publish(copies, folder)
            del copies
            ranks = run_world(nw, new_rank, args.quick, nep, nsh, published)
        print(f"\n{ow} ranks (EP {oep}, dense {osh[0]}, experts {osh[1]}) -> {nw} ranks (EP {nep}, dense {nsh[0]}, "
              f"experts {nsh[1]}); whole state {whole / 2**20:.1f} MiB\n{header}")
        for r, st in enumerate(ranks):
            share = st["share_bytes"]
            print(f"{r:>8} {share / 2**20:>9.1f} {share / whole:>11.3f} "
                  f"{st['fetched_bytes'] / share:>13.3f} {st['largest_fetch_bytes'] / whole:>18.3f} "
                  f"{st['rss_growth'] / share:>16.3f}")


if __name__ == "__main__":
    main()
