"""The engines with real tokenizers (no Ray): streamed text == the whole completion for emoji, CJK and combining
characters that BPE tokens split; stop strings matched on the text, across token boundaries, never leaking;
usage and max_tokens in the model's tokens; token-id prompts checked against the vocabulary; a model's own chat
template and stop tokens (a Hugging Face tokenizer folder made here), refused messages a 400 naming them; a
checkpoint's tokenizer used without being told."""

import asyncio

import pytest

from raymoe.deployments.engine import Engine
from raymoe.deployments.engine_config import EngineConfig
from raymoe.deployments.fake_engine import FakeEngine, FakeEngineConfig
from raymoe.deployments.protocol import Chat, RequestError, SamplingParams
from raymoe.platform.bpe import train_bpe
from raymoe.platform.checkpoint import save_checkpoint
from raymoe.platform.data import default_corpus_text
from raymoe.platform.model import GPT, GPTConfig
from raymoe.platform.tokenizer import load_tokenizer
from serving_helpers import tokenizer_folder

MULTIBYTE = "🙂 日本語のテキスト e\u0301 naïve Ωμέγα 👩\u200d💻 한국어"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([default_corpus_text()[:100_000]], 400)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def stream_and_whole(eng, prompt, params):
    async def main():
        chunks = [c async for c in await eng.stream(prompt, params)]
        return chunks, await eng.generate(prompt, params)
    return run(main())


def fake(tokenizer, **kw):
    eng = FakeEngine(tokenizer=tokenizer, config=FakeEngineConfig(token_delay_s=0.0, block_size=512, **kw))
    eng.start()
    return eng


def test_stream_equals_whole_completion_for_multibyte_text(bpe):
    ids = bpe.encode(MULTIBYTE)
    assert any("\ufffd" in bpe.decode([t]) for t in ids)  # tokens really end mid-character
    eng = fake(bpe)
    try:
        n = 3 * len(ids)  # the fake model repeats the prompt's tokens: the reply is the prompt, three times
        chunks, whole = stream_and_whole(eng, MULTIBYTE, SamplingParams(max_tokens=n))
        assert whole.text == MULTIBYTE * 3 == bpe.decode(whole.token_ids)
        assert "".join(c.text for c in chunks) == whole.text
        assert [t for c in chunks for t in c.token_ids] == whole.token_ids
        assert not any("\ufffd" in c.text for c in chunks)  # held back until the character is whole
        assert sum(1 for c in chunks if not c.text) > 0  # ... which some tokens had to wait for
        assert (whole.prompt_tokens, whole.completion_tokens) == (len(ids), n)  # usage in the model's tokens
    finally:
        eng.shutdown(1)


@pytest.mark.parametrize("stop", ["ta gam", "本語", "e\u0301 n", "ga alpha"])
def test_stop_strings_across_token_boundaries_never_leak(bpe, stop):
    text = "alpha beta gamma 日本語 e\u0301 naïve omega "
    ids = bpe.encode(text)
    eng = fake(bpe)
    try:
        chunks, whole = stream_and_whole(eng, text, SamplingParams(max_tokens=4 * len(ids), stop=[stop, "zzz"]))
        full = text * 4
        assert whole.finish_reason == "stop" and whole.text == full[:full.index(stop)]
        streamed = "".join(c.text for c in chunks)
        assert streamed == whole.text and stop not in streamed
        assert chunks[-1].finish_reason == "stop"
        # the stop string spans tokens: no single token holds it
        assert not any(stop in bpe.decode([t]) for t in ids)
    finally:
        eng.shutdown(1)


def test_token_id_prompts_are_checked_against_the_vocabulary(bpe):
    eng = fake(bpe)
    try:
        res = eng.generate_sync([5, 6, 7], SamplingParams(max_tokens=3))
        assert res.token_ids == [5, 6, 7] and res.text == bpe.decode([5, 6, 7]) and res.prompt_tokens == 3
        for bad in ([5, 400], [-1], [5, 10 ** 6]):
            with pytest.raises(RequestError, match=r"outside this model's vocabulary \[0, 400\)") as ei:
                eng.generate_sync(bad, SamplingParams(max_tokens=3))
            assert (ei.value.status, ei.value.param) == (400, "prompt")
        prompt = "hello world, hello world!!"
        room = 512 - len(bpe.encode(prompt)) + 1  # max_tokens counts the model's tokens, not bytes
        assert len(prompt.encode()) > len(bpe.encode(prompt))
        assert eng.generate_sync(prompt, SamplingParams(max_tokens=room)).completion_tokens == room
        with pytest.raises(RequestError) as ei:
            eng.generate_sync(prompt, SamplingParams(max_tokens=room + 1))
        assert ei.value.param == "max_tokens"
        assert eng.prompt_text([5, 6, 7]) == bpe.decode([5, 6, 7])  # echo of a token-id prompt
    finally:
        eng.shutdown(1)


def test_model_chat_template_and_stop_tokens(tmp_path):
    """A Hugging Face tokenizer folder: the engine renders its ChatML template, encodes the special tokens as their
    ids, stops at generation_config's <|im_end|> and never shows special tokens."""
    folder = tokenizer_folder(tmp_path / "hf")
    eng = FakeEngine(str(folder), config=FakeEngineConfig(token_delay_s=0.0, block_size=512))
    eng.start()
    tok = load_tokenizer(folder)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
        prompt = tok.apply_chat_template(messages)
        assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n" \
                         "<|im_start|>assistant\n"
        res = eng.generate_sync(Chat(messages), SamplingParams(max_tokens=100))
        # the fake model repeats the prompt: its first <|im_end|> (a stop token) ends the reply
        assert (res.text, res.finish_reason) == ("system\nBe brief.", "stop")
        assert res.prompt_tokens == len(tok.encode(prompt)) and tok.encode(prompt)[0] == 300  # <|im_start|>
        assert res.completion_tokens == 1 + len(tok.encode("system\nBe brief.")) + 1
        for messages, param in (([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages.1"),
                                ([{"role": "robot", "content": "a"}], "messages.0")):
            with pytest.raises(RequestError, match="Unknown role") as ei:
                eng.generate_sync(Chat(messages), SamplingParams(max_tokens=3))
            assert (ei.value.status, ei.value.param, ei.value.code) == (400, param, "invalid_messages")
    finally:
        eng.shutdown(1)


def test_engine_uses_the_checkpoint_tokenizer_and_streams_what_it_returns(tmp_path, bpe):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(dict(vocab_size=400, block_size=64, n_layer=2, n_head=2, d_model=32,
                                         expert_interval=2, num_experts=4, k=1)))
    ckpt = save_checkpoint(tmp_path, 1, model, extra={"model_config": model.config.to_dict()}, tokenizer=bpe)
    eng = Engine(str(ckpt), config=EngineConfig(max_batch_size=4))
    eng.start()
    try:
        assert eng.info()["tokenizer"] == "bpe" and eng.tokenizer.fingerprint() == bpe.fingerprint()
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=3)  # random tokens: many split characters
        chunks, whole = stream_and_whole(eng, "The 日本", params)
        assert "".join(c.text for c in chunks) == whole.text
        assert whole.prompt_tokens == len(bpe.encode("The 日本"))
        if whole.finish_reason == "length":
            assert whole.text == bpe.decode(whole.token_ids)
        chat = eng.generate_sync(Chat([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=5))
        assert chat.prompt_tokens == len(bpe.encode("<|user|>\nhi\n<|assistant|>\n"))  # no template: role tags
        other = save_checkpoint(tmp_path / "other", 1, model, extra={"model_config": model.config.to_dict()},
                                tokenizer=train_bpe([default_corpus_text()[:20_000]], 400))
        with pytest.raises(ValueError, match="another tokenizer"):
            eng.reload(str(other))
    finally:
        eng.shutdown(5)


def test_engine_on_a_hugging_face_folder_chats_with_its_template(tmp_path):
    """A Hugging Face model folder (a tiny Qwen2-MoE saved by transformers, with its tokenizer files): the engine
    loads model and tokenizer from it, renders chats with its template as transformers does, and stops at its
    stop tokens."""
    transformers = pytest.importorskip("transformers")
    from serving_helpers import hf_model_folder

    folder = hf_model_folder(tmp_path / "qwen")
    eng = Engine(str(folder), config=EngineConfig(max_batch_size=2))
    eng.start()
    try:
        messages = [{"role": "user", "content": "What is a list?"}]
        ref = transformers.AutoTokenizer.from_pretrained(str(folder))
        want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        res = eng.generate_sync(Chat(messages), SamplingParams(max_tokens=20, temperature=0.0))
        assert res.prompt_tokens == len(want) and eng.info()["chat_template"] is True
        assert eng.tokenizer.stop_ids == {301, 0}
        assert not set(res.token_ids) & {301, 0}  # a stop token ends the reply and is not part of it
        assert res.text == eng.tokenizer.decode(res.token_ids) or res.finish_reason == "stop"
        with pytest.raises(RequestError) as ei:
            eng.generate_sync(Chat(messages + [{"role": "robot", "content": "x"}]), SamplingParams(max_tokens=2))
        assert ei.value.param == "messages.1"
    finally:
        eng.shutdown(5)
