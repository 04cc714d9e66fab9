"""Chat templates: hand-written expected prompts, transformers' renderer as a second opinion,
typed errors, the sandbox, and the no-double-BOS rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from phimlx.chat import PHI3_CHAT_TEMPLATE, ChatTemplateError, render_chat
from phimlx.errors import PhimlxError
from phimlx.gguf import open_gguf
from phimlx.testing.vocab import PHI3_GGUF_CHAT_TEMPLATE, write_vocab_gguf
from phimlx.tokenizer import Tokenizer

HI = [{"role": "user", "content": "hi"}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a haiku"},
    {"role": "assistant", "content": "Ice, stick, puck."},
    {"role": "user", "content": "Another"},
]


def _hf_render(template: str, messages, **kw) -> str:
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = ctu.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, **kw
    )
    return rendered[0]


def test_phi3_default_template() -> None:
    got = render_chat(HI, template=PHI3_CHAT_TEMPLATE, bos_token="<s>", eos_token="<|endoftext|>")
    assert got == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    got = render_chat(
        CONVERSATION, template=PHI3_CHAT_TEMPLATE, bos_token="<s>", eos_token="<|endoftext|>"
    )
    assert got == (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nWrite a haiku<|end|>\n"
        "<|assistant|>\nIce, stick, puck.<|end|>\n<|user|>\nAnother<|end|>\n<|assistant|>\n"
    )
    done = render_chat(HI, template=PHI3_CHAT_TEMPLATE, bos_token="<s>", eos_token="<|endoftext|>",
                       add_generation_prompt=False)  # fmt: skip
    assert done == "<|user|>\nhi<|end|>\n<|endoftext|>"
    assert got == _hf_render(PHI3_CHAT_TEMPLATE, CONVERSATION, eos_token="<|endoftext|>")


def test_phi3_gguf_template_writes_bos() -> None:
    got = render_chat(HI, template=PHI3_GGUF_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert got == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_smollm2_template(smollm2_path: Path) -> None:
    template = open_gguf(smollm2_path).metadata["tokenizer.chat_template"]
    got = render_chat(HI, template=template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert got == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    got = render_chat(CONVERSATION[:2], template=template, bos_token=None, eos_token=None)
    assert got == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku<|im_end|>\n<|im_start|>assistant\n"
    )
    assert got == _hf_render(template, CONVERSATION[:2])


def test_transformers_environment_features() -> None:
    t = "{{ messages[0]['content'] | tojson }}{% for m in messages %}{% break %}{% endfor %}"
    assert render_chat([{"role": "user", "content": "<b>é"}], template=t, bos_token=None,
                       eos_token=None) == '"<b>é"'  # fmt: skip
    year = render_chat(HI, template="{{ strftime_now('%Y') }}", bos_token=None, eos_token=None)
    assert year.isdigit() and len(year) == 4
    # trim_blocks / lstrip_blocks: block tags leave no newline or indentation behind
    t = (
        "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n"
        "    {% endif %}\n{% endfor %}"
    )
    assert render_chat(HI, template=t, bos_token=None, eos_token=None) == "hi\n"
    assert render_chat(HI, template=t, bos_token=None, eos_token=None) == _hf_render(t, HI)


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages.__class__.__mro__ }}", "failed while rendering"),
        ("{{ ''.__class__.__subclasses__() }}", "failed while rendering"),
        ("{{ messages[5]['content'] + 1 }}", "failed while rendering"),
        ("{% if false %}x{% endif %}", "empty prompt"),
    ],
)
def test_template_errors_are_typed(template: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat(HI, template=template, bos_token="<s>", eos_token="</s>")
    assert isinstance(info.value, PhimlxError) and isinstance(info.value, ValueError)


def test_bad_messages() -> None:
    with pytest.raises(TypeError):
        render_chat("hi", template=PHI3_CHAT_TEMPLATE, bos_token=None, eos_token=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        render_chat(
            [{"content": "hi"}], template=PHI3_CHAT_TEMPLATE, bos_token=None, eos_token=None
        )


def test_rendered_prompt_gets_one_bos(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(open_gguf(write_vocab_gguf(tmp_path / "v.gguf")))
    for template in (PHI3_GGUF_CHAT_TEMPLATE, PHI3_CHAT_TEMPLATE):
        text = render_chat(HI, template=template, bos_token=tok.bos_token,
                           eos_token=tok.eos_token)  # fmt: skip
        ids = tok.encode_chat(text)
        assert ids[:2] == [1, 32010] and ids.count(1) == 1
        assert ids[-2:] == [32007, 32001]  # "\n" after <|end|> and <|assistant|> stripped
