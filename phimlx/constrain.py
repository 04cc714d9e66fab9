"""Output constrained to a JSON schema, a regex or a grammar, enforced by llguidance.

llguidance (the library llama.cpp uses for ``--grammar``/``--json-schema``) compiles the
constraint and, at each step, gives the set of tokens that keep the output valid; the
sampler sets every other logit to -inf (`Constraint.mask`).  Its tokenizer is built from the
model's own vocabulary (`Tokenizer.token_bytes`, control tokens marked as special), so a
constraint sees exactly the bytes each token writes.

The mask for the next token is computed on a worker thread as soon as a token is chosen,
while the forward pass of that token runs (llguidance releases the GIL).  When the grammar
is complete and admits nothing more, generation ends after its last token (finish reason
``"stop"``) without another forward pass.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import ConstraintError
from .tokenizer import Tokenizer

_INSTALL = "pip install llguidance"
# Whitespace between JSON tokens: llama.cpp's json-schema-to-grammar rule (a space, or one or
# two newlines and up to 20 spaces or tabs).  llguidance's default, any run of whitespace,
# lets sampling wander off into blank lines until max_tokens; a schema's "x-guidance"
# options override this.
_JSON_SPACE = r"(?: |\n{1,2}[ \t]{0,20})?"
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, Any]] = weakref.WeakKeyDictionary()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise ConstraintError(
            f"constrained output (json_schema, regex, grammar) needs llguidance: {_INSTALL}"
        ) from e
    return llguidance


def _worker() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="phimlx-mask")
        return _pool


class _Vocab:
    """The model's vocabulary as llguidance's ``TokenizerWrapper`` reads it."""

    def __init__(self, tok: Tokenizer, n_vocab: int) -> None:
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.stop_ids)
        self.bos_token_id = tok.bos_id
        # Control tokens are marked with a 0xff first byte: llguidance never lets a grammar
        # write them as text (llama.cpp's integration does the same).
        self.tokens = [
            (b"\xff" + tok.token_bytes(i)) if i in tok.special_ids else tok.token_bytes(i)
            for i in range(tok.vocab_size)
        ] + [b""] * (n_vocab - tok.vocab_size)
        self.special_token_ids = sorted(tok.special_ids)
        self._tok = tok
        self._by_bytes: dict[bytes, int] | None = None

    def __call__(self, text: str | bytes) -> list[int]:
        """Ids whose bytes are exactly ``text``'s: the tokenizer's own where they are (a
        SentencePiece vocabulary puts a "▁" before a text run, which llguidance must not
        see), else the longest vocabulary entries from the left."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        tok = self._tok
        ids = tok.encode(data.decode("utf-8", errors="replace"), add_bos=False, parse_special=False)
        if b"".join(tok.token_bytes(i) for i in ids) == data:
            return ids
        if self._by_bytes is None:
            self._by_bytes = {}
            for i in range(tok.vocab_size):
                b = tok.token_bytes(i)
                if b and i not in tok.special_ids:
                    self._by_bytes.setdefault(b, i)
        table, longest = self._by_bytes, max(map(len, self._by_bytes))
        out, at = [], 0
        while at < len(data):
            for n in range(min(longest, len(data) - at), 0, -1):
                i = table.get(data[at : at + n])
                if i is not None:
                    out.append(i)
                    at += n
                    break
            else:  # a byte no token writes: llguidance then cannot force it either
                raise ValueError(f"no token writes byte {data[at]:#04x}")
        return out


def llg_tokenizer(tok: Tokenizer, n_vocab: int) -> Any:
    """llguidance's tokenizer for ``tok`` with ``n_vocab`` logits (built once, ~1 s on a
    50k vocabulary, and kept with the tokenizer)."""
    llg = _llguidance()
    kept = _tokenizers.setdefault(tok, {})
    if n_vocab not in kept:
        vocab = _Vocab(tok, n_vocab)
        kept[n_vocab] = llg.LLTokenizer(
            llg.TokenizerWrapper(vocab), n_vocab=n_vocab, eos_token=sorted(tok.stop_ids)
        )
    return kept[n_vocab]


def grammar_text(
    *,
    json_schema: Mapping[str, Any] | str | bool | None = None,
    regex: str | None = None,
    grammar: str | None = None,
) -> str | None:
    """The llguidance grammar for one of the three constraint kinds (None: none given).

    ``json_schema``: a JSON schema (dict or JSON text); ``True`` means any JSON object
    (OpenAI's ``json_object`` mode).  ``regex``: the whole output matches it.  ``grammar``:
    a Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar.

    Raises:
        ConstraintError: more than one kind given, or one that is not valid.
    """
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if v is not None]  # fmt: skip
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(f"give one of json_schema, regex, grammar, not {' and '.join(given)}")
    llg = _llguidance()
    if json_schema is not None:
        if json_schema is True:
            json_schema = {"type": "object"}
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from e
        if not isinstance(json_schema, Mapping):
            raise ConstraintError(
                f"json_schema must be a JSON object (a dict), not {type(json_schema).__name__}"
            )
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                dict(json_schema), defaults={"whitespace_pattern": _JSON_SPACE}
            )
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"json_schema is invalid: {e}") from e
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError(f"regex must be a string, not {type(regex).__name__}")
        return llg.LLMatcher.grammar_from_regex(regex)
    if not isinstance(grammar, str):
        raise ConstraintError(f"grammar must be a string, not {type(grammar).__name__}")
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
        raise ConstraintError(f"grammar is not valid GBNF or Lark: {e}") from e
    return llg.LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One generation's constraint: which tokens may come next, given those chosen so far.

    Build with `Constraint.create` (validates before any compute).  Per token: `mask` the
    logits, sample, `consume` the chosen token; `done` says the output is complete.
    """

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int) -> None:
        llg = _llguidance()
        self._matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(f"invalid constraint: {self._matcher.get_error()}")
        self._n_vocab = n_vocab
        self._words = (n_vocab + 31) // 32
        self._pending: Future[np.ndarray] | None = _worker().submit(self._compute)

    @classmethod
    def create(
        cls,
        tok: Tokenizer,
        n_vocab: int,
        *,
        json_schema: Mapping[str, Any] | str | bool | None = None,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> Constraint | None:
        """The constraint for the given kind (None when none is given).

        Raises:
            ConstraintError: the schema, regex or grammar is invalid (the message says how).
        """
        text = grammar_text(json_schema=json_schema, regex=regex, grammar=grammar)
        if text is None:
            return None
        return cls(llg_tokenizer(tok, n_vocab), text, n_vocab)

    def _compute(self) -> np.ndarray:
        bits = np.zeros(self._words, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[: self._n_vocab] != 0

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of the tokens that may not come next to -inf, in place."""
        pending, self._pending = self._pending, None
        allowed = pending.result() if pending is not None else self._compute()
        if self._matcher.is_error():
            raise ConstraintError(f"the constraint failed: {self._matcher.get_error()}")
        logits[: self._n_vocab][~allowed] = -np.inf

    def consume(self, token: int) -> None:
        """Advance past ``token`` (a token `mask` allowed) and start the next mask."""
        if not self._matcher.consume_token(int(token)):
            raise ConstraintError(
                f"token {token} does not fit the constraint: {self._matcher.get_error()}"
            )
        self._pending = None if self.done else _worker().submit(self._compute)

    @property
    def done(self) -> bool:
        """The output is complete and the constraint admits no further token."""
        return bool(self._matcher.is_stopped())

    def close(self) -> None:
        """Wait for a mask still being computed (the matcher must outlive it)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
