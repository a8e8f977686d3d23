"""raymoe's one decoder: the DeepSpeed-MoE paper's GPT-MoE (MoE schedule, pyramid expert counts, residual MoE)
and, configured by :class:`~raymoe.platform.model_config.GPTConfig`, the Mixtral / Qwen-MoE / OLMoE /
DeepSeek-V3 families (norms, RoPE, attention kinds, SwiGLU, modern routers, shared experts).

Shape legend: B batch, T tokens in this call, L key length (cached + new), H heads, Dh head dim,
D model dim, F ffn dim, V vocab, E experts.

The model is single-device: expert parallelism is injected per MoE layer (`moe_kwargs`), never hard-coded.
Positions are per row (`positions_BT`), so left-padded batched generation works with a learned absolute
position embedding: a row's first real token always gets position 0.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from raymoe.platform.attention import make_attention, make_rope
from raymoe.platform.layers import MLP, make_norm
from raymoe.platform.model_config import GPTConfig

__all__ = ["GPT", "GPTConfig", "ModelOutput", "Block"]


@dataclass
class ModelOutput:
    """Result of `GPT.forward`.

    loss = ce_loss + aux_loss_coef * aux_loss + z_loss (None without targets); aux_loss = sum of the MoE
    layers' l_aux (unscaled; 0 for a dense model); z_loss = sum of the router z-losses (already scaled by
    z_loss_coef inside the MoE); stats = one RouterStats per MoE layer, in layer order.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    ce_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    stats: list = field(default_factory=list)
    z_loss: Optional[torch.Tensor] = None


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is a dense MLP or an MoE layer."""

    def __init__(self, cfg: GPTConfig, layer_id: int, moe_kwargs: Optional[dict] = None):
        super().__init__()
        self.layer_id = layer_id
        self.ln_1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = make_attention(cfg)
        self.ln_2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.is_moe = moe_kwargs is not None
        if self.is_moe:
            from raymoe.platform.moe import MoE  # lazy: dense models work without the MoE package

            self.mlp = MoE(**moe_kwargs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, bias=cfg.bias, dropout=cfg.dropout)
        # None, "moe" or "full": set by raymoe.platform.activation_checkpoint (training only)
        self.checkpoint_mode: Optional[str] = None

    def forward(self, x_BTD, mask_B1TL, cache, token_mask_BT, rope=None):
        mode = self.checkpoint_mode if self.training and torch.is_grad_enabled() and cache is None else None
        if mode == "full":
            out_BTD, l_aux = _checkpoint(self._forward, x_BTD, mask_B1TL, cache, token_mask_BT, rope)
        else:
            out_BTD, l_aux = self._forward(x_BTD, mask_B1TL, cache, token_mask_BT, rope, moe_checkpoint=mode == "moe")
        return out_BTD, l_aux, self.mlp.last_stats if self.is_moe else None

    def _forward(self, x_BTD, mask_B1TL, cache, token_mask_BT, rope, moe_checkpoint: bool = False):
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), mask_B1TL, cache, self.layer_id, rope)
        h_BTD = self.ln_2(x_BTD)
        if self.is_moe:
            if moe_checkpoint:
                y_BTD, l_aux = _checkpoint(self._moe, h_BTD, token_mask_BT)
            else:
                y_BTD, l_aux = self._moe(h_BTD, token_mask_BT)
            return x_BTD + y_BTD, l_aux
        return x_BTD + self.mlp(h_BTD), None

    def _moe(self, h_BTD, token_mask_BT):
        y_BTD, l_aux, _ = self.mlp(h_BTD, token_mask=token_mask_BT)
        return y_BTD, l_aux


def _checkpoint(fn, *args):
    """Non-reentrant activation checkpointing of ``fn`` (see raymoe.platform.activation_checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    from raymoe.platform.activation_checkpoint import checkpoint_contexts

    return checkpoint(fn, *args, use_reentrant=False, context_fn=checkpoint_contexts)


MoEKwargs = Union[None, dict, Callable[[int, int], dict]]


class GPT(nn.Module):
    """GPT decoder; MoE layers replace the MLP on `config.moe_layer_ids()` (`blocks.{i}.mlp`, layer_id=i).

    `moe_kwargs` adds arguments to every MoE layer (e.g. a dispatcher): a dict, or a callable
    `(layer_id, num_experts) -> dict` for per-layer values such as `global_expert_ids` under expert parallelism.
    """

    def __init__(self, config: GPTConfig, *, moe_kwargs: MoEKwargs = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        # learned absolute positions (GPT-2) or RoPE inside the attention (cos/sin computed once per forward)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.position == "learned" else None
        self.rope = make_rope(config)
        self.drop = nn.Dropout(config.dropout)
        experts = config.experts_per_layer()
        self.blocks = nn.ModuleList(
            Block(config, i, self._moe_args(i, experts[i], moe_kwargs) if i in experts else None)
            for i in range(config.n_layer)
        )
        self.ln_f = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # GPT-2's init; training from scratch uses raymoe.platform.init instead (the same distributions, drawn
        # per parameter name and global expert id, so every layout starts from the same weights)
        self.apply(self._init_weights)
        self._init_residual_projections()

    def tie_weights(self) -> None:
        """The head shares the token embedding's weight (``tie_embeddings``); called again after ``to_empty``,
        which gives each module its own new parameter."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _moe_args(self, layer_id: int, num_experts: int, extra: MoEKwargs) -> dict:
        c = self.config
        args = dict(hidden_size=c.d_model, expert=c.expert_ffn_size, num_experts=num_experts, args=c.moe,
                    layer_id=layer_id)
        if c.mlp == "swiglu":
            args["activation"] = "swiglu"
        if callable(extra):
            extra = extra(layer_id, num_experts)
        args.update(extra or {})
        return args

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _init_residual_projections(self) -> None:
        # GPT-2: projections that write into the residual stream get std 0.02/sqrt(2 * n_layer).
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            for name, p in block.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if name.endswith("c_proj.weight") or (block.is_moe and leaf == "w2"):
                    nn.init.normal_(p, mean=0.0, std=std)
                elif block.is_moe and leaf == "w1":
                    nn.init.normal_(p, mean=0.0, std=0.02)
            residual_mlp = getattr(block.mlp, "mlp", None) if block.is_moe else None
            if isinstance(residual_mlp, nn.Module):  # residual MoE: its dense MLP's output projection
                out_proj = [m for m in residual_mlp.modules() if isinstance(m, nn.Linear)][-1]
                nn.init.normal_(out_proj.weight, mean=0.0, std=std)

    # ---- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: Optional[torch.Tensor] = None,
        *,
        kv_cache=None,
        positions_BT: Optional[torch.Tensor] = None,
        token_mask_BT: Optional[torch.Tensor] = None,
        last_logits_only: bool = False,
        ignore_index: int = -1,
    ) -> ModelOutput:
        """Run the decoder.

        idx_BT: token ids. targets_BT: next-token targets (`ignore_index` entries are skipped).
        kv_cache: a `raymoe.platform.kv_cache.KVCache`; keys/values of this call are appended to it.
        token_mask_BT: bool, False marks padding: padding keys are never attended to and padding tokens are
        never routed to experts. positions_BT: explicit positions; default = number of real tokens before
        each token in its row (cache included), so left padding does not shift positions.
        last_logits_only: compute logits for the last position only (generation).
        """
        B, T = idx_BT.shape
        if token_mask_BT is not None:
            token_mask_BT = token_mask_BT.to(device=idx_BT.device, dtype=torch.bool)
        start = kv_cache.length if kv_cache is not None else 0
        plain = positions_BT is None and kv_cache is None and token_mask_BT is None
        if positions_BT is None:
            positions_BT = self._default_positions(idx_BT, token_mask_BT, kv_cache)
        # The plain (training) case is checked without reading a tensor: no device sync per step.
        max_pos = T - 1 if plain else (int(positions_BT.max()) if positions_BT.numel() else 0)
        if max_pos >= self.config.block_size:
            raise ValueError(f"positions must be < block_size={self.config.block_size}; got max position "
                             f"{max_pos} (sequence too long)")
        mask_B1TL = self._attention_mask(B, T, start, token_mask_BT, kv_cache, idx_BT.device)
        if kv_cache is not None:
            kv_cache.begin(T, token_mask_BT)
        x_BTD, rope = self.embed(idx_BT, positions_BT)
        l_aux_list, stats = [], []
        for block in self.blocks:
            x_BTD, l_aux, st = block(x_BTD, mask_B1TL, kv_cache, token_mask_BT, rope)
            if l_aux is not None:
                l_aux_list.append(l_aux)
                stats.append(st)
        if kv_cache is not None:
            kv_cache.end(T, token_mask_BT)
        x_BTD = self.ln_f(x_BTD)
        if last_logits_only:
            x_BTD = x_BTD[:, -1:, :]
        logits_BTV = self.lm_head(x_BTD)

        zero = logits_BTV.new_zeros(())
        aux_loss = torch.stack([a.float() for a in l_aux_list]).sum() if l_aux_list else zero
        z_parts = [s.z_loss for s in stats if getattr(s, "z_loss", None) is not None]
        z_loss = torch.stack([z.float().reshape(()) for z in z_parts]).sum() if z_parts else zero
        ce_loss = loss = None
        if targets_BT is not None:
            ce_loss = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.size(-1)),
                                      targets_BT.reshape(-1), ignore_index=ignore_index)
            loss = ce_loss + self.config.aux_loss_coef * aux_loss + z_loss
        return ModelOutput(logits_BTV, loss, ce_loss, aux_loss, stats, z_loss)

    def embed(self, idx_BT: torch.Tensor, positions_BT: torch.Tensor):
        """Token embeddings (plus learned positions) and the RoPE cos/sin of `positions_BT` (None without RoPE)."""
        x_BTD = self.wte(idx_BT)
        rope = None
        if self.wpe is not None:
            x_BTD = x_BTD + self.wpe(positions_BT)
        else:
            rope = self.rope(positions_BT, x_BTD.dtype)
        return self.drop(x_BTD), rope

    @staticmethod
    def _default_positions(idx_BT, token_mask_BT, kv_cache) -> torch.Tensor:
        B, T = idx_BT.shape
        base_B = (kv_cache.valid_len_B.to(idx_BT.device) if kv_cache is not None
                  else torch.zeros(B, dtype=torch.long, device=idx_BT.device))
        if token_mask_BT is None:
            return base_B[:, None] + torch.arange(T, device=idx_BT.device)[None, :]
        return (base_B[:, None] + token_mask_BT.long().cumsum(1) - 1).clamp(min=0)

    @staticmethod
    def _attention_mask(B, T, start, token_mask_BT, kv_cache, device) -> Optional[torch.Tensor]:
        """Bool mask [B, 1, T, L] (True = attend), or None for the plain causal case (SDPA's is_causal)."""
        if start == 0 and token_mask_BT is None:
            return None
        L = start + T
        key_valid_BL = torch.ones(B, L, dtype=torch.bool, device=device)
        if kv_cache is not None and start > 0:
            key_valid_BL[:, :start] = kv_cache.key_mask_BL[:, :start].to(device)
        if token_mask_BT is not None:
            key_valid_BL[:, start:] = token_mask_BT
        q_T = torch.arange(start, L, device=device)[:, None]
        k_L = torch.arange(L, device=device)[None, :]
        # Each query also sees itself so padding rows are never fully masked (that would give NaN).
        mask_TL = k_L <= q_T
        return mask_TL[None, None] & (key_valid_BL[:, None, None, :] | (k_L == q_T)[None, None])

    # ---- MoE helpers ---------------------------------------------------------------------------------

    def moe_modules(self) -> list[nn.Module]:
        """The MoE layers, in layer order."""
        return [b.mlp for b in self.blocks if b.is_moe]

    moe_layers = moe_modules  # the name used in the shared spec

    def set_dropless(self, dropless: bool) -> None:
        """Switch every MoE layer between capacity dropping and dropless routing."""
        for m in self.moe_modules():
            m.set_dropless(dropless)

    def set_deterministic(self, deterministic: bool) -> None:
        """No random routing draws in eval mode (see ``MoE.set_deterministic``) on every MoE layer."""
        for m in self.moe_modules():
            m.set_deterministic(deterministic)

    @contextlib.contextmanager
    def dropless(self, dropless: bool = True) -> Iterator["GPT"]:
        """Context manager: run dropless (and, with it, deterministic in eval) inside, restore each layer's
        previous settings afterwards."""
        previous = [(bool(m.drop_tokens), bool(m.deterministic)) for m in self.moe_modules()]
        self.set_dropless(dropless)
        try:
            yield self
        finally:
            for m, (drop, det) in zip(self.moe_modules(), previous):
                m.set_dropless(not drop, deterministic=det)

    @contextlib.contextmanager
    def deterministic_routing(self, deterministic: bool = True) -> Iterator["GPT"]:
        """Context manager: eval-mode routing without random draws inside (validation loss, a frozen teacher:
        the same numbers at every run and expert-parallel size); previous settings restored afterwards."""
        previous = [bool(m.deterministic) for m in self.moe_modules()]
        self.set_deterministic(deterministic)
        try:
            yield self
        finally:
            for m, det in zip(self.moe_modules(), previous):
                m.set_deterministic(det)

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step on every MoE layer (call after optimizer.step())."""
        if self.config.moe.expert_bias:
            for m in self.moe_modules():
                m.update_expert_bias()

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total (tied weights once), active per token, embedding (wte + wpe).

        active counts k experts per MoE layer (plus the gate, a residual MLP and its coefficient),
        i.e. total minus the (E_local - k) experts a token does not use.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_modules():
            numel, n_local = _expert_numel(moe)
            if n_local:
                inactive += (n_local - min(self.config.moe.k, n_local)) * (numel // n_local)
        embedding = self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return {"total": total, "active": total - inactive, "embedding": embedding}


def _expert_numel(moe: nn.Module) -> tuple[int, int]:
    """(params in the routed experts of one MoE layer, number of local experts)."""
    from raymoe.platform.moe.experts import GroupedExperts

    numel = n_local = 0
    for m in moe.modules():
        if isinstance(m, GroupedExperts):
            numel += sum(p.numel() for p in m.parameters())
            n_local += m.w1.shape[0]
    return numel, n_local
