"""Request parsing, the default chat template and the serving metric definitions (no Ray)."""

import pytest

from raymoe.deployments import openai_api as oa
from raymoe.deployments.protocol import Chat, RequestError, SamplingParams
from raymoe.deployments.fake_engine import FakeEngine
from raymoe.platform import metrics as M
from raymoe.platform.chat import DEFAULT_CHAT_STOP
from raymoe.platform.tokenizer import ByteTokenizer


def test_default_chat_template_is_the_documented_one():
    """A model without a chat template (the byte tokenizer, the trained BPE) is chatted with role tags; the
    request's text parts are joined and its messages go to the template as they are."""
    req = oa.parse(oa.ChatCompletionRequest, {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "developer", "content": None},
        {"role": "user", "content": "Bye"}]})
    msgs = req.template_messages()
    assert msgs[1] == {"role": "user", "content": "Hi!"}
    assert ByteTokenizer().apply_chat_template(msgs) == (
        "<|system|>\nBe terse.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|system|>\n\n<|user|>\nBye\n<|assistant|>\n")
    assert ByteTokenizer().chat_stop_strings == DEFAULT_CHAT_STOP == ("\n<|",)


def test_a_message_the_template_refuses_is_a_400_naming_it():
    eng = FakeEngine()
    eng.start()
    try:
        good = {"role": "user", "content": "hi"}
        for messages, param in (([good, {"role": "robot", "content": "x"}], "messages.1"),
                                ([{"role": "tool", "content": "x"}, good], "messages.0"),
                                ([good, {"role": "user", "content": {"k": 1}}], "messages.1")):
            with pytest.raises(RequestError, match="role must be one of|content must be a string") as ei:
                eng.encode(Chat(messages), "messages")
            assert (ei.value.status, ei.value.param, ei.value.code) == (400, param, "invalid_messages")
        assert eng.encode(Chat([good]), "messages") == list(b"<|user|>\nhi\n<|assistant|>\n")
    finally:
        eng.shutdown(1)


def test_sampling_defaults_and_stop_normalisation():
    req = oa.parse(oa.CompletionRequest, {"prompt": "x", "stop": "\n", "seed": 3, "frequency_penalty": 0.0})
    sp = req.sampling(16)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.stop, sp.seed) == (16, 1.0, 1.0, ["\n"], 3)
    chat = oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.sampling(None).max_tokens is None  # chat: the rest of the context
    assert chat.sampling(None).stop == []  # the engine adds the default template's turn end itself
    assert oa.parse(oa.CompletionRequest, {"prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert oa.parse(oa.CompletionRequest, {"prompt": ["a", "b"]}).prompts() == ["a", "b"]


@pytest.mark.parametrize("cls,body,param", [
    (oa.CompletionRequest, [], None),                                          # not an object
    (oa.CompletionRequest, {}, "prompt"),                                      # missing
    (oa.CompletionRequest, {"prompt": 5}, "prompt"),                           # wrong type
    (oa.CompletionRequest, {"prompt": "a", "max_tokens": "5"}, "max_tokens"),  # strict: no coercion
    (oa.CompletionRequest, {"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    (oa.CompletionRequest, {"prompt": "a", "stream": "yes"}, "stream"),
    (oa.CompletionRequest, {"prompt": "a", "n": 0}, "n"),
    (oa.CompletionRequest, {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (oa.CompletionRequest, {"prompt": "a", "temperature": "hot"}, "temperature"),
    (oa.ChatCompletionRequest, {"messages": "hi"}, "messages"),
    (oa.ChatCompletionRequest, {"messages": [{"role": 5, "content": "x"}]}, "messages.0.role"),
    (oa.ChatCompletionRequest, {"messages": [{"content": "x"}]}, "messages.0.role"),
])
def test_parse_errors_name_the_field(cls, body, param):
    with pytest.raises(RequestError) as ei:
        oa.parse(cls, body)
    assert ei.value.status == 400 and ei.value.param == param
    body = oa.error_from(ei.value)
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_semantic_errors():
    with pytest.raises(RequestError, match="empty"):
        oa.parse(oa.ChatCompletionRequest, {"messages": []}).template_messages()
    with pytest.raises(RequestError, match="empty"):
        oa.parse(oa.CompletionRequest, {"prompt": []}).prompts()
    oa.parse(oa.CompletionRequest, {"prompt": "a", "logprobs": 3}).check_supported()  # implemented now
    with pytest.raises(RequestError, match="only text content"):
        oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}).template_messages()


def test_serving_metrics_are_defined_once_with_units():
    names = [m.name for m in M.SERVING_METRICS]
    assert set(M.SERVING_METRICS) <= set(M.ALL_METRICS) and len(set(names)) == len(names)
    assert all(n.startswith("raymoe_serve_") for n in names)
    assert all(m.name.endswith("_total") for m in M.SERVING_METRICS if m.kind == "counter")
    assert all(m.boundaries for m in M.SERVING_METRICS if m.kind == "histogram")
    required = {"raymoe_serve_requests_total", "raymoe_serve_generated_tokens_total",
                "raymoe_serve_time_to_first_token_seconds", "raymoe_serve_inter_token_latency_seconds",
                "raymoe_serve_batch_size", "raymoe_serve_queue_length", "raymoe_serve_expert_load_fraction"}
    assert required <= set(names)
    _, made = M.prometheus_registry(M.SERVING_METRICS)
    assert set(made) == set(names)


def test_build_app_rejects_bad_arguments_before_deploying():
    pytest.importorskip("ray.serve")
    from raymoe.deployments.app import build_app

    with pytest.raises(ValueError, match="checkpoint is required"):
        build_app({})
    with pytest.raises(ValueError, match="max_bach_size"):
        build_app({"checkpoint": "/x", "engine": {"max_bach_size": 3}})
    with pytest.raises(ValueError, match="cannot be imported"):
        build_app({"engine_cls": "nowhere:Engine"})
    with pytest.raises(ValueError, match="Extra inputs"):
        build_app({"checkpoint": "/x", "num_replica": 2})
    with pytest.raises(ValueError, match="not both"):
        build_app({"checkpoint": "/x", "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}})


@pytest.mark.parametrize("cls,body,param", [
    (oa.CompletionRequest, {"prompt": "a", "suffix": "b"}, "suffix"),
    (oa.CompletionRequest, {"prompt": "a", "logprobs": 1, "echo": True}, "echo"),   # prompt logprobs
    (oa.CompletionRequest, {"prompt": "a", "best_of": 2, "n": 3}, "best_of"),
    (oa.CompletionRequest, {"prompt": "a", "best_of": 2, "stream": True}, "best_of"),
    (oa.CompletionRequest, {"prompt": "a", "best_of": 9}, "best_of"),
    (oa.CompletionRequest, {"prompt": "a", "typo_penalty": 1}, "typo_penalty"),     # unknown: never ignored
    (oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    (oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}],
                                "response_format": {"type": "json_object"}}, "response_format"),
    (oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "x"}]}, "tools"),
    (oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}], "tool_choice": "auto"},
     "tool_choice"),
    (oa.CompletionRequest, {"prompt": "a", "logit_bias": {"e": 5}}, "logit_bias"),
])
def test_parameters_not_implemented_are_400s_naming_them(cls, body, param):
    with pytest.raises(RequestError) as ei:
        oa.parse(cls, body).check_supported()
    assert (ei.value.status, ei.value.param) == (400, param)


def test_sampling_parameters_reach_the_engine_params():
    req = oa.parse(oa.CompletionRequest, {"prompt": "a", "presence_penalty": 0.5, "frequency_penalty": -1,
                                          "repetition_penalty": 1.3, "logit_bias": {"101": -100, "7": 2.5},
                                          "min_tokens": 3, "logprobs": 2, "best_of": 3, "user": "u",
                                          "metadata": {"k": "v"}})
    req.check_supported()
    sp = req.sampling(16)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_tokens, sp.logprobs) == (
        0.5, -1, 1.3, 3, 2)
    assert sp.logit_bias == {101: -100.0, 7: 2.5} and req.candidates() == 3
    chat = oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "assistant", "content": "x", "refusal": None,
                                                             "tool_calls": None}], "logprobs": True,
                                               "top_logprobs": 4, "response_format": {"type": "text"}})
    chat.check_supported()  # a reply sent back as the client got it (empty extras) is fine
    assert chat.sampling(None).logprobs == 4
    assert oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}],
                                               "logprobs": True}).sampling(None).logprobs == 0
    for bad in ({"presence_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": {5: 101}},
                {"logit_bias": {300: 1}}, {"min_tokens": 20}, {"logprobs": 21}):
        name = next(iter(bad))
        with pytest.raises(RequestError) as ei:
            SamplingParams(**bad).validate(vocab_size=257)
        assert ei.value.param == name
