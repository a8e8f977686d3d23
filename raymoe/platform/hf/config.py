"""Hugging Face ``config.json`` <-> :class:`~raymoe.platform.model.GPTConfig`, for the five supported families.

A field is *consumed* (mapped onto GPTConfig), *checked* (raymoe implements only some of its values; anything
else is one ValueError naming the file, the field and what is supported) or *ignored* (transformers' modeling
code never reads it, or it only matters for HF-side tooling: token ids, dtype, ``use_cache``...). Keys
transformers itself ignores cannot change the math as the reference computes it, so unknown keys are ignored
too, except the ones the families' original code used (``topk_method``, ``scoring_func``...): those are
checked. Code in the folder (``auto_map``) is never executed: only the five ``architectures`` are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from raymoe.config import MoEArgs
from raymoe.platform.files import read_json_object
from raymoe.platform.model import GPTConfig
from raymoe.platform.rope import ROPE_TYPES  # the scaling types raymoe computes

# architectures entry -> family (model_type)
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
FAMILIES = {v: k for k, v in ARCHITECTURES.items()}
# rope_theta when a file has none (the defaults of transformers' config classes)
_DEFAULT_THETA = {"mixtral": 1e6}
# key names of the routed expert count, per family (transformers renamed some across versions)
_EXPERT_KEYS = {"mixtral": ("num_local_experts", "num_experts"), "qwen2_moe": ("num_experts", "num_local_experts"),
                "qwen3_moe": ("num_experts", "num_local_experts"), "olmoe": ("num_experts", "num_local_experts"),
                "deepseek_v3": ("n_routed_experts", "num_local_experts")}


class HFFormatError(ValueError):
    """A Hugging Face folder raymoe cannot load (or a model it cannot export); the message names the file,
    tensor or field and what is supported."""


def read_hf_config(folder: str | Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: no such file (a Hugging Face model folder has a config.json)")
    return read_json_object(path, HFFormatError)


def family_of(hf: dict, where: str = "config.json") -> str:
    """The family of an HF config (from ``architectures``); a ValueError for anything but the five."""
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        remote = " (code in the folder - auto_map / trust_remote_code - is never executed)" if "auto_map" in hf \
            else ""
        raise HFFormatError(f"{where}: architectures={archs!r} is not supported{remote}; supported: "
                            f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]


class _Fields:
    """Reads fields of one config file; every error names the file and the field."""

    def __init__(self, hf: dict, where: str):
        self.hf, self.where = hf, where

    def get(self, key: str, default: Any = None) -> Any:
        value = self.hf.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise HFFormatError(f"{self.where}: field {key!r} is missing")
        return self.hf[key]

    def first(self, keys: tuple[str, ...]) -> Any:
        for key in keys:
            if self.hf.get(key) is not None:
                return self.hf[key]
        raise HFFormatError(f"{self.where}: none of the fields {list(keys)} is set")

    def fail(self, key: str, value: Any, supported: str) -> None:
        raise HFFormatError(f"{self.where}: {key}={value!r} is not supported by raymoe; supported: {supported}")

    def expect(self, key: str, allowed: tuple, default: Any = None) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            self.fail(key, value, " or ".join(repr(a) for a in allowed))
        return value


def _rope(f: _Fields, family: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling`` keys."""
    key = "rope_parameters" if f.hf.get("rope_parameters") is not None else "rope_scaling"
    params = f.get(key, {})
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        f.fail(key, params, "one flat dict (RoPE per layer type is not supported)")
    params = dict(params)
    theta = float(params.pop("rope_theta", f.get("rope_theta", _DEFAULT_THETA.get(family, 10000.0))))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", f.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        f.fail("partial_rotary_factor", partial, "1.0 (RoPE over the whole head)")
    if kind not in ROPE_TYPES:
        f.fail(f"{key}.rope_type", kind, ", ".join(ROPE_TYPES))
    if kind == "default":
        return theta, None
    if kind == "yarn":  # transformers' defaults for what the file leaves out
        params["original_max_position_embeddings"] = f.get(
            "original_max_position_embeddings",
            params.get("original_max_position_embeddings") or f.require("max_position_embeddings"))
    if kind == "linear" and not params.get("factor"):
        f.fail(f"{key}.factor", params.get("factor"), "a positive number for rope_type 'linear'")
    return theta, {"rope_type": kind, **params}


def _check_sliding_window(f: _Fields, family: str, block_size: int) -> None:
    window = f.get("sliding_window")
    active = window is not None and window != 0 and window < block_size
    if family in ("qwen2_moe", "qwen3_moe"):
        uses = bool(f.get("use_sliding_window", False)) or "sliding_attention" in (f.get("layer_types") or [])
        active = active and uses
    if active:
        f.fail("sliding_window", window, f"none (or a window >= max_position_embeddings={block_size}); "
                                         "raymoe implements full causal attention only")


def _schedule(f: _Fields, family: str, n_layer: int) -> list[int]:
    if family in ("mixtral", "olmoe"):
        return list(range(n_layer))
    if family == "deepseek_v3":
        f.expect("moe_layer_freq", (1,), 1)
        first = int(f.get("first_k_dense_replace", 0))
        return list(range(first, n_layer))
    step = int(f.get("decoder_sparse_step", 1))
    dense = set(f.get("mlp_only_layers", []) or [])
    if step < 1:
        f.fail("decoder_sparse_step", step, "an int >= 1")
    return [i for i in range(n_layer) if i not in dense and (i + 1) % step == 0]


def gpt_config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """The :class:`GPTConfig` of an HF ``config.json`` dict (``where`` names the file in errors)."""
    family = family_of(hf, where)
    f = _Fields(hf, where)
    if f.hf.get("quantization_config") is not None:
        qm = (f.hf["quantization_config"] or {}).get("quant_method") if isinstance(f.hf["quantization_config"],
                                                                               dict) else None
        f.fail("quantization_config", {"quant_method": qm}, "unquantized weights (fp32, bf16 or fp16)")
    f.expect("hidden_act", ("silu",), "silu")
    d_model, n_head, n_layer = int(f.require("hidden_size")), int(f.require("num_attention_heads")), \
        int(f.require("num_hidden_layers"))
    block_size = int(f.require("max_position_embeddings"))
    _check_sliding_window(f, family, block_size)
    theta, scaling = _rope(f, family)
    num_experts = int(f.first(_EXPERT_KEYS[family]))
    schedule = _schedule(f, family, n_layer) if num_experts > 0 else []
    k = int(f.require("num_experts_per_tok"))
    args: dict[str, Any] = dict(k=k, drop_tokens=False, router="softmax_topk")
    cfg: dict[str, Any] = dict(
        vocab_size=int(f.require("vocab_size")), block_size=block_size, n_layer=n_layer, n_head=n_head,
        n_kv_head=int(f.get("num_key_value_heads", n_head)), d_model=d_model, d_ff=int(f.require("intermediate_size")),
        dropout=0.0, bias=False, qkv_bias=False, norm="rmsnorm",
        norm_eps=float(f.get("rms_norm_eps", 1e-5 if family in ("mixtral", "olmoe") else 1e-6)),
        position="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu",
        tie_embeddings=bool(f.get("tie_word_embeddings", False)), moe_layers=schedule,
        num_experts=max(num_experts, 1), expert_ffn=int(f.get("moe_intermediate_size", f.require("intermediate_size"))),
        aux_loss_coef=float(f.get("router_aux_loss_coef", f.get("aux_loss_alpha", 0.0))),
    )
    if family == "mixtral":
        cfg["expert_ffn"] = cfg["d_ff"]
        if f.get("router_jitter_noise", 0.0):
            f.fail("router_jitter_noise", f.get("router_jitter_noise"), "0.0 (no router input jitter)")
        args["norm_topk_prob"] = True  # Mixtral always renormalises the top-k (softmax over the top-k logits)
    elif family == "deepseek_v3":
        _deepseek(f, cfg, args)
    else:
        args["norm_topk_prob"] = bool(f.get("norm_topk_prob", False))
        if family != "qwen2_moe" and f.get("attention_bias", False):
            f.fail("attention_bias", True, "false (biases on q/k/v/o projections are not implemented)")
    if family == "olmoe":
        cfg.update(qk_norm="full", expert_ffn=cfg["d_ff"])
        if f.get("clip_qkv") is not None:
            f.fail("clip_qkv", f.get("clip_qkv"), "null (no clipping of q/k/v)")
        if f.get("head_dim") not in (None, d_model // n_head):
            f.fail("head_dim", f.get("head_dim"), f"hidden_size // num_attention_heads = {d_model // n_head}")
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):  # transformers: getattr(config, "head_dim") or D / H
        cfg["head_dim"] = int(f.get("head_dim", d_model // n_head))
    if family == "qwen3_moe":
        cfg["qk_norm"] = "head"
    if family == "qwen2_moe":
        # transformers 5 has the qkv_bias key; older files have attention_bias or nothing (always biases)
        cfg["qkv_bias"] = bool(f.get("qkv_bias", f.get("attention_bias", True)))
        shared = int(f.get("shared_expert_intermediate_size", 0))
        args.update(shared_expert_ffn=shared, shared_expert_gate=shared > 0)
    try:
        return GPTConfig(**cfg, moe=MoEArgs(**args))
    except ValueError as e:
        raise HFFormatError(f"{where}: the model it describes is not valid in raymoe: {e}") from None


def _deepseek(f: _Fields, cfg: dict, args: dict) -> None:
    f.expect("topk_method", ("noaux_tc",), "noaux_tc")
    f.expect("scoring_func", ("sigmoid",), "sigmoid")
    if f.get("attention_bias", False):
        f.fail("attention_bias", True, "false (biases on the MLA projections are not implemented)")
    n_shared = int(f.get("n_shared_experts", 0))
    n_group = int(f.get("n_group", 1))
    cfg.update(attention="mla", n_kv_head=cfg["n_head"], q_lora_rank=f.get("q_lora_rank"),
               kv_lora_rank=int(f.require("kv_lora_rank")), qk_nope_head_dim=int(f.require("qk_nope_head_dim")),
               qk_rope_head_dim=int(f.require("qk_rope_head_dim")), v_head_dim=int(f.require("v_head_dim")),
               rope_interleave=bool(f.get("rope_interleave", True)))
    args.update(router="sigmoid_group", norm_topk_prob=bool(f.get("norm_topk_prob", True)), n_group=n_group,
                topk_group=int(f.get("topk_group", n_group)),
                routed_scaling_factor=float(f.get("routed_scaling_factor", 1.0)),
                shared_expert_ffn=n_shared * cfg["expert_ffn"], expert_bias=True)


# ---- GPTConfig -> config.json ------------------------------------------------------------------------------

def family_for(cfg: GPTConfig) -> str:
    """The HF family that holds exactly this model, or a ValueError saying why there is none."""
    m = cfg.moe
    why = []
    if m.router == "deepspeed":
        why.append("its MoE layers use DeepSpeed's gating (moe.router='deepspeed'), which no Hugging Face "
                   "family has (the DeepSpeed-MoE paper's GPT-MoE)")
    for name, want in (("norm", "rmsnorm"), ("position", "rope"), ("mlp", "swiglu"), ("bias", False)):
        if getattr(cfg, name) != want:
            why.append(f"{name}={getattr(cfg, name)!r} (the families have {want!r})")
    if m.use_residual:
        why.append("moe.use_residual=True (Residual-MoE)")
    if isinstance(cfg.num_experts, list) and len(set(cfg.num_experts)) > 1:
        why.append(f"num_experts={cfg.num_experts} (one count for every layer in the families)")
    if why:
        raise HFFormatError("this model has no Hugging Face equivalent: " + "; ".join(why))
    ids = cfg.moe_layer_ids()
    every = ids == list(range(cfg.n_layer))
    plain = not cfg.qkv_bias and not m.shared_expert_gate
    if cfg.attention == "mla" or m.router == "sigmoid_group":
        ok = (cfg.attention == "mla" and m.router == "sigmoid_group" and plain
              and ids == list(range(ids[0] if ids else cfg.n_layer, cfg.n_layer))
              and m.shared_expert_ffn % cfg.expert_ffn_size == 0)
        candidates = {"deepseek_v3": ok}
    else:
        candidates = {
            "olmoe": (cfg.qk_norm == "full" and not m.shared_expert_ffn and every and plain
                      and cfg.head_dim * cfg.n_head == cfg.d_model),
            "qwen3_moe": cfg.qk_norm == "head" and not m.shared_expert_ffn and plain,
            "mixtral": cfg.qk_norm is None and not m.shared_expert_ffn and every and plain and m.norm_topk_prob,
            "qwen2_moe": cfg.qk_norm is None and m.shared_expert_ffn > 0 and m.shared_expert_gate,
        }
    for family, ok in candidates.items():
        if ok:
            return family
    raise HFFormatError(
        "this model matches none of the Hugging Face families raymoe exports "
        f"({sorted(ARCHITECTURES)}): attention={cfg.attention!r}, qk_norm={cfg.qk_norm!r}, "
        f"router={m.router!r}, norm_topk_prob={m.norm_topk_prob}, shared_expert_ffn={m.shared_expert_ffn}, "
        f"shared_expert_gate={m.shared_expert_gate}, qkv_bias={cfg.qkv_bias}, moe_layers={ids}")


def hf_config_from_gpt(cfg: GPTConfig, dtype: str = "float32", extra: Optional[dict] = None) -> dict:
    """The ``config.json`` dict of the HF family that holds ``cfg`` (``family_for``); ``extra`` adds keys
    (token ids). Keys are written the way transformers 5 writes them (``rope_parameters``, ``dtype``) and, with
    the same values, the way transformers 4 reads them (``rope_theta``, ``rope_scaling``, ``torch_dtype``)."""
    family = family_for(cfg)
    m = cfg.moe
    num_experts = cfg.num_experts[0] if isinstance(cfg.num_experts, list) else cfg.num_experts
    out: dict[str, Any] = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "max_position_embeddings": cfg.block_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": m.k, "router_aux_loss_coef": cfg.aux_loss_coef,
        "intermediate_size": cfg.d_ff, "attention_dropout": 0.0, "dtype": dtype,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        # the same, as transformers 4 (and tools built on it) read them
        "torch_dtype": dtype, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
    }
    ids = cfg.moe_layer_ids()
    if family in ("mixtral", "olmoe"):
        out.update(intermediate_size=cfg.expert_ffn_size)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        out["head_dim"] = cfg.head_dim
    if family == "mixtral":
        out.update(num_local_experts=num_experts, sliding_window=None)
    elif family == "olmoe":
        out.update(num_experts=num_experts, norm_topk_prob=m.norm_topk_prob, attention_bias=False, clip_qkv=None)
    elif family in ("qwen2_moe", "qwen3_moe"):
        out.update(num_experts=num_experts, moe_intermediate_size=cfg.expert_ffn_size, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(cfg.n_layer) if i not in ids], norm_topk_prob=m.norm_topk_prob,
                   use_sliding_window=False, sliding_window=None)
        if family == "qwen2_moe":
            out.update(shared_expert_intermediate_size=m.shared_expert_ffn, qkv_bias=bool(cfg.qkv_bias))
        else:
            out.update(attention_bias=False)
    else:
        out.update(n_routed_experts=num_experts, moe_intermediate_size=cfg.expert_ffn_size,
                   n_shared_experts=m.shared_expert_ffn // cfg.expert_ffn_size,
                   first_k_dense_replace=ids[0] if ids else cfg.n_layer, n_group=m.n_group, topk_group=m.topk_group,
                   norm_topk_prob=m.norm_topk_prob, routed_scaling_factor=m.routed_scaling_factor,
                   q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave, attention_bias=False,
                   topk_method="noaux_tc", scoring_func="sigmoid")
    out.update(extra or {})
    return out
