"""Typed configuration for everything a user writes in YAML (``cluster_configs/*.yaml``).

One pydantic tree, ``extra="forbid"`` everywhere, a description on every field. ``load_config`` reads a YAML
file, applies dotted ``--set`` overrides and turns validation failures into a :class:`ConfigError` whose
message names the field path and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration value is missing, unknown or outside its allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("raymoe", description="Run name; used for the output folder and metric labels.")
    output_dir: str = Field(
        "runs", description="Folder under which the run folder <output_dir>/<name> is created. A relative path is "
        "taken against the current directory, except inside a Ray job's working-dir copy (`ray job submit "
        "--working-dir`), which Ray deletes: there against $RAYMOE_RESULTS_DIR, default ~/raymoe_results. A "
        "storage URI (s3://bucket/prefix, gs://..., file://...; pyarrow.fs) keeps checkpoints and logs there "
        "(logs are written to a local copy and uploaded at each checkpoint; see README 'Where outputs go')."
    )
    seed: int = Field(1234, ge=0, description="Seed for initialisation, data sampling and routing noise.")


class ModelConfig(_Section):
    """The decoder's architecture. The defaults are the DeepSpeed-MoE paper's GPT-MoE (learned positions,
    LayerNorm, GELU, multi-head attention); the other fields configure the same decoder to the Mixtral,
    Qwen2/3-MoE, OLMoE and DeepSeek-V3 families (a Hugging Face folder sets them for you: ``init_from``)."""

    vocab_size: int = Field(
        257, ge=2, description="Vocabulary size of the model. Unset: follows the tokenizer (257 for tokenizer.kind "
        "byte, tokenizer.vocab_size for bpe, the size of a pretrained one); set: at least the tokenizer's.",
    )
    block_size: int = Field(128, ge=2, description="Context length in tokens (the largest position + 1).")
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention (query) heads per block.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); must divide n_head; default n_head."
    )
    head_dim: int | None = Field(None, ge=1, description="Size of one attention head; default d_model / n_head.")
    d_model: int = Field(128, ge=8, description="Hidden size.")
    d_ff: int | None = Field(None, ge=1, description="Dense FFN size; default 4 * d_model.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (attention, residual).")
    bias: bool = Field(True, description="Use biases in linear layers and norms.")
    qkv_bias: bool | None = Field(None, description="Biases on the q/k/v projections only (Qwen2); default `bias`.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalization layer.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of every norm.")
    qk_norm: Literal["head", "full"] | None = Field(
        None, description="RMSNorm on queries and keys: 'head' per head (Qwen3), 'full' over all heads (OLMoE)."
    )
    position: Literal["learned", "rope"] = Field("learned", description="Learned absolute positions or RoPE.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    rope_scaling: dict[str, Any] | None = Field(
        None, description="RoPE scaling as in a Hugging Face config: {'rope_type': 'linear'|'yarn', 'factor': ...,"
        " ...}; null = none."
    )
    rope_interleave: bool = Field(False, description="Rotate interleaved pairs of the RoPE dims (DeepSeek-V3).")
    attention: Literal["mha", "mla"] = Field(
        "mha", description="'mha': multi-head / grouped-query attention; 'mla': DeepSeek's multi-head latent "
        "attention (the fields below)."
    )
    q_lora_rank: int | None = Field(None, ge=1, description="MLA: rank of the query compression (null = none).")
    kv_lora_rank: int = Field(0, ge=0, description="MLA: rank of the key/value compression.")
    qk_nope_head_dim: int = Field(0, ge=0, description="MLA: per-head query/key dims without RoPE.")
    qk_rope_head_dim: int = Field(0, ge=0, description="MLA: per-head query/key dims with RoPE (shared key part).")
    v_head_dim: int = Field(0, ge=0, description="MLA: per-head value dims.")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="Feed-forward kind of dense layers and experts.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output projection.")
    init_from: str | None = Field(
        None, description="Start training (or fine-tuning) from this Hugging Face model folder (Mixtral, "
        "Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) or raymoe checkpoint (also at a storage URI): it sets the "
        "architecture and the first weights. Leave the other model/moe fields unset, except model.block_size (the training context), "
        "model.dropout, moe.aux_loss_coef and moe.z_loss_coef; its tokenizer is the run's unless the tokenizer "
        "section is set. A resumed checkpoint wins over it.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.head_dim is None and self.attention == "mha" and self.d_model % self.n_head:
            raise ValueError(f"model.n_head={self.n_head} must divide model.d_model={self.d_model} "
                             "(or set model.head_dim)")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        return self


NoisyGatePolicy = Literal["Jitter", "RSample"]
NOISY_GATE_POLICIES = (None, *get_args(NoisyGatePolicy))


def moe_schedule(n_layer: int, expert_interval: int, moe_layers: list[int] | None) -> list[int]:
    """Block ids that get an MoE layer: ``moe_layers`` if given, else every block i with
    i % expert_interval == expert_interval - 1 (interval 0: none, a dense model)."""
    if moe_layers is not None:
        return sorted(set(moe_layers))
    if expert_interval == 0:
        return []
    return [i for i in range(n_layer) if i % expert_interval == expert_interval - 1]


def check_top_k(k: int, expert_counts: list[int], where: str = "moe.k") -> None:
    """ValueError unless every MoE layer has at least ``k`` experts."""
    if expert_counts and k > min(expert_counts):
        raise ValueError(f"{where}={k} must be <= the smallest num_experts ({min(expert_counts)})")


def require_ep_divides(ep_size: int, num_experts: int) -> None:
    """ValueError unless ``ep_size`` >= 1 divides ``num_experts`` (each expert-parallel rank holds E/ep experts)."""
    if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size}: must be >= 1 and divide num_experts={num_experts}")


class MoEArgs(_Section):
    """Routing and loss options of an MoE layer, with DeepSpeed-MoE's names: the one typed argument object.

    The ``moe`` section of a config holds these fields (plus the layer schedule); the model's
    :class:`~raymoe.platform.model.GPTConfig` carries one instance and every
    :class:`~raymoe.platform.moe.MoE` layer reads it (DeepSpeed-style keyword arguments build one).
    """

    k: int = Field(1, ge=1, description="Experts per token (top-k gating).")
    capacity_factor: float = Field(1.0, gt=0, description="Training capacity factor (tokens per expert).")
    eval_capacity_factor: float = Field(1.0, gt=0, description="Capacity factor in eval mode.")
    min_capacity: int = Field(4, ge=0, description="Minimum expert capacity in tokens.")
    drop_tokens: bool = Field(
        True, description="Drop tokens over capacity; false = dropless. Default: true with router 'deepspeed' "
        "(DeepSpeed's default), false with the modern routers."
    )
    use_rts: bool = Field(
        True, description="Random Token Selection at top-1 in drop mode, in training and eval (as DeepSpeed): an "
        "expert over capacity keeps random tokens, not the first ones."
    )
    drop_policy: Literal["probs", "position"] = Field(
        "probs", description="Top-k gating with k > 2 in drop mode (DeepSpeed's topkgating): an expert over "
        "capacity keeps the token-choices with the highest gate probability ('probs', DeepSpeed's default) or "
        "the earliest tokens ('position'). k = 1 drops by RTS or position, k = 2 by choice rank then position."
    )
    noisy_gate_policy: NoisyGatePolicy | None = Field(
        None, description="Gate noise in training: null, 'Jitter' (input jitter, any k) or 'RSample' (Gumbel "
        "noise on the top-1 choice; no effect with k >= 2, as in DeepSpeed)."
    )
    top2_2nd_expert_sampling: bool = Field(
        True, description="Top-2 gating: sample the second expert with Gumbel noise, in training and eval "
        "(DeepSpeed's default; generation and serving switch eval sampling off, see docs/routing.md)."
    )
    use_residual: bool = Field(False, description="Residual-MoE: dense MLP + top-1 expert mixed per token.")
    z_loss_coef: float = Field(0.0, ge=0, description="Router z-loss coefficient (0 = off).")
    expert_bias: bool = Field(False, description="Aux-loss-free balancing bias (DeepSeek-V3 style).")
    expert_bias_update_rate: float = Field(1e-3, ge=0, description="Step size of the expert bias update.")
    router: Literal["deepspeed", "softmax_topk", "sigmoid_group"] = Field(
        "deepspeed",
        description="'deepspeed': DeepSpeed-MoE's gating (the options above). 'softmax_topk': softmax over all "
        "experts then top-k (Mixtral, Qwen-MoE, OLMoE). 'sigmoid_group': DeepSeek-V3's sigmoid scores with "
        "the score-correction bias and group-limited selection.",
    )
    norm_topk_prob: bool = Field(False, description="Modern routers: renormalize the top-k weights to sum to 1.")
    n_group: int = Field(1, ge=1, description="sigmoid_group: expert groups (must divide num_experts).")
    topk_group: int = Field(1, ge=1, description="sigmoid_group: groups a token may choose experts from.")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Modern routers: scale of the routed output.")
    shared_expert_ffn: int = Field(
        0, ge=0, description="FFN size of the shared expert every token also runs (DeepSeek's n_shared_experts "
        "* moe_intermediate_size, Qwen2-MoE's shared_expert_intermediate_size); 0 = none."
    )
    shared_expert_gate: bool = Field(False, description="Scale the shared expert by sigmoid(Linear(h)) (Qwen2-MoE).")

    @model_validator(mode="before")
    @classmethod
    def _router_default_drop(cls, data: Any) -> Any:
        # The modern routers are dropless unless drop_tokens is given; DeepSpeed's gating keeps its default.
        if isinstance(data, dict) and "drop_tokens" not in data and data.get("router", "deepspeed") != "deepspeed":
            data = {**data, "drop_tokens": False}
        return data

    @model_validator(mode="after")
    def _shared_and_groups(self) -> "MoEArgs":
        if self.use_residual and self.shared_expert_ffn:
            raise ValueError(f"moe.use_residual and moe.shared_expert_ffn={self.shared_expert_ffn} both make the "
                             "layer's shared MLP: set one (Residual-MoE's mixing or the shared expert's sum)")
        if self.topk_group > self.n_group:
            raise ValueError(f"moe.topk_group={self.topk_group} must be <= moe.n_group={self.n_group}")
        return self


class MoEConfig(MoEArgs):
    """The ``moe`` section: which blocks are MoE layers, their expert counts and sizes, and :class:`MoEArgs`."""

    num_experts: int | list[int] = Field(
        8,
        description="Experts per MoE layer: one int for all, or a list with one entry per MoE layer "
        "(Pyramid-MoE, e.g. [4, 4, 8]). 1 or an empty moe_layers list gives a dense model.",
    )
    expert_interval: int = Field(
        2, ge=1, description="MoE on every expert_interval-th block (blocks i with i % interval == interval-1)."
    )
    moe_layers: list[int] | None = Field(
        None, description="Explicit block ids that get an MoE (overrides expert_interval); [] = dense model."
    )
    expert_ffn: int | None = Field(None, ge=1, description="FFN size of each expert; default model.d_ff.")
    aux_loss_coef: float = Field(0.01, ge=0, description="Coefficient of the summed load-balancing loss.")

    @field_validator("num_experts")
    @classmethod
    def _positive_experts(cls, v: int | list[int]) -> int | list[int]:
        values = v if isinstance(v, list) else [v]
        if not values or any(e < 1 for e in values):
            raise ValueError(f"num_experts must be an int >= 1 or a non-empty list of ints >= 1, got {v!r}")
        return v

    def args(self) -> MoEArgs:
        """The :class:`MoEArgs` part of this section."""
        return MoEArgs(**self.model_dump(include=set(MoEArgs.model_fields)))


class DataConfig(_Section):
    sources: list[str] = Field(
        default_factory=list,
        description="Text (.txt), JSONL (.jsonl), token (.bin uint16 / .npy) files or folders; "
        "empty = the embedded default corpus (Python's pydoc_data.topics).",
    )
    jsonl_field: str = Field("text", description="Field holding the text in JSONL records.")
    cache_dir: str = Field(".cache/raymoe", description="Folder for tokenized memory-mapped token files.")
    val_fraction: float = Field(0.05, gt=0, le=0.5, description="Fraction of tokens held out for validation.")


class TokenizerConfig(_Section):
    """How a run turns text into tokens; the tokenizer is saved in every checkpoint, so eval, generate and serve
    use it without being told."""

    kind: Literal["byte", "bpe", "pretrained"] = Field(
        "byte", description="byte: UTF-8 bytes + EOS (257 ids, no files); bpe: a byte-level BPE trained with the "
        "`tokenizers` library on the run's text (cached in data.cache_dir); pretrained: tokenizer.json of `path`.",
    )
    vocab_size: int = Field(
        2048, ge=258, le=65536, description="bpe: vocabulary size of the trained tokenizer (256 byte symbols, "
        "<|endoftext|> and merges); model.vocab_size follows it.",
    )
    path: str | None = Field(
        None, description="pretrained: a folder holding tokenizer.json (a Hugging Face model folder or a raymoe "
        "checkpoint); its tokenizer_config.json / generation_config.json give the special and stop tokens.",
    )
    train_bytes: int = Field(
        100_000_000, ge=1, description="bpe: the merges are learned from at most this many bytes of the text before "
        "the validation split.",
    )

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> "TokenizerConfig":
        if (self.kind == "pretrained") != (self.path is not None):
            raise ValueError(f"tokenizer.path is required with tokenizer.kind 'pretrained' and only then "
                             f"(kind {self.kind!r}, path {self.path!r})")
        return self


class TrainConfig(_Section):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step (all workers together).")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward pass; default = global_batch_size / cluster.num_workers "
        "(ray) or global_batch_size (local: no accumulation). Fixed for the run: any number of shards splits the "
        "step's micro-batches, counts differing by at most one."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr: float = Field(3e-4, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    eval_interval: int = Field(50, ge=1, description="Evaluate validation loss every this many steps.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    log_interval: int = Field(10, ge=1, description="Write a metrics record every this many steps.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available else cpu.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto = bf16 autocast on GPU, fp32 on CPU."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (default: torch's).")
    progress: bool = Field(True, description="Show a progress bar on a terminal.")
    activation_checkpointing: Literal["none", "moe", "full"] = Field(
        "none", description="Recompute activations in the backward instead of keeping them: none; moe = the MoE "
        "sublayer of each MoE block (its expert activations are the largest); full = every block. Same results, "
        "less activation memory, about one more forward of compute.")

    @model_validator(mode="after")
    def _micro_divides(self) -> "TrainConfig":
        micro = self.micro_batch_size
        if micro is not None and self.global_batch_size % micro:
            raise ValueError(
                f"train.micro_batch_size={micro} must divide train.global_batch_size={self.global_batch_size}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be <= train.lr={self.lr}")
        return self


class CheckpointConfig(_Section):
    interval: int = Field(0, ge=0, description="Save every this many steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints to keep; older ones are deleted.")
    resume: bool | str = Field(
        False, description="false; true: resume from the run folder's latest checkpoint, or start at step 0 with a "
        "warning when there is none; 'must': the same, but fail when there is none; or a checkpoint path or "
        "storage URI (s3://...)."
    )


class DistillConfig(_Section):
    teacher_checkpoint: str | None = Field(
        None, description="Checkpoint folder of the teacher; set to train a Mixture-of-Students student."
    )
    student_layers: int | None = Field(None, ge=1, description="Student depth; default: teacher depth - 12.5%.")
    beta: float = Field(1.0, ge=0, description="Weight of the KD term.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KD term.")
    kd_stop_step: int | None = Field(
        None, ge=0, description="Staged KD: stop KD after this step (null = KD for the whole run)."
    )
    kl_direction: Literal["teacher_student", "student_teacher"] = Field(
        "teacher_student",
        description="KD term: KL(teacher || student) (Hinton KD, DeepSpeed MoS; the default) or "
        "KL(student || teacher) (mode-seeking: the student concentrates on the teacher's largest modes).",
    )


class SampleConfig(_Section):
    prompt: str = Field("def ", description="Prompt of the sample printed after training.")
    max_new_tokens: int = Field(120, ge=0, description="Tokens generated for the sample (0 = no sample).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0 = greedy).")
    top_k: int | None = Field(40, ge=1, description="Top-k filter (null = off).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus filter (null = off).")


class ClusterConfig(_Section):
    mode: Literal["local", "ray"] = Field(
        "local", description="local = train in this process; ray = a Coordinator actor drives ExpertShard actors."
    )
    address: str | None = Field(
        None, description="Ray cluster address (null: RAY_ADDRESS, else a running local cluster, else start one)."
    )
    num_workers: int = Field(2, ge=1, description="Expert shards (Ray actors); one per GPU on GPU clusters.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per shard in its placement-group bundle.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per shard (1 on GPU clusters, 0 on CPU).")
    memory_per_worker_gb: float | None = Field(
        None, gt=0, description="Memory limit per shard in GiB (null = none): reserved as Ray's `memory` resource "
        "in each shard's bundle, and checked in the shard: its training state (parameters, gradients, AdamW state, "
        "the elastic undo copy and the shard copies held for cluster.buddy_interval, this rank's shards only) must "
        "fit, or the run fails naming this setting. After the first optimizer step the shard also compares its "
        "peak RSS above its process baseline (the runtime before the model, ~300 MiB) with it: printed, exported "
        "(raymoe_shard_peak_rss_over_baseline_bytes, updated after every step) and a warning when over (once, at "
        "the first step or whenever it first gets over), not an error (it holds activations, transient FSDP "
        "buffers and allocator slack too; see docs/design.md).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend: auto = nccl with GPUs, gloo on CPU."
    )
    ep_size: int | list[int] | Literal["auto"] = Field(
        "auto",
        description="Expert-parallel degree: one int for every MoE layer, a list with one entry per MoE layer "
        "(PR-MoE), or auto = the largest divisor of num_workers that divides the layer's expert count.",
    )
    hierarchical_all_to_all: bool = Field(
        False, description="Two-phase all-to-all (intra-node, then inter-node; DeepSpeed-MoE sec. 5.3)."
    )
    ranks_per_node: int | None = Field(
        None, ge=1, description="Shards per node for the hierarchical all-to-all (null = from the placement)."
    )
    dense_sharding: Literal["replicate", "shard"] = Field(
        "replicate", description="Dense (non-expert) parameters, gradients and AdamW state: replicate = a full "
        "copy on every shard (gradients all-reduced); shard = FSDP2 (fully_shard) over all shards, each holding "
        "1/num_workers. Changes memory, not numerics. Local runs (one process) ignore it.",
    )
    expert_sharding: Literal["replicate", "shard"] = Field(
        "replicate", description="Expert parameters, gradients and AdamW state: replicate = each shard holds its "
        "experts whole (gradients all-reduced over the expert-data-parallel group); shard = FSDP2 over that "
        "group (a layer whose EP size is num_workers has no replica to shard over and stays whole). Local runs "
        "ignore it.",
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = Field(
        "PACK", description="Placement-group strategy for the shard bundles."
    )
    collective_timeout_s: float = Field(
        120.0, gt=0, description="Timeout of torch.distributed collectives and of waiting for a step."
    )
    start_timeout_s: float = Field(300.0, gt=0, description="Timeout for placing and starting the shards.")
    elastic: bool = Field(
        True, description="Keep training when shards are lost (shrink) or resources are added (grow)."
    )
    min_workers: int = Field(1, ge=1, description="Elastic: fewest shards to continue with.")
    max_workers: int | None = Field(None, ge=1, description="Elastic: most shards to grow to (null = num_workers).")
    buddy_interval: int = Field(
        0, ge=0, description="Elastic: every this many steps, right after the update, each shard hands a copy of "
        "what it holds (its FSDP shards, or its experts and dense replica) to its buddy, the next rank (and keeps "
        "one itself when > 1); recovery rebuilds what no survivor holds from them: with 1 no step is lost unless a "
        "shard and its buddy are lost together (0 = off: fall back to the last checkpoint).",
    )
    publish_interval: int = Field(
        0, ge=0, description="Every this many steps each shard puts its weights into Ray's object store, expert "
        "by expert, and registers them with the run's weight registry (the latest two steps are kept), so "
        "`raymoe serve --follow RUN_DIR --live` on the same Ray cluster swaps them in without a checkpoint "
        "(0 = off).",
    )
    grow_check_interval: int = Field(
        1, ge=1, description="Elastic: look for free resources to add shards every this many steps."
    )
    coordinator_restarts: int = Field(
        3, ge=0, description="Times the driver starts a new coordinator (and shards) when the coordinator's process "
        "dies; it resumes from the run's latest checkpoint, losing at most checkpoint.interval steps (0 = fail).",
    )

    @field_validator("ep_size")
    @classmethod
    def _positive_ep(cls, v):
        values = v if isinstance(v, list) else ([] if v == "auto" else [v])
        if isinstance(v, list) and not v or any(e < 1 for e in values):
            raise ValueError(f"ep_size must be 'auto', an int >= 1 or a non-empty list of ints >= 1, got {v!r}")
        return v


# What a config may set beside model.init_from (the folder sets everything else about the model).
INIT_FROM_MODEL_FIELDS = frozenset({"init_from", "block_size", "dropout"})
INIT_FROM_MOE_FIELDS = frozenset({"aux_loss_coef", "z_loss_coef"})


class RaymoeConfig(_Section):
    """The root of every raymoe YAML file."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name, output folder, seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="GPT decoder shape.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="MoE layers: schedule, gating, losses.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and tokenization.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer: byte, BPE, pretrained.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimizer, schedule, steps.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Saving and resuming.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Mixture-of-Students KD.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Sample printed after training.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Distributed training on Ray.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RaymoeConfig":
        if self.model.init_from:
            self._check_init_from()
        else:
            self._check_architecture()
        if self.cluster.mode == "ray":
            self._check_distributed_batch()
            self._check_elastic_bounds()
        return self

    def _check_init_from(self) -> None:
        """The folder sets the architecture: model/moe fields given other values than their defaults would be
        ignored, so they are errors (the defaults themselves are harmless: a config passed on by the driver
        carries every field)."""
        allowed = {"model": INIT_FROM_MODEL_FIELDS, "moe": INIT_FROM_MOE_FIELDS}
        clash = sorted(f"{name}.{f}" for name, section in (("model", self.model), ("moe", self.moe))
                       for f, info in type(section).model_fields.items()
                       if f not in allowed[name] and getattr(section, f) != info.get_default(call_default_factory=True))
        if clash:
            raise ValueError(
                f"model.init_from={self.model.init_from!r} sets the architecture; remove {clash} (allowed "
                f"beside it: {sorted(f'model.{f}' for f in INIT_FROM_MODEL_FIELDS - {'init_from'})} and "
                f"{sorted(f'moe.{f}' for f in INIT_FROM_MOE_FIELDS)})")
        if "tokenizer" not in self.model_fields_set and (Path(self.model.init_from) / "tokenizer.json").is_file():
            self.tokenizer = TokenizerConfig(kind="pretrained", path=self.model.init_from)

    def _check_architecture(self) -> None:
        self._vocab_follows_tokenizer()
        n_moe = len(moe_layer_ids(self))
        if isinstance(self.moe.num_experts, list) and len(self.moe.num_experts) != n_moe:
            raise ValueError(
                f"moe.num_experts has {len(self.moe.num_experts)} entries but the schedule has {n_moe} MoE "
                f"layers {moe_layer_ids(self)}: give one entry per MoE layer or a single int"
            )
        bad = [i for i in (self.moe.moe_layers or []) if not 0 <= i < self.model.n_layer]
        if bad:
            raise ValueError(f"moe.moe_layers {bad} out of range: allowed 0..{self.model.n_layer - 1}")
        experts = self.moe.num_experts if isinstance(self.moe.num_experts, list) else [self.moe.num_experts]
        check_top_k(self.moe.k, experts if n_moe else [])
        ep = self.cluster.ep_size
        if isinstance(ep, list) and len(ep) != n_moe:
            raise ValueError(f"cluster.ep_size has {len(ep)} entries but the schedule has {n_moe} MoE layers "
                             f"{moe_layer_ids(self)}: give one entry per MoE layer, one int, or 'auto'")
        if self.moe.use_residual and self.moe.k != 1:
            raise ValueError(f"moe.use_residual needs moe.k=1 (Residual-MoE is top-1), got k={self.moe.k}")


    def _vocab_follows_tokenizer(self) -> None:
        """model.vocab_size unset: the tokenizer's size (byte, bpe; a pretrained one is resolved when it is loaded);
        set: it must hold every id of the tokenizer."""
        size = {"byte": 257, "bpe": self.tokenizer.vocab_size}.get(self.tokenizer.kind)
        if size is None:
            return
        if "vocab_size" not in self.model.model_fields_set:
            self.model.vocab_size = size
        elif self.model.vocab_size < size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the tokenizer's {size} ids "
                             f"(tokenizer.kind {self.tokenizer.kind!r}); leave model.vocab_size unset to follow it")

    def _check_elastic_bounds(self) -> None:
        c = self.cluster
        top = c.max_workers or c.num_workers
        if not c.min_workers <= c.num_workers <= top:
            raise ValueError(f"cluster.min_workers={c.min_workers} <= cluster.num_workers={c.num_workers} <= "
                             f"cluster.max_workers={top} must hold")

    def _check_distributed_batch(self) -> None:
        """Any number of shards splits a step's micro-batches (counts differing by at most one); only the
        default micro-batch, one per shard (global batch / num_workers), needs num_workers to divide the batch."""
        world, t = self.cluster.num_workers, self.train
        gb = t.global_batch_size
        if t.micro_batch_size is None and gb % world:
            allowed = [d for d in range(1, gb + 1) if gb % d == 0]
            raise ValueError(
                f"train.micro_batch_size is unset (default: train.global_batch_size / cluster.num_workers) and "
                f"cluster.num_workers={world} does not divide train.global_batch_size={gb}: set "
                f"train.micro_batch_size to one of {allowed}, or num_workers to a divisor of {gb}")
        per_node = self.cluster.ranks_per_node
        if per_node is not None and world % per_node:
            raise ValueError(f"cluster.ranks_per_node={per_node} must divide cluster.num_workers={world} (EP groups "
                             f"are made of whole nodes); allowed: {[d for d in range(1, world + 1) if world % d == 0]} "
                             "or null (from the placement)")


def moe_layer_ids(cfg: RaymoeConfig) -> list[int]:
    """Block ids that get an MoE under this config's schedule."""
    return moe_schedule(cfg.model.n_layer, cfg.moe.expert_interval, cfg.moe.moe_layers)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        if isinstance(got, dict) and e["type"] == "value_error":
            # a cross-field check on a whole section: its message already names the fields
            lines.append(f"  {msg}")
            continue
        got_s = "" if e["type"] == "extra_forbidden" else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{got_s}")
    return "\n".join(lines)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign ``value`` at ``a.b.c`` in a nested dict, checking each key against the schema."""
    keys = dotted.split(".")
    model: type[BaseModel] | None = RaymoeConfig
    node = tree
    for depth, key in enumerate(keys):
        if model is not None:
            if key not in model.model_fields:
                where = ".".join(keys[:depth]) or "<root>"
                allowed = ", ".join(model.model_fields)
                raise ConfigError(f"--set {dotted}: unknown field '{key}' under {where}; allowed: {allowed}")
            annotation = model.model_fields[key].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(keys) - 1:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``a.b=value`` strings; values are YAML scalars/lists (``3``, ``true``, ``[4, 8]``, ``null``)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.path=value, got {item!r}")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {path}: cannot parse value {raw!r}: {exc}") from exc
        parsed.append((path.strip(), value))
    return parsed


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The fields of ``cfg`` that were set (by the user or a validator), as plain JSON, nested sections
    included: :func:`config_from_dict` of it rebuilds an equal config that also knows which fields were given
    (``model.init_from`` depends on that), which a full ``model_dump`` would lose. For sending configs to actors."""
    out: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            sub = config_to_dict(value)
            if sub or name in cfg.model_fields_set:
                out[name] = sub
        elif name in cfg.model_fields_set:
            out[name] = cfg.model_dump(mode="json", include={name})[name]
    return out


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | None = None,
                     source: str = "<dict>") -> RaymoeConfig:
    """Validate a plain dict (as read from YAML) plus overrides into a :class:`RaymoeConfig`."""
    tree: dict[str, Any] = dict(data or {})
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for path, value in parse_overrides(overrides):
        _set_path(tree, path, value)
    try:
        return RaymoeConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RaymoeConfig:
    """Read a YAML config (``None`` = all defaults) and apply ``--set`` overrides."""
    if path is None:
        return config_from_dict({}, overrides, source="defaults")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return config_from_dict(data, overrides, source=str(p))


RESULTS_DIR_ENV = "RAYMOE_RESULTS_DIR"
DEFAULT_RESULTS_DIR = "~/raymoe_results"


def in_ray_job_working_dir(path: Path) -> bool:
    """Whether ``path`` lies in the copy Ray unpacks of a runtime environment's working dir
    (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes."""
    parts = Path(path).parts
    return any(parts[i:i + 2] == ("runtime_resources", "working_dir_files") for i in range(len(parts) - 1))


def resolve_output_dir(output_dir: str, cwd: Path | None = None) -> Path | str:
    """The absolute folder ``run.output_dir`` names. A relative path is taken against ``cwd`` (default: the
    current directory), except inside a Ray job's working-dir copy (:func:`in_ray_job_working_dir`): there
    against ``$RAYMOE_RESULTS_DIR`` (default ``~/raymoe_results``), so the run's outputs outlive the job and
    ``checkpoint.resume`` finds them from the next one (as Ray Train's ``storage_path`` defaults to
    ``~/ray_results``). A storage URI (``s3://...``, see :mod:`raymoe.platform.storage`) is returned as it is;
    ``file://`` as its local path."""
    if "://" in output_dir:
        from raymoe.platform.storage import location

        loc = location(output_dir)
        if not isinstance(loc, Path):
            return str(loc)
        output_dir = str(loc)
    path = Path(output_dir).expanduser()
    if path.is_absolute():
        return path
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if in_ray_job_working_dir(cwd):
        cwd = Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).expanduser()
    return Path(os.path.abspath(cwd / path))


def resolved_d_ff(cfg: RaymoeConfig) -> int:
    """Dense FFN size after defaults."""
    return cfg.model.d_ff or 4 * cfg.model.d_model


def describe_fields(model: type[BaseModel] = RaymoeConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted path, default, description) for every field; used by docs and `raymoe config`."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, prefix=path + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((path, repr(default), field.description or ""))
    return rows
