"""The continuous-batching engine: one thread owns the model and runs every request.

Live requests are `Model._stream` generators (the library's one decode loop, with its
sampling and stopping rules) sharing one `StepBatch`.  Each round advances every live
stream by one chunk, so the batch's first ``handle.result()`` steps all of them in one
forward pass (`Model.step_batch`).  Between rounds, new requests join and finished or
cancelled ones leave: closing a generator runs its ``finally``, which withdraws its
registered step and hands its session back to the prompt cache.

A new request's prompt is prefilled here, in pieces of ``prefill_chunk`` tokens (a shorter
prompt whole), about ``prefill_chunk`` tokens between two decode rounds, so a long prompt
delays the others' next token by one piece, not by its whole prefill, and several short
ones that arrive together start together, their pieces in one forward pass
(`Model.prefill_batch`).  The prefilled session goes back to the prompt cache, where the
request's stream finds it holding the whole prompt (and the logits after it).

Chunks reach the request's asyncio side through `Ticket`, a queue: the engine collects a
round's chunks and hands them over with one ``loop.call_soon_threadsafe`` (one wake-up of
the event loop a round, not one a request).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..generate import Chunk, StepBatch
from ..session import Session

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256


class QueueFullError(Exception):
    """Every batch slot and queue place is taken: answer 429 and ask to retry later."""


class EngineStoppedError(Exception):
    """The engine stopped (the server is shutting down) before the request finished."""


class Ticket:
    """A request's handle on the asyncio side: its chunks, in order, then the end.

    ``await ticket.get()`` returns the next `Chunk` (the last one has a ``finish_reason``)
    or raises the error the request met in the engine.  ``cancel()`` makes the engine drop
    the request between two rounds (a client that went away).
    """

    def __init__(self, engine: Engine, call: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.cached_tokens = 0  # prompt tokens reused from the prompt cache (set by the engine)
        self.cancelled = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    async def get(self) -> Chunk:
        """The next chunk.

        Raises:
            Exception: what the request met in the engine (`EngineStoppedError` at shutdown).
        """
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Drop the request (its slot and session are freed at the next round)."""
        if not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    def _deliver(self, item: Chunk | BaseException) -> None:
        """From the engine thread: ``item`` goes to the asyncio side at the engine's next
        `Engine._flush`."""
        self._engine._outbox.append((self, item))


def _put_all(items: list[tuple[Ticket, Chunk | BaseException]]) -> None:
    """In the event loop: queue each item for its ticket."""
    for ticket, item in items:
        ticket._queue.put_nowait(item)


@dataclass(eq=False)
class _Job:
    """A request inside the engine: its prefill state, then its stream."""

    ticket: Ticket
    session: Session | None = None
    gen: Iterator[Chunk] | None = None
    tokens: int = field(default=0)  # chunks delivered


class Engine:
    """One thread that owns ``model`` and runs requests with continuous batching.

    Args:
        model: the `phimlx.Model` to serve; no one else should generate with it meanwhile.
        max_batch: requests decoding (or prefilling) at once.
        max_queue: requests waiting for a batch slot; past ``max_batch + max_queue``
            requests in all, `submit` raises `QueueFullError`.
        prefill_chunk: prompt tokens prefilled between two decode rounds.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(
                f"max_batch={max_batch}, max_queue={max_queue}, prefill_chunk={prefill_chunk}: "
                "need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1"
            )
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()  # under _cond
        self._count = 0  # requests in the engine (waiting, prefilling, decoding); under _cond
        self._stopping = False
        self._prefilling: list[_Job] = []  # engine thread only
        self._live: list[_Job] = []  # engine thread only
        self._batch = StepBatch(model.step_batch)
        self._outbox: list[tuple[Ticket, Chunk | BaseException]] = []  # engine thread only
        self._thread: threading.Thread | None = None

    # -- the asyncio side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="phimlx-engine", daemon=True)
            self._thread.start()

    def submit(self, call: Any) -> Ticket:
        """Queue a prepared call (`Model._prepare`); must run in the event loop that will
        read the ticket.

        Raises:
            QueueFullError: ``max_batch + max_queue`` requests are already in.
            EngineStoppedError: the engine is stopping.
        """
        ticket = Ticket(self, call, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if self._count >= self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {self.max_batch} requests running and "
                    f"{self.max_queue} waiting; retry later"
                )
            self._count += 1
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def stop(self, timeout: float | None = None) -> None:
        """Stop: requests still in are cancelled (their clients get `EngineStoppedError`)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (it stops at shutdown, or on a bug)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def load(self) -> dict[str, int]:
        """Requests running (prefilling or decoding) and waiting for a slot."""
        with self._cond:
            return {"running": self._count - len(self._waiting), "waiting": len(self._waiting)}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._prefilling or self._live):
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = [t for t in self._waiting if t.cancelled]  # gone while queued
                    for ticket in admitted:
                        self._waiting.remove(ticket)
                    room = self.max_batch - len(self._prefilling) - len(self._live)
                    while self._waiting and room > 0:
                        admitted.append(self._waiting.popleft())
                        room -= 1
                for ticket in admitted:
                    self._admit(ticket)
                self._prefill_pieces()
                self._flush()  # first chunks out before the round's forward pass
                self._decode_round()
                self._flush()
        except BaseException:  # a bug here must not leave clients waiting forever
            log.exception("the engine failed")
            raise
        finally:
            self._shutdown()

    def _flush(self) -> None:
        """Hand the chunks and errors delivered since the last call to their event loops:
        one ``call_soon_threadsafe`` for each loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, item in self._outbox:
            by_loop.setdefault(ticket._loop, []).append((ticket, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for ticket, _ in items:
                    ticket.cancelled = True

    def _end(self, job: _Job, item: BaseException | None = None) -> None:
        """Take ``job`` out of the engine, telling its client ``item`` if given."""
        if item is not None:
            job.ticket._deliver(item)
        with self._cond:
            self._count -= 1

    def _admit(self, ticket: Ticket) -> None:
        """Give ``ticket`` a session: the kept one sharing the longest prefix (or a fork of
        its shared start: `PromptCache.take`), else a new one."""
        job = _Job(ticket)
        if ticket.cancelled:
            self._end(job)
            return
        call = ticket.call
        if not call.cache:  # no prompt cache: the stream prefills the prompt itself
            self._begin_stream(job)
            return
        model, ids = self.model, call.ids
        try:
            session, shared = model._prompt_cache.take(ids, call.context)
            if session is None:
                session = model.new_session(call.context)
            n = len(ids)
            # as `Model._stream` does: the whole prompt is cached only with its end logits
            kept = session.logits_at(n) if shared == n else None
            if kept is not None and session.trim(n) == n:
                ticket.cached_tokens = n
            else:
                pos = min(shared, n - 1, session.position)
                ticket.cached_tokens = session.trim(pos) if session.position else 0
        except Exception as e:  # noqa: BLE001 - the request fails, not the engine
            self._end(job, e)
            return
        job.session = session
        self._prefilling.append(job)

    def _prefill_pieces(self) -> None:
        """Prefill pieces of the waiting prompts, oldest first, about ``prefill_chunk``
        tokens in all (at least one piece), in one forward pass (`Model.prefill_batch`);
        start each stream whose prompt is done.

        A piece is ``prefill_chunk`` tokens of one prompt or the rest of it, never less:
        a prompt that fits in one piece is prefilled whole, as `Model.stream` would, and
        gets the logits it would get alone."""
        pieces: list[tuple[_Job, Session, int]] = []  # a job, its session, its piece's end
        done = 0
        for job in list(self._prefilling):
            session = job.session
            assert session is not None
            if job.ticket.cancelled:
                self._prefilling.remove(job)
                self.model._prompt_cache.put(session)  # what was prefilled stays useful
                self._end(job)
                continue
            piece = min(self.prefill_chunk, len(job.ticket.call.ids) - session.position)
            if done and done + piece > self.prefill_chunk:
                break  # the decode steps of the others come first
            pieces.append((job, session, session.position + piece))
            done += max(piece, 1)
        todo = [(job.ticket.call.ids, s, end) for job, s, end in pieces if end > s.position]
        if len(todo) > 1:
            try:
                self.model.prefill_batch(
                    [s for _, s, _ in todo], [ids[s.position : end] for ids, s, end in todo]
                )
            except Exception:  # noqa: BLE001 - each prompt again on its own, below, so
                log.debug("a batched prefill failed", exc_info=True)  # its error is its own
        for job, session, end in pieces:
            ids = job.ticket.call.ids
            try:
                if session.position < end:
                    session.prefill(ids[session.position : end])
            except Exception as e:  # noqa: BLE001
                self._prefilling.remove(job)
                self.model._prompt_cache.put(session)
                self._end(job, e)
                continue
            if session.position == len(ids):
                self._prefilling.remove(job)
                # The stream takes it back from the cache at once, holding the whole prompt.
                self.model._prompt_cache.put(session)
                job.session = None
                self._begin_stream(job)

    def _begin_stream(self, job: _Job) -> None:
        """Start ``job``'s stream and deliver its first chunk (it samples the first token)."""
        job.gen = self.model._stream(job.ticket.call, self._batch)
        self._live.append(job)
        self._advance(job)

    def _decode_round(self) -> None:
        """Advance every live stream by one chunk (one batched forward pass for all)."""
        for job in list(self._live):
            if job in self._live:
                self._advance(job)

    def _advance(self, job: _Job) -> None:
        gen = job.gen
        assert gen is not None
        if job.ticket.cancelled:
            self._live.remove(job)
            gen.close()  # withdraws its step, returns its session to the prompt cache
            self._end(job)
            return
        try:
            chunk = next(gen)
        except Exception as e:  # noqa: BLE001 - StopIteration included: a stream always ends
            self._live.remove(job)  # with a finish reason, so this is a failure
            gen.close()
            self._end(job, e if not isinstance(e, StopIteration) else RuntimeError("no chunk"))
            return
        job.tokens += 1
        job.ticket._deliver(chunk)
        if chunk.finish_reason is not None:
            self._live.remove(job)
            try:
                for _ in gen:  # nothing more comes: runs the stream's own ending
                    pass
            except Exception:  # noqa: BLE001
                log.exception("a finished stream failed while closing")
            self._end(job)

    def _shutdown(self) -> None:
        """Cancel everything still in (the thread is ending)."""
        stopped = EngineStoppedError("the server shut down before the request finished")
        for job in self._live:
            try:
                if job.gen is not None:
                    job.gen.close()
            except Exception:  # noqa: BLE001
                log.exception("a stream failed while closing")
            self._end(job, stopped)
        for job in self._prefilling:
            if job.session is not None:
                self.model._prompt_cache.put(job.session)
            self._end(job, stopped)
        self._live.clear()
        self._prefilling.clear()
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
        for ticket in waiting:
            self._end(_Job(ticket), stopped)
        self._flush()
