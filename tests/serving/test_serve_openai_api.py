"""Request parsing, the chat template and the serving metric definitions (no Ray)."""

import pytest

from raymoe.deployments import openai_api as oa
from raymoe.deployments.protocol import RequestError
from raymoe.platform import metrics as M


def test_chat_template_is_the_documented_one():
    req = oa.parse(oa.ChatCompletionRequest, {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}]})
    assert req.prompt_text() == ("<|system|>\nBe terse.\n<|user|>\nHi!\n<|assistant|>\nHello.\n"
                                 "<|user|>\nBye\n<|assistant|>\n")
    assert oa.CHAT_STOP == "\n<|"


def test_sampling_defaults_and_stop_normalisation():
    req = oa.parse(oa.CompletionRequest, {"prompt": "x", "stop": "\n", "seed": 3, "frequency_penalty": 0.0})
    sp = req.sampling(16)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.stop, sp.seed) == (16, 1.0, 1.0, ["\n"], 3)
    chat = oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.sampling(None, (oa.CHAT_STOP,)).max_tokens is None  # chat: the rest of the context
    assert chat.sampling(None, (oa.CHAT_STOP,)).stop == [oa.CHAT_STOP]
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
    (oa.ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
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
        oa.parse(oa.ChatCompletionRequest, {"messages": []}).prompt_text()
    with pytest.raises(RequestError, match="empty"):
        oa.parse(oa.CompletionRequest, {"prompt": []}).prompts()
    with pytest.raises(RequestError, match="logprobs"):
        oa.parse(oa.CompletionRequest, {"prompt": "a", "logprobs": 3}).check_supported()
    with pytest.raises(RequestError, match="only text content"):
        oa.parse(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}).prompt_text()


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
