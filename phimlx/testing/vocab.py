"""A Phi-3-shaped SentencePiece vocabulary, built from scratch, for synthetic test models.

Phi-3's own vocabulary cannot be downloaded here, so this builds one with the same layout as
llama.cpp's ``models/ggml-vocab-phi-3.gguf`` (Microsoft's Phi-3 as llama.cpp converts it):

======================  =============================  ============  ==========
ids                     pieces                         token type    score
======================  =============================  ============  ==========
0, 1, 2                 ``<unk>``, ``<s>``, ``</s>``   3, 3, 4       -1000
3 .. 258                ``<0x00>`` .. ``<0xFF>``       6 (byte)      0
259                     ``▁▁``                         1             -1e9
260 .. 31999            word pieces, then characters   1             -1, -2, ...
32000 .. 32010          ``<|endoftext|>`` ..           3 (control)   -1000
                        ``<|user|>`` (Phi-3's ids)
32011 .. size-1         ``[PAD32011]`` ..              2 (unknown)   -10000
======================  =============================  ============  ==========

The word pieces are every substring of the words of a small built-in corpus (``▁``-prefixed
as SentencePiece spells them), ranked by frequency, so that merges compete the way they do
in a trained vocabulary; single characters (the corpus's, then CJK and Hangul blocks) fill the
rest.  Deterministic, and built in a few tens of milliseconds.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PHI3_ADDED_TOKENS",
    "PHI3_GGUF_CHAT_TEMPLATE",
    "add_vocab_to_writer",
    "phi3_like_vocab",
    "write_vocab_gguf",
]

# Phi-3's added tokens at their real ids (tokenizer_config.json added_tokens_decoder).
PHI3_ADDED_TOKENS: dict[int, str] = {
    32000: "<|endoftext|>",
    32001: "<|assistant|>",
    32002: "<|placeholder1|>",
    32003: "<|placeholder2|>",
    32004: "<|placeholder3|>",
    32005: "<|placeholder4|>",
    32006: "<|system|>",
    32007: "<|end|>",
    32008: "<|placeholder5|>",
    32009: "<|placeholder6|>",
    32010: "<|user|>",
}

# The template inside Microsoft's Phi-3-mini-4k-instruct GGUF (it writes the BOS itself).
PHI3_GGUF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_FIRST_PIECE = 259
_MAX_PIECE_CHARS = 10

_CORPUS = """\
Write a haiku about ice hockey. The puck slides across the frozen rink, and the players
chase it with their sticks while the crowd cheers from the stands. Hello world! Hello, how
are you today? I am fine, thank you, and you? We're going to the game tonight; it's the
final of the season and they've sold every ticket. The goalie stopped thirty shots.
Once upon a time there was a small model that could run on a laptop. It read the weights
from a file, computed the attention of every head, and wrote one token after another until
it reached the end of the answer. A helpful assistant answers questions clearly and briefly.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 100 1000 2024 3.14159 42 7.5% $19.99 #1 @user
def generate(prompt, max_tokens=100, temperature=0.8):
    tokens = tokenizer.encode(prompt)
    for step in range(max_tokens):
        logits = model.forward(tokens)
        next_token = sample(logits, temperature)
        if next_token == eos:
            break
        tokens.append(next_token)
    return tokenizer.decode(tokens)
if (x <= y && y != z) { return x + y * z; } else { print("done"); }
Système, café, naïve, résumé, über, Straße, niño, señor, façade, coöperate, Ålesund.
Привет мир, как дела? Γειά σου κόσμε. 你好，世界！今天天气很好。 こんにちは世界。 안녕하세요.
The user asks the system a question, and the assistant writes an answer that ends the turn.
Temperature, top-p, top-k and the repeat penalty shape the sampling of the next token.
"""


def _word_pieces(corpus: str) -> list[str]:
    """Every substring (2..10 characters) of the corpus's "▁word"s, most frequent first."""
    words = Counter("\u2581" + w for w in corpus.split())
    counts: Counter[str] = Counter()
    for w, c in words.items():
        n = len(w)
        for i in range(n):
            for j in range(i + 2, min(n, i + _MAX_PIECE_CHARS) + 1):
                counts[w[i:j]] += c
    counts.pop("\u2581\u2581", None)  # placed first, as in Llama's vocabulary
    return sorted(counts, key=lambda p: (-counts[p], len(p), p))


@functools.lru_cache(maxsize=4)
def _pieces(n_normal: int) -> tuple[str, ...]:
    pieces = ["\u2581\u2581"]
    seen = set(pieces)
    chars = sorted(set(_CORPUS.replace(" ", "\u2581").replace("\n", "")) | {"\u2581"})
    multi = [p for p in _word_pieces(_CORPUS) if p not in seen]
    budget = n_normal - len(pieces) - len(chars)
    pieces += multi[: max(budget, 0)]
    seen.update(pieces)
    pieces += [c for c in chars if c not in seen]
    seen.update(chars)
    # Fill with single characters from CJK Unified Ideographs, then Hangul syllables.
    for cp in (*range(0x4E00, 0xA000), *range(0xAC00, 0xD7A4)):
        if len(pieces) >= n_normal:
            break
        c = chr(cp)
        if c not in seen:
            pieces.append(c)
    if len(pieces) < n_normal:
        raise ValueError(f"cannot build {n_normal} distinct pieces")
    return tuple(pieces[:n_normal])


def phi3_like_vocab(size: int = 32064) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata of a Phi-3-shaped SentencePiece vocabulary.

    Args:
        size: number of token ids; Phi-3 has 32064 (ids 32011 and up are ``[PADnnnnn]``).

    Returns:
        ``{"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [...], ...}`` with
        tokens, scores, token types, BOS 1, EOS 32000, UNK 0, PAD 32000, add_bos true.

    Raises:
        ValueError: ``size`` is below 32011 (Phi-3's special tokens need their real ids).
    """
    first_added = min(PHI3_ADDED_TOKENS)
    last_added = max(PHI3_ADDED_TOKENS)
    if size <= last_added:
        raise ValueError(f"size {size} is too small: Phi-3's special tokens use ids up to "
                         f"{last_added}")  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [-1000.0] * 3 + [0.0] * 256
    types = [_CONTROL, _CONTROL, _USER_DEFINED] + [_BYTE] * 256
    pieces = _pieces(first_added - _FIRST_PIECE)
    tokens += pieces
    scores += [-1e9] + [-float(i) for i in range(1, len(pieces))]
    types += [_NORMAL] * len(pieces)
    for i in range(first_added, size):
        tokens.append(PHI3_ADDED_TOKENS.get(i, f"[PAD{i}]"))
        scores.append(-1000.0 if i in PHI3_ADDED_TOKENS else -10000.0)
        types.append(_CONTROL if i in PHI3_ADDED_TOKENS else _UNKNOWN)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 32000,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 32000,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def add_vocab_to_writer(
    writer: Any, vocab: Mapping[str, Any], *, chat_template: bool | str = True
) -> None:
    """Write a ``phi3_like_vocab()`` (or any such mapping) into a ``gguf.GGUFWriter``.

    Args:
        writer: a ``gguf.GGUFWriter`` before ``write_header_to_file``.
        vocab: ``tokenizer.ggml.*`` keys and values.
        chat_template: True writes `PHI3_GGUF_CHAT_TEMPLATE`, a string writes that template,
            False writes none.
    """
    v = vocab
    writer.add_tokenizer_model(v["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in v:
        writer.add_tokenizer_pre(v["tokenizer.ggml.pre"])
    writer.add_token_list(v["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in v:
        writer.add_token_scores(v["tokenizer.ggml.scores"])
    writer.add_token_types(v["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in v:
        writer.add_token_merges(v["tokenizer.ggml.merges"])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
        ("padding_token_id", writer.add_pad_token_id),
        ("add_bos_token", writer.add_add_bos_token),
        ("add_eos_token", writer.add_add_eos_token),
    ):
        if f"tokenizer.ggml.{key}" in v:
            add(v[f"tokenizer.ggml.{key}"])
    if chat_template:
        writer.add_chat_template(
            PHI3_GGUF_CHAT_TEMPLATE if chat_template is True else str(chat_template)
        )


def write_vocab_gguf(
    path: str | os.PathLike[str],
    vocab: Mapping[str, Any] | None = None,
    *,
    architecture: str = "phi3",
    name: str = "Phi3",
    chat_template: bool | str = True,
) -> Path:
    """Write a tokenizer-only GGUF (no tensors) that llama.cpp opens with ``vocab_only=True``.

    Args:
        path: where to write.
        vocab: the tokenizer metadata; default `phi3_like_vocab()`.
        architecture: ``general.architecture``; Phi-3-mini hyperparameters are written under it.
        name: ``general.name`` (llama.cpp applies Phi-3's whitespace rule when it contains
            "phi3" or "phi-3").
        chat_template: as in `add_vocab_to_writer`.

    Returns:
        The path written.
    """
    import gguf

    path = Path(path)
    vocab = vocab if vocab is not None else phi3_like_vocab()
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(name)
    w.add_context_length(4096)
    w.add_embedding_length(3072)
    w.add_feed_forward_length(8192)
    w.add_block_count(32)
    w.add_head_count(32)
    w.add_head_count_kv(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(96)
    add_vocab_to_writer(w, vocab, chat_template=chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
