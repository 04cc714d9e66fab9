"""`Session`: one KV cache behind the model's lock, and the token ids it holds.

It is the public incremental-decode handle (`Model.new_session`) and what the generation
loop and the prompt cache drive, so there is one path from a token to its logits.  Knowing
the ids it holds is what lets a later call continue it from the longest common prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from . import backends

_KEPT_ENDS = 4  # prefill end logits kept per session


class Session:
    """The incremental-decode interface: one KV cache, NumPy logits on every backend.

    Obtain one with `Model.new_session`.  A session is used by one thread at a time; the
    model's lock serializes forward passes, so sessions of one `Model` may run in different
    threads.
    """

    def __init__(self, inner: backends.Session, lock: threading.Lock) -> None:
        self._inner = inner
        self._lock = lock
        self._tokens: list[int] = []  # the ids at positions 0 .. position - 1
        # Logits at the end of the last prefills, by position: a call that continues from
        # exactly there (the same prompt again, "regenerate") reuses them instead of
        # recomputing the prompt's last token, so it samples from the same logits.
        self._ends: dict[int, np.ndarray] = {}

    @property
    def position(self) -> int:
        """Tokens held in the cache."""
        return self._inner.position

    @property
    def max_context(self) -> int:
        """Positions this session can hold."""
        return self._inner.max_context

    @property
    def kv_cache_type(self) -> str:
        """How the cache stores K and V: one of ``"f16"``, ``"f32"``, ``"q8_0"``
        (`phimlx.load`'s ``kv_cache_type``)."""
        return self._inner.kv_cache_type

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids held in the cache, in order."""
        return tuple(self._tokens)

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run the prompt (batched); float32 logits [vocab] after its last token.

        Args:
            token_ids: the ids to append.
            all_logits: return float32 [T, vocab] instead: row i is the logits after
                ``token_ids[i]`` (what a prefill ending there gives, to float rounding), for
                scoring a text or checking drafted tokens.

        Raises:
            ContextLengthError: the tokens do not fit in what is left of the context.
            ValueError: empty input or an id outside the vocabulary.
        """
        ids = [int(t) for t in token_ids]
        with self._lock:
            try:
                logits = np.asarray(
                    self._inner.prefill(ids, all_logits=all_logits), dtype=np.float32
                )
            finally:  # an interrupted prefill may have cached some of its chunks
                self._sync(ids)
            self._keep_end(logits[-1] if all_logits else logits)
            return logits

    def _keep_end(self, logits: np.ndarray) -> None:
        """Keep the logits a prefill ending at the current position returned (`logits_at`)."""
        self._ends[self.position] = logits.copy()  # the caller may write into its own
        while len(self._ends) > _KEPT_ENDS:
            del self._ends[next(iter(self._ends))]

    def verify(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids``; float32 logits (T, vocab) after each, as T `step` calls give
        them (bit for bit on the NumPy backend; on MLX a prefill's, to float rounding).
        Speculative decoding checks drafted tokens with it.

        Raises:
            ContextLengthError: the tokens do not fit in what is left of the context.
            ValueError: empty input or an id outside the vocabulary.
        """
        ids = [int(t) for t in token_ids]
        exact = getattr(self._inner, "verify", None)
        if exact is None:
            return self.prefill(ids, all_logits=True)
        with self._lock:
            try:
                return np.asarray(exact(ids), dtype=np.float32)
            finally:
                self._sync(ids)

    def logits_at(self, position: int) -> np.ndarray | None:
        """The logits a prefill ending at ``position`` returned, if the session still holds
        that position and kept them (the last few prefills' are kept); else None."""
        return self._ends.get(position) if position <= self.position else None

    def step(self, token_id: int) -> np.ndarray:
        """Append ``token_id``; float32 logits [vocab] for the next position.

        Raises:
            ContextLengthError: the session is full.
            ValueError: an id outside the vocabulary.
        """
        token_id = int(token_id)
        with self._lock:
            try:
                return np.asarray(self._inner.step(token_id), dtype=np.float32)
            finally:
                self._sync([token_id])

    def step_async(self, token_id: int) -> backends.PendingLogits:
        """`step` that returns a handle at once; ``handle.result()`` gives the logits.  On
        MLX the step computes while the caller works (samples, streams text)."""
        token_id = int(token_id)
        with self._lock:  # the graph is built (rope, cache slots) under the lock
            try:
                return self._inner.step_async(token_id)
            finally:
                self._sync([token_id])

    def trim(self, n: int) -> int:
        """Forget positions ``n`` and later (``0 <= n <= position``); returns the position
        afterwards: ``n``, or 0 where the cache cannot go back that far (a sliding-window
        cache that has wrapped), in which case it was emptied.

        Raises:
            ValueError: ``n`` is outside ``0 .. position``.
        """
        with self._lock:
            kept = self._inner.trim(n)
            del self._tokens[kept:]
            self._ends = {p: v for p, v in self._ends.items() if p <= kept}
            return kept

    def fork(self, n: int | None = None) -> Session:
        """A new session holding this one's first ``n`` positions (default: all of them)
        exactly as this one holds them, with their ids; this one is unchanged.  A prefix
        that several conversations share (a system prompt, a document) is computed once
        and forked for each.

        Raises:
            ValueError: ``n`` is outside ``0 .. position``, or the cache no longer holds
                every position from 0 (a sliding-window cache that has wrapped).
        """
        with self._lock:
            n = self.position if n is None else n
            inner = self._inner.fork(n)
            other = Session(inner, self._lock)
            other._tokens = self._tokens[:n]
            other._ends = {p: v for p, v in self._ends.items() if p <= n}
            return other

    def reset(self) -> None:
        """Forget everything (position 0)."""
        with self._lock:
            self._inner.reset()
            self._tokens.clear()
            self._ends.clear()

    def _sync(self, fed: list[int]) -> None:
        """Make `tokens` match the backend's position after feeding ``fed``."""
        pos = self._inner.position
        if pos <= len(self._tokens):
            del self._tokens[pos:]
        else:
            self._tokens.extend(fed[: pos - len(self._tokens)])


def prefill_batch(
    model: backends.LoadedModel,
    lock: threading.Lock,
    sessions: Sequence[Session],
    token_lists: Sequence[Sequence[int]],
) -> np.ndarray:
    """`Session.prefill` of ``token_lists[b]`` into ``sessions[b]`` for each b, under
    ``lock``, in one forward pass where the backend has one (the NumPy backend's
    ``prefill_batch``; elsewhere one prefill after another): float32 logits (B, vocab), row
    b what ``sessions[b].prefill(token_lists[b])`` returns.  See `phimlx.Model.prefill_batch`.
    """
    _check_own(sessions, lock)
    lists = [[int(t) for t in ids] for ids in token_lists]
    batched = getattr(model, "prefill_batch", None)
    with lock:
        try:
            if batched is not None:
                logits = np.asarray(batched([s._inner for s in sessions], lists), np.float32)
            else:  # everything checked first, as the batched form does
                inner = [s._inner for s in sessions]
                backends.checked_prefills(inner, lists, model.config, lambda s: True)
                rows = [s.prefill(ids) for s, ids in zip(inner, lists, strict=True)]
                logits = np.stack(rows).astype(np.float32, copy=False)
        finally:  # each session's ids follow its position, whatever was computed
            for s, ids in zip(sessions, lists, strict=False):
                s._sync(ids)
        for s, row in zip(sessions, logits, strict=True):
            s._keep_end(row)
        return logits


def _check_own(sessions: Sequence[Session], lock: threading.Lock) -> None:
    for i, s in enumerate(sessions):
        if not isinstance(s, Session):
            raise TypeError(f"sessions[{i}] is a {type(s).__name__}, not a phimlx Session")
        if s._lock is not lock:
            raise ValueError(
                f"sessions[{i}] belongs to another model; a batch advances sessions of one model"
            )


def step_batch(
    model: backends.LoadedModel,
    lock: threading.Lock,
    sessions: Sequence[Session],
    token_ids: Sequence[int],
) -> np.ndarray:
    """`backends.LoadedModel.step_batch` for public sessions opened by ``model`` (whose
    forward passes take turns under ``lock``): one forward pass under the lock, then each
    session's ids follow its position.  See `phimlx.Model.step_batch`."""
    _check_own(sessions, lock)
    ids = [int(t) for t in token_ids]
    with lock:
        try:
            return np.asarray(model.step_batch([s._inner for s in sessions], ids), np.float32)
        finally:  # positions move together or not at all; the ids follow
            for s, t in zip(sessions, ids, strict=False):
                s._sync([t])
