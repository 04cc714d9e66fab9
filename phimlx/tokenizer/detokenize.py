"""Incremental detokenization for streaming.

Decoding token by token breaks text in two ways: a character split over byte-fallback
tokens (an emoji is four ``<0xNN>`` tokens) decodes to U+FFFD until its last byte, and a
SentencePiece piece's leading space depends on what precedes it.  The fix (the one
text-generation-inference and ``tokenizers.decoders.DecodeStream`` use): decode a short
window that starts a little before the new tokens, and emit only what it adds beyond the
window's prefix, once the addition no longer ends in an incomplete character.  Joined, the
streamed pieces equal the full decode of all tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StreamingDetokenizer:
    """Feed token ids with `add`; each call returns the new text that is safe to show.

    Args:
        decode: the full decoder, ids -> text (e.g. ``Tokenizer.decode`` with its options).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is open)."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        new_text = self._decode(self.tokens[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.tokens)
            self.text += piece
            return piece
        return ""

    def finalize(self) -> str:
        """Flush what is still held (an unfinished character becomes U+FFFD)."""
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        new_text = self._decode(self.tokens[self._prefix :])
        piece = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._prefix = self._read = len(self.tokens)
        self.text += piece
        return piece
