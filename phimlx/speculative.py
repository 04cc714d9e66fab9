"""Speculative decoding: cheap drafts of the next tokens, checked by the model in one pass.

A proposer drafts up to k tokens after the text so far: `PromptLookup` copies what followed
the last occurrence of the text's final n-gram (prompt lookup decoding, llama.cpp's n-gram
lookup, llama-cpp-python's ``LlamaPromptLookupDecoding``), `DraftModel` lets a smaller model
with the same vocabulary decode them greedily.  The generation loop (`phimlx.generate`)
feeds the sampled token and the drafts in one forward pass that returns the logits after
each, then samples as always: while the sampled token equals the next draft, the logits
after it are already computed and no forward pass is needed; at the first difference the
remaining drafts are trimmed from the cache.

Exactness: every token is drawn by the same sampler from the same logits (to float
rounding) as without speculation, with the same random numbers, so greedy output is
token for token plain decoding's and seeded sampling gives plain sampling's text.  Drafts
are deterministic, so this check is speculative sampling's rule for a proposal of
probability one (accept with probability min(1, p/q) = p, else draw from the rest).

`Drafter` picks each round's draft length from the acceptance rate so far and the
measured time of forward passes over 1, 2, ... rows: long drafts where checking many rows
costs about one step (a model bound by memory bandwidth), short ones where it does not,
none (but a probe now and then) where drafts are rarely right, so free-form text pays
almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .model import Model
    from .session import Session


class Proposer(Protocol):
    """Drafts the tokens most likely to follow ``history``."""

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` drafted ids (fewer or none where it has no guess)."""
        ...

    def close(self) -> None:
        """Release what it holds (a draft model's session)."""
        ...


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the most recent earlier occurrence
    of the history's last ``n`` tokens, for ``n`` from ``max_ngram`` down to ``min_ngram``."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes {min_ngram}..{max_ngram} are invalid")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        h = np.asarray(history, dtype=np.int64)
        for n in range(min(self.max_ngram, h.size - 1), self.min_ngram - 1, -1):
            tail = h[-n:]
            # windows h[i:i+n] for i < size - n (an earlier occurrence, not the tail itself)
            win = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
            hits = np.flatnonzero((win == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent occurrence
                return h[start : start + k].tolist()
        return []

    def close(self) -> None:
        pass


class DraftModel:
    """Drafts greedily with a smaller model of the same vocabulary; its session continues
    from the draft model's own prompt cache and goes back there afterwards."""

    def __init__(self, model: Model, context: int) -> None:
        self.model = model
        self.context = min(context, model.config.context_length)
        self._session: Session | None = None

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        history = list(history)
        if len(history) + 1 > self.context:  # past the draft model's context: no drafts
            return []
        s = self._session
        if s is None:
            s, _ = self.model._prompt_cache.take(history, self.context)
            self._session = s = s if s is not None else self.model.new_session(self.context)
        held = s.tokens
        shared = 0
        for a, b in zip(held, history, strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(history) - 1)  # feed at least one token to get logits
        kept = s.trim(shared)
        room = s.max_context - len(history)
        k = min(k, room)
        if k <= 0:
            return []
        logits = s.prefill(history[kept:])
        drafts = [int(np.argmax(logits))]
        while len(drafts) < k:
            drafts.append(int(np.argmax(s.step(drafts[-1]))))
        return drafts

    def close(self) -> None:
        if self._session is not None:
            self.model._prompt_cache.put(self._session)
            self._session = None


class Drafter:
    """A proposer with a cost-aware draft length, and the counts `Stats` reports.

    Each round's length maximizes the expected tokens per second: with ``a`` the estimated
    chance that a draft is right given that the one before it was (accepted drafts over
    accepted drafts plus rejections, with older rounds weighing less), ``k`` drafts yield
    ``1 + a + ... + a^k`` tokens for the time of a forward pass over ``k + 1`` rows, which
    the loop measures (`observe`); lengths not measured yet are interpolated, or assumed
    cheap, so that they get tried.  Where no length beats a plain step, it drafts one
    token every `PROBE` steps to notice when the text starts to repeat its input.
    """

    PROBE = 8
    DECAY = 0.8  # weight of the past in the acceptance estimate, per round
    _OPTIMISTIC = 0.1  # an unmeasured extra row: this fraction of a row's measured time

    def __init__(self, proposer: Proposer, max_draft: int) -> None:
        if isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 1:
            raise ValueError(f"num_draft_tokens={max_draft!r} is invalid: must be >= 1")
        self.proposer = proposer
        self.max_draft = max_draft
        self._accepted = 1.0  # prior: a = 0.5
        self._rejected = 1.0
        self._cost: dict[int, float] = {}  # rows of a forward pass -> seconds (running)
        self._waited = 0
        self.k = self._best()

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is right after a right one."""
        return self._accepted / (self._accepted + self._rejected)

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Drafts for the next round, at most ``limit`` (what the context and token budget
        leave)."""
        k = self.k
        if k == 0:
            self._waited += 1
            if self._waited < self.PROBE:
                return []
            self._waited, k = 0, 1
        k = min(k, limit)
        return self.proposer.propose(history, k) if k > 0 else []

    def observe(self, rows: int, seconds: float) -> None:
        """A forward pass over ``rows`` tokens took ``seconds``."""
        old = self._cost.get(rows)
        self._cost[rows] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self.k = self._best()

    def update(self, accepted: int, drafted: int) -> None:
        """A finished round: ``accepted`` of ``drafted`` drafts were used."""
        self._accepted = self.DECAY * self._accepted + accepted
        self._rejected = self.DECAY * self._rejected + (accepted < drafted)
        self.k = self._best()

    def _cost_of(self, rows: int) -> float:
        known = sorted(self._cost)
        if rows in self._cost:
            return self._cost[rows]
        if not known:
            return 1.0 + self._OPTIMISTIC * (rows - 1)
        below = [t for t in known if t < rows]
        above = [t for t in known if t > rows]
        if below and above:  # between two measured lengths: linear
            lo, hi = below[-1], above[0]
            w = (rows - lo) / (hi - lo)
            return (1 - w) * self._cost[lo] + w * self._cost[hi]
        base = below[-1] if below else above[0]
        per_row = self._cost[known[0]] / known[0]
        return self._cost[base] + self._OPTIMISTIC * per_row * (rows - base)

    def _best(self) -> int:
        a = self.acceptance
        best_k, best = 0, 1.0 / self._cost_of(1)
        tokens = p = 1.0
        for k in range(1, self.max_draft + 1):
            p *= a
            tokens += p
            rate = tokens / self._cost_of(k + 1)
            if rate > best:
                best_k, best = k, rate
        return best_k

    def close(self) -> None:
        self.proposer.close()
