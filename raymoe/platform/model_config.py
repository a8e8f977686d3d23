"""`GPTConfig`: the architecture of raymoe's one decoder (the paper's GPT-MoE by default; the fields of the
other families configure the same blocks, see docs/models.md). A plain dataclass, validated in `__post_init__`,
stored in every native checkpoint (`to_dict` / `from_dict`)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from raymoe.config import MoEArgs, check_top_k, moe_schedule
from raymoe.platform.rope import check_rope_scaling

# The routing options of GPTConfig.moe, as flat keys: how checkpoints written before they were grouped store them.
_FLAT_MOE_KEYS = frozenset(MoEArgs.model_fields)


@dataclass
class GPTConfig:
    """Architecture of a GPT(-MoE) decoder. Plain dataclass; validated in `__post_init__`.

    MoE schedule: layer i is an MoE layer when `i % expert_interval == expert_interval - 1` (interval 2 ->
    layers 1, 3, 5, ...; interval 0 -> dense model); an explicit `moe_layers` list overrides the interval.
    `num_experts` is one int for all MoE layers or a list with one count per MoE layer in layer order
    (PR-MoE pyramid, e.g. [4, 4, 8]). `moe` holds the routing options every MoE layer reads
    (:class:`raymoe.config.MoEArgs`, DeepSpeed-MoE's names); a dict is accepted and validated into one.
    """

    vocab_size: int = 257
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: Optional[int] = None  # dense FFN size; None -> 4 * d_model
    dropout: float = 0.0
    bias: bool = True
    expert_interval: int = 2
    moe_layers: Optional[list[int]] = None
    num_experts: Union[int, list[int]] = 8
    expert_ffn: Optional[int] = None  # expert FFN size; None -> d_ff
    aux_loss_coef: float = 0.01
    moe: MoEArgs = field(default_factory=MoEArgs)
    # ---- family options (defaults: the paper's GPT-MoE); field meanings: raymoe.config.ModelConfig ----
    n_kv_head: Optional[int] = None  # None -> n_head (resolved in __post_init__)
    head_dim: Optional[int] = None  # None -> d_model // n_head (resolved)
    qkv_bias: Optional[bool] = None  # None -> bias (resolved)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    qk_norm: Optional[str] = None  # None | "head" | "full"
    position: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_interleave: bool = False
    attention: str = "mha"  # "mha" | "mla"
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mlp: str = "gelu"  # "gelu" | "swiglu"
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            _require_int(name, getattr(self, name), minimum=1)
        self._validate_attention()
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _require_int("d_ff", self.d_ff, minimum=1)
        if self.expert_ffn is not None:
            _require_int("expert_ffn", self.expert_ffn, minimum=1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1); got {self.dropout}")
        _require_int("expert_interval", self.expert_interval, minimum=0)
        if self.moe_layers is not None:
            self.moe_layers = list(self.moe_layers)
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.n_layer]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(
                    f"GPTConfig.moe_layers must be distinct layer ids in [0, {self.n_layer - 1}]; "
                    f"got {self.moe_layers}"
                )
            self.moe_layers = sorted(self.moe_layers)
        if isinstance(self.moe, dict):
            self.moe = MoEArgs(**self.moe)
        if not isinstance(self.moe, MoEArgs):
            raise TypeError(f"GPTConfig.moe must be a raymoe.config.MoEArgs or a dict; got {type(self.moe).__name__}")
        self._validate_experts()

    def _validate_attention(self) -> None:
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("qk_norm", self.qk_norm, (None, "head", "full"))
        _choice("position", self.position, ("learned", "rope"))
        _choice("attention", self.attention, ("mha", "mla"))
        _choice("mlp", self.mlp, ("gelu", "swiglu"))
        if self.head_dim is None:
            if self.attention == "mha" and self.d_model % self.n_head != 0:
                raise ValueError(f"GPTConfig.d_model must be divisible by n_head (or set head_dim); got "
                                 f"d_model={self.d_model}, n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        _require_int("head_dim", self.head_dim, minimum=1)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _require_int("n_kv_head", self.n_kv_head, minimum=1)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0; got {self.norm_eps}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _require_int(name, getattr(self, name), minimum=1)
            if self.q_lora_rank is not None:
                _require_int("q_lora_rank", self.q_lora_rank, minimum=1)
            if self.position != "rope":
                raise ValueError("GPTConfig.attention='mla' needs position='rope' (its decoupled RoPE part)")
        try:
            check_rope_scaling(self.rope_scaling, self.rope_theta)
        except (TypeError, ValueError) as e:
            raise type(e)(f"GPTConfig.{e}") from None

    def kv_dims(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) of what one layer's KV cache stores per token."""
        if self.attention == "mla":
            return self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return self.n_kv_head, self.head_dim, self.head_dim

    def _validate_experts(self) -> None:
        ids = self.moe_layer_ids()
        if isinstance(self.num_experts, (list, tuple)):
            self.num_experts = list(self.num_experts)
            if len(self.num_experts) != len(ids):
                raise ValueError(
                    f"GPTConfig.num_experts list must have one entry per MoE layer ({len(ids)} layers: {ids}); "
                    f"got {len(self.num_experts)} entries {self.num_experts}"
                )
            for e in self.num_experts:
                _require_int("num_experts[i]", e, minimum=1)
        else:
            _require_int("num_experts", self.num_experts, minimum=1)
        check_top_k(self.moe.k, list(self.experts_per_layer().values()), where="GPTConfig.moe.k")
        if self.aux_loss_coef < 0:
            raise ValueError(f"GPTConfig.aux_loss_coef must be >= 0; got {self.aux_loss_coef}")

    @property
    def n_embd(self) -> int:
        """Alias of d_model (nanoGPT's name)."""
        return self.d_model

    def moe_layer_ids(self) -> list[int]:
        """Sorted ids of the blocks whose MLP is an MoE layer."""
        return moe_schedule(self.n_layer, self.expert_interval, self.moe_layers)

    def experts_per_layer(self) -> dict[int, int]:
        """{layer id: number of experts} for every MoE layer."""
        ids = self.moe_layer_ids()
        if isinstance(self.num_experts, list):
            return dict(zip(ids, self.num_experts))
        return {i: self.num_experts for i in ids}

    @property
    def expert_ffn_size(self) -> int:
        return self.expert_ffn if self.expert_ffn is not None else self.d_ff

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (round trips through `from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["moe"] = self.moe.model_dump(mode="json")
        return copy.deepcopy(out)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build from a dict (a checkpoint's ``extra.model_config``); unknown keys are a ValueError (catches typos
        and version skew). Routing options stored flat at the top level (older checkpoints) go into ``moe``."""
        d = dict(d)
        flat = {k: d.pop(k) for k in list(d) if k in _FLAT_MOE_KEYS}
        if flat:
            d["moe"] = {**flat, **dict(d.get("moe") or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig got unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def student(self, num_layers: int) -> "GPTConfig":
        """Mixture-of-Students config: this (teacher) architecture at reduced depth `num_layers`.

        Interval schedules keep their `expert_interval`; explicit `moe_layers` are mapped by relative depth
        (student layer s corresponds to teacher layer round(s * (N-1) / (n-1))). A pyramid `num_experts`
        list is resampled the same way over the MoE layers, so the first and last counts are kept.
        """
        _require_int("num_layers", num_layers, minimum=1)
        if num_layers > self.n_layer:
            raise ValueError(
                f"student num_layers must be in [1, {self.n_layer}] (teacher depth); got {num_layers}"
            )
        moe_layers = None
        if self.moe_layers is not None:
            teacher_moe = set(self.moe_layers)
            moe_layers = [s for s in range(num_layers) if _spread(s, num_layers, self.n_layer) in teacher_moe]
            n_moe = len(moe_layers)
        else:
            iv = self.expert_interval
            n_moe = 0 if iv == 0 else sum(1 for i in range(num_layers) if i % iv == iv - 1)
        num_experts: Union[int, list[int]] = self.num_experts
        if isinstance(self.num_experts, list):
            m = len(self.num_experts)
            num_experts = [self.num_experts[_spread(j, n_moe, m)] for j in range(n_moe)]
        return dataclasses.replace(self, n_layer=num_layers, moe_layers=moe_layers, num_experts=num_experts,
                                   moe=self.moe.model_copy())


def _spread(j: int, n: int, m: int) -> int:
    """Index in range(m) for position j of n, spread evenly (first->first, last->last)."""
    return 0 if n <= 1 else int(round(j * (m - 1) / (n - 1)))


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"GPTConfig.{name}={value!r}; allowed: {list(allowed)}")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"GPTConfig.{name} must be an int >= {minimum}; got {value!r}")


