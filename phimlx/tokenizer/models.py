"""The ``tokenizers`` BPE models that encode text fragments as llama.cpp does.

Both GGUF tokenizer models run as a ``tokenizers`` BPE (see `tokenizer`):

- ``llama`` (SentencePiece): llama.cpp's merge rule -- join the adjacent pair whose
  concatenation is the best-scored piece -- is a BPE whose merges are all the (left, right)
  splits of every piece, ranked by the piece's score (`_spm_backend`);
- ``gpt2`` (byte-level BPE): the file's merges behind the pre-tokenizer regexes that
  ``tokenizer.ggml.pre`` names (llama.cpp ``llm_tokenizer_bpe``); `PRE_TOKENIZERS` lists
  the names phimlx runs (`_bpe_backend`).

Byte-level vocabularies spell each byte as a printable character; `_byte_level_bytes` maps
a token back to its bytes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["PRE_TOKENIZERS"]

log = logging.getLogger(__name__)

# -- gpt2 pre-tokenizers (llama.cpp llm_tokenizer_bpe, per tokenizer.ggml.pre) -------------

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


def _splits(*patterns: str) -> list[pre_tokenizers.PreTokenizer]:
    # llama.cpp applies its regexes one after the other, keeping matches and the text between
    # them as separate words: a sequence of "isolated" splits.
    return [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]


def _byte_level(*patterns: str) -> pre_tokenizers.PreTokenizer:
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*_splits(*patterns), bl])


_PreFamily = tuple[Callable[[], pre_tokenizers.PreTokenizer], bool, bool]


@functools.cache
def _pre_families() -> dict[str, _PreFamily]:
    """``tokenizer.ggml.pre`` -> (pre-tokenizer factory, ignore_merges, default add_bos)."""
    default = (
        lambda: _byte_level(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"),
        False,
        False,
    )
    gpt2 = (lambda: _byte_level(_GPT2_RE), False, False)
    smollm = (lambda: _byte_level(r"\p{N}", _GPT2_RE), False, False)
    llama3 = (lambda: _byte_level(_LLAMA3_RE), True, True)
    qwen2 = (lambda: _byte_level(_QWEN2_RE), False, False)
    table: dict[str, _PreFamily] = {"default": default}
    for names, family in (
        ("gpt-2 gpt2 phi-2 mpt olmo jais trillion roberta-bpe exaone4", gpt2),
        ("smollm starcoder refact command-r codeshell exaone minerva-7b", smollm),
        ("llama3 llama-v3 llama-bpe falcon3 pixtral dbrx smaug-bpe", llama3),
        ("qwen2 stablelm2 deepseek-r1-qwen megrez", qwen2),
    ):
        table.update(dict.fromkeys(names.split(), family))
    return table


PRE_TOKENIZERS: frozenset[str] = frozenset(_pre_families())  # the tokenizer.ggml.pre we run

# -- the GPT-2 byte alphabet ---------------------------------------------------------------


@functools.cache
def _byte_decoder_table() -> dict[int, int]:
    """str.translate table: GPT-2 byte-level character -> the character of its byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = b
        else:
            table[256 + extra] = b
            extra += 1
    return table


def _byte_level_bytes(text: str) -> bytes:
    s = text.translate(_byte_decoder_table())
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte alphabet: keep it as UTF-8
        return b"".join(c.encode("latin-1") if ord(c) < 256 else c.encode() for c in s)


# -- the BPE models ------------------------------------------------------------------------


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]):
    """Every (left, right) split of every piece, best piece score first (llama.cpp's order).

    Ties keep vocabulary order; llama.cpp breaks them by position instead, which only
    matters for different pieces of exactly equal score meeting in one word."""
    found = [
        (-s, t[:k], t[k:])
        for t, s in zip(tokens, scores, strict=False)
        for k in range(1, len(t))
        if t[:k] in vocab and t[k:] in vocab
    ]
    found.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in found]


def _spm_backend(
    tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int]
) -> HFTokenizer:
    has_bytes = "<0x00>" in vocab
    bpe = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, scores, vocab),
        byte_fallback=has_bytes,
        unk_token=None if has_bytes else next((t for t in ("<unk>",) if t in vocab), None),
    )
    return HFTokenizer(bpe)


def _bpe_backend(vocab: dict[str, int], merges: list[str], pre: str, source: str) -> HFTokenizer:
    factory, ignore_merges, _ = _pre_families()[pre]
    # llama.cpp cuts a merge at the first space after its first character.
    pairs = [(m[:c], m[c + 1 :]) for m in merges for c in (m.find(" ", 1),)]
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    except Exception:  # a merge names a token outside the vocabulary: drop those, as llama.cpp
        ok = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
        log.warning("%s: %d merges name tokens outside the vocabulary; ignored", source,
                    len(pairs) - len(ok))  # fmt: skip
        bpe = models.BPE(vocab=vocab, merges=ok, ignore_merges=ignore_merges)
    tk = HFTokenizer(bpe)
    tk.pre_tokenizer = factory()
    return tk
