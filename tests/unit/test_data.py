"""Unit tests for raymoe.platform.data: tokenizer, corpora, token files, splits, sampling."""

import json
import pickle

import numpy as np
import pytest
import torch

from raymoe.platform.data import (
    EOS_ID,
    ByteTokenizer,
    TokenDataset,
    build_dataset,
    build_token_file,
    default_corpus_text,
    eval_batches,
    global_batch_starts,
    load_corpus_texts,
    sample_batch,
)

TOK = ByteTokenizer()


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ["", "hello world\n", "naïve café – 日本語 🙂 \x00\t", "a" * 1000])
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


def test_tokenizer_eos_and_out_of_range_skipped():
    assert TOK.vocab_size == 257 and TOK.eos_id == EOS_ID == 256
    ids = TOK.encode("hi", add_eos=True)
    assert ids == [104, 105, 256]
    assert TOK.decode(ids) == "hi"
    assert TOK.decode([256, 104, 300, -1, 105, 256]) == "hi"
    assert TOK.decode(torch.tensor([104, 256, 105])) == "hi"
    assert TOK.decode(np.array([], dtype=np.int64)) == ""


def test_tokenizer_invalid_utf8_replaced_and_lone_surrogate_safe():
    assert TOK.decode([0xFF, 104]) == "\ufffdh"
    assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"  # a truncated multibyte char
    assert len(TOK.encode("\ud800")) == 3  # encodes (no crash); decoding yields replacement chars
    with pytest.raises(TypeError, match="expects str"):
        TOK.encode(b"bytes")


# ---------------------------------------------------------------- corpora
def test_default_corpus():
    text = default_corpus_text()
    assert len(text.encode("utf-8")) > 100_000
    assert text == default_corpus_text()  # fixed order
    assert TOK.decode(TOK.encode(text)) == text


def test_load_txt_jsonl_and_directory(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file")
    (d / "a.jsonl").write_text('{"text": "doc one"}\n\n{"text": "doc two", "id": 2}\n')
    (d / "sub" / "c.txt").write_text("nested")
    (d / "ignored.md").write_text("not a corpus file")
    assert load_corpus_texts([d]) == ["doc one", "doc two", "second file", "nested"]
    assert load_corpus_texts([d / "b.txt"]) == ["second file"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert load_corpus_texts([tmp_path / "c.jsonl"], jsonl_field="body") == ["x"]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ('{"text": "ok"}\n{"txt": "bad"}\n', r"bad\.jsonl:2: missing field 'text'"),
        ('{"text": "ok"}\n\n{not json\n', r"bad\.jsonl:3: invalid JSON"),
        ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
        ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' must be a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, pattern):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=pattern):
        load_corpus_texts([tmp_path / "bad.jsonl"])


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus_texts([tmp_path / "nope.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported suffix '.csv'"):
        load_corpus_texts([tmp_path / "x.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_corpus_texts([tmp_path / "empty"])


# ---------------------------------------------------------------- token files
def test_token_file_contents_reuse_and_rebuild(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "ab"}\n{"text": "c"}\n')
    txt = tmp_path / "b.txt"
    txt.write_text("é")
    cache = tmp_path / "cache"
    path = build_token_file([src, txt], cache)
    expected = [97, 98, EOS_ID, 99, EOS_ID, 0xC3, 0xA9]
    assert np.fromfile(path, dtype=np.uint16).tolist() == expected
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == 7 and meta["vocab_size"] == 257 and len(meta["fingerprint"]) == 32
    ds = TokenDataset(path)
    assert len(ds) == 7 and ds.vocab_size == 257 and ds.tokens.tolist() == expected

    mtime = path.stat().st_mtime_ns
    assert build_token_file([src, txt], cache) == path  # reused, not rewritten
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.with_suffix(".json").name]

    txt.write_text("é!")  # content change -> new fingerprint -> rebuilt
    path2 = build_token_file([src, txt], cache)
    assert path2 != path and np.fromfile(path2, dtype=np.uint16).tolist() == expected + [33]
    assert build_token_file([src, txt], cache, jsonl_field="text") == path2
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


def test_token_file_rebuilt_when_truncated(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    path = build_token_file(tmp_path / "a.txt", tmp_path / "c")
    path.write_bytes(path.read_bytes()[:4])  # a damaged cache entry must not be trusted
    assert build_token_file(tmp_path / "a.txt", tmp_path / "c") == path
    assert np.fromfile(path, dtype=np.uint16).tolist() == list(b"hello")


def test_pretokenized_files(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 300
    ids.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    for name in ("t.bin", "t.npy"):
        path = build_token_file([tmp_path / name], tmp_path / "cache")
        assert path == tmp_path / name  # used in place, no copy
        ds = TokenDataset(path)
        assert ds.tokens.tolist() == ids.tolist() and ds.vocab_size == 300
    (tmp_path / "x.txt").write_text("z")
    mixed = build_token_file([tmp_path / "t.bin", tmp_path / "x.txt"], tmp_path / "cache")
    assert TokenDataset(mixed).tokens.tolist() == ids.tolist() + [EOS_ID, ord("z")]
    assert TokenDataset(mixed).vocab_size == 300
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        build_token_file([tmp_path / "bad.npy"], tmp_path / "cache")


def test_build_dataset_default_corpus(tmp_path):
    ds = build_dataset(None, tmp_path)
    assert len(ds) == len(default_corpus_text().encode("utf-8")) and ds.vocab_size == 257
    assert build_dataset([], tmp_path).path == ds.path
    assert TOK.decode(ds.tokens[:200]) == default_corpus_text().encode()[:200].decode("utf-8", "replace")


# ---------------------------------------------------------------- split + sampling
@pytest.fixture
def ds(tmp_path):
    (np.arange(2000, dtype=np.uint16) % 257).tofile(tmp_path / "t.bin")
    return TokenDataset(tmp_path / "t.bin")


def test_split_deterministic_and_disjoint(ds):
    train, val = ds.split(0.1)
    assert (train.start, train.end, val.start, val.end) == (0, 1800, 1800, 2000)
    assert (train.name, val.name) == ("train", "val")
    t2, v2 = ds.split(0.1)
    assert t2.tokens.tolist() == train.tokens.tolist() and v2.tokens.tolist() == val.tokens.tolist()
    # windows of each split stay inside it: the last train window ends at the last train token
    assert train.num_windows(16) + 16 == len(train)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), ds.tokens)
    sub_t, sub_v = val.split(0.5)  # splits of a range stay inside the range
    assert (sub_t.start, sub_t.end, sub_v.start, sub_v.end) == (1800, 1900, 1900, 2000)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 0.51, 1.0, "0.1", None, True])
def test_split_validation(ds, bad):
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        ds.split(bad)


def test_split_too_short_for_block(ds):
    with pytest.raises(ValueError, match=r"split 'val' has 20 tokens, fewer than block_size \+ 1 = 33"):
        ds.split(0.01, block_size=32)
    _, val = ds.split(0.01)
    with pytest.raises(ValueError, match="fewer than block_size"):
        sample_batch(val, 0, 0, 0, 1, 4, 32)


def test_sample_batch_shift_and_determinism(ds):
    train, _ = ds.split(0.1)
    x, y = sample_batch(train, 7, 3, 0, 1, 8, 16)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the fixture's tokens are i % 257, so every row is consecutive values from its start offset
    starts = global_batch_starts(7, 3, 8, train.num_windows(16), "train")
    expect = (torch.from_numpy(starts)[:, None] + torch.arange(17)) % 257
    assert torch.equal(x, expect[:, :-1]) and torch.equal(y, expect[:, 1:])
    x2, y2 = sample_batch(train, 7, 3, 0, 1, 8, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_batch(train, 7, 4, 0, 1, 8, 16)[0])  # steps differ
    assert not torch.equal(x, sample_batch(train, 8, 3, 0, 1, 8, 16)[0])  # seeds differ


def test_global_batch_starts_pure_and_split_dependent():
    a = global_batch_starts(1, 5, 32, 1000)
    global_batch_starts(1, 4, 32, 1000)  # no hidden state between calls
    assert np.array_equal(a, global_batch_starts(1, 5, 32, 1000))
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, global_batch_starts(1, 5, 32, 1000, "val"))
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        global_batch_starts(-1, 0, 4, 10)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_union_over_ranks_equals_world1(ds, world):
    train, _ = ds.split(0.1)
    x1, y1 = sample_batch(train, 11, 9, 0, 1, 8, 16)
    parts = [sample_batch(train, 11, 9, r, world, 8, 16) for r in range(world)]
    assert all(p[0].shape == (8 // world, 16) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)


def test_sample_batch_argument_errors(ds):
    with pytest.raises(ValueError, match="micro_batch=4 must divide global_batch=6"):
        sample_batch(ds, 0, 0, 0, 2, 6, 16, micro_batch=4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        sample_batch(ds, 0, 0, 2, 2, 4, 16)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        sample_batch(ds, 0, 0, 0, 1, 4, 0)


def test_eval_batches(ds):
    _, val = ds.split(0.1)  # 200 tokens, block 16 -> windows at 0, 16, ..., 176 (12)
    batches = list(eval_batches(val, 16, 5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], (1800 + torch.arange(0, 192, 16)) % 257)
    assert all(torch.equal(b[0][:, 1:], b[1][:, :-1]) for b in batches)
    assert len(list(eval_batches(val, 16, 5, max_batches=2))) == 2
    shards = [list(eval_batches(val, 16, 5, rank=r, world=2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 1]
    assert torch.equal(shards[1][0][0], batches[1][0])
    again = list(eval_batches(val, 16, 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))


def test_dataset_pickles_by_path(ds):
    train, _ = ds.split(0.1)
    _ = train.tokens  # open the map first
    blob = pickle.dumps(train)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert (clone.start, clone.end, clone.name) == (0, 1800, "train")
    assert torch.equal(sample_batch(clone, 1, 1, 0, 1, 4, 8)[0], sample_batch(train, 1, 1, 0, 1, 4, 8)[0])
