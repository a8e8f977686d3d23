"""Tokenizers: the byte tokenizer and Hugging Face `tokenizers` (``tokenizer.json``), behind one interface.

Both give ``vocab_size``, ``eos_id`` (the document separator of token files), ``stop_ids`` (generation ends at
any of them), ``encode``/``encode_batch``/``decode``, ``token_bytes`` (UTF-8 bytes per id, for bits per byte),
``fingerprint`` (a hash of everything that decides the ids: token caches are keyed on it), ``save(folder)`` and
``apply_chat_template(messages)``.

Files, as in a Hugging Face model folder: ``tokenizer.json``; ``tokenizer_config.json`` (``bos_token``,
``eos_token``..., a string or ``{"content": ...}``; ``chat_template``: a string or a list of ``{name,
template}``); ``chat_template.jinja`` (wins over the config's template); ``generation_config.json``
(``eos_token_id``: an int or a list: more stop tokens). Every raymoe checkpoint carries these files next to its
manifest (`raymoe.platform.checkpoint`), so eval, generate and serve load the tokenizer a model was trained
with (`load_tokenizer`); a checkpoint without them (written before tokenizers travelled) is read with the byte
tokenizer. A model without a chat template is chatted with `DEFAULT_CHAT_TEMPLATE` (role tags).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from raymoe.platform.chat import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, check_template, render_chat
from raymoe.platform.files import read_json_object

EOS_ID = 256
TOKENIZER_FILE, CONFIG_FILE, GENERATION_FILE, TEMPLATE_FILE = (
    "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, GENERATION_FILE, TEMPLATE_FILE)
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_CLASS = "raymoe.ByteTokenizer"
PathLike = str | os.PathLike


class Tokenizer:
    """What every tokenizer offers (see the module docstring); subclasses set the attributes in ``__init__``."""

    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None = None
    stop_ids: frozenset[int]
    chat_template: str | None = None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of several documents (no special tokens added), each an int array."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes of the text each id stands for (0 for special tokens)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def save(self, folder: PathLike) -> list[str]:
        """Write this tokenizer's files into ``folder``; returns their names."""
        raise NotImplementedError

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Extra stop strings of a chat turn: the next role tag for `DEFAULT_CHAT_TEMPLATE`, none for a model's
        own template (it ends turns with a stop token)."""
        return DEFAULT_CHAT_STOP if self.chat_template is None else ()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt of a conversation, rendered as transformers' ``apply_chat_template(tokenize=False)`` does;
        `raymoe.platform.chat.ChatTemplateError` (naming the message) when the template refuses it."""
        return render_chat(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages,
                           add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})


def _as_id_list(ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor (torch is not imported here)
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids if isinstance(ids, np.ndarray) else list(ids)).astype(np.int64).ravel()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 plus EOS (256): no vocabulary files, any text, any language."""

    name = "byte"
    vocab_size = 257
    eos_id = EOS_ID
    stop_ids = frozenset({EOS_ID})
    special_tokens = {"eos_token": ""}  # EOS has no text: templates that print eos_token print nothing

    def encode(self, text: str, add_special_tokens: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes), optionally followed by EOS."""
        return self.encode_array(text, add_eos).tolist()

    def encode_array(self, text: str, add_eos: bool = False) -> np.ndarray:
        """Like `encode` but returns a uint16 array (the fast path for building token files)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        # surrogatepass: a lone surrogate (e.g. from a bad JSON escape) must not crash a whole corpus build
        ids = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.uint16)
        return np.append(ids, np.uint16(EOS_ID)) if add_eos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; EOS and any id outside 0..255 are skipped, invalid UTF-8 becomes U+FFFD.

        decode(encode(s)) == s for every str that is valid Unicode (no lone surrogates).
        """
        arr = _as_id_list(ids)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.append(np.ones(256, dtype=np.int64), 0)

    def fingerprint(self) -> str:
        return "byte-v1"

    def save(self, folder: PathLike) -> list[str]:
        """A ``tokenizer_config.json`` that names the byte tokenizer (so a checkpoint says what it was trained
        with; no vocabulary file is needed)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG_FILE).write_text(json.dumps({"tokenizer_class": _BYTE_CLASS}, indent=1))
        return [CONFIG_FILE]


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte (``tokenizers``' ByteLevel alphabet) -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` plus the special tokens, stop tokens and chat template of its
    ``tokenizer_config.json`` / ``generation_config.json`` / ``chat_template.jinja`` (see `load_tokenizer`)."""

    def __init__(self, tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | dict | None = None, name: str = "hf"):
        self.tok, self.name = tokenizer, name
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        template = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...] as transformers stores several
            template = {t["name"]: t["template"] for t in template}
        self.named_templates = template if isinstance(template, dict) else {}
        self.chat_template = template.get("default") if isinstance(template, dict) else template
        if self.chat_template is not None:
            check_template(self.chat_template)  # a broken template fails when the model loads, not per request
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {n: t for n in _SPECIAL_NAMES if (t := _token_text(self.config.get(n))) is not None}
        gen_eos = _ids(self.generation_config.get("eos_token_id"))
        self.eos_id = self._id_of("eos_token", gen_eos[0] if gen_eos else None)
        gen_bos = _ids(self.generation_config.get("bos_token_id"))
        self.bos_id = self._id_of("bos_token", gen_bos[0] if gen_bos else None)
        if "eos_token" not in self.special_tokens and self.eos_id is not None:
            self.special_tokens["eos_token"] = tokenizer.id_to_token(self.eos_id)
        self.stop_ids = frozenset({*gen_eos, *([self.eos_id] if self.eos_id is not None else [])})
        bad = sorted(i for i in self.stop_ids if not 0 <= i < self.vocab_size)
        if bad:
            raise ValueError(f"stop token ids {bad} are outside this tokenizer's vocabulary [0, {self.vocab_size})")

    def _id_of(self, name: str, fallback: int | None) -> int | None:
        text = self.special_tokens.get(name)
        tid = self.tok.token_to_id(text) if text is not None else None
        return tid if tid is not None else fallback

    # -- ids ------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Several documents at once: the Rust library encodes them on all cores (its own thread pool)."""
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        arr = _as_id_list(ids)
        return self.tok.decode(arr[(arr >= 0) & (arr < self.vocab_size)].tolist(),
                               skip_special_tokens=skip_special_tokens)

    @cached_property
    def _special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def _byte_level(self) -> bool:
        dec = json.loads(self.tok.to_str()).get("decoder") or {}
        parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
        return any(p.get("type") == "ByteLevel" for p in parts)

    def token_bytes(self) -> np.ndarray:
        """Exact for byte-level BPE (GPT-2, Llama 3, Qwen, the trained default); for SentencePiece-style
        vocabularies ``▁`` counts as a space and ``<0xNN>`` as one byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        chars = _byte_level_chars() if self._byte_level else None
        for i in range(self.vocab_size):
            tok = self.tok.id_to_token(i)
            if tok is None or i in self._special_ids:
                continue
            if chars is not None and all(c in chars for c in tok):
                out[i] = len(tok)
            elif _BYTE_FALLBACK.match(tok):
                out[i] = 1
            else:
                out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.tok.to_str().encode())
        h.update(json.dumps([self.eos_id, sorted(self.stop_ids)]).encode())
        return "hf-" + h.hexdigest()

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> list[str]:
        """``tokenizer.json``, ``tokenizer_config.json`` (special tokens; several named templates), the template
        as ``chat_template.jinja`` and, when there are stop tokens besides EOS, ``generation_config.json``
        (never overwriting one that is there: a model folder's own belongs to the model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / TOKENIZER_FILE))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["raymoe_name"] = self.name  # "bpe", or the folder it came from
        for n, t in self.special_tokens.items():
            config.setdefault(n, t)
        if self.named_templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.named_templates.items()]
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False))
        names = [TOKENIZER_FILE, CONFIG_FILE]
        if self.chat_template is not None and not self.named_templates:
            (folder / TEMPLATE_FILE).write_text(self.chat_template)
            names.append(TEMPLATE_FILE)
        if self.stop_ids - {self.eos_id} and not (folder / GENERATION_FILE).exists():
            gen = {"eos_token_id": sorted(self.stop_ids), **({"bos_token_id": self.bos_id} if self.bos_id else {})}
            (folder / GENERATION_FILE).write_text(json.dumps(gen, indent=1))
            names.append(GENERATION_FILE)
        return names


def _read_json(path: Path) -> dict | None:
    return read_json_object(path) if path.is_file() else None


def tokenizer_from_folder(folder: PathLike, name: str = "hf") -> HFTokenizer:
    """The tokenizer of a folder holding ``tokenizer.json`` (+ the optional files of the module docstring)."""
    from tokenizers import Tokenizer as RustTokenizer

    folder = Path(folder)
    try:
        tok = RustTokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as e:  # the Rust library raises its own exception type
        raise ValueError(f"{folder / TOKENIZER_FILE}: not a tokenizers file ({e})") from None
    template: str | dict | None = None
    if (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    extra = sorted((folder / "chat_templates").glob("*.jinja")) if (folder / "chat_templates").is_dir() else []
    if extra:
        template = {**({"default": template} if template is not None else {}),
                    **{p.stem: p.read_text(encoding="utf-8") for p in extra}}
    config = _read_json(folder / CONFIG_FILE)
    name = (config or {}).get("raymoe_name") or name
    return HFTokenizer(tok, config, _read_json(folder / GENERATION_FILE), template, name)


def _checkpoint_dir(path: Path) -> Path | None:
    """The committed step dir of a raymoe checkpoint (a step dir or a root of them), or None if ``path`` is not
    one."""
    from raymoe.platform.checkpoint import read_manifest

    return Path(read_manifest(path)["path"]) if is_raymoe_checkpoint(path) else None


def is_raymoe_checkpoint(path: PathLike) -> bool:
    """True for a raymoe checkpoint: a step dir with a manifest, or a folder of step dirs (at any location)."""
    from raymoe.platform import storage
    from raymoe.platform.checkpoint import LATEST, MANIFEST

    p = storage.location(path)
    if storage.is_remote(p):
        names = storage.list_dir(p)
        return MANIFEST in names or LATEST in names or any(n.startswith("step_") for n in names)
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / LATEST).is_file()
                           or any(c.name.startswith("step_") and c.is_dir() for c in p.iterdir()))


def _remote_checkpoint_tokenizer(path) -> Tokenizer:
    """The tokenizer of a raymoe checkpoint at a storage URI: its files, verified, copied here first."""
    import tempfile

    from raymoe.platform import storage
    from raymoe.platform.checkpoint import fetch_files

    if not is_raymoe_checkpoint(path):
        raise FileNotFoundError(f"tokenizer source {str(path)!r}: no raymoe checkpoint there (at a storage URI "
                                "only a raymoe checkpoint's tokenizer is read)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = fetch_files(path, TOKENIZER_FILES, Path(tmp) / (storage.location(path).name or "checkpoint"))
        if not folder.is_dir():  # a checkpoint without tokenizer files: trained with the byte tokenizer
            return ByteTokenizer()
        return load_tokenizer(folder)


def load_tokenizer(path: PathLike) -> Tokenizer:
    """The tokenizer of a raymoe checkpoint (a step dir or a folder of them: its latest), of a Hugging Face model
    folder, or of any folder holding ``tokenizer.json`` (or that file itself). A raymoe checkpoint without
    tokenizer files (written before checkpoints carried them) gives the byte tokenizer; a checkpoint's files are
    checked against its manifest; one at a storage URI (``s3://...``) too."""
    if "://" in str(path):
        from raymoe.platform import storage

        if storage.is_remote(path):
            return _remote_checkpoint_tokenizer(path)
        path = storage.location(path)  # file://
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer source {str(p)!r} does not exist")
    if p.is_file() and p.name == TOKENIZER_FILE:
        p = p.parent
    ckpt = _checkpoint_dir(p)
    folder = ckpt if ckpt is not None else p
    if ckpt is not None:
        from raymoe.platform.checkpoint import verify_files

        verify_files(ckpt, [f for f in TOKENIZER_FILES if (ckpt / f).is_file()])
    if (folder / TOKENIZER_FILE).is_file():
        return tokenizer_from_folder(folder, name=p.name or "hf")
    config = _read_json(folder / CONFIG_FILE) if folder.is_dir() else None
    if (config or {}).get("tokenizer_class") == _BYTE_CLASS or (ckpt is not None and config is None):
        return ByteTokenizer()
    raise ValueError(f"{p}: no {TOKENIZER_FILE} (a Hugging Face fast tokenizer) here; raymoe reads tokenizer.json "
                     "only: save the tokenizer with transformers' AutoTokenizer...save_pretrained(folder) first")


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """ValueError unless a model with ``vocab_size`` ids can take every id of ``tokenizer``."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{vocab_size}; the model must have at least the tokenizer's vocabulary")
