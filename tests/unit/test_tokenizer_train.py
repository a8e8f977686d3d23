"""A run with the trained BPE tokenizer, through the CLI: the model's vocabulary follows the tokenizer, loss is
logged per token and in bits per byte, the checkpoint carries the tokenizer, and eval, generate and the serving
engine use it without being told."""

import json

import pytest

from raymoe.cli import main
from raymoe.deployments.engine import Engine
from raymoe.deployments.protocol import SamplingParams
from raymoe.platform.checkpoint import read_manifest
from raymoe.platform.detokenize import IncrementalDetokenizer
from raymoe.platform.generate import generate
from raymoe.platform.model_io import load_model
from raymoe.platform.tokenizer import HFTokenizer, load_tokenizer

TINY = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
        "moe.num_experts=4", "moe.k=1", "train.global_batch_size=4", "train.warmup_steps=1", "train.steps=4",
        "train.eval_interval=2", "train.eval_batches=2", "train.log_interval=1", "train.progress=false",
        "train.threads=2", "sample.max_new_tokens=8", "sample.prompt=The", "tokenizer.kind=bpe",
        "tokenizer.vocab_size=320"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe_run")
    argv = ["train"]
    for s in TINY + [f"run.output_dir={tmp}", "run.name=r", f"data.cache_dir={tmp / 'cache'}"]:
        argv += ["--set", s]
    assert main(argv) == 0
    return tmp / "r"


def test_bpe_run_logs_bits_per_byte_and_carries_its_tokenizer(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["bpb"] < 20 for r in recs) and all("val_bpb" in r for r in recs if r["step"] % 2 == 0)
    # bits per byte = nats per token x tokens / (ln 2 x bytes): a BPE token stands for several bytes
    assert recs[-1]["val_bpb"] < recs[-1]["val_loss"] / 0.6931
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bpb"] == recs[-1]["val_bpb"] and summary["last_bpb"] == recs[-1]["bpb"]
    assert (run / "metrics.csv").read_text().splitlines()[0].split(",")[:6] == \
        ["step", "loss", "ce_loss", "aux_loss", "bpb", "val_loss"]
    manifest = read_manifest(run / "checkpoints")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    tok = load_tokenizer(run / "checkpoints")
    assert isinstance(tok, HFTokenizer) and tok.name == "bpe" and tok.vocab_size == 320
    assert load_model(run / "checkpoints").config.vocab_size == 320  # the model's vocabulary followed it


def test_eval_and_generate_use_the_checkpoint_tokenizer_untold(run, capsys):
    capsys.readouterr()
    # no tokenizer settings: the default config would tokenize bytes; the checkpoint's BPE is used instead
    argv = ["eval", "--checkpoint", str(run / "checkpoints")]
    for s in TINY[:9] + ["train.eval_batches=2", f"data.cache_dir={run.parent / 'cache'}"]:
        if not s.startswith("tokenizer."):
            argv += ["--set", s]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["val_loss"] == pytest.approx(last["val_loss"], rel=1e-3)
    assert result["val_bpb"] == pytest.approx(last["val_bpb"], rel=1e-3)
    assert main(["generate", "--checkpoint", str(run / "checkpoints"), "--prompt", "The object",
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.strip()
    tok, model = load_tokenizer(run / "checkpoints"), load_model(run / "checkpoints")
    ids = tok.encode("The object")
    new = generate(model, [ids], 6, temperature=0.0, eos_id=tok.stop_ids)[0]
    detok = IncrementalDetokenizer(tok, ids)
    assert out == "The object" + detok.push(new) + detok.flush()


def test_serving_engine_uses_the_checkpoint_tokenizer_untold(run):
    eng = Engine(str(run / "checkpoints"))
    eng.start()
    try:
        tok = load_tokenizer(run / "checkpoints")
        assert eng.tokenizer.fingerprint() == tok.fingerprint() and eng.info()["tokenizer"] == "bpe"
        res = eng.generate_sync("The object", SamplingParams(max_tokens=6, temperature=0.0))
        ids = tok.encode("The object")
        assert res.prompt_tokens == len(ids) < len("The object")
        model = load_model(run / "checkpoints")
        assert res.token_ids == generate(model, [ids], 6, temperature=0.0, eos_id=tok.stop_ids)[0]
    finally:
        eng.shutdown(5)


def test_pretrained_tokenizer_sets_the_vocabulary_when_unset(run, tmp_path):
    """tokenizer.kind pretrained (here: the BPE the module's run carries) with model.vocab_size unset: the model's
    vocabulary is the tokenizer's, without being told."""
    from raymoe.config import load_config
    from raymoe.platform.model_io import gpt_config_from

    sets = [s for s in TINY if not s.startswith("tokenizer.")]
    cfg = load_config(None, sets + ["tokenizer.kind=pretrained", f"tokenizer.path={run / 'checkpoints'}"])
    assert gpt_config_from(cfg).vocab_size == 320
    cfg = load_config(None, sets + ["tokenizer.kind=pretrained", f"tokenizer.path={run / 'checkpoints'}",
                                    "model.vocab_size=400"])
    assert gpt_config_from(cfg).vocab_size == 400  # a larger vocabulary stays allowed
