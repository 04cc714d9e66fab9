"""Tokenizers built from a GGUF's own ``tokenizer.ggml.*`` metadata (or a hub tokenizer.json).

The goal is llama.cpp's ids, exactly, for the same file.  llama.cpp tokenizes in two stages
and so do we:

1. Special-token partition (llama.cpp ``tokenizer_st_partition``): every token whose type is
   control, user-defined or unknown is searched in the text, longest first, and the text is
   cut around each match.  With ``parse_special=False`` only user-defined tokens are cut out.
   Phi-3 (``ARCHITECTURES['phi3'].strip_space_after_special``; llama.cpp keys it on a model
   name containing "phi3"/"phi-3") strips ASCII whitespace right after its special tokens,
   except after ``<unk>``, ``<s>`` and ``<|endoftext|>``.
2. Each remaining text fragment goes through the model, run by the ``tokenizers`` library:
   - ``llama`` (SentencePiece): ``" "`` -> ``"▁"`` and a ``"▁"`` prefix on every fragment
     (``add_space_prefix``), then llama.cpp's merge rule -- repeatedly join the adjacent pair
     whose concatenation is the vocabulary piece with the highest score -- which is a BPE whose
     merges are all the (left, right) splits of every piece, ranked by the piece's score.
     Characters outside the vocabulary fall back to ``<0xNN>`` byte tokens.
   - ``gpt2`` (byte-level BPE): the file's merges, after the pre-tokenizer regexes that
     ``tokenizer.ggml.pre`` names (llama.cpp ``llm_tokenizer_bpe``).

Decoding is ours: each token's bytes (`Tokenizer.token_bytes`) joined and read as UTF-8.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from enum import IntFlag
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import ARCHITECTURES
from .errors import GGUFError, UnsupportedModelError
from .gguf import ModelFile

__all__ = ["Tokenizer", "TokenAttr", "PRE_TOKENIZERS"]

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")

_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip remove
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


class Tokenizer:
    """Text <-> token ids for one model, as llama.cpp tokenizes it.

    Build one with `from_gguf` (the GGUF's own vocabulary) or `from_file` (a tokenizer.json).

    Attributes:
        vocab_size: number of token ids.
        bos_id, eos_id: the file's BOS / EOS ids (None when it has none).
        bos_token, eos_token: their texts.
        stop_ids: ids that end generation: EOS, end-of-turn / end-of-message tokens, and the
            architecture's ``stop_tokens`` (Phi-3: ``<|end|>`` 32007, ``<|endoftext|>`` 32000).
        special_ids: control (and unknown-type) ids; ``decode(skip_special=True)`` drops them.
        add_bos, add_eos: what ``encode(add_bos=None)`` adds, as the file says.
        add_space_prefix: SentencePiece puts "▁" before each text run; `decode` removes it
            again from the first piece of a run (at the start, or after a special token).
    """

    def __init__(
        self,
        *,
        tokens: list[str],
        attrs: np.ndarray,
        token_bytes: list[bytes],
        vocab: dict[str, int],
        backend: Callable[[], HFTokenizer],
        spm: bool,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        stop_ids: frozenset[int],
        rstrip_ids: frozenset[int] = frozenset(),
        partition: bool = True,
        prefix_after_special: bool = True,
    ) -> None:
        self._tokens = tokens
        self._attrs = attrs.tolist()
        self._bytes = token_bytes
        self._token_to_id = vocab  # later duplicates win, as in llama.cpp
        self._make_backend = backend
        self._backend_obj: HFTokenizer | None = None
        self._lock = threading.Lock()
        self._spm = spm
        self._partition_specials = partition
        self._prefix_after_special = prefix_after_special
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_token = tokens[bos_id] if bos_id is not None else None
        self.eos_token = tokens[eos_id] if eos_id is not None else None
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.stop_ids = frozenset(stop_ids)
        self.special_ids = frozenset(np.flatnonzero(attrs & _SPECIAL).tolist())
        # llama.cpp's special-token cache: longest text (in bytes) first.
        cache = np.flatnonzero(attrs & _PARTITIONED).tolist()
        cache.sort(key=lambda i: -len(token_bytes[i]))
        self._cache = [(tokens[i], i, i in rstrip_ids) for i in cache]
        self._cache_plain = [c for c in self._cache if not self._attrs[c[1]] & _SPECIAL]

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, mf: ModelFile) -> Tokenizer:
        """The tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata.

        Args:
            mf: an opened GGUF (`phimlx.open_gguf`).

        Returns:
            A `Tokenizer`; the ``tokenizers`` model behind `encode` is built on first use.

        Raises:
            GGUFError: a tokenizer key is missing or malformed (the message names it).
            UnsupportedModelError: the tokenizer model or pre-tokenizer is not one phimlx runs.
        """
        return cls.from_metadata(mf.metadata, source=str(mf.path))

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], *, source: str = "<metadata>") -> Tokenizer:
        """As `from_gguf`, from a metadata mapping.

        Args:
            md: ``ModelFile.metadata`` (or any mapping of the same ``tokenizer.ggml.*`` keys).
            source: how error messages name the file.

        Returns:
            A `Tokenizer`.

        Raises:
            GGUFError, UnsupportedModelError: as `from_gguf`.
        """

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
        name = str(md.get("general.name", "")).lower()

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
        if (spec and spec.strip_space_after_special) or "phi3" in name or "phi-3" in name:
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
        return cls(
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

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        architecture: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """A hub ``tokenizer.json`` (the ``tokenizers`` library runs it as the hub does).

        Args:
            path: the tokenizer.json file; a ``tokenizer_config.json`` beside it, when present,
                supplies the BOS/EOS texts and ``add_bos_token``.
            architecture: the model's architecture, for its extra stop tokens.
            metadata: the GGUF's metadata; its ``tokenizer.ggml.bos_token_id`` /
                ``eos_token_id`` / ``add_bos_token`` win over the json files.

        Returns:
            A `Tokenizer` (special tokens follow the json's own lstrip/rstrip flags).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a tokenizer.json the library can read.
        """
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
        return cls(
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

    # -- encoding --------------------------------------------------------------------------

    def _backend(self) -> HFTokenizer:
        if self._backend_obj is None:
            with self._lock:
                if self._backend_obj is None:
                    self._backend_obj = self._make_backend()
        return self._backend_obj

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: cut special tokens out of the text."""
        frags: list[str | int] = [text]
        for tok, tid, rstrip in self._cache if parse_special else self._cache_plain:
            if not any(type(f) is str and tok in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if type(f) is not str or tok not in f:
                    out.append(f)
                    continue
                pos = 0
                while (m := f.find(tok, pos)) >= 0:
                    if m > pos:
                        out.append(f[pos:m])
                    out.append(tid)
                    pos = m + len(tok)
                    if rstrip:
                        pos = len(f) - len(f[pos:].lstrip(_ASCII_SPACE))
                if pos < len(f):
                    out.append(f[pos:])
            frags = out
        return frags

    def _encode_text(self, frag: str) -> list[int]:
        if self._spm:
            frag = frag.replace(" ", _SPM_SPACE)
            if self.add_space_prefix:
                frag = _SPM_SPACE + frag
        return self._backend().encode(frag, add_special_tokens=False).ids

    def encode(
        self, text: str, *, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the text.
            add_bos: True/False to add a BOS or not; None does what the file says (and then
                also appends EOS if the file asks for it, as llama.cpp's ``add_special``).
            parse_special: read special-token texts (``"<|user|>"``) as those tokens; False
                encodes them as plain text (user-defined tokens are still recognized, as in
                llama.cpp).

        Returns:
            The ids, exactly as llama.cpp's ``llama_tokenize`` gives them.
        """
        if _SURROGATE.search(text):
            # tokenizers (Rust) cannot take them: a str from broken UTF-16 or
            # 'surrogateescape' decoding.  Show them as U+FFFD, like a decoder would.
            log.warning("the text holds lone surrogate code points; encoded as U+FFFD")
            text = _SURROGATE.sub("\ufffd", text)
        ids: list[int] = []
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        if text:
            if not self._partition_specials:  # a tokenizer.json: the library does it all
                ids.extend(self._encode_json(text, parse_special))
            else:
                for f in self._partition(text, parse_special):
                    if type(f) is int:
                        ids.append(f)
                    else:
                        ids.extend(self._encode_text(f))
        if add_bos is not False and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_json(self, text: str, parse_special: bool) -> list[int]:
        backend = self._backend()
        with self._lock:  # encode_special_tokens is a tokenizer-wide switch
            backend.encode_special_tokens = not parse_special
            try:
                return backend.encode(text, add_special_tokens=False).ids
            finally:
                backend.encode_special_tokens = False

    def encode_chat(self, rendered: str) -> list[int]:
        """Encode a rendered chat prompt (`phimlx.chat.render_chat`) without a doubled BOS.

        A template that writes the BOS text itself (Microsoft's Phi-3 GGUF starts with
        ``{{ bos_token }}``) gets no second BOS; otherwise BOS is added as the file says.
        Special-token texts are parsed.
        """
        starts_with_bos = bool(self.bos_token) and rendered.startswith(self.bos_token)
        return self.encode(rendered, add_bos=False if starts_with_bos else None)

    # -- decoding --------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` contributes to decoded text: a byte token its byte, a
        SentencePiece "▁" a space, a byte-level character its byte, a control or user-defined
        token its text, an unused token nothing.  `decode` joins these, except that it drops
        the "▁" prefix space at the start of a text run (see `add_space_prefix`)."""
        return self._bytes[token_id]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8, e.g. a cut-off emoji, becomes U+FFFD).

        Args:
            ids: token ids.
            skip_special: leave out control tokens (BOS, ``<|end|>``, ...).

        Returns:
            The text; ``decode(encode(text))`` gives ``text`` back (BOS and the space prefix
            that SentencePiece adds are not part of it).

        Raises:
            IndexError: an id is outside the vocabulary.
        """
        data, attrs = self._bytes, self._attrs
        parts: list[bytes] = []
        run_start = True  # at a text run's start SentencePiece had added a "▁"
        for i in ids:
            if i < 0:
                raise IndexError(f"token id {i} is negative")
            a = attrs[i]
            if a & _PARTITIONED:
                if not (skip_special and a & _SPECIAL):
                    parts.append(data[i])
                run_start = self._prefix_after_special
                continue
            piece = data[i]
            if run_start and self.add_space_prefix and a & _NORMAL and piece[:1] == b" ":
                piece = piece[1:]
            run_start = False
            parts.append(piece)
        return b"".join(parts).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as the file spells it (``"▁the"``, ``"Ġthe"``)."""
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as the file spells it, or None."""
        return self._token_to_id.get(token)

    def __repr__(self) -> str:
        kind = "llama-spm" if self._spm else "bpe"
        return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, stop_ids={sorted(self.stop_ids)})")  # fmt: skip


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
