"""What a model remembers between calls: recent sessions, reused by their longest common prefix.

A chat turn's prompt is the previous turn's prompt, the reply, and the new message; without
a cache every turn re-reads the whole history.  `PromptCache` keeps the sessions of recent
calls (their KV caches and the ids they hold) within a memory budget, least recently used
evicted, and hands the next call the one that shares the longest prefix with its prompt, so
only the rest is prefilled (as llama.cpp's server and llama-cpp-python do).  Where the
prompt shares only the start of that session (a system prompt that other conversations
begin with too), the call gets a copy of the start (`Session.fork`) rather than the session
cut back to it, so the conversation it holds is not lost to the next call, and calls at
the same time each get the start (vLLM's and SGLang's prefix caches share it likewise).

`ReplyIds` remembers the ids generated for recent replies, by their text: a conversation fed
back with a reply in it is encoded with those ids rather than by re-tokenizing the text,
which can give other ids (Phi-3's tokenizer, for one, strips the whitespace after special
tokens) and would throw the cache away from that point on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from .session import Session


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Sessions kept for reuse, at most ``max_bytes`` of KV cache in all (the most recent
    one is kept whatever its size: it is the conversation in progress).

    Thread-safe: a session is lent to one call at a time (`take`) and comes back with `put`.

    Args:
        bytes_per_token: KV cache bytes one cached position costs.
        max_bytes: the budget for all kept sessions.
        max_sessions: at most this many sessions kept.
    """

    def __init__(self, bytes_per_token: int, max_bytes: int, max_sessions: int = 8) -> None:
        self.bytes_per_token = bytes_per_token
        self.max_bytes = max_bytes
        self.max_sessions = max_sessions
        self._sessions: list[Session] = []  # least recently used first
        self._lock = threading.Lock()
        self._clears = 0  # `clear` calls so far: a session forked meanwhile is not put back

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        """KV cache bytes held by the kept sessions (an estimate: positions x per-token)."""
        return sum(s.position for s in self._sessions) * self.bytes_per_token

    def take(self, ids: Sequence[int], max_context: int) -> tuple[Session | None, int]:
        """A session for a call whose prompt is ``ids``, from the kept session of
        ``max_context`` positions that shares the longest prefix with it, and that prefix's
        length; ``(None, 0)`` when no session shares anything.

        Where the prompt continues what the kept session holds, or shares more than half
        of it (the next turn of its conversation, a retry of its last turn), that session
        is lent, out of the cache until `put` back.  Where it shares less (a system prompt
        or a document that other conversations start with too), the call gets a fork of
        the shared prefix (`Session.fork`) and the kept session stays, whole, for the
        calls that continue it and for other calls at the same time."""
        with self._lock:
            best, best_n = None, 0
            for s in self._sessions:
                if s.max_context != max_context:
                    continue
                n = common_prefix(s.tokens, ids)
                if n > best_n:
                    best, best_n = s, n
            if best is None:
                return None, 0
            self._sessions.remove(best)  # out while it is forked: no one else changes it
            clears = self._clears
        if 2 * best_n > best.position:
            return best, best_n
        try:
            fork = best.fork(best_n)
        except ValueError:  # (a wrapped sliding window): lend it, as the only way to reuse it
            return best, best_n
        except BaseException:  # (out of memory): kept as it was
            self._put_back(best, clears)
            raise
        self._put_back(best, clears)
        return fork, best_n

    def _put_back(self, session: Session, clears: int) -> None:
        """`put` a session that was out while it was forked, unless the cache was cleared
        meanwhile (``clears``: the count of `clear` calls when it was taken out)."""
        with self._lock:
            if clears == self._clears:
                self._keep(session)

    def put(self, session: Session) -> None:
        """Keep ``session`` as the most recently used; evict the least recently used ones
        beyond the budget."""
        with self._lock:
            self._keep(session)

    def _keep(self, session: Session) -> None:  # (under the lock)
        if session in self._sessions:
            self._sessions.remove(session)
        if session.position == 0:
            return
        self._sessions.append(session)
        while len(self._sessions) > 1 and (
            len(self._sessions) > self.max_sessions or self.nbytes > self.max_bytes
        ):
            self._sessions.pop(0)

    def clear(self) -> None:
        """Drop every kept session (their memory goes with them)."""
        with self._lock:
            self._sessions.clear()
            self._clears += 1


class ReplyIds:
    """The ids generated for the last few replies, by their text (bounded, LRU)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, ids: Sequence[int]) -> None:
        """Record that ``ids`` were generated for ``text`` (which they decode to)."""
        if not text or not ids:
            return
        with self._lock:
            self._ids[text] = tuple(ids)
            self._ids.move_to_end(text)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def get(self, text: str) -> tuple[int, ...] | None:
        """The ids generated for ``text``, if it was a recent reply."""
        with self._lock:
            ids = self._ids.get(text)
            if ids is not None:
                self._ids.move_to_end(text)
            return ids
