"""One forward over row groups that each have their own KV cache: the mixed prefill + decode step.

Shape legend: B rows of a group, T tokens per row in this call, D model dim, N tokens of all groups, V vocab.

Continuous batching admits new requests between decode steps. Running their prompts as a separate forward
costs one more model pass per admission (on a small model each pass is mostly per-op overhead), and when
clients arrive at different times that is one extra pass per request. `forward_groups` runs the new rows'
prompts and the running rows' next tokens in one pass: attention runs per group (each group attends to its
own cache), everything token-wise (layer norms, the MLP / MoE layers, the LM head) runs once over the tokens
of all groups. The results equal separate forwards of each group (tests/unit/test_mixed_step.py); padding
tokens (token mask False) are never routed to experts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def forward_groups(model, groups: Sequence[tuple[Tensor, object, Tensor]]) -> list[Tensor]:
    """``groups``: ``(idx_BT, kv_cache, token_mask_BT)`` each (a `KVCache`-like cache: keys/values of this
    call are appended to it, as ``GPT.forward`` does); returns each group's last-position logits [B, V]."""
    cfg, D = model.config, model.config.d_model
    xs, masks, attn_masks, caches, ropes = [], [], [], [], []
    for idx_BT, cache, mask_BT in groups:
        B, T = idx_BT.shape
        mask_BT = mask_BT.to(device=idx_BT.device, dtype=torch.bool)
        pos_BT = model._default_positions(idx_BT, mask_BT, cache)
        if pos_BT.numel() and int(pos_BT.max()) >= cfg.block_size:
            raise ValueError(f"positions must be < block_size={cfg.block_size}; got max position "
                             f"{int(pos_BT.max())} (sequence too long)")
        attn_masks.append(model._attention_mask(B, T, cache.length, mask_BT, cache, idx_BT.device))
        cache.begin(T, mask_BT)
        x_BTD, rope = model.embed(idx_BT, pos_BT)
        xs.append(x_BTD)
        ropes.append(rope)
        masks.append(mask_BT)
        caches.append(cache)
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    mask_N = torch.cat([m.reshape(-1) for m in masks])
    for block in model.blocks:
        xs = [x + block.attn(block.ln_1(x), am, c, block.layer_id, r)
              for x, am, c, r in zip(xs, attn_masks, caches, ropes)]
        x_ND = torch.cat([x.reshape(-1, D) for x in xs])
        h_ND = block.ln_2(x_ND)
        y_ND = block.mlp(h_ND, token_mask=mask_N)[0] if block.is_moe else block.mlp(h_ND)
        xs = [part.view_as(x) for part, x in zip((x_ND + y_ND).split(sizes), xs)]
    for x, m, c in zip(xs, masks, caches):
        c.end(x.shape[1], m)
    logits_BV = model.lm_head(model.ln_f(torch.cat([x[:, -1] for x in xs])))
    return list(logits_BV.split([x.shape[0] for x in xs]))
