"""Streaming detokenization with real vocabularies: pieces join to exactly the full decode."""

from __future__ import annotations

import pytest

from phimlx.gguf import open_gguf
from phimlx.tokenizer import StreamingDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and   repeated spaces",
    "tabs\tand\nnewlines\n\n",
    "日本語のテキスト、中文字符",
    "emoji 🏒🥅 and ZWJ 👩‍👩‍👧‍👦 family",
    "combining: e\u0301 a\u0308 n\u0303",
    "def f(x):\n    return x ** 2  # code",
    "rare bytes: \u0f3a\u2603\U0001f9ec",
]


@pytest.fixture(scope="module", params=["smollm2", "phi3"])
def tokenizer(request, smollm2_path, tiny_phi3):
    path = smollm2_path if request.param == "smollm2" else tiny_phi3
    return Tokenizer.from_gguf(open_gguf(path))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_bos=False)
    detok = StreamingDetokenizer(lambda t: tokenizer.decode(t, skip_special=True))
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special=True)
    assert not any("\ufffd" in p for p in pieces)  # no half characters on the way


def test_multibyte_characters_wait_for_their_last_byte(tiny_phi3):
    """The Phi-3-like vocabulary spells rare characters with byte-fallback tokens."""
    tok = Tokenizer.from_gguf(open_gguf(tiny_phi3))
    ids = tok.encode("\U0001f9ec", add_bos=False)
    byte_tokens = [i for i in ids if tok.id_to_token(i).startswith("<0x")]
    assert len(byte_tokens) == 4  # the emoji is four bytes, none of them in the vocab
    detok = StreamingDetokenizer(lambda t: tok.decode(t, skip_special=True))
    out = [detok.add(i) for i in ids]
    assert out[-1].endswith("\U0001f9ec") and all("\U0001f9ec" not in p for p in out[:-1])
