"""Chat templates render as transformers' apply_chat_template does (transformers is the oracle, test-only): a tiny
tokenizer folder made here (tokenizers + Jinja templates), the same text and the same token ids; a conversation
the template refuses is an error naming the message, where transformers refuses it too."""

import json

import pytest

from raymoe.platform.bpe import train_bpe
from raymoe.platform.chat import ChatTemplateError, render_chat
from raymoe.platform.data import default_corpus_text
from raymoe.platform.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message.role) }}{% endif %}\n"
    "{%- if not (message.role == 'system' and loop.first) %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

# Llama-2 style: whitespace handled by trim_blocks / lstrip_blocks, bos/eos tokens, alternating roles
INST = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
"""

# namespace, tojson, loop controls, the {% generation %} block, optional keys
FANCY = """{% set ns = namespace(n=0, sys='') %}
{% for m in messages %}
  {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if ns.n > 3 %}{% break %}{% endif %}
<{{ m.role }}{% if m.name is defined %} name={{ m.name | tojson }}{% endif %}>
  {% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{% endgeneration %}
  {% else %}{{ m.content }}{% endif %}
</{{ m.role }}>
{% endfor %}
{{ {'system': ns.sys, 'turns': ns.n} | tojson }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello <b>&</b> 日本語 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "Bye", "name": "ann"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tokenizer (a byte-level BPE with special tokens) and a folder per template, as a model ships them."""
    from tokenizers import AddedToken

    root = tmp_path_factory.mktemp("chat")
    tok = train_bpe([default_corpus_text()[:40_000]], 320)
    tok.tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<s>", "</s>")])
    out = {}
    for name, template in (("chatml", CHATML), ("inst", INST), ("fancy", FANCY)):
        f = root / name
        f.mkdir()
        tok.tok.save(str(f / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<|endoftext|>"}
        if name == "inst":  # one template in tokenizer_config.json, the others in chat_template.jinja
            config["chat_template"] = template
        else:
            (f / "chat_template.jinja").write_text(template)
        (f / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = f
    return out


def oracle(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["chatml", "inst", "fancy"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_renders_like_transformers(folders, name, conv, gen):
    messages = CONVERSATIONS[conv]
    ref = oracle(folders[name])
    tok = load_tokenizer(folders[name])
    try:
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except jinja2.TemplateError:
        with pytest.raises(ChatTemplateError):
            tok.apply_chat_template(messages, add_generation_prompt=gen)
        return
    got = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert got == want
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert tok.encode(got) == list(ids)  # the special tokens in the text become their ids


def test_refused_conversations_name_the_message(folders):
    chatml, inst = load_tokenizer(folders["chatml"]), load_tokenizer(folders["inst"])
    cases = [(chatml, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], 1, "Unknown role: tool"),
             (inst, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1, "must alternate"),
             (inst, [{"role": "assistant", "content": "a"}], 0, "must alternate"),
             (chatml, [{"role": "user", "content": 5}], 0, "TypeError")]
    for tok, messages, index, reason in cases:
        with pytest.raises(ChatTemplateError, match=reason) as ei:
            tok.apply_chat_template(messages)
        assert ei.value.index == index and str(ei.value).startswith(f"messages.{index}:")
        with pytest.raises(Exception):  # transformers refuses the same conversations
            oracle(folders["chatml" if tok is chatml else "inst"]).apply_chat_template(messages, tokenize=False)


def test_the_sandbox_holds():
    """Templates come with models: they cannot reach Python internals or change their inputs."""
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat("{{ messages.__class__ }}", msgs) == ""  # an unsafe attribute reads as undefined
    for template in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ messages.pop() }}",
                     "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(ChatTemplateError, match="unsafe|not allowed"):
            render_chat(template, msgs)
    with pytest.raises(ChatTemplateError, match="messages must not be empty"):
        render_chat("x", [])
