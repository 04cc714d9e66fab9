"""Tokenizer ids against llama.cpp (llama-cpp-python, vocab_only) on two vocabularies:

- the real SmolLM2-135M-Instruct GGUF (gpt2 byte-level BPE, pre-tokenizer "smollm");
- a Phi-3-shaped SentencePiece vocabulary (`phimlx.testing.vocab`, Phi-3's added tokens at
  their real ids and types), written as a tokenizer-only GGUF named "Phi3" so that llama.cpp
  applies Phi-3's strip-whitespace-after-special rule.

Set PHIMLX_PHI3_VOCAB to llama.cpp's ``models/ggml-vocab-phi-3.gguf`` (Microsoft's real Phi-3
vocabulary; it ships in the llama-cpp-python sdist) to run the same checks on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from phimlx.errors import GGUFError, UnsupportedModelError
from phimlx.gguf import open_gguf
from phimlx.testing.vocab import phi3_like_vocab, write_vocab_gguf
from phimlx.tokenizer import Tokenizer

CORPUS = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    " \n ",
    "Hello world",
    " Hello world",
    "Hello  world   ",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs",
    "line1\nline2\r\nline3\n\n  indented",
    "中文测试：你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "emoji 😀👍🏽 and the family 👨\u200d👩\u200d👧\u200d👦 (ZWJ)",
    "e\u0301 combining marks: \u00e5 A\u030a, n\u0303, naïve café",
    "Ωμέγα Привет мир العربية",
    "numbers 0 12 345 6789 1234567 3.14159 ½ ² ٣٤٥",
    "def f(x):\n    return x ** 2  # square\n\n\tpass",
    "if (a<=b && c!=d) { x += 1; } // done",
    "I'm you're they've we'll it's I'D",
    "<|user|>\nhi<|end|>\n<|assistant|>\n",
    "<|user|>hi<|end|><|assistant|>",
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\nWrite a haiku<|end|>\n<|assistant|>\n",
    "<|user|>  \t\n hi <|end|> \n<|assistant|>",
    "<|user|>\u3000hi\u00a0<|end|>",
    "text<|endoftext|> more",
    "<s>hello</s> <unk>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "[PAD32011] <|placeholder1|>x",
    "<0x0A> is not a newline",
    "zero\u200bwidth and line\u2028separator",
    "The quick brown fox jumps over the lazy dog. " * 4,
]

# (our add_bos, llama.cpp add_special, parse_special)
MODES = [(None, True, True), (False, False, True), (None, True, False), (False, False, False)]


def _llama_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab_gguf(tmp_path_factory.mktemp("vocab") / "phi3-like.gguf")


@pytest.fixture(scope="module")
def phi3_tok(phi3_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(phi3_path))


@pytest.fixture(scope="module")
def smol_tok(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


def _real_phi3() -> Path:
    p = os.environ.get("PHIMLX_PHI3_VOCAB")
    if not p or not Path(p).is_file():
        pytest.skip("set PHIMLX_PHI3_VOCAB to llama.cpp's models/ggml-vocab-phi-3.gguf")
    return Path(p)


@pytest.fixture(params=["phi3-like", "smollm2", "real-phi3"])
def vocab_path(request: pytest.FixtureRequest) -> Path:
    if request.param == "phi3-like":
        return request.getfixturevalue("phi3_path")
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_path")
    return _real_phi3()


def test_ids_match_llama_cpp(vocab_path: Path) -> None:
    tok = Tokenizer.from_gguf(open_gguf(vocab_path))
    ref = _llama_vocab(vocab_path)
    bad = []
    for text in CORPUS:
        for add_bos, add_special, special in MODES:
            want = ref.tokenize(text.encode(), add_bos=add_special, special=special)
            got = tok.encode(text, add_bos=add_bos, parse_special=special)
            if got != want:
                bad.append((text, add_bos, special, want, got))
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


def test_phi3_chat_prompt_strips_newline_after_special(phi3_tok: Tokenizer) -> None:
    hi = phi3_tok.encode("hi", add_bos=False)
    ids = phi3_tok.encode("<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert ids == [1, 32010, *hi, 32007, 32001]
    assert ids == phi3_tok.encode("<|user|>hi<|end|><|assistant|>")
    # <|endoftext|> is not stripped: the text after it keeps its newline
    assert phi3_tok.encode("<|endoftext|>\n", add_bos=False)[0] == 32000
    assert len(phi3_tok.encode("<|endoftext|>\n", add_bos=False)) > 1


def test_smollm2_keeps_whitespace_after_special(smol_tok: Tokenizer) -> None:
    ids = smol_tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2:] == [2, smol_tok.token_to_id("Ċ")]
    assert smol_tok.bos_id == 1 and not smol_tok.add_bos  # the file says no BOS


def test_byte_fallback_ids(phi3_tok: Tokenizer) -> None:
    # U+1F600 is not a piece: "▁" then its four UTF-8 bytes as <0xNN> tokens (id = 3 + byte)
    ids = phi3_tok.encode("😀", add_bos=False)
    assert ids == [phi3_tok.token_to_id("\u2581"), *(3 + b for b in "😀".encode())]


def test_parse_special_false_encodes_text(phi3_tok: Tokenizer) -> None:
    ids = phi3_tok.encode("<|user|>", add_bos=False, parse_special=False)
    assert 32010 not in ids
    assert phi3_tok.decode(ids) == "<|user|>"


def test_special_ids_and_stops(phi3_tok: Tokenizer, smol_tok: Tokenizer) -> None:
    t = phi3_tok
    assert t.vocab_size == 32064
    assert (t.bos_id, t.eos_id, t.bos_token, t.eos_token) == (1, 32000, "<s>", "<|endoftext|>")
    assert t.stop_ids == {32000, 32007}
    assert {1, 32000, 32001, 32007, 32010} <= t.special_ids
    assert t.id_to_token(32010) == "<|user|>" and t.token_to_id("<|end|>") == 32007
    assert t.token_to_id("no such piece") is None
    assert smol_tok.eos_id in smol_tok.stop_ids and smol_tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("which", ["phi3_tok", "smol_tok"])
def test_decode_round_trip(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    for text in CORPUS:
        if "<" in text and "|" in text or "<s>" in text or "[PAD" in text:
            continue
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == text, text
        assert tok.decode(tok.encode(text, add_bos=False)) == text, text


def test_decode_special_tokens(phi3_tok: Tokenizer, smol_tok: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert smol_tok.decode(smol_tok.encode(text)) == text
    assert smol_tok.decode(smol_tok.encode(text), skip_special=True) == "user\nhi\n"
    ids = phi3_tok.encode("<|user|>hi<|end|>")
    assert phi3_tok.decode(ids) == "<s><|user|>hi<|end|>"
    assert phi3_tok.decode(ids, skip_special=True) == "hi"


@pytest.mark.parametrize("which", ["phi3_tok", "smol_tok"])
def test_token_bytes_concatenate_to_text(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    for text in CORPUS:
        if "<" in text:
            continue
        ids = tok.encode(text, add_bos=False)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        # SentencePiece's space prefix is in the bytes, not in the decoded text
        want = (" " + text if tok.add_space_prefix and text else text).encode()
        assert raw == want, text
        assert raw.decode() == (" " if tok.add_space_prefix and text else "") + tok.decode(ids)
    assert tok.token_bytes(tok.token_to_id("<0x0A>") or tok.token_to_id("Ċ")) == b"\n"


def test_encode_chat_no_double_bos(phi3_tok: Tokenizer) -> None:
    ids = phi3_tok.encode_chat("<s><|user|>\nhi<|end|>\n<|assistant|>\n")
    assert ids[:2] == [1, 32010] and ids.count(1) == 1
    assert phi3_tok.encode_chat("<|user|>\nhi<|end|>\n<|assistant|>\n")[:2] == [1, 32010]


def test_unknown_pre_tokenizer_is_refused(smollm2_path: Path) -> None:
    md = dict(open_gguf(smollm2_path).metadata)
    md["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(UnsupportedModelError, match="no-such-pre.*tokenizer_repo"):
        Tokenizer.from_metadata(md)
    md["tokenizer.ggml.model"] = "bert"
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_metadata(md)
    del md["tokenizer.ggml.tokens"]
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata(md)
    md = dict(open_gguf(smollm2_path).metadata)
    md["tokenizer.ggml.token_type"] = [1, 2]
    with pytest.raises(GGUFError, match="token_type"):
        Tokenizer.from_metadata(md)


def test_construction_is_fast(phi3_path: Path, smollm2_path: Path) -> None:
    for path in (phi3_path, smollm2_path):
        md = open_gguf(path).metadata
        t0 = time.perf_counter()
        Tokenizer.from_metadata(md)
        # typically 20-60 ms on 2 busy cores; the bound catches an accidental O(n^2)
        assert time.perf_counter() - t0 < 1.0


def test_phi3_like_vocab_is_deterministic() -> None:
    a, b = phi3_like_vocab(), phi3_like_vocab()
    assert a == b
    toks = a["tokenizer.ggml.tokens"]
    assert len(toks) == len(set(toks)) == 32064
    assert toks[3] == "<0x00>" and toks[258] == "<0xFF>" and toks[32007] == "<|end|>"
    assert a["tokenizer.ggml.token_type"][32011] == 2  # [PAD32011]: unknown, as llama.cpp's
    with pytest.raises(ValueError):
        phi3_like_vocab(32000)


def test_tokenizer_json_matches_gguf(smollm2_path: Path, smol_tok: Tokenizer, tmp_path: Path):
    """A hub-style tokenizer.json of SmolLM2 (built here from the GGUF's vocabulary, merges
    and the Digits + ByteLevel pre-tokenizer that SmolLM2's hub file uses) gives the same ids."""
    import json

    from tokenizers import AddedToken, pre_tokenizers
    from tokenizers import Tokenizer as HF
    from tokenizers.models import BPE

    md = open_gguf(smollm2_path).metadata
    toks = md["tokenizer.ggml.tokens"]
    hf = HF(BPE({t: i for i, t in enumerate(toks)},
                [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]))  # fmt: skip
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]  # fmt: skip
    )
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in toks[:17]])
    hf.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", architecture="llama")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    for text in CORPUS:
        assert tok.encode(text) == smol_tok.encode(text), text
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == smol_tok.decode(ids) == text, text
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.json")
