"""A tokenizer's vocabulary, read from GGUF ``tokenizer.ggml.*`` metadata or a tokenizer.json.

`gguf_tokenizer_args` and `json_tokenizer_args` turn either source into the keyword
arguments of `tokenizer.Tokenizer`: every token's text, attributes (`TokenAttr`) and
bytes, BOS / EOS and whether to add them, the stop ids, the special tokens that eat the
whitespace after them, and a factory for the ``tokenizers`` model that encodes (`models`).
The rules are llama.cpp's (llama-vocab.cpp), so that the ids are its ids.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from enum import IntFlag
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from ..config import ARCHITECTURES, strips_space_after_special
from ..errors import GGUFError, UnsupportedModelError
from .models import (
    PRE_TOKENIZERS,
    _bpe_backend,
    _byte_decoder_table,
    _byte_level_bytes,
    _pre_families,
    _spm_backend,
)

__all__ = ["TokenAttr", "gguf_tokenizer_args", "json_tokenizer_args"]

log = logging.getLogger(__name__)

_SPM_SPACE = "\u2581"  # "▁"


class TokenAttr(IntFlag):
    """Token attributes as llama.cpp keeps them (GGUF ``token_type`` 1..6 map onto these)."""

    UNDEFINED = 0
    UNKNOWN = 1
    UNUSED = 2
    NORMAL = 4
    CONTROL = 8
    USER_DEFINED = 16
    BYTE = 32


# GGUF tokenizer.ggml.token_type values -> attributes.
# Plain ints from here on: IntFlag arithmetic is far too slow for 50k-entry loops.
_UNKNOWN, _UNUSED, _NORMAL = int(TokenAttr.UNKNOWN), int(TokenAttr.UNUSED), int(TokenAttr.NORMAL)
_CONTROL, _USER, _BYTE = int(TokenAttr.CONTROL), int(TokenAttr.USER_DEFINED), int(TokenAttr.BYTE)
_TYPE_TABLE = np.array([0, _NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE], dtype=np.int64)
_SPECIAL = _CONTROL | _UNKNOWN  # skipped by decode(skip_special=True)
_PARTITIONED = _CONTROL | _USER | _UNKNOWN

# Tokens llama.cpp treats as end-of-generation by their text, making them control tokens
# whatever the file says (llama-vocab.cpp, "maintain a list of tokens that cause
# end-of-generation").  "</s>" is among them but is not a stop token of ours: Phi-3 never
# emits it, and the brief's stop set is eos + end-of-turn.
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
     "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}
)  # fmt: skip
_CONTROL_TEXTS = _EOG_TEXTS | {"</s>"}
_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")  # Phi-3 rule exceptions (llama.cpp)


def gguf_tokenizer_args(md: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """`Tokenizer` keyword arguments from GGUF metadata (`Tokenizer.from_metadata`)."""

    def fail(msg: str) -> GGUFError:
        return GGUFError(f"{source}: {msg}")

    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(model, str):
        raise fail("metadata key 'tokenizer.ggml.model' is missing; the file has no "
                   "tokenizer (pass tokenizer_repo= to use a hub tokenizer.json)")  # fmt: skip
    if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], str):
        raise fail("metadata key 'tokenizer.ggml.tokens' is missing or not a list of strings")
    n = len(tokens)

    def number_list(key: str, default: float) -> list:
        v = md.get(key)
        if v is None:
            return [default] * n
        if not isinstance(v, list) or len(v) < n:
            raise fail(f"metadata '{key}' must be a list of at least {n} numbers "
                       f"(one per token), got {type(v).__name__} of length "
                       f"{len(v) if isinstance(v, list) else '-'}")  # fmt: skip
        return v[:n]

    types = np.asarray(number_list("tokenizer.ggml.token_type", 1), dtype=np.int64)
    attrs = _TYPE_TABLE[np.where((types >= 0) & (types < len(_TYPE_TABLE)), types, 0)]
    vocab = {t: i for i, t in enumerate(tokens)}
    arch = md.get("general.architecture")
    spec = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    name = str(md.get("general.name", ""))

    if model == "llama":
        spm, default_bos, default_eos, add_bos = True, 1, 2, True
    elif model == "gpt2":
        spm, default_bos, default_eos, add_bos = False, None, None, False
    else:
        raise UnsupportedModelError(
            f"{source}: tokenizer model '{model}' is not supported (phimlx runs 'llama' "
            "SentencePiece and 'gpt2' BPE vocabularies); pass tokenizer_repo= to use the "
            "model's tokenizer.json instead")  # fmt: skip
    pre = ""
    if not spm:
        pre = md.get("tokenizer.ggml.pre") or ""
        if not pre:
            log.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' "
                        "pre-tokenizer (generation quality may suffer)", source)  # fmt: skip
            pre = "default"
        if pre not in _pre_families():
            # No fallback: another pre-tokenizer's ids are different ids, and a model fed
            # them degrades quietly.  llama.cpp refuses such files too.
            raise UnsupportedModelError(
                f"{source}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; "
                f"phimlx knows {', '.join(sorted(PRE_TOKENIZERS))}.  Pass tokenizer_repo= "
                "to use the model's tokenizer.json instead")  # fmt: skip
        add_bos = _pre_families()[pre][2]
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    prefix = spm and bool(md.get("tokenizer.ggml.add_space_prefix", True))

    def special(key: str, default: int | None) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}", default)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise GGUFError(
                f"{source}: tokenizer.ggml.{key} = {v!r} is not a token of the {n}-token "
                "vocabulary; the file is corrupt (or its tokenizer was edited by hand)"
            )
        return v

    bos_id = special("bos_token_id", default_bos)
    eos_id = special("eos_token_id", default_eos)
    if add_bos and bos_id is None:
        log.warning("%s: the file asks for a BOS token but names none; none is added", source)
        add_bos = False

    # llama.cpp turns end-of-generation-looking tokens into control tokens.
    for t in _CONTROL_TEXTS & vocab.keys():
        attrs[vocab[t]] |= _CONTROL
    stops = {special("eot_token_id", None), special("eom_token_id", None), eos_id}
    stops.update(vocab[t] for t in _EOG_TEXTS & vocab.keys() if attrs[vocab[t]] & _SPECIAL)
    stops.update(vocab[t] for t in (spec.stop_tokens if spec else ()) if t in vocab)
    stops.discard(None)

    rstrip: set[int] = set()
    if strips_space_after_special(arch if isinstance(arch, str) else None, name):
        rstrip = set(np.flatnonzero(attrs & _PARTITIONED).tolist())
        rstrip.update(vocab[t] for t in ("</s>",) if t in vocab)
        rstrip.difference_update(vocab[t] for t in _NO_RSTRIP if t in vocab)

    if spm:
        scores = number_list("tokenizer.ggml.scores", 0.0)
        backend = functools.partial(_spm_backend, tokens, scores, vocab)
    else:
        merges = md.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or (merges and not isinstance(merges[0], str)):
            raise fail("metadata 'tokenizer.ggml.merges' is missing or not a list of "
                       "strings; a gpt2 tokenizer needs its merges")  # fmt: skip
        backend = functools.partial(_bpe_backend, vocab, merges, pre, source)
    return dict(
        tokens=tokens,
        attrs=attrs,
        token_bytes=_piece_bytes(tokens, attrs, spm=spm),
        vocab=vocab,
        backend=backend,
        spm=spm,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=prefix,
        stop_ids=frozenset(stops),
        rstrip_ids=frozenset(rstrip),
    )


def json_tokenizer_args(
    path: str | os.PathLike[str],
    *,
    architecture: str | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """`Tokenizer` keyword arguments from a tokenizer.json (`Tokenizer.from_file`)."""
    path = Path(path)
    md = metadata or {}
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises bare Exceptions, missing file included
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}") from e
        raise ValueError(f"{path}: not a tokenizer.json that tokenizers reads: {e}") from e
    spec = json.loads(hf.to_str())
    cfg = _read_json(path.with_name("tokenizer_config.json"))
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    added = hf.get_added_tokens_decoder()
    parts = [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")]
    text_spec = json.dumps(parts, ensure_ascii=False)
    byte_level = '"ByteLevel"' in text_spec
    spm = not byte_level and ("Metaspace" in text_spec or _SPM_SPACE in text_spec)
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
    attrs = np.full(len(tokens), _NORMAL, dtype=np.int64)
    if byte_fallback:
        for b in range(256):
            i = vocab.get(f"<0x{b:02X}>")
            if i is not None:
                attrs[i] = _BYTE
    for i, a in added.items():
        attrs[i] = _CONTROL if a.special else _USER
    token_bytes = _piece_bytes(tokens, attrs, spm=False if byte_level else (spm or None))
    scheme = re.search(r'"prepend_scheme":\s*"(\w+)"', text_spec)
    prepend = '"Prepend"' in text_spec or (scheme is not None and scheme[1] != "never")
    after_special = '"Prepend"' in text_spec or (scheme is not None and scheme[1] == "always")

    # BOS/EOS: the GGUF's ids, else tokenizer_config.json, else the post-processor.
    single = (spec.get("post_processor") or {}).get("single") or []
    tmpl = [next(iter(x.values())).get("id") for x in single if "SpecialToken" in x]
    first_special = bool(single) and "SpecialToken" in single[0]

    def token_id(key: str, cfg_key: str, fallback: str | None) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and 0 <= v < len(tokens):
            return v
        text = cfg.get(cfg_key, fallback)
        text = text.get("content") if isinstance(text, dict) else text
        return vocab.get(text) if isinstance(text, str) else None

    bos_id = token_id("bos_token_id", "bos_token", tmpl[0] if first_special else None)
    eos_id = token_id("eos_token_id", "eos_token", None)
    add_bos = md.get("tokenizer.ggml.add_bos_token", cfg.get("add_bos_token", first_special))
    add_eos = md.get("tokenizer.ggml.add_eos_token", cfg.get("add_eos_token", False))
    spec_arch = ARCHITECTURES.get(architecture or "")
    stops = {eos_id} if eos_id is not None else set()
    stops.update(i for i, t in enumerate(tokens) if t in _EOG_TEXTS and i in added)
    stops.update(vocab[t] for t in (spec_arch.stop_tokens if spec_arch else ()) if t in vocab)
    return dict(
        tokens=tokens,
        attrs=attrs,
        token_bytes=token_bytes,
        vocab=vocab,
        backend=lambda: hf,
        spm=spm,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(add_bos) and bos_id is not None,
        add_eos=bool(add_eos) and eos_id is not None,
        add_space_prefix=spm and prepend,
        stop_ids=frozenset(stops),
        partition=False,
        prefix_after_special=after_special,
    )


def _piece_bytes(tokens: list[str], attrs: np.ndarray, *, spm: bool | None) -> list[bytes]:
    """Every token's bytes (`Tokenizer.token_bytes`), in bulk: per-token Python calls cost
    tens of ms on a 50k vocabulary.  ``spm`` None: no space or byte-level mapping."""
    out = [b""] * len(tokens)
    for i in np.flatnonzero(attrs & _PARTITIONED).tolist():
        out[i] = tokens[i].encode()
    for i in np.flatnonzero(attrs & _BYTE).tolist():
        t = tokens[i]
        if spm is not False and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                out[i] = bytes([int(t[3:5], 16)])
            except ValueError:
                raise GGUFError(
                    f"tokenizer.ggml.tokens[{i}] = {t!r} is a byte token but not <0xNN> with "
                    "two hex digits; the file's vocabulary is corrupt") from None  # fmt: skip
        else:
            out[i] = _byte_level_bytes(t) if spm is False else t.encode()
    normal = np.flatnonzero((attrs & _NORMAL) & ~(attrs & _PARTITIONED)).tolist()
    texts = [tokens[i] for i in normal]
    sep = "\uffff"  # a noncharacter: not in any real vocabulary
    joined = sep.join(texts)
    pieces: list[bytes] | None = None
    if spm is False:
        parts = joined.translate(_byte_decoder_table()).split(sep)
        try:
            pieces = [p.encode("latin-1") for p in parts]
        except UnicodeEncodeError:
            pieces = [_byte_level_bytes(t) for t in texts]
    else:
        if spm:
            joined = joined.replace(_SPM_SPACE, " ")
        pieces = joined.encode().split(sep.encode())
    if len(pieces) != len(normal):  # a token held the separator after all
        pieces = [_byte_level_bytes(t) if spm is False else
                  (t.replace(_SPM_SPACE, " ") if spm else t).encode() for t in texts]  # fmt: skip
    for i, b in zip(normal, pieces, strict=True):
        out[i] = b
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
