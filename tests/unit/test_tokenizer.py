"""Tokenizers: the trained byte-level BPE (round trip on the corpus, determinism, cache), Hugging Face folders
(special and stop tokens, chat template sources), load_tokenizer on every kind of folder, token files keyed on
the tokenizer, and bytes per token for bits per byte."""

import json

import numpy as np
import pytest

from raymoe.config import config_from_dict
from raymoe.platform.bpe import bpe_for, run_tokenizer, train_bpe
from raymoe.platform.checkpoint import CheckpointError, finalize_checkpoint
from raymoe.platform.data import (TokenDataset, build_dataset, build_token_file, default_corpus_text,
                                  window_bytes)
from raymoe.platform.tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_tokenizer, tokenizer_from_folder

CORPUS = default_corpus_text()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([CORPUS[:200_000]], 512)


def test_bpe_round_trips_the_corpus_and_compresses_it(bpe):
    ids = bpe.encode(CORPUS)
    assert bpe.vocab_size == 512 and max(ids) < 512 and bpe.eos_id == 0 and bpe.stop_ids == {0}
    assert bpe.decode(ids) == CORPUS  # byte-level: every string round-trips, nothing is unknown
    assert len(CORPUS.encode()) / len(ids) > 2.0  # a real vocabulary, not bytes
    assert int(bpe.token_bytes()[ids].sum()) == len(CORPUS.encode())  # exact bytes per token
    assert bpe.token_bytes()[0] == 0  # <|endoftext|> stands for no text
    for text in ("naïve café – 日本語 🙂 e\u0301 \x00\t", "<|endoftext|> is special", ""):
        assert bpe.decode(bpe.encode(text)) == text.replace("<|endoftext|>", "")
    assert bpe.encode("<|endoftext|>") == [0]


def test_bpe_training_is_deterministic_and_cached(tmp_path):
    a = train_bpe([CORPUS[:50_000]], 300)
    b = train_bpe([CORPUS[:50_000]], 300)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != train_bpe([CORPUS[:50_000]], 301).fingerprint()
    src = tmp_path / "a.txt"
    src.write_text(CORPUS[:60_000])
    logs = []
    first = bpe_for([src], tmp_path / "cache", vocab_size=300, log=logs.append)
    assert len(logs) == 1 and "learned in" in logs[0]
    again = bpe_for([src], tmp_path / "cache", vocab_size=300, log=logs.append)
    assert len(logs) == 1 and again.fingerprint() == first.fingerprint()  # from the cache
    # the merges come from the text before the validation split only
    held_out = CORPUS[:60_000][int(60_000 * 0.9):]
    trained_on = bpe_for([src], tmp_path / "cache", vocab_size=300, val_fraction=0.1)
    assert trained_on.fingerprint() == train_bpe([CORPUS[:60_000][:int(60_000 * 0.9)]], 300).fingerprint()
    assert held_out not in CORPUS[:int(60_000 * 0.9)]
    src.write_text("changed " + CORPUS[:60_000])
    bpe_for([src], tmp_path / "cache", vocab_size=300, log=logs.append)
    assert len(logs) == 2  # other text: learned again


def test_run_tokenizer_and_vocab_follows(tmp_path):
    cfg = config_from_dict({"tokenizer": {"kind": "bpe", "vocab_size": 300}, "data": {"cache_dir": str(tmp_path)}})
    assert cfg.model.vocab_size == 300  # unset: follows the tokenizer
    tok = run_tokenizer(cfg)
    assert tok.vocab_size == 300 and tok.name == "bpe" and run_tokenizer(cfg) is tok
    assert isinstance(run_tokenizer(config_from_dict({})), ByteTokenizer)
    with pytest.raises(ValueError, match="the tokenizer has 300 ids but the model's vocab_size is 257"):
        check_fits(tok, 257, "model.vocab_size")


def write_hf_folder(folder, *, template=None, config_extra=None, generation=None, jinja=None):
    """A tiny Hugging Face tokenizer folder: a byte-level BPE with ChatML special tokens."""
    from tokenizers import AddedToken

    tok = train_bpe([CORPUS[:30_000]], 300)
    tok.tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>",
              **({"chat_template": template} if template is not None else {}), **(config_extra or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


def test_hf_folder_special_and_stop_tokens(tmp_path):
    f = write_hf_folder(tmp_path / "m", generation={"eos_token_id": [301, 0], "bos_token_id": 0})
    tok = load_tokenizer(f)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 302
    assert tok.eos_id == 301 and tok.stop_ids == {0, 301}  # tokenizer_config's eos + generation_config's list
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert tok.encode("<|im_start|>hi<|im_end|>")[0] == 300 and tok.token_bytes()[[0, 300, 301]].tolist() == [0, 0, 0]
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special_tokens=False) == "<|im_start|>hi"
    g = write_hf_folder(tmp_path / "g", config_extra={"eos_token": None}, generation={"eos_token_id": 0})
    assert load_tokenizer(g).stop_ids == {0} and load_tokenizer(g).special_tokens["eos_token"] == "<|endoftext|>"
    assert load_tokenizer(f / "tokenizer.json").fingerprint() == tok.fingerprint()


def test_chat_template_sources(tmp_path):
    a = write_hf_folder(tmp_path / "a", template="A{{ messages[0].content }}")
    assert load_tokenizer(a).chat_template == "A{{ messages[0].content }}"
    b = write_hf_folder(tmp_path / "b", template="A", jinja="B{{ messages[0].content }}")  # the .jinja file wins
    assert load_tokenizer(b).apply_chat_template([{"role": "user", "content": "x"}]) == "Bx"
    c = write_hf_folder(tmp_path / "c", template=[{"name": "default", "template": "D"},
                                                   {"name": "tool_use", "template": "T"}])
    tc = load_tokenizer(c)
    assert tc.chat_template == "D" and tc.named_templates == {"default": "D", "tool_use": "T"}
    assert load_tokenizer(write_hf_folder(tmp_path / "d")).chat_template is None  # none: role tags
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_tokenizer(write_hf_folder(tmp_path / "e", template="{% for %}"))
    for src in (a, b, c):  # saved and loaded again: the same template(s)
        load_tokenizer(src).save(tmp_path / "copy" / src.name)
        again = load_tokenizer(tmp_path / "copy" / src.name)
        assert (again.chat_template, again.named_templates) == (load_tokenizer(src).chat_template,
                                                                load_tokenizer(src).named_templates)


def test_checkpoint_carries_its_tokenizer_and_old_ones_read_as_bytes(tmp_path, bpe):
    def commit(step_dir, tokenizer):
        step_dir.mkdir(parents=True)
        (step_dir / "dense.safetensors").write_bytes(b"x")
        return finalize_checkpoint(step_dir, tokenizer=tokenizer)

    c = commit(tmp_path / "run" / "step_00000001", bpe)
    manifest = json.loads((c / "manifest.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])  # listed and hashed
    for where in (c, tmp_path / "run"):  # a step dir, or a folder of them (its latest)
        assert load_tokenizer(where).fingerprint() == bpe.fingerprint()
    assert isinstance(load_tokenizer(commit(tmp_path / "b" / "step_00000001", ByteTokenizer())), ByteTokenizer)
    assert isinstance(load_tokenizer(commit(tmp_path / "old" / "step_00000001", None)), ByteTokenizer)
    (c / "tokenizer.json").write_text((c / "tokenizer.json").read_text().replace("<|endoftext|>", "<|endoftexx|>"))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(c)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "hf")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")


def test_token_files_are_keyed_on_the_tokenizer(tmp_path, bpe):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "Hello world, 日本語 🙂"}) + "\n" + json.dumps({"text": "second doc"}) + "\n")
    by_bytes = build_token_file([src], tmp_path / "cache")
    by_bpe = build_token_file([src], tmp_path / "cache", tokenizer=bpe)
    assert by_bytes != by_bpe and build_token_file([src], tmp_path / "cache", tokenizer=bpe) == by_bpe
    ids = TokenDataset(by_bpe).tokens.tolist()
    assert ids == bpe.encode("Hello world, 日本語 🙂") + [0] + bpe.encode("second doc")  # EOS between documents
    meta = json.loads(by_bpe.with_suffix(".json").read_text())
    assert (meta["tokenizer"], meta["tokenizer_fingerprint"], meta["vocab_size"]) == ("bpe", bpe.fingerprint(), 512)
    ds = build_dataset([src], tmp_path / "cache", tokenizer=bpe)
    assert window_bytes(ds, np.array([0]), len(ds) - 1) == len("Hello world, 日本語 🙂second doc".encode()) - 1


def test_large_vocabularies_use_uint32_token_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(rust, {"eos_token": "w0"})
    (tmp_path / "a.txt").write_text("w1 w69999 w5")
    path = build_token_file([tmp_path / "a.txt"], tmp_path / "cache", tokenizer=tok)
    assert json.loads(path.with_suffix(".json").read_text())["dtype"] == "uint32"
    assert TokenDataset(path).tokens.tolist() == [1, 69999, 5]


def test_byte_tokenizer_files_and_bytes():
    tok = ByteTokenizer()
    assert tok.token_bytes().tolist() == [1] * 256 + [0]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_tokenizer_from_folder_rejects_garbage(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        tokenizer_from_folder(tmp_path)


TEXTS = ["🙂👩\u200d💻 emoji", "日本語のテキストと한국어", "e\u0301 a\u0300\u0316 combining", "naïve Ωμέγα ascii"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_equals_the_whole_decode(bpe, text):
    """Pieces released token by token join to decode(all ids); a piece never ends inside a character."""
    from raymoe.platform.detokenize import IncrementalDetokenizer

    ids = bpe.encode(text * 3)
    assert any("\ufffd" in bpe.decode([t]) for t in ids) or text.isascii()  # BPE splits these characters
    for prompt in ([], bpe.encode("The "), bpe.encode("日")[:1]):  # also after a prompt ending mid-character
        d = IncrementalDetokenizer(bpe, prompt)
        pieces = [d.push([t]) for t in ids]
        assert "".join(pieces) + d.flush() == text * 3 == bpe.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    d = IncrementalDetokenizer(ByteTokenizer())
    b = ByteTokenizer().encode(text)
    assert "".join(d.push([t]) for t in b) + d.flush() == text


def test_stop_strings_hold_back_and_cut_across_pieces():
    from raymoe.platform.detokenize import StopStrings, TextStream

    st = StopStrings(["END", "\n\n"])
    assert st.push("abc E") == ("abc ", False)  # "E" could start END: held
    assert st.push("N") == ("", False)
    assert st.push("Dxyz") == ("", True)  # the stop string and what follows never show
    st = StopStrings(["END"])
    assert st.push("abE") == ("ab", False) and st.push("NO") == ("ENO", False) and st.push("E", final=True) == \
        ("E", False)
    ts = TextStream(ByteTokenizer(), stop=["日本"])
    ids = ByteTokenizer().encode("x日本y")
    out = [ts.push([t]) for t in ids]
    assert "".join(o for o, _ in out) == "x" and out[-2][1] is True  # matched on text, mid-way through bytes
    with pytest.raises(ValueError):
        StopStrings([""])
