"""The run's tokenizer (`run_tokenizer`), and training a byte-level BPE tokenizer on the run's text (`train_bpe`).

``tokenizer.kind: bpe`` learns GPT-2-style byte-level BPE merges with the Hugging Face `tokenizers` library
(byte-level pre-tokenizer and decoder: every string round-trips, no unknown tokens) from the text before the
validation split, so validation text never shapes the vocabulary. ``<|endoftext|>`` (id 0) is EOS: the document
separator of token files and the stop token. The result is cached in ``data.cache_dir`` under a key of the
sources' contents and the settings, so the merges are learned once (well under a second for the embedded
corpus) and every process of a run (local, the coordinator, each shard) gets the same tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from raymoe.platform.data import TEXT_SUFFIXES, _expand, default_corpus_text, sources_fingerprint, text_documents
from raymoe.platform.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, is_raymoe_checkpoint,
                                       load_tokenizer, tokenizer_from_folder)

EOT = "<|endoftext|>"
_BPE_VERSION = 1
_memo: dict[str, Tokenizer] = {}


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> HFTokenizer:
    """A byte-level BPE tokenizer with ``vocab_size`` ids (256 byte symbols, EOT, merges) learned from ``texts``."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not 258 <= vocab_size <= 1 << 16:
        raise ValueError(f"tokenizer.vocab_size must be in [258, 65536], got {vocab_size}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
    return HFTokenizer(tok, {k: v for k, v in config.items() if v is not None}, name="bpe")


def _text_before_validation(sources, jsonl_field: str, val_fraction: float, budget: int) -> Iterator[str]:
    """The sources' documents up to the validation split (the last ``val_fraction`` of the text, measured in
    characters as a stand-in for tokens) and at most ``budget`` characters."""
    total = sum(len(d) for d in text_documents(sources, jsonl_field))
    left = min(budget, int(total * (1.0 - val_fraction)))
    for doc in text_documents(sources, jsonl_field):
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def bpe_for(sources, cache_dir, *, vocab_size: int, jsonl_field: str = "text", val_fraction: float = 0.05,
            train_bytes: int = 100_000_000, log=None) -> HFTokenizer:
    """The BPE tokenizer of these sources and settings: from ``cache_dir`` if it was trained before, else trained
    now and cached (written to a temporary folder and renamed, so concurrent processes never see half of one)."""
    files = _expand([sources] if isinstance(sources, (str, os.PathLike)) else list(sources or []), TEXT_SUFFIXES)
    text_files = [f for f in files if f.suffix in TEXT_SUFFIXES]
    if files and not text_files:
        raise ValueError("tokenizer.kind 'bpe' learns from text, but data.sources holds only token files; use the "
                         "tokenizer they were made with (tokenizer.kind 'pretrained')")
    default = default_corpus_text() if not files else None
    h = hashlib.blake2b(digest_size=12)
    h.update(f"bpe:{_BPE_VERSION}:{vocab_size}:{val_fraction}:{train_bytes}:".encode())
    h.update(sources_fingerprint(text_files, default, jsonl_field).encode())
    folder = Path(cache_dir) / f"tokenizer-bpe{vocab_size}-{h.hexdigest()}"
    if (folder / "tokenizer.json").is_file():
        return tokenizer_from_folder(folder, name="bpe")
    import time

    t0 = time.perf_counter()
    tok = train_bpe(_text_before_validation(text_files or None, jsonl_field, val_fraction, train_bytes), vocab_size,
                    show_progress=sys.stderr.isatty())
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex}")
    tok.save(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first: theirs is the same tokenizer
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(f"tokenizer: byte-level BPE, {tok.vocab_size} ids, learned in {time.perf_counter() - t0:.2f}s "
            f"(cached in {folder})")
    return tokenizer_from_folder(folder, name="bpe")


def run_tokenizer(cfg, log=None) -> Tokenizer:
    """The tokenizer a run trains with: its distillation teacher's (a student reads the teacher's tokens), or,
    with ``model.init_from`` a raymoe checkpoint and no tokenizer section, that checkpoint's; else ``tokenizer.kind``'s:
    the byte tokenizer, the BPE of `bpe_for`, or a pretrained one. Memoised per process."""
    t, d = cfg.tokenizer, cfg.data
    if cfg.distill.teacher_checkpoint:
        return load_tokenizer(cfg.distill.teacher_checkpoint)
    init = getattr(cfg.model, "init_from", None)
    if init and "tokenizer" not in cfg.model_fields_set and is_raymoe_checkpoint(init):
        return load_tokenizer(init)  # (a Hugging Face folder's tokenizer.json: the config made it 'pretrained')
    if t.kind == "byte":
        return ByteTokenizer()
    key = repr((t.kind, t.vocab_size, t.path, t.train_bytes, d.sources, d.jsonl_field, d.cache_dir,
                d.val_fraction, os.getcwd()))
    if key not in _memo:
        if t.kind == "pretrained":
            _memo[key] = load_tokenizer(t.path)
        else:
            _memo[key] = bpe_for(d.sources or None, d.cache_dir, vocab_size=t.vocab_size, jsonl_field=d.jsonl_field,
                                 val_fraction=d.val_fraction, train_bytes=t.train_bytes, log=log)
    return _memo[key]
