"""The training loop: one implementation, run by local training and by every expert shard (SPMD).

`Trainer.run` is the loop (torchtitan's ``Trainer.train()`` is the model): step, evaluate at
``train.eval_interval``, report, checkpoint at ``checkpoint.interval`` and at the end. A local run is a world of
one rank; a distributed run starts the same loop on every shard from a schedule handed out once (start step,
optional stop step) and the ranks stay in lockstep through their collectives. What differs is injected:

- the rank's place in the world (``rank``, ``world``, ``group``: the process group that sums each step's
  metrics, one small all-reduce per step, so every rank holds the same record);
- the model, optimizer and gradient synchronisation built for that rank (:mod:`raymoe.platform.distributed`);
- a :class:`Reporter` that receives each step's record and each written checkpoint (local: the run log and a
  commit in this process; a shard: rank 0 reports to the coordinator, which commits the manifest);
- :class:`StepHooks` called before each step and each checkpoint write (fault injection in tests).

Which windows a rank reads is a pure function of (seed, step, rank, world): the global batch of a step is the
same for any world size, its N micro-batches are spread over the ranks in contiguous runs whose counts differ
by at most one (`data.micro_batch_assignment`; any world size, the ranks with fewer run weight-0 padding passes
so every rank runs ceil(N / W) passes in lockstep), every micro-batch's loss is weighted by 1/N and the ranks'
gradients and metrics are summed, and the router noise of every micro-batch is seeded by its index in the
global batch, so one rank accumulating all micro-batches and W ranks each running their share give the same
losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from raymoe.config import RaymoeConfig
from raymoe.platform import checkpoint as ckpt
from raymoe.platform import storage
from raymoe.platform.data import (build_dataset, eval_window_starts, rank_micro_batches, rank_window_starts,
                                  window_bytes, windows_from_starts)
from raymoe.platform.distill import KDSchedule
from raymoe.platform.parallel import reset_comm_stats, seed_router_noise, total_comm_seconds
from raymoe.platform.train_step import KDSettings, StepResult, autocast_context, lr_at, train_step

Batch = tuple[torch.Tensor, torch.Tensor]


# -- choices made once per run --------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; allowed here: 'auto', 'cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPU for 'auto', fp32 (no autocast) on CPU."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def micro_batch_size(cfg: RaymoeConfig) -> int:
    """Sequences per forward pass: ``train.micro_batch_size``, else the whole batch of one rank at the
    configured world size. Fixed for the run: when an elastic world changes, ranks run more or fewer
    micro-batches per step and the global batch stays the same."""
    t = cfg.train
    world = cfg.cluster.num_workers if cfg.cluster.mode == "ray" else 1
    return t.micro_batch_size or t.global_batch_size // world


def build_splits(cfg: RaymoeConfig, block_size: int | None = None, tokenizer=None):
    """(train, validation) token datasets of ``cfg.data`` (built and cached once per cache folder and tokenizer),
    split for windows of ``block_size`` tokens (default ``model.block_size``). ``tokenizer``: default the run's
    (`raymoe.platform.bpe.run_tokenizer`), whose ids must fit the model's vocabulary; ``raymoe eval`` passes the
    checkpoint's."""
    from raymoe.platform.bpe import run_tokenizer
    from raymoe.platform.model_io import gpt_config_from
    from raymoe.platform.tokenizer import check_fits

    d = cfg.data
    if tokenizer is None:
        tokenizer = run_tokenizer(cfg, log=print)
        # the model's vocabulary: model.vocab_size, or model.init_from's, or the distillation teacher's
        check_fits(tokenizer, gpt_config_from(cfg).vocab_size, "model.vocab_size")
    ds = build_dataset(d.sources or None, cache_dir=d.cache_dir, tokenizer=tokenizer, jsonl_field=d.jsonl_field)
    return ds.split(d.val_fraction, block_size=block_size or cfg.model.block_size)


def resume_source(cfg: RaymoeConfig, ckpt_dir) -> storage.Location | None:
    """The checkpoint ``checkpoint.resume`` names: None (start fresh), the run's latest one (``true``: None if
    there is none yet; ``"must"``: CheckpointError if there is none) or the given path or URI."""
    resume = cfg.checkpoint.resume
    if resume is False:
        return None
    if resume is True or resume == "must":
        latest = ckpt.latest_checkpoint(ckpt_dir)
        if latest is None and resume == "must":
            raise ckpt.CheckpointError(
                f"checkpoint.resume=must: no committed checkpoint in {storage.absolute(ckpt_dir)} "
                "(<run.output_dir>/<run.name>/checkpoints): check run.output_dir and run.name")
        return latest
    return storage.location(resume)


def load_teacher(cfg: RaymoeConfig, device: torch.device):
    """The frozen Mixture-of-Students teacher and its KD schedule, or (None, None) without distillation."""
    d = cfg.distill
    if not d.teacher_checkpoint:
        return None, None
    from raymoe.platform.model_io import load_model

    teacher = load_model(d.teacher_checkpoint, device=device)
    teacher.eval()
    teacher.set_deterministic(True)  # the KD targets do not depend on random routing draws
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, KDSchedule(d.kd_stop_step)


# -- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def window_loss_sums(model, split_ds, starts, *, block_size: int, micro_batch: int, device="cpu",
                     autocast_dtype: torch.dtype | None = None, padding: int = 0) -> tuple[float, int]:
    """(summed cross-entropy, token count) over the windows at ``starts``, in forwards of ``micro_batch``
    windows (each forward sees the capacity it sees in training); the last ``padding`` forwards are padding
    passes (``data.rank_window_starts``), run for the collectives inside them and not counted."""
    x, y = windows_from_starts(split_ds, np.asarray(starts, dtype=np.int64), block_size, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        forwards = list(zip(x.split(micro_batch), y.split(micro_batch)))
        for i, (xb, yb) in enumerate(forwards):
            # DeepSpeed's eval routing may draw (top-2 second-expert sampling, top-1 RTS); validation does not,
            # so its loss is the same at every run and expert-parallel size
            with autocast_context(torch.device(device).type, autocast_dtype), model.deterministic_routing():
                logits = model(xb).logits
            if i >= len(forwards) - padding:
                continue
            total += float(torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.size(-1)), yb.view(-1), reduction="sum"))
            count += yb.numel()
    finally:
        model.train(was_training)
    return total, count


def bits_per_byte(total_nats: float, num_bytes: int | None) -> float | None:
    """Summed cross-entropy (nats) over the UTF-8 bytes those tokens stand for, in bits: comparable across
    tokenizers (None when the bytes are unknown)."""
    return total_nats / (math.log(2) * num_bytes) if num_bytes else None


def val_metrics(total: float, count: int, num_bytes: int | None = None) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and, given the targets' UTF-8 bytes, bits per byte."""
    if count == 0:
        raise ValueError("evaluation got no tokens: the validation split is empty or too short")
    loss = total / count
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if (bpb := bits_per_byte(total, num_bytes)) is not None:
        out["val_bpb"] = bpb
    return out


def evaluate_checkpoint_windows(cfg: RaymoeConfig, model, device="cpu", tokenizer=None) -> dict[str, float]:
    """The validation loss that training logs, for ``model`` (``raymoe eval``): the same windows and forward
    sizes, one process; the text is tokenized with ``tokenizer`` (``raymoe eval``: the checkpoint's)."""
    # learned positions: the model's block_size is the training context; RoPE: it is the whole position range
    # (a Hugging Face model's 4096 or 131072), and training used model.block_size of the config
    block, t = model.config.block_size, cfg.train
    if model.config.position == "rope":
        block = min(cfg.model.block_size, block)
    _, val = build_splits(cfg, block, tokenizer=tokenizer)
    starts = eval_window_starts(val, block, t.global_batch_size, t.eval_batches)
    return val_metrics(*window_loss_sums(model, val, starts, block_size=block, micro_batch=micro_batch_size(cfg),
                                         device=device), window_bytes(val, starts, block))


# -- the injected parts -------------------------------------------------------------------------------------
class Reporter(Protocol):
    """Where the loop's results go (every rank calls it; a distributed reporter acts on rank 0)."""

    def record(self, rec: dict) -> None:
        """One step's record (the same on every rank)."""

    def checkpoint_written(self, step: int, path: Path) -> None:
        """Every rank wrote its part of checkpoint ``step`` under ``path``: commit it."""

    def step_done(self, step: int) -> None:
        """After ``step`` steps (its record reported, its checkpoint written): e.g. in-memory copies."""


class StepHooks(Protocol):
    """Called by the loop before each step and each checkpoint write (fault injection in tests)."""

    def before_step(self, step: int, trainer: "Trainer", micro_batches: int) -> None: ...

    def before_save(self, step: int, trainer: "Trainer", root: Path) -> None: ...


@dataclass
class RankInfo:
    """This rank's place: ``rank`` of ``world``; ``group`` sums the per-step metrics (None for world 1);
    ``writes_dense`` / ``writes_experts``: the parts of a checkpoint this rank writes."""

    rank: int = 0
    world: int = 1
    group: object = None
    writes_dense: bool = True
    writes_experts: bool = True


# -- the loop -------------------------------------------------------------------------------------------------
class Trainer:
    """One rank's training loop over an injected model (see the module docstring)."""

    def __init__(self, cfg: RaymoeConfig, model, optimizer, train_ds, val_ds, *, device: torch.device,
                 reporter: Reporter, place: RankInfo | None = None, grad_sync=None, grad_norm_fn=None,
                 teacher=None, kd_schedule: KDSchedule | None = None, hooks: StepHooks | None = None):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.train_ds, self.val_ds = train_ds, val_ds
        self.device, self.dtype = device, resolve_dtype(cfg.train.dtype, device)
        self.place = place or RankInfo()
        self.reporter, self.hooks = reporter, hooks
        self.grad_sync, self.grad_norm_fn = grad_sync, grad_norm_fn
        self.teacher, self.kd_schedule = teacher, kd_schedule
        self.micro = micro_batch_size(cfg)
        self.ckpt_dir = storage.RunOutputs(cfg.run.output_dir, cfg.run.name).checkpoints
        tb = getattr(train_ds, "token_bytes", None)  # bytes per token id: bits per byte in the records
        self._token_bytes = None if tb is None else torch.as_tensor(np.append(tb, 0), device=device)
        self._eval_bytes: int | None = None
        self.stop_requested = False  # set from another thread (the coordinator's stop request)
        self.last_synced = -1  # the last step whose record every rank holds (0-based)
        self.last_record: dict | None = None

    # -- one step ----------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> tuple[list[Batch], int]:
        """This rank's passes of ``step``: its micro-batches of the global batch (router noise seeded by their
        indices in it), then its padding passes; returns (passes, padding passes). See the module docstring."""
        t, p = self.cfg.train, self.place
        passes = rank_micro_batches(self.train_ds, self.cfg.run.seed, step, p.rank, p.world, t.global_batch_size,
                                    self.micro, self.cfg.model.block_size, self.device)
        seed_router_noise(self.cfg.run.seed, step, p.rank, model=self.model,
                          micro_batches=len(passes.batches) - passes.padding, first=passes.first)
        return passes.batches, passes.padding

    def step(self, step: int) -> dict:
        """Run optimizer step ``step`` (0-based) on this rank; returns the step's record for the whole world."""
        t = self.cfg.train
        kd = None
        if self.teacher is not None and self.kd_schedule.active(step):
            d = self.cfg.distill
            kd = KDSettings(self.teacher, d.beta, d.temperature, d.kl_direction)
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
        batches, padding = self.micro_batches(step)
        t0 = time.perf_counter()  # the step's time includes what the hooks do first (e.g. elastic's undo copy)
        if self.hooks is not None:
            self.hooks.before_step(step, self, len(batches))
        reset_comm_stats(self.model)
        res = train_step(self.model, self.optimizer, batches, lr=lr, grad_clip=t.grad_clip,
                         autocast_dtype=self.dtype, kd=kd, grad_sync=self.grad_sync, grad_norm_fn=self.grad_norm_fn,
                         total_micro_batches=t.global_batch_size // self.micro, padding=padding)
        return self._reduce(step, res, t0, total_comm_seconds(self.model),
                            self._target_bytes(batches[:len(batches) - padding]))

    def _target_bytes(self, batches: list[Batch]) -> float:
        """UTF-8 bytes of this rank's target tokens (0 when the tokenizer is unknown: no bits per byte)."""
        if self._token_bytes is None:
            return 0.0
        top = len(self._token_bytes) - 1
        return float(sum(int(self._token_bytes[y.clamp(max=top)].sum()) for _, y in batches))

    def _reduce(self, step: int, res: StepResult, t0: float, comm_s: dict[int, float],
                num_bytes: float = 0.0) -> dict:
        """Sum this rank's results over the world (one all-reduce) and build the step's record; the stop
        flag travels with it, so every rank agrees on where a requested stop happens. The means (loss, aux
        loss, dropped fraction, l_aux) arrive as each rank's share (weighted by its micro-batches, see
        ``train_step``), so their sum is the step's mean however unevenly the ranks split it; all-to-all
        seconds are averaged over the ranks. ``step_s`` is the step's wall time on this rank from ``t0``, the
        reduction included."""
        W = self.place.world
        counts = [c for layer in res.expert_counts for c in layer]
        vec = [res.loss, res.ce_loss, res.aux_loss, res.tokens, float(self.stop_requested), num_bytes, *counts,
               *res.dropped_fraction, *res.l_aux, *comm_s.values()]
        if W > 1:
            buf = torch.tensor(vec, dtype=torch.float64, device=self.device)  # on the GPU for NCCL
            dist.all_reduce(buf, group=self.place.group)
            vec = buf.tolist()
        step_s = time.perf_counter() - t0
        loss, ce, aux, tokens, stop, num_bytes = vec[:6]
        rec = {"step": step + 1, "loss": loss, "ce_loss": ce, "aux_loss": aux, "lr": res.lr,
               "grad_norm": res.grad_norm, "tokens": int(round(tokens)), "step_s": step_s,
               "tokens_per_s": tokens / step_s if step_s > 0 else 0.0, "kd": res.kd_active, "world": W}
        if (bpb := bits_per_byte(ce * tokens, int(round(num_bytes)))) is not None:
            rec["bpb"] = bpb  # of the cross-entropy (the router's aux loss is not part of the text's code length)
        rest = vec[6:]
        if res.expert_counts:
            n_layers = len(res.expert_counts)
            flat, rest = rest[:len(counts)], rest[len(counts):]
            rec["expert_counts"], i = [], 0
            for layer in res.expert_counts:
                rec["expert_counts"].append([int(round(c)) for c in flat[i:i + len(layer)]])
                i += len(layer)
            rec["dropped_fraction"] = rest[:n_layers]
            rec["l_aux"] = rest[n_layers:2 * n_layers]
            rest = rest[2 * n_layers:]
        if comm_s:
            rec["all_to_all_s"] = {str(k): v / W for k, v in zip(comm_s, rest)}
        rec["_stop"] = stop > 0
        return rec

    def evaluate(self) -> dict[str, float]:
        """Validation loss over the run's evaluation windows, split over the ranks as the training batches are
        (whole micro-batches, counts differing by at most one, padding passes for the ranks with fewer)."""
        t, block, p = self.cfg.train, self.cfg.model.block_size, self.place
        starts = eval_window_starts(self.val_ds, block, t.global_batch_size, t.eval_batches)
        if self._eval_bytes is None:  # the same windows at every evaluation: their bytes once
            self._eval_bytes = window_bytes(self.val_ds, starts, block) or 0
        mine, padding = rank_window_starts(starts, self.micro, p.world, p.rank)
        total, count = window_loss_sums(self.model, self.val_ds, mine, block_size=block, micro_batch=self.micro,
                                        device=self.device, autocast_dtype=self.dtype, padding=padding)
        if p.world > 1:
            buf = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(buf, group=p.group)
            total, count = buf[0].item(), int(buf[1].item())
        return val_metrics(total, count, self._eval_bytes)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write this rank's part of checkpoint ``step`` (no manifest); returns the checkpoint dir."""
        p = self.place
        if self.hooks is not None:
            self.hooks.before_save(step, self, self.ckpt_dir)
        # FSDP-sharded: every rank takes part in gathering one tensor at a time, the writers write it
        return ckpt.save_checkpoint(self.ckpt_dir, step, self.model, self.optimizer, write_dense=p.writes_dense,
                                    write_experts=p.writes_experts, write_manifest=False,
                                    rank=p.rank if p.world > 1 else None)

    def checkpoint(self, step: int) -> None:
        """Every rank writes its part; once all did (a barrier), the reporter commits the checkpoint, and no rank
        goes on before the commit returned (a second barrier): a failure later never finds a world that is
        past a checkpoint that was not committed."""
        path = self.save(step)
        self._barrier()
        self.reporter.checkpoint_written(step, path)
        self._barrier()

    def _barrier(self) -> None:
        if self.place.world > 1:
            # a barrier as an all-reduce on this rank's device (NCCL's barrier guesses the device)
            dist.all_reduce(torch.ones(1, device=self.device), group=self.place.group)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, start: int, stop_at: int | None = None) -> int:
        """Train from step ``start`` (0-based) to ``train.steps``, or until ``stop_at`` or a stop request, and
        write the final checkpoint when the last step is done. Returns the next step to run."""
        t, c = self.cfg.train, self.cfg.checkpoint
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        self.last_synced, step = start - 1, start
        while step < end:
            rec = self.step(step)
            done = step + 1
            if done % t.eval_interval == 0 or done == t.steps:
                rec.update(self.evaluate())
            stop = rec.pop("_stop")
            self.reporter.record(rec)
            self.last_synced, self.last_record, step = done - 1, rec, done
            if c.interval and done % c.interval == 0 and done != t.steps:
                self.checkpoint(done)
            self.reporter.step_done(done)
            if stop:
                break
        if step == t.steps:
            self.checkpoint(t.steps)
        return step


def commit_checkpoint(path, step: int, cfg: RaymoeConfig, model_config, extra: dict | None = None,
                      writers: int = 1):
    """Commit checkpoint ``step`` whose parts ranks 0..``writers``-1 all wrote under ``path`` (the run's tokenizer
    files, then the manifest last; refused unless every file the writers list is in the storage with the size
    and sha256 they wrote and every expert of every layer is there), then delete all but the newest
    ``checkpoint.keep_last`` and upload the run's logs if the run folder is remote. Local training and the
    coordinator both commit here."""
    from raymoe.platform.bpe import run_tokenizer

    path = storage.location(path)
    ckpt.finalize_checkpoint(path, step=step, config=cfg.model_dump(mode="json"),
                             extra={"model_config": model_config.to_dict(), **(extra or {})},
                             expected_experts=model_config.experts_per_layer(), tokenizer=run_tokenizer(cfg),
                             writer_ranks=range(writers))
    for old in ckpt.list_checkpoints(path.parent)[:-cfg.checkpoint.keep_last]:
        ckpt.remove_checkpoint(old)
    storage.RunOutputs(cfg.run.output_dir, cfg.run.name).push()
    return path
