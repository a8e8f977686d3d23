"""A Hugging Face folder loaded by expert-parallel shards (EP=2, gloo, spawned processes) gives transformers'
logits: each rank builds only its experts (parallel.make_moe_kwargs) and hf.load_weights reads only theirs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gloo_world  # noqa: E402  (tests/gloo_world.py)
from test_hf_models import build_hf, hf_logits, padded_batch  # noqa: E402

CASES = ("qwen2_moe", "deepseek_v3")
TIMEOUT_S = 120


def _load_and_run(rank: int, world: int, job: dict) -> dict:
    """This rank's model of the folder (only its experts, read from the folder), its logits on the padded batch."""
    from raymoe.platform import hf, parallel
    from raymoe.platform.model import GPT

    folder = job["folder"]
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
    return {"logits": logits, "bytes_read": info["bytes_read"], "experts": experts}


@pytest.mark.slow
def test_ep2_shards_loaded_from_a_folder_match_transformers(tmp_path):
    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    refs, folders = {}, {}
    for name in CASES:
        refs[name] = build_hf(name)
        folders[name] = str(tmp_path / name)
        refs[name].save_pretrained(folders[name])
    per_rank = gloo_world.spawn(2, _load_and_run, [{"folder": folders[name]} for name in CASES], TIMEOUT_S,
                                collective_timeout_s=60)
    results = [dict(zip(CASES, jobs)) for jobs in per_rank]
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
