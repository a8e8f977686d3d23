"""Chat templates: a model's Jinja template rendered as transformers' ``apply_chat_template(tokenize=False)`` does.

The same environment: jinja2's ImmutableSandboxedEnvironment (templates come with models: untrusted code) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and a no-op ``{% generation %}`` block, a
``tojson`` filter that does not escape HTML, ``raise_exception(message)``, ``strftime_now(format)``; the template
sees ``messages`` (message keys whose value is None dropped), ``add_generation_prompt``, ``tools``,
``documents`` and the special tokens (``bos_token``, ``eos_token``, ...). transformers is the test oracle
(tests/unit/test_tokenizer_chat.py), never imported here.

A template that refuses a conversation (``raise_exception``, or an error while rendering: a missing key, a
wrong type) raises `ChatTemplateError` with the index of the first message whose prefix of the conversation
the template refuses, so an API can answer 400 naming the message.

`DEFAULT_CHAT_TEMPLATE` is the template of models that have none: each message ``<|{role}|>\\n{content}\\n``
(developer is written as system), then ``<|assistant|>\\n``; a reply ends at `DEFAULT_CHAT_STOP`, the start of
the next role tag.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

ROLES = ("system", "user", "assistant", "developer")
DEFAULT_CHAT_STOP = ("\n<|",)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role not in ['system', 'user', 'assistant', 'developer'] %}"
    "{{ raise_exception(\"role must be one of 'system', 'user', 'assistant', 'developer'; got '\" "
    "~ message.role ~ \"'\") }}"
    "{% endif %}"
    "{% if message.content is defined and message.content is not string %}"
    "{{ raise_exception('content must be a string') }}"
    "{% endif %}"
    "{{ '<|' ~ ('system' if message.role == 'developer' else message.role) ~ '|>\\n' ~ "
    "(message.content if message.content is defined else '') ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template refused the conversation; ``index`` is the message it refused (None: not known)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with it): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names (no way to reach Python internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **kw: dict(*a, **kw))
    return env.from_string(template)


def check_template(template: str) -> None:
    """ValueError when ``template`` is not valid Jinja (checked once, when a tokenizer loads)."""
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e.message} (line {e.lineno})") from None


def _plain(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of objects")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _render(template: str, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
    return _compile(template).render(messages=messages, tools=kwargs.pop("tools", None),
                                     documents=kwargs.pop("documents", None),
                                     add_generation_prompt=add_generation_prompt, **kwargs)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
    """``template`` rendered for ``messages`` (see the module docstring); ``kwargs``: the special tokens and
    any other template variables."""
    msgs = _plain(messages)
    if not msgs:
        raise ChatTemplateError("messages must not be empty")
    try:
        return _render(template, msgs, add_generation_prompt, dict(kwargs))
    except Exception as exc:  # TemplateError, and what a template can raise on odd input (TypeError, ...)
        reason = f"{type(exc).__name__}: {exc}" if not _is_template_error(exc) else str(exc)
        index = _first_refused(template, msgs, add_generation_prompt, kwargs)
        where = f"messages.{index}" if index is not None else "messages"
        raise ChatTemplateError(f"{where}: the model's chat template cannot render it ({reason})", index) from None


def _is_template_error(exc: BaseException) -> bool:
    import jinja2

    return isinstance(exc, jinja2.TemplateError)


def _first_refused(template: str, msgs: list[dict], add_generation_prompt: bool, kwargs: dict) -> int | None:
    """The first k such that the conversation's first k + 1 messages do not render."""
    for k in range(len(msgs)):
        try:
            _render(template, msgs[:k + 1], add_generation_prompt, dict(kwargs))
        except Exception:
            return k
    return None
