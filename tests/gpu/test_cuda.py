"""GPU paths (skipped without CUDA): the MoE layer on CUDA equals the reference, the grouped-GEMM kernel and
bf16 autocast are really used, KV-cache generation, local bf16 training and resume, NCCL all-to-all dispatch."""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from raymoe.platform.moe import MoE  # noqa: E402
from raymoe.platform.moe import experts as experts_mod  # noqa: E402
from raymoe.platform.moe.reference import reference_forward  # noqa: E402

CUDA = torch.device("cuda")
LAYOUTS = {"slots": 0.0, "segments": 2.0}


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 comparisons need full-precision GEMMs (TF32 would differ from the reference at 1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _fwd_bwd(m, x, noise, path):
    xx = x.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    if path == "fast":
        y, l_aux, counts = m(xx, noise=noise)
        kept = m.last_stats.kept_mask
    else:
        o = reference_forward(m, xx, None, noise)
        y, l_aux, counts, kept = o.y, o.l_aux, o.exp_counts, o.kept_mask
    w = torch.arange(y.numel(), device=y.device, dtype=torch.float32).view_as(y).sin()
    ((y.float() * w).sum() + l_aux).backward()
    return dict(y=y.detach().float(), l_aux=l_aux.detach(), counts=counts, kept=kept, gx=xx.grad.float(),
                grads={n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,drop", [(1, True), (2, True), (2, False), (4, False)])
def test_fast_equals_reference_on_cuda(k, drop, layout):
    torch.manual_seed(k)
    m = MoE(64, 96, num_experts=8, k=k, drop_tokens=drop, capacity_factor=0.8, min_capacity=1,
            noisy_gate_policy="RSample", capacity_layout_min_fill=LAYOUTS[layout]).to(CUDA).train()
    x = torch.randn(4, 33, 64, device=CUDA)
    noise = m.draw_noise(4 * 33)
    a, b = _fwd_bwd(m, x, noise, "fast"), _fwd_bwd(m, x, noise, "ref")
    assert torch.equal(a["counts"].cpu(), b["counts"].cpu()) and torch.equal(a["kept"], b["kept"])
    for key in ("y", "l_aux", "gx"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    for n in b["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], atol=1e-5, rtol=1e-5, msg=n)


def _spy_grouped_mm(monkeypatch):
    seen = []
    real = torch._grouped_mm

    def spy(a, b, *args, **kw):
        seen.append(a.dtype)
        return real(a, b, *args, **kw)
    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return seen


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_mm_kernel_runs_bf16_under_autocast(monkeypatch):
    """Dropless on CUDA uses torch._grouped_mm; under bf16 autocast the experts compute in bf16 (fp32 master
    weights get fp32 grads) and stay close to the fp32 result."""
    assert experts_mod._probe_grouped_mm(CUDA, torch.bfloat16)
    torch.manual_seed(0)
    m = MoE(256, 512, num_experts=8, k=2, drop_tokens=False, capacity_layout_min_fill=2.0).to(CUDA)
    x = torch.randn(512, 256, device=CUDA)
    noise = m.draw_noise(512)  # the same second-expert sampling in both runs
    y32, _, _ = m(x, noise=noise)
    seen = _spy_grouped_mm(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, l_aux, _ = m(x, noise=noise)
    assert seen and set(seen) == {torch.bfloat16}
    assert l_aux.dtype == torch.float32 and y16.dtype == torch.float32
    torch.testing.assert_close(y16, y32, atol=2e-2 * y32.abs().max().item(), rtol=0.05)
    y16.square().sum().backward()
    assert m.experts.w1.grad.dtype == torch.float32 and torch.isfinite(m.experts.w1.grad).all()
    assert m.experts.w1.grad.abs().sum() > 0


def test_capacity_layout_runs_bf16_under_autocast(monkeypatch):
    torch.manual_seed(0)
    m = MoE(128, 256, num_experts=8, k=2, capacity_factor=1.0, capacity_layout_min_fill=0.0).to(CUDA)
    x = torch.randn(256, 128, device=CUDA)
    noise = m.draw_noise(256)  # the same random token selection in both runs
    y32, _, _ = m(x, noise=noise)
    dtypes = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: dtypes.append(a.dtype) or real(a, b, **kw))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, _, _ = m(x, noise=noise)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(y16, y32, atol=2e-2 * y32.abs().max().item(), rtol=0.05)


def test_zero_token_experts_on_cuda():
    m = MoE(32, 64, num_experts=8, k=1, drop_tokens=False).to(CUDA)
    with torch.no_grad():
        m.gate.wg.weight.zero_()
        m.gate.wg.weight[3, 0] = 10.0  # every token with x[:, 0] > 0 goes to expert 3, the rest to expert 0
    x = torch.randn(64, 32, device=CUDA, requires_grad=True)
    y, _, counts = m(x)
    y.sum().backward()
    assert int(counts[1:3].sum()) == 0 and torch.isfinite(x.grad).all()
    assert m.experts.w1.grad[1].abs().sum() == 0 and m.experts.w1.grad[3].abs().sum() > 0


def test_kv_cache_generation_equals_recompute_on_cuda():
    from raymoe.platform.generate import generate
    from raymoe.platform.model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_dict(dict(vocab_size=257, block_size=48, n_layer=4, n_head=4, d_model=32, expert_interval=2,
                      num_experts=[2, 4], k=1))).to(CUDA)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [7]]
    cached = generate(m, prompts, 10, temperature=0.0)
    uncached = generate(m, prompts, 10, temperature=0.0, use_cache=False)
    assert cached == uncached and len({tuple(r) for r in cached}) == 3


TINY = ["model.block_size=64", "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.d_ff=128",
        "moe.num_experts=4", "moe.k=2", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.eval_interval=4", "train.eval_batches=2", "train.log_interval=1",
        "train.progress=false", "train.lr=3e-3", "sample.max_new_tokens=8", "train.device=cuda"]


def _train(tmp_path, name, *extra):
    from raymoe.cli import main
    argv = ["train"]
    for s in TINY + [f"run.output_dir={tmp_path}", f"run.name={name}", f"data.cache_dir={tmp_path / 'c'}",
                     *extra]:
        argv += ["--set", s]
    assert main(argv) == 0
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_local_training_bf16_on_cuda_and_resume(tmp_path):
    """`raymoe train` on CUDA (bf16 autocast by default): loss falls, and a resumed run continues like the
    uninterrupted one (close, not bitwise: CUDA's scatter-add order is not fixed)."""
    pytest.importorskip("pydantic")
    full = _train(tmp_path, "full", "train.steps=12", "checkpoint.interval=6", "checkpoint.keep_last=5")
    assert full[-1]["loss"] < full[0]["loss"] - 0.5
    resumed = _train(tmp_path, "resumed", "train.steps=12",
                     f"checkpoint.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000006'}")
    a = [r["loss"] for r in full if r["step"] > 6]
    b = [r["loss"] for r in resumed]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-2 * abs(x), (a, b)


def _ep_worker(rank, world, port, out, backend="nccl", device="cuda"):
    import torch.distributed as dist
    from raymoe.platform.moe.comm import AllToAllDispatcher
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    kw = {"device_id": torch.device(device, rank)} if device == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    try:
        torch.manual_seed(0)
        ref = MoE(64, 96, num_experts=8, k=2, capacity_factor=1.0, drop_tokens=True).to(device)
        results = {}
        for name, drop, min_fill in (("dropless", False, 0.9), ("slots", True, 0.0), ("segments", True, 2.0)):
            local = MoE(64, 96, num_experts=8, k=2, capacity_factor=1.0, drop_tokens=drop,
                        capacity_layout_min_fill=min_fill).to(device)
            local.load_state_dict(ref.state_dict())
            ep = MoE(64, 96, num_experts=8, k=2, capacity_factor=1.0, drop_tokens=drop, ep_size=world,
                     capacity_layout_min_fill=min_fill,
                     dispatcher=AllToAllDispatcher(dist.group.WORLD, world, rank, 8)).to(device)
            ep.load_state_dict(local.state_dict())
            x = torch.randn(128, 64, device=device)
            torch.manual_seed(1)  # the same random token selection (RTS) draws in both
            ya, _, _ = local(x)
            torch.manual_seed(1)
            yb, _, _ = ep(x)
            ya.sum().backward()
            yb.sum().backward()
            results[name] = max(float((ya - yb).detach().abs().max()),
                                float((local.experts.w1.grad - ep.experts.w1.grad).abs().max()))
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_nccl_all_to_all_dispatch_equals_local(tmp_path, free_port):
    """The all-to-all dispatcher over an NCCL group (world 1: one GPU here) equals the local dispatcher in the
    variable-split (dropless) and fixed-capacity routes."""
    import torch.multiprocessing as mp
    if not torch.distributed.is_nccl_available():
        pytest.skip("torch built without NCCL")
    out = tmp_path / "r.pt"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_ep_worker, args=(0, 1, free_port(), str(out)))
    p.start()
    p.join(timeout=180)
    if p.is_alive():
        p.kill()
        pytest.fail("NCCL worker timed out")
    assert p.exitcode == 0
    results = torch.load(out)
    assert set(results) == {"dropless", "slots", "segments"}
    for name, err in results.items():
        assert err < 1e-5, (name, err)



def test_local_layer_on_cuda_defaults_to_segments(monkeypatch):
    """Measured on an H100 (benchmarks/moe_layer.py --device cuda): the grouped GEMM over segments beats the
    slot layout at every shape, so a local layer with the default min fill never takes the slots there."""
    m = MoE(64, 128, num_experts=8, k=2, capacity_factor=1.0).to(CUDA)
    used = []
    monkeypatch.setattr(m.experts, "forward_capacity", lambda *a, **kw: used.append("slots"))
    y, _, _ = m(torch.randn(256, 64, device=CUDA))
    assert used == [] and torch.isfinite(y).all()


def test_mixed_prefill_decode_step_on_cuda():
    """The serving runner's mixed step (new prompts + running rows in one forward) on CUDA equals a prefill
    and a decode run separately."""
    from raymoe.platform.model import GPT, GPTConfig
    from raymoe.platform.runner import LocalRunner

    def runner():
        torch.manual_seed(0)
        m = GPT(GPTConfig.from_dict(dict(vocab_size=257, block_size=64, n_layer=4, n_head=4, d_model=32, expert_interval=2,
                          num_experts=[2, 4], k=1))).to(CUDA)
        return LocalRunner(m, 4)

    a, b = runner(), runner()
    idx = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    mask = idx > 0
    new_idx, new_mask = torch.tensor([[9, 10]]), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        tok = a.prefill(idx, mask).argmax(-1, keepdim=True).cpu()
        b.prefill(idx, mask)
        new_a, run_a = a.prefill_and_decode(new_idx, new_mask, tok)
        run_b = b.decode(tok)
        new_b = b.prefill(new_idx, new_mask)
    torch.testing.assert_close(run_a, run_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_a, new_b, rtol=1e-4, atol=1e-4)
    assert a.rows == b.rows == 3 and run_a.device.type == "cuda"
