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

The vocabulary is read in `vocab`; the ``tokenizers`` models are built in `models`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from ..gguf import ModelFile
from .vocab import (
    _NORMAL,
    _PARTITIONED,
    _SPECIAL,
    _SPM_SPACE,
    gguf_tokenizer_args,
    json_tokenizer_args,
)

__all__ = ["Tokenizer"]

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")

_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip remove


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
        chat_adds_bos: bool = True,
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
        self._chat_adds_bos = chat_adds_bos
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
        return cls(**gguf_tokenizer_args(md, source=source))

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
        return cls(**json_tokenizer_args(path, architecture=architecture, metadata=metadata))

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], *, architecture: str | None = None
    ) -> Tokenizer:
        """The tokenizer of a Hugging Face / mlx-lm model folder, as transformers'
        ``AutoTokenizer`` reads it (see `phimlx.tokenizer.folder`): the same ids, a chat
        prompt encoded as ``apply_chat_template`` encodes it (no BOS added: the template
        writes it if the model wants one).

        Args:
            folder: the folder holding ``tokenizer.json`` (and ``tokenizer_config.json``,
                ``generation_config.json``, ``config.json`` when present).
            architecture: the model's architecture, for its extra stop tokens.

        Returns:
            A `Tokenizer`.

        Raises:
            CheckpointError: the folder has no tokenizer.json (the message says how to
                name another source).
            ValueError: the file is not a tokenizer.json the library can read.
        """
        from ..formats.errors import CheckpointError
        from .folder import eos_ids

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; copy the model's tokenizer files into it, "
                "or pass tokenizer_repo= (a hub repo with the model's tokenizer.json)"
            )
        args = json_tokenizer_args(folder / "tokenizer.json", architecture=architecture,
                                   metadata=None)  # fmt: skip
        n = len(args["tokens"])
        args["stop_ids"] = args["stop_ids"] | {i for i in eos_ids(folder) if i < n}
        return cls(**args, chat_adds_bos=False)

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
        if not self._chat_adds_bos:  # a Hugging Face folder: apply_chat_template's rule
            return self.encode(rendered, add_bos=False)
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
