"""A Hugging Face folder loaded by expert-parallel shards (EP=2, gloo, spawned processes) gives transformers'
logits: each rank builds only its experts (parallel.make_moe_kwargs) and hf.load_weights reads only theirs."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_models import build_hf, hf_logits, padded_batch  # noqa: E402

CASES = ("qwen2_moe", "deepseek_v3")
TIMEOUT_S = 120


def _rank(rank: int, world: int, port: int, folders: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from raymoe.platform import hf, parallel
    from raymoe.platform.model import GPT

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, folder in folders.items():
            cfg = hf.config_from_folder(folder)
            layout = parallel.ParallelLayout.from_config(cfg, world, world)
            groups = parallel.build_process_groups(layout, rank)
            model = GPT(cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups))
            info = hf.load_weights(model, folder)
            model.eval()
            model.set_dropless(True)
            idx, mask = padded_batch()
            with torch.no_grad():
                logits = model(idx, token_mask_BT=mask.bool()).logits
            experts = {m.layer_id: list(m.experts.global_expert_ids) for m in model.moe_modules()}
            results[name] = {"logits": logits, "bytes_read": info["bytes_read"], "experts": experts}
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_shards_loaded_from_a_folder_match_transformers(tmp_path, free_port):
    import torch.multiprocessing as mp

    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    refs, folders = {}, {}
    for name in CASES:
        refs[name] = build_hf(name)
        folders[name] = str(tmp_path / name)
        refs[name].save_pretrained(folders[name])
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_rank, args=(2, free_port(), folders, out_dir), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the EP=2 world did not finish within {TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    idx, mask = padded_batch()
    keep = mask.bool()
    for name in CASES:
        whole = hf.load_weights(GPT(hf.config_from_folder(folders[name])), folders[name])["bytes_read"]
        ref = hf_logits(refs[name], idx, mask)
        seen = {}
        for rank, res in enumerate(results):
            r = res[name]
            assert (r["logits"][keep] - ref[keep]).abs().max() < 1e-4, (name, rank)
            assert r["bytes_read"] < whole
            for lid, ids in r["experts"].items():
                seen.setdefault(lid, []).extend(ids)
        n = hf.config_from_folder(folders[name]).num_experts
        assert all(sorted(ids) == list(range(n)) for ids in seen.values()), seen
