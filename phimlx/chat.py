"""Chat templates: the GGUF's own jinja ``tokenizer.chat_template``, or a built-in Phi-3 one.

Templates come from downloaded files, so they are untrusted code: they run in jinja2's
`ImmutableSandboxedEnvironment`, configured as transformers configures it
(``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not HTML-escape, and the ``raise_exception`` and ``strftime_now`` helpers), so that a
template renders here exactly as `apply_chat_template` renders it.

The BOS rule: a template that writes ``{{ bos_token }}`` itself (Microsoft's Phi-3 GGUF does)
must not get a second BOS from the tokenizer; `Tokenizer.encode_chat` encodes a rendered
prompt with that rule applied.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import PhimlxError

__all__ = ["PHI3_CHAT_TEMPLATE", "ROLES", "ChatTemplateError", "render_chat"]

# The roles chat templates handle (OpenAI's, which the Phi-3 and llama templates follow).
ROLES = ("system", "user", "assistant", "tool")

# Microsoft's template for Phi-3-mini-4k-instruct (tokenizer_config.json, the July 2024 update
# that added the system role).  It writes no BOS: the tokenizer adds it (add_bos_token is true).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% else %}"
    "{{ eos_token }}"
    "{% endif %}"
)


class ChatTemplateError(PhimlxError, ValueError):
    """A chat template could not be compiled or rendered (the message names the problem)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; transformers' does not, and templates rely on that.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template does not compile: {e.message} (template line {e.lineno})"
        ) from e


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a sequence of {{'role': ..., 'content': ...}} mappings, "
            f"not {type(messages).__name__}"
        )
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(
                f"message {i} is a {type(m).__name__}, not a mapping with 'role' and 'content'"
            )
        role = m.get("role")
        if not isinstance(role, str):
            raise ValueError(f"message {i} has no 'role' string: {dict(m)!r}")
        if role not in ROLES:
            raise ValueError(
                f"message {i} has the role {role!r}; chat templates know {', '.join(ROLES)}"
            )
        plain.append(dict(m))
    return plain


def render_chat(
    messages: Sequence[Mapping[str, str]],
    *,
    template: str,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation with a model's chat template.

    Args:
        messages: ``[{"role": "system" | "user" | "assistant", "content": "..."}, ...]``.
        template: the jinja template (a GGUF's ``tokenizer.chat_template``, or the
            architecture's default, `Architecture.chat_template`).
        bos_token: the text of the BOS token (``"<s>"``); None renders as "".
        eos_token: the text of the EOS token; None renders as "".
        add_generation_prompt: end with the assistant's turn header so the model answers.

    Returns:
        The prompt text, special tokens written as text (encode it with
        `Tokenizer.encode_chat`, which parses them and adds no second BOS).

    Raises:
        ChatTemplateError: the template does not compile, fails while rendering (including a
            ``raise_exception`` call of the template's own), or renders nothing.
        TypeError, ValueError: ``template`` is not a string, or ``messages`` is not a
            sequence of mappings with a ``role``.
    """
    if not isinstance(template, str):
        raise TypeError(
            f"template must be the chat template's text, got {type(template).__name__}; "
            "use the model's (Model.chat_template) or its architecture's default"
        )
    plain = _plain_messages(messages)
    compiled = _compile(template)
    try:
        text = compiled.render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed while rendering: {e}") from e
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise ChatTemplateError(
            f"the chat template failed while rendering: {type(e).__name__}: {e}"
        ) from e
    if not text:
        raise ChatTemplateError("the chat template rendered an empty prompt for these messages")
    return text
