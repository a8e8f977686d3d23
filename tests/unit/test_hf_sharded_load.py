"""A Hugging Face folder loaded into an FSDP-sharded model (dense and experts sharded, spawned gloo world of 2):
each rank reads only the blocks of the folder's tensors that overlap its shards (no gather, fewer bytes than
the whole folder), and the gathered weights equal one process loading the whole model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gloo_world  # noqa: E402  (tests/gloo_world.py)
from test_hf_models import build_hf  # noqa: E402

CASES = ("mixtral", "deepseek_v3")  # transposed expert stacks of gate|up; MLA, a shared expert, a dense layer


def _load_sharded(rank: int, world: int, job: dict) -> dict:
    """This rank's sharded model of the folder (EP ``job["ep"]``), loaded with no gather; its weights gathered
    afterwards (global expert ids of its expert rows alongside)."""
    from raymoe.platform import fsdp, hf, parallel
    from raymoe.platform.init import meta_model, reset_buffers
    from raymoe.platform.model_io import load_weights

    cfg = hf.config_from_folder(job["folder"])
    layout = parallel.ParallelLayout.from_config(cfg, world, job["ep"])
    groups = parallel.build_process_groups(layout, rank)
    model = meta_model(cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups))
    assert fsdp.apply_sharding(model, layout, groups, dense="shard", experts="shard")
    model.to_empty(device="cpu")
    model.tie_weights()
    reset_buffers(model)

    def refuse(*_a, **_k):
        raise AssertionError("a sharded load gathered whole tensors")

    real = fsdp.gathered
    fsdp.gathered = refuse
    try:
        load_weights(model, job["folder"])
    finally:
        fsdp.gathered = real
    with fsdp.gathered(model):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {f"blocks.{m.layer_id}.mlp.experts.": list(m.experts.global_expert_ids) for m in model.moe_modules()}
    read = hf.load_weights  # the bytes one rank reads: a second load, counted (the model is already filled)
    return {"state": state, "experts": experts, "bytes_read": read(model, job["folder"])["bytes_read"]}


@pytest.mark.slow
def test_sharded_ranks_read_their_blocks_of_a_folder(tmp_path):
    from raymoe.platform import hf
    from raymoe.platform.model import GPT

    folders = {}
    for name in CASES:
        folders[name] = str(tmp_path / name)
        build_hf(name).save_pretrained(folders[name])
    jobs = [{"folder": folders[name], "ep": ep} for name in CASES for ep in (1, 2)]
    per_rank = gloo_world.spawn(2, _load_sharded, jobs, timeout=180, collective_timeout_s=60)
    for j, job in enumerate(jobs):
        ref = GPT(hf.config_from_folder(job["folder"]))
        whole = hf.load_weights(ref, job["folder"])["bytes_read"]
        ref_state = ref.state_dict()
        for rank in range(2):
            got = per_rank[rank][j]
            assert got["bytes_read"] < 0.75 * whole, (job, rank, got["bytes_read"], whole)
            for k, v in got["state"].items():
                prefix = next((p for p in got["experts"] if k.startswith(p)), None)
                want = ref_state[k] if prefix is None else ref_state[k][got["experts"][prefix]]
                assert torch.equal(v, want), (job, rank, k)
