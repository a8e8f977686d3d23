"""A sharded rank running several micro-batches holds sharded gradients between them, not whole ones.

FSDP2 can defer the gradient reduction to a step's last micro-batch; it then keeps every unit's whole
(unsharded) gradients between micro-batches, so a rank with gradient accumulation would need the whole dense
part's gradients. raymoe reduce-scatters after every micro-batch instead (raymoe/platform/fsdp.py): when the
second micro-batch starts, each sharded parameter's gradient is already its shard.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

import ep_harness as H
import gloo_world


def _accumulate(rank: int, world: int, job: dict) -> list[dict]:
    from raymoe.platform import fsdp, parallel
    from raymoe.platform.model import GPT, GPTConfig
    from raymoe.platform.train_step import build_optimizer, train_step

    cfg = GPTConfig.from_dict(H.CONFIGS["k1_drop"])
    layout = parallel.ParallelLayout.from_config(cfg, world, 1)
    groups = parallel.build_process_groups(layout, rank)
    torch.manual_seed(0)
    model = GPT(cfg, moe_kwargs=parallel.make_moe_kwargs(layout, groups, uniform_tokens=True))
    assert fsdp.apply_sharding(model, layout, groups, dense="shard", experts="shard")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    seen: list[dict] = []

    def at_forward(_module, _args):  # what each micro-batch finds when it starts
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        seen.append({"sharded_params": len(sharded),
                     "grads": sum(p.grad is not None for p in sharded),
                     "grads_sharded": sum(isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape
                                          for p in sharded)})

    model.register_forward_pre_hook(at_forward)
    gen = torch.Generator().manual_seed(rank)
    batches = [(x, x.roll(-1, 1)) for x in (torch.randint(cfg.vocab_size, (2, cfg.block_size), generator=gen)
                                            for _ in range(3))]
    train_step(model, opt, batches, lr=1e-3, grad_clip=1.0, grad_sync=parallel.make_grad_sync(model, layout, groups),
               grad_norm_fn=parallel.make_grad_norm(model, layout, groups), total_micro_batches=3 * world)
    return seen


def test_micro_batches_accumulate_sharded_gradients():
    for seen in gloo_world.spawn(2, _accumulate, [{}], timeout=120):
        first, *later = seen[0]
        assert first["grads"] == 0 and first["sharded_params"] > 0
        for s in later:  # micro-batches 2 and 3: every parameter is its shard again, and so is its gradient
            assert s["grads"] == s["grads_sharded"] == s["sharded_params"] == first["sharded_params"], seen[0]
