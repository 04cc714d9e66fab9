"""The generation loop's logic on a scripted session: finish reasons, stop strings, stats."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from phimlx.backends import Finished
from phimlx.errors import ContextLengthError
from phimlx.generate import _StopMatcher, stream
from phimlx.sampling import Sampler, SamplingParams
from phimlx.tokenizer import StreamingDetokenizer

VOCAB = ["<eos>", "a", "b", "c", " ", "STOP", "x"]


class ScriptedSession:
    """A session whose greedy continuation is a fixed script of token ids."""

    def __init__(self, script: Sequence[int], max_context: int = 100) -> None:
        self.script = list(script)
        self.max_context = max_context
        self._pos = 0
        self._i = 0

    @property
    def position(self) -> int:
        return self._pos

    def _next(self) -> np.ndarray:
        logits = np.zeros(len(VOCAB), np.float32)
        logits[self.script[min(self._i, len(self.script) - 1)]] = 10.0
        self._i += 1
        return logits

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self._pos += len(ids)
        return self._next()

    def step(self, token_id: int) -> np.ndarray:
        assert self._pos < self.max_context
        self._pos += 1
        return self._next()

    def step_async(self, token_id: int) -> Finished:
        return Finished(self.step(token_id))

    def reset(self) -> None:
        self._pos = 0


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids if i != 0)


def run(script, *, prompt=(1,), max_tokens=50, stops=(), max_context=100):
    greedy = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    chunks = list(
        stream(
            ScriptedSession(script, max_context),
            list(prompt),
            greedy,
            decode,
            max_tokens=max_tokens,
            stop_ids=frozenset({0}),
            stop_strings=stops,
        )
    )
    return "".join(c.text for c in chunks), chunks


def test_eos_stops_and_is_not_in_the_text():
    text, chunks = run([1, 2, 3, 0, 1])
    assert text == "abc"
    assert chunks[-1].finish_reason == "stop"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].stats.generation_tokens == 3
    assert chunks[-1].stats.prompt_tokens == 1


def test_max_tokens_gives_length():
    text, chunks = run([1, 2, 3, 1, 2, 3], max_tokens=4)
    assert text == "abca"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].stats.generation_tokens == 4


def test_full_context_gives_context():
    # 2 prompt tokens + room for 3 more positions: 4 tokens sampled (the last needs no step)
    text, chunks = run([1, 2, 3, 1, 2, 3], prompt=(1, 1), max_context=5)
    assert text == "abca"
    assert chunks[-1].finish_reason == "context"


def test_prompt_longer_than_context_raises_naming_both_lengths():
    with pytest.raises(ContextLengthError, match=r"6 tokens.*holds 5"):
        run([1], prompt=(1,) * 6, max_context=5)


def test_stop_string_split_across_tokens_is_cut_and_nothing_after_it_leaks():
    # "ab" then "c" + " " ... stop string "c x" spans three tokens
    text, chunks = run([1, 2, 3, 4, 6, 1, 1, 0], stops=["c x"])
    assert text == "ab"
    assert chunks[-1].finish_reason == "stop"


def test_text_before_a_partial_stop_match_is_not_held_back():
    m = _StopMatcher(["STOP"])
    assert m.feed("hello S") == ("hello ", False)  # only the "S" could start the stop
    assert m.feed("T") == ("", False)
    assert m.feed("ay") == ("STay", False)  # not a stop after all: released at once
    assert m.feed("xSTOPy") == ("x", True)


def test_held_text_is_flushed_at_the_end():
    text, chunks = run([1, 5, 0], stops=["STOPPED"])  # "aSTOP" then eos
    assert text == "aSTOP"
    assert chunks[-1].finish_reason == "stop"


def test_max_tokens_zero_yields_only_the_final_chunk():
    text, chunks = run([1, 2], max_tokens=0)
    assert text == "" and len(chunks) == 1 and chunks[0].finish_reason == "length"


def test_detokenizer_waits_for_complete_utf8():
    # byte tokens: "é" = C3 A9 split over two tokens, then "!"
    pieces = {0: b"\xc3", 1: b"\xa9", 2: b"!"}

    def dec(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    d = StreamingDetokenizer(dec)
    assert d.add(0) == ""
    assert d.add(1) == "é"
    assert d.add(2) == "!"
    assert d.finalize() == ""
    assert d.text == dec([0, 1, 2])


def test_detokenizer_flushes_an_unfinished_character():
    d = StreamingDetokenizer(lambda ids: bytes([0xE2] * len(ids)).decode("utf-8", "replace"))
    assert d.add(0) == ""
    assert d.finalize() == "\ufffd"
