"""Data: corpora, memory-mapped token files, deterministic splits and batch sampling.

Legend: B batch rows, T block_size (tokens per row), W windows (valid start offsets of a split).

A step's batch is a pure function of (seed, step, split); rank r of world w takes a contiguous run of its
micro-batches (counts differing by at most one when w does not divide them), so re-planning with another world
size neither skips nor repeats samples. Token files are plain uint16 arrays (uint32 for vocabularies over 65536
ids; np.memmap): every worker on a node shares one page cache instead of holding its own copy. Text is tokenized
with the run's tokenizer (`raymoe.platform.tokenizer`: byte, BPE, a model's own), documents in batches that the
Rust tokenizer encodes on all cores, with a progress bar; the cache is keyed on the sources' contents and the
tokenizer's fingerprint, so another tokenizer builds another file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from raymoe.platform.tokenizer import EOS_ID, ByteTokenizer, Tokenizer  # noqa: F401 (re-exported)

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".bin", ".npy")
_META_FORMAT = "raymoe-tokens"
_META_VERSION = 2
_HASH_CHUNK = 1 << 20
_BATCH_CHARS = 1 << 22  # documents handed to the tokenizer per call (its threads share them)
PathLike = str | os.PathLike


def default_corpus_text() -> str:
    """The embedded default corpus: Python's reference docs (`pydoc_data.topics`), no download needed.

    Topics are joined in sorted key order with blank lines, so the text is fixed for a Python version
    (about 465 KB on CPython 3.11).
    """
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def _expand(paths: Sequence[PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by `paths`; a directory contributes its files with `suffixes` (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise ValueError(f"data directory {str(p)!r} holds no files ending in {list(suffixes)}")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
                raise ValueError(f"data file {str(p)!r}: unsupported suffix {p.suffix!r}; "
                                 f"allowed: {list(TEXT_SUFFIXES + TOKEN_SUFFIXES)} or a directory")
            files.append(p)
        else:
            raise FileNotFoundError(f"data source {str(p)!r} does not exist")
    return files


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                raise ValueError(f"{where}: missing field {field!r} (jsonl_field); keys: {sorted(obj)[:10]}")
            if not isinstance(obj[field], str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {type(obj[field]).__name__}")
            yield obj[field]


def _iter_documents(path: Path, jsonl_field: str) -> Iterator[str]:
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{str(path)!r} is not a text source (expected one of {list(TEXT_SUFFIXES)})")
    yield from _iter_jsonl(path, jsonl_field) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]


def load_corpus_texts(paths: Sequence[PathLike], jsonl_field: str = "text") -> list[str]:
    """Documents of the text sources `paths`.

    A .txt file is one document; each non-blank line of a .jsonl file is a JSON object whose `jsonl_field`
    is one document; a directory contributes all its .txt/.jsonl files (recursively, sorted by path).
    `build_token_file` puts EOS between consecutive documents.
    """
    return [doc for f in _expand(paths, TEXT_SUFFIXES) for doc in _iter_documents(f, jsonl_field)]


def _load_token_file(path: Path) -> np.ndarray:
    """Read-only memory map of a pre-tokenized file (.bin: raw uint16, or the dtype its raymoe meta names;
    .npy: 1-D integer array)."""
    if path.suffix == ".bin":
        meta = _read_meta(path.with_suffix(".json"))
        dtype = np.dtype(meta["dtype"]) if meta and meta.get("dtype") in ("uint16", "uint32") else np.dtype(np.uint16)
        size = path.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise ValueError(f"token file {str(path)!r}: {size} bytes is not a non-empty {dtype} array")
        return np.memmap(path, dtype=dtype, mode="r")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        raise ValueError(f"token file {str(path)!r}: expected a non-empty 1-D integer array, "
                         f"got shape {arr.shape} {arr.dtype}")
    return arr


def sources_fingerprint(files: list[Path], default_text: str | None, jsonl_field: str) -> str:
    """Hash of the text sources: contents (not mtimes) and options."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{_META_FORMAT}:{_META_VERSION}:{jsonl_field}".encode())
    if default_text is not None:
        h.update(b"\0default\0" + default_text.encode("utf-8", errors="surrogatepass"))
    for f in files:
        h.update(b"\0file\0" + f.suffix.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _fingerprint(files: list[Path], default_text: str | None, tokenizer: Tokenizer, jsonl_field: str) -> str:
    """Hash of everything the token file depends on: the sources and the tokenizer."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{sources_fingerprint(files, default_text, jsonl_field)}:{tokenizer.fingerprint()}:"
             f"{tokenizer.eos_id}".encode())
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    """A unique sibling name: concurrent builders (ranks on one node) never write the same file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _write_tokens(out, arr: np.ndarray, origin: str, dtype: np.dtype) -> tuple[int, int]:
    """Append `arr` to `out` as `dtype`; returns (count, max id)."""
    if arr.size == 0:
        return 0, -1
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > np.iinfo(dtype).max:
        raise ValueError(f"{origin}: token ids must be in [0, {np.iinfo(dtype).max}] for a {dtype} token file, "
                         f"got [{lo}, {hi}]")
    out.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return int(arr.size), hi


def text_documents(source: PathLike | Sequence[PathLike] | None, jsonl_field: str = "text") -> Iterator[str]:
    """The documents of the text sources (None or [] = the embedded default corpus, one document); token files
    among them are skipped."""
    files = _expand(_as_list(source), TEXT_SUFFIXES)
    if not files:
        yield default_corpus_text()
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            yield from _iter_documents(f, jsonl_field)


def _as_list(source) -> list:
    return [source] if isinstance(source, (str, os.PathLike)) else list(source or [])


def _batched(docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """(origin, documents) in batches of about _BATCH_CHARS characters, one origin per batch."""
    origin, batch, size = None, [], 0
    for o, doc in docs:
        if batch and (o != origin or size >= _BATCH_CHARS):
            yield origin, batch
            batch, size = [], 0
        origin = o
        batch.append(doc)
        size += len(doc)
    if batch:
        yield origin, batch


def _progress(total_bytes: int, what: str):
    """A byte-counting progress bar on a terminal (tqdm disables itself elsewhere)."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=f"tokenize {what}", unit="B", unit_scale=True, disable=None,
                dynamic_ncols=True, leave=False)


def build_token_file(source: PathLike | Sequence[PathLike] | None, cache_dir: PathLike,
                     tokenizer: Tokenizer | None = None, jsonl_field: str = "text") -> Path:
    """Tokenize `source` with `tokenizer` (default: the byte tokenizer) into a token file under `cache_dir` and
    return its path.

    `source`: None or [] for the embedded default corpus, else paths of .txt/.jsonl files, directories, or
    pre-tokenized .bin (uint16) / .npy token files. A single token file is returned as is (no copy). Otherwise
    all documents are concatenated with EOS between them into `tokens-<fingerprint>.bin` (uint16, or uint32 for a
    vocabulary over 65536 ids) plus a JSON meta (`num_tokens`, `vocab_size`, `dtype`, `tokenizer`,
    `fingerprint`, ...) written next to it. Documents are encoded in batches (`Tokenizer.encode_batch`: a
    Hugging Face tokenizer spreads a batch over all cores) under a progress bar. Both files are written to
    temporary names and renamed, the meta last, so concurrent builders and crashes never leave a half file; an
    existing file whose meta fingerprint matches the inputs (sources and tokenizer) is reused.
    """
    tokenizer = tokenizer or ByteTokenizer()
    files = _expand(_as_list(source), TEXT_SUFFIXES)
    if len(files) == 1 and files[0].suffix in TOKEN_SUFFIXES:
        _load_token_file(files[0])  # validate now rather than at the first step
        return files[0]
    default_text = default_corpus_text() if not files else None
    fp = _fingerprint(files, default_text, tokenizer, jsonl_field)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = cache / f"tokens-{fp}.bin", cache / f"tokens-{fp}.json"
    meta = _read_meta(meta_path)
    if (meta and meta.get("fingerprint") == fp and bin_path.is_file()
            and bin_path.stat().st_size == np.dtype(meta.get("dtype", "uint16")).itemsize * meta["num_tokens"]):
        return bin_path
    if tokenizer.eos_id is None and (len(files) > 1 or any(f.suffix == ".jsonl" for f in files)):
        raise ValueError("the tokenizer has no EOS token to separate documents; give it an eos_token")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    tmp = _tmp_name(bin_path)
    try:
        with open(tmp, "wb") as out:
            num_tokens, max_id = _write_documents(out, files, default_text, tokenizer, jsonl_field, dtype)
        if num_tokens == 0:
            raise ValueError(f"data sources {[str(f) for f in files]} contain no tokens")
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": _META_FORMAT, "version": _META_VERSION, "num_tokens": num_tokens, "dtype": dtype.name,
        "vocab_size": max(tokenizer.vocab_size, max_id + 1), "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint(), "fingerprint": fp,
        "sources": [str(f) for f in files] or ["<default: pydoc_data.topics>"],
    }
    tmp = _tmp_name(meta_path)
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # the meta is the commit marker: written after the token file is in place
    return bin_path


def _write_documents(out, files: list[Path], default_text: str | None, tokenizer: Tokenizer, jsonl_field: str,
                     dtype: np.dtype) -> tuple[int, int]:
    """Write every document's tokens with EOS between documents; returns (tokens written, max id)."""
    def documents() -> Iterator[tuple[str, str | np.ndarray]]:
        if default_text is not None:
            yield "default corpus", default_text
        for f in files:
            if f.suffix in TOKEN_SUFFIXES:
                yield str(f), np.asarray(_load_token_file(f))
            else:
                yield from ((str(f), doc) for doc in _iter_documents(f, jsonl_field))

    total = len(default_text.encode()) if default_text is not None else sum(f.stat().st_size for f in files)
    eos = np.array([tokenizer.eos_id if tokenizer.eos_id is not None else 0], dtype=np.int64)
    num_tokens, max_id, first = 0, -1, True
    with _progress(total, f"({tokenizer.name})") as bar:
        for origin, batch in _batched(documents()):
            texts = [d for d in batch if isinstance(d, str)]
            encoded = iter(tokenizer.encode_batch(texts) if texts else [])
            for doc in batch:
                ids = next(encoded) if isinstance(doc, str) else doc
                if not first:
                    num_tokens += _write_tokens(out, eos, origin, dtype)[0]
                n, hi = _write_tokens(out, ids, origin, dtype)
                num_tokens, max_id, first = num_tokens + n, max(max_id, hi), False
                bar.update(len(doc.encode("utf-8", errors="surrogatepass")) if isinstance(doc, str) else doc.nbytes)
    return num_tokens, max_id


def _read_meta(meta_path: Path) -> dict | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == _META_FORMAT else None


class TokenDataset:
    """A token stream (or a contiguous range of one) backed by a read-only memory map.

    Pickles by path (not by contents), so handing it to another process costs nothing; the map is
    reopened lazily there.
    """

    def __init__(self, path: PathLike, start: int = 0, end: int | None = None, name: str = "all"):
        self.path, self.name = Path(path), name
        self._data: np.ndarray | None = None
        total = len(self._file_tokens())
        end = total if end is None else end
        if not 0 <= start <= end <= total:
            raise ValueError(f"TokenDataset range [{start}, {end}) is outside [0, {total}] of {str(self.path)!r}")
        self.start, self.end = start, end
        meta = _read_meta(self.path.with_suffix(".json"))
        self._vocab_size: int | None = meta["vocab_size"] if meta else None
        self.token_bytes: np.ndarray | None = None  # UTF-8 bytes per token id, for bits per byte (build_splits)

    def _file_tokens(self) -> np.ndarray:
        if self._data is None:
            self._data = _load_token_file(self.path)
        return self._data

    @property
    def tokens(self) -> np.ndarray:
        """The tokens of this range (a memmap view, no copy)."""
        return self._file_tokens()[self.start:self.end]

    def __len__(self) -> int:
        return self.end - self.start

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    @property
    def vocab_size(self) -> int:
        """Smallest vocab that covers the file: from the meta, else max id + 1 (one scan, cached)."""
        if self._vocab_size is None:
            self._vocab_size = int(self._file_tokens().max()) + 1
        return self._vocab_size

    def num_windows(self, block_size: int) -> int:
        """Number of valid window starts for (x, y) rows of `block_size` tokens; errors if there are none."""
        _check_nonneg_int("block_size", block_size, 1)
        if len(self) < block_size + 1:
            raise ValueError(
                f"split {self.name!r} has {len(self)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller block_size, a different val_fraction, or more data"
            )
        return len(self) - block_size

    def split(self, val_fraction: float, block_size: int | None = None) -> tuple[TokenDataset, TokenDataset]:
        """(train, val): the last `val_fraction` of the stream is val, the rest train.

        Deterministic and seed-independent; the two ranges are disjoint, so no window of one split reads a
        token of the other. With `block_size`, both must hold at least block_size + 1 tokens.
        """
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0.0 < val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be a number in (0, 0.5], got {val_fraction!r}")
        n_val = max(1, int(round(len(self) * val_fraction)))
        if n_val >= len(self):
            raise ValueError(f"dataset of {len(self)} tokens is too small to split with val_fraction={val_fraction}")
        cut = self.end - n_val
        train = TokenDataset(self.path, self.start, cut, name="train")
        val = TokenDataset(self.path, cut, self.end, name="val")
        train.token_bytes = val.token_bytes = self.token_bytes
        for part in (train, val) if block_size is not None else ():
            part.num_windows(block_size)  # raises if a split is too short
        return train, val


def _check_nonneg_int(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_rank(rank, world) -> None:
    _check_nonneg_int("world", world, 1)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}) for world={world}, got {rank!r}")


def global_batch_starts(seed: int, step: int, global_batch: int, num_windows: int, split: str = "train") -> np.ndarray:
    """Window start offsets (int64 [global_batch]) of the whole global batch of `step`.

    A pure function of (seed, step, split): the generator is PCG64 seeded by a hash of the three, so
    steps are independent (resuming at step s needs no replay) and there is no hidden state.
    """
    _check_nonneg_int("seed", seed)
    _check_nonneg_int("step", step)
    _check_nonneg_int("global_batch", global_batch, 1)
    _check_nonneg_int("num_windows", num_windows, 1)
    digest = hashlib.blake2b(f"raymoe-batch:{seed}:{step}:{split}".encode(), digest_size=16).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    return rng.integers(0, num_windows, size=global_batch, dtype=np.int64)


def windows_from_starts(ds: TokenDataset, starts_B: np.ndarray, block_size: int,
                        device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_BT, y_BT) for windows starting at ``starts_B``; what a shard does with the starts the coordinator plans."""
    idx_BT1 = starts_B[:, None] + np.arange(block_size + 1, dtype=np.int64)[None, :]
    rows_BT1 = torch.from_numpy(np.asarray(ds.tokens[idx_BT1], dtype=np.int64))
    x_BT, y_BT = rows_BT1[:, :-1].contiguous(), rows_BT1[:, 1:].contiguous()
    return x_BT.to(device), y_BT.to(device)


def micro_batch_assignment(num_micro: int, world: int, rank: int) -> range:
    """Global indices of the micro-batches rank ``rank`` of ``world`` runs out of a step's ``num_micro``: a
    contiguous chunk; the first ``num_micro % world`` ranks get one more than the others, so the counts differ
    by at most one and every micro-batch is run once. With ``world`` dividing ``num_micro`` this is the even
    split (rank r runs r*n .. (r+1)*n - 1); otherwise the ranks with fewer run padding passes
    (:func:`padding_passes`) so the world stays in lockstep."""
    _check_nonneg_int("num_micro", num_micro)
    _check_rank(rank, world)
    base, extra = divmod(num_micro, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def padding_passes(num_micro: int, world: int, rank: int) -> int:
    """Forward/backward passes beyond its own micro-batches that rank ``rank`` runs so that every rank runs
    ceil(num_micro / world) passes per step (the most any rank has): the collectives inside a pass (the MoE
    all-to-alls, FSDP's gathers) need every rank of their group."""
    return -(-num_micro // world) - len(micro_batch_assignment(num_micro, world, rank))


def rank_window_starts(starts_G: np.ndarray, micro_batch: int, world: int, rank: int) -> tuple[np.ndarray, int]:
    """(window starts, padding passes) of rank ``rank``: the windows of its micro-batches of ``starts_G`` (whole
    micro-batches of ``micro_batch`` windows, :func:`micro_batch_assignment`), then ``micro_batch`` windows for
    each of its :func:`padding_passes`: a repeat of its first micro-batch (the first of all when it has none),
    real text, so a padding pass loads the experts as a real one does."""
    _check_nonneg_int("micro_batch", micro_batch, 1)
    if len(starts_G) % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} must divide the {len(starts_G)} windows")
    n_micro = len(starts_G) // micro_batch
    mine = micro_batch_assignment(n_micro, world, rank)
    padding = padding_passes(n_micro, world, rank)
    first = mine.start if len(mine) else 0
    pad = np.tile(starts_G[first * micro_batch:(first + 1) * micro_batch], padding)
    return np.concatenate([starts_G[mine.start * micro_batch:mine.stop * micro_batch], pad]), padding


class RankPasses(NamedTuple):
    """A rank's passes of one step (:func:`rank_micro_batches`)."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (x_BT, y_BT) per pass: its micro-batches, then padding
    first: int  # index in the global batch of its first micro-batch (router noise seeds)
    padding: int  # padding passes at the end of ``batches``


def rank_micro_batches(split_ds: TokenDataset, seed: int, step: int, rank: int, world: int, global_batch: int,
                       micro_batch: int, block_size: int, device: str | torch.device = "cpu") -> RankPasses:
    """Rank ``rank``'s passes of the global batch of ``step`` (:func:`rank_window_starts`): the training loop's
    data for any world size."""
    starts_G = global_batch_starts(seed, step, global_batch, split_ds.num_windows(block_size), split_ds.name)
    rows, padding = rank_window_starts(starts_G, micro_batch, world, rank)
    x, y = windows_from_starts(split_ds, rows, block_size, device)
    first = micro_batch_assignment(global_batch // micro_batch, world, rank).start
    return RankPasses(list(zip(x.split(micro_batch), y.split(micro_batch))), first, padding)


def sample_batch(
    split_ds: TokenDataset, seed: int, step: int, rank: int, world: int, global_batch: int, block_size: int,
    device: str | torch.device = "cpu", micro_batch: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows (x_BT, y_BT) of the global batch of `step`; int64, y is x shifted by one token.

    The global batch is ``global_batch // micro_batch`` micro-batches of ``micro_batch`` rows; rank r gets the
    rows of its micro-batches (:func:`micro_batch_assignment`: contiguous, counts differing by at most one),
    so the ranks' batches stacked in rank order equal the world=1 batch for any world size. Split the rows by
    ``micro_batch`` to get the micro-batches (rank r's first is global micro-batch
    ``micro_batch_assignment(..)[0]``). With ``world`` dividing the micro-batches, rank r gets the rows
    [r*B, (r+1)*B) with B = global_batch // world.
    """
    _check_rank(rank, world)
    _check_nonneg_int("global_batch", global_batch, 1)
    _check_nonneg_int("micro_batch", micro_batch, 1)
    if global_batch % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} must divide global_batch={global_batch}")
    starts_G = global_batch_starts(seed, step, global_batch, split_ds.num_windows(block_size), split_ds.name)
    mine = micro_batch_assignment(global_batch // micro_batch, world, rank)
    return windows_from_starts(split_ds, starts_G[mine.start * micro_batch:mine.stop * micro_batch], block_size,
                               device)


def eval_batches(
    split_ds: TokenDataset, block_size: int, batch_size: int, max_batches: int | None = None,
    rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x_BT, y_BT) batches over fixed windows for evaluation.

    Windows start at 0, block_size, 2*block_size, ... (each reads block_size + 1 tokens); they are grouped
    into batches of `batch_size` in order (the last may be smaller) and at most `max_batches` are used.
    With rank/world, rank r takes batches r, r + world, ... of that list, so ranks cover it exactly once.
    """
    _check_nonneg_int("batch_size", batch_size, 1)
    _check_rank(rank, world)
    starts_W = np.arange(0, split_ds.num_windows(block_size), block_size, dtype=np.int64)
    n_batches = -(-len(starts_W) // batch_size)
    if max_batches is not None:
        _check_nonneg_int("max_batches", max_batches)
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world):
        yield windows_from_starts(split_ds, starts_W[b * batch_size:(b + 1) * batch_size], block_size, device)


def eval_window_starts(split_ds: TokenDataset, block_size: int, global_batch: int, max_batches: int) -> np.ndarray:
    """Start offsets of the evaluation windows: non-overlapping windows from the start of the split, as many
    whole global batches as fit (at most ``max_batches``). Local and distributed evaluation split exactly these
    windows (distributed: contiguous slices per rank), so both report the same validation loss."""
    starts_W = np.arange(0, split_ds.num_windows(block_size), block_size, dtype=np.int64)
    n = min(max_batches, len(starts_W) // global_batch) * global_batch
    if n == 0:
        raise ValueError(f"split {split_ds.name!r} has {len(starts_W)} windows of {block_size} tokens, fewer than "
                         f"one global batch ({global_batch}); lower train.global_batch_size or data.val_fraction")
    return starts_W[:n]


def build_dataset(sources: Sequence[PathLike] | None, cache_dir: PathLike,
                  tokenizer: Tokenizer | None = None, jsonl_field: str = "text") -> TokenDataset:
    """The whole token stream of `sources` (None or [] = the embedded default corpus), tokenized with
    `tokenizer` (default: bytes), as a TokenDataset whose ``token_bytes`` (bytes per id) gives bits per byte.

    Call `.split(val_fraction, block_size)` on the result for train/val.
    """
    tokenizer = tokenizer or ByteTokenizer()
    ds = TokenDataset(build_token_file(sources, cache_dir, tokenizer, jsonl_field))
    if ds.vocab_size <= tokenizer.vocab_size:  # else pre-tokenized ids of another tokenizer: bytes unknown
        ds.token_bytes = tokenizer.token_bytes()
    return ds


def window_bytes(ds: TokenDataset, starts_B: np.ndarray, block_size: int) -> int | None:
    """UTF-8 bytes of the target tokens (each window's last ``block_size`` tokens) of the windows at ``starts_B``,
    or None when the dataset's tokenizer is unknown (a pre-tokenized file)."""
    if ds.token_bytes is None:
        return None
    idx = np.asarray(starts_B, dtype=np.int64)[:, None] + np.arange(1, block_size + 1, dtype=np.int64)[None, :]
    ids = np.asarray(ds.tokens[idx], dtype=np.int64)
    table = np.append(ds.token_bytes, 0)  # ids the tokenizer does not know count 0 bytes
    return int(table[np.minimum(ids, len(table) - 1)].sum())
