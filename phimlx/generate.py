"""THE decode loop, written once against the incremental-decode protocol.

Three layers, as in mlx-lm: `generate_tokens` (prefill, sample, step: token ids), `stream`
(detokenize incrementally, stop strings, finish reasons, stats: `Chunk`s), and the blocking
`Model.generate` in `phimlx.model` that joins a stream into a `Result`.

Batches run the same loop, one per sequence: `StepBatch` gives each loop a ``step`` that
only registers its token, and runs all registered tokens as one batched forward pass
(`LoadedModel.step_batch`) when the first loop needs its logits; `run_together` advances
the loops round-robin, so each pass steps every sequence still going.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import PendingLogits, Session, check_fits
from .sampling import Sampler, token_logprobs
from .tokenizer import StreamingDetokenizer

if TYPE_CHECKING:
    from .constrain import Constraint
    from .speculative import Drafter

Step = Callable[[int], PendingLogits]  # feed a sampled token; a handle to the next logits


@dataclass
class Stats:
    """Timing and size figures of one generation."""

    prompt_tokens: int = 0  # the whole prompt, cached_tokens of them from the prompt cache
    prompt_seconds: float = 0.0  # the prefill of the prompt tokens that were not cached
    cached_tokens: int = 0
    dropped_messages: int = 0  # oldest messages left out to fit the context
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    time_to_first_token: float = 0.0  # seconds from the call to the first sampled token
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and those the model took
    accepted_tokens: int = 0
    peak_memory: int | None = None  # peak resident memory of the process, bytes

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (prefill of the tokens that were not cached)."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second, after the first token."""
        n = self.generation_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds else 0.0

    def summary(self) -> str:
        """One line: prompt and generation sizes and speeds, time to first token, memory.
        A speed needs two timed points: with one generated token it is shown as n/a."""
        mem = f", peak memory {self.peak_memory / 2**30:.2f} GiB" if self.peak_memory else ""
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        prompt_tps = f"{self.prompt_tps:.1f} tok/s" if self.prompt_seconds else "n/a tok/s"
        gen_tps = f"{self.generation_tps:.1f} tok/s" if self.generation_tokens > 1 else "n/a tok/s"
        if self.draft_tokens:
            gen_tps += f", {self.accepted_tokens} of {self.draft_tokens} drafted tokens taken"
        return (
            f"prompt: {self.prompt_tokens} tokens{cached}, {prompt_tps}; "
            f"generation: {self.generation_tokens} tokens, {gen_tps}; "
            f"time to first token {self.time_to_first_token:.3f} s{mem}"
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its text (`Tokenizer.decode` of it alone, special tokens included) and its
    log-probability under the model's distribution."""

    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities at one generated position: the chosen token's and the ``k`` most
    likely tokens' (most likely first), from the model's logits before any logits processor,
    temperature or filter (as OpenAI and vLLM report them): ``log_softmax(logits)``."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Chunk:
    """One piece of a stream: new text, the token that produced it, and, on the last chunk,
    why generation ended (``"stop"``, ``"length"`` or ``"context"``) and the stats.

    ``logprobs`` (with ``logprobs=k``): the log-probabilities of ``token``, when it is part
    of the output (not on a final chunk whose token is an end-of-generation token)."""

    text: str
    token: int | None
    finish_reason: str | None = None
    stats: Stats | None = None
    logprobs: Logprobs | None = None


@dataclass
class Result:
    """A whole generation; ``logprobs`` (with ``logprobs=k``) has one entry per token of
    ``tokens``."""

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    stats: Stats = field(default_factory=Stats)
    logprobs: list[Logprobs] | None = None


def peak_rss() -> int | None:
    """Peak resident set size of this process in bytes (None where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except Exception:  # noqa: BLE001 - best effort only
            return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def generate_tokens(
    session: Session,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    *,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    stats: Stats | None = None,
    cached: int = 0,
    cached_logits: np.ndarray | None = None,
    step: Step | None = None,
    logprobs: int | None = None,
    constraint: Constraint | None = None,
    drafter: Drafter | None = None,
) -> Iterator[tuple[int, str | None, tuple[float, np.ndarray, np.ndarray] | None]]:
    """Prefill ``prompt_ids`` and yield ``(token, finish_reason, logprobs)`` triples.

    ``cached``: the session already holds the first ``cached`` prompt ids (its position);
    only the rest is prefilled.  All of them may be cached when ``cached_logits`` gives the
    logits after the last one (kept from the prefill that computed it).

    ``step``: how a sampled token is fed to the session (default ``session.step_async``);
    a batch gives its own (`StepBatch.join`).

    ``logprobs=k``: each triple's third item is `token_logprobs` of the token (its
    log-probability, the top ``k`` ids and theirs); None without it.  ``constraint``: the
    grammar the sampler masks with (`Sampler(params, mask=constraint.mask)`); each output
    token is consumed by it.

    ``drafter``: speculative decoding (`phimlx.speculative`): a sampled token is fed together
    with the drafts of the tokens after it, in one pass that gives the logits after each;
    a draft the sampler then picks costs no forward pass, and the first one it does not
    pick is trimmed from the cache with those after it.  Not with a batch's ``step``.

    ``finish_reason`` is None while generation goes on; the triple that ends it carries
    ``"stop"`` (the token is in ``stop_ids`` and is not part of the output), ``"done"`` (the
    constraint is complete after this token, which is part of the output), ``"length"``
    (``max_tokens`` reached) or ``"context"`` (the session is full).
    """
    stats = stats if stats is not None else Stats()
    whole = cached_logits is not None and cached == len(prompt_ids) > 0
    rest = prompt_ids[cached:]
    if not whole:  # an empty prompt or one too long: an error even if max_tokens=0
        check_fits(len(rest), session.position, session.max_context)
    if not (0 <= cached < len(prompt_ids) or whole) or session.position != cached:
        raise ValueError(
            f"cached={cached} must be below the prompt's {len(prompt_ids)} tokens (or all of "
            f"them, with their logits) and equal the session's position {session.position}"
        )
    if max_tokens <= 0:
        return
    step = step or session.step_async
    t0 = time.perf_counter()
    logits = cached_logits if whole else session.prefill(rest)
    t1 = time.perf_counter()
    stats.prompt_tokens, stats.prompt_seconds = len(prompt_ids), t1 - t0
    stats.cached_tokens = cached
    generated: list[int] = []
    pending: list[int] = []  # drafts in the cache past the last output token
    ahead: list[np.ndarray] = []  # the logits after each of them
    drafted = accepted = 0  # this round's

    def drop_pending() -> None:
        """Trim the drafts not taken from the cache (re-feeding what a wrapped sliding-
        window cache cannot keep)."""
        n = session.position - len(pending)
        held = session.tokens[:n]
        kept = session.trim(n)
        if kept < n:
            session.prefill(held[kept:])
        pending.clear()
        ahead.clear()

    try:
        while True:
            token = sampler(logits, generated)
            if not generated:
                stats.time_to_first_token = time.perf_counter() - t0
                t_first = time.perf_counter()
            if token in stop_ids:
                yield token, "stop", None
                break
            lp = token_logprobs(logits, token, logprobs) if logprobs is not None else None
            generated.append(token)
            stats.generation_tokens = len(generated)
            stats.generation_seconds = time.perf_counter() - t_first
            if constraint is not None:
                constraint.consume(token)  # the next mask is computed during the step
                if constraint.done:
                    yield token, "done", lp
                    break
            if len(generated) >= max_tokens:
                yield token, "length", lp
                break
            if pending and token == pending[0]:  # the draft was right: its logits are here
                pending.pop(0)
                logits = ahead.pop(0)
                accepted += 1
                stats.accepted_tokens += 1
                if not pending:
                    drafter.update(accepted, drafted)  # type: ignore[union-attr]
                yield token, None, lp
                continue
            if pending:
                drafter.update(accepted, drafted)  # type: ignore[union-attr]
                drop_pending()
            if session.position >= session.max_context:
                yield token, "context", lp
                break
            drafts: list[int] = []
            if drafter is not None:
                # drafts fed give the logits after them: the last token's are never used
                left = max_tokens - len(generated) - 1
                room = min(left, session.max_context - session.position - 1)
                drafts = drafter.propose([*prompt_ids, *generated], room)
            if drafts:
                t_pass = time.perf_counter()
                out = session.verify([token, *drafts])  # the logits T steps give
                drafter.observe(len(drafts) + 1, time.perf_counter() - t_pass)  # type: ignore[union-attr]
                pending[:], ahead[:] = drafts, list(out[1:])
                drafted, accepted = len(drafts), 0
                stats.draft_tokens += drafted
                yield token, None, lp
                logits = out[0]
                continue
            t_pass = time.perf_counter()
            handle = step(token)  # MLX computes it while the caller streams text
            t_sent = time.perf_counter()
            yield token, None, lp
            t_back = time.perf_counter()
            logits = handle.result()
            if drafter is not None:  # the pass's own time, not the caller's in between
                now = time.perf_counter()
                drafter.observe(1, (t_sent - t_pass) + (now - t_back))
    finally:
        if pending:
            drop_pending()
    stats.generation_seconds = time.perf_counter() - t_first


class _StopMatcher:
    """Holds back only the text that could still turn into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream(
    session: Session,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    decode: Callable[[Sequence[int]], str],
    *,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    stop_strings: Sequence[str] = (),
    cached: int = 0,
    cached_logits: np.ndarray | None = None,
    step: Step | None = None,
    logprobs: int | None = None,
    constraint: Constraint | None = None,
    token_text: Callable[[int], str] | None = None,
    drafter: Drafter | None = None,
) -> Iterator[Chunk]:
    """Yield `Chunk`s of text as tokens are generated; the last one has the finish reason
    and stats.  ``decode`` turns ids into text (the tokenizer's, without special tokens);
    ``token_text`` gives one token's text for `Logprobs` (default: ``decode``); the other
    arguments are `generate_tokens`'."""
    stats = Stats()
    token_text = token_text or (lambda t: decode([t]))

    def logprobs_of(token: int, lp: tuple[float, np.ndarray, np.ndarray] | None) -> Any:
        if lp is None:
            return None
        chosen, ids, lps = lp
        top = tuple(
            TokenLogprob(int(i), token_text(int(i)), float(v))
            for i, v in zip(ids, lps, strict=True)
        )
        return Logprobs(TokenLogprob(token, token_text(token), chosen), top)

    detok = StreamingDetokenizer(decode)
    stops = _StopMatcher(stop_strings)
    finish = "length"
    last: int | None = None
    carry = ""  # text of the token that ended generation, sent with the final chunk
    tokens = generate_tokens(
        session,
        prompt_ids,
        sampler,
        max_tokens=max_tokens,
        stop_ids=stop_ids,
        stats=stats,
        cached=cached,
        cached_logits=cached_logits,
        step=step,
        logprobs=logprobs,
        constraint=constraint,
        drafter=drafter,
    )
    final_lp = None  # the logprobs of the final chunk's token, when it is output
    for token, reason, lp in tokens:
        last = token
        if reason == "stop":
            finish = reason
            break
        last_lp = logprobs_of(token, lp)
        text, hit = stops.feed(detok.add(token))
        if hit:
            stats.peak_memory = peak_rss()
            yield Chunk(text, token, "stop", stats, last_lp)
            return
        if reason is not None:
            finish, carry, final_lp = ("stop" if reason == "done" else reason), text, last_lp
            break
        yield Chunk(text, token, logprobs=last_lp)  # every token reaches the caller
    tail, hit = stops.feed(detok.finalize())
    text = carry + tail
    if hit:
        finish = "stop"
    else:
        text += stops.flush()
    stats.peak_memory = peak_rss()
    yield Chunk(text, last, finish, stats, final_lp)


class _Waiting:
    """A token registered with a `StepBatch`: the handle its loop gets (`PendingLogits`)."""

    __slots__ = ("batch", "session", "token", "logits")

    def __init__(self, batch: StepBatch, session: Session, token: int) -> None:
        self.batch, self.session, self.token = batch, session, token
        self.logits: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self.logits is None:
            self.batch.run()
        if self.logits is None:
            raise RuntimeError("this batched step was withdrawn, or its batch failed")
        return self.logits


class StepBatch:
    """Decode loops of several sessions of one model, stepped together.

    Each loop's ``step(token)`` (from `join`) only registers the token; the first loop
    that asks for its logits runs every registered token as one batched forward pass
    (``step_batch(sessions, tokens) -> logits [B, vocab]``) and the others find theirs
    computed.  Advanced round-robin (`run_together`), every loop still going registers once
    per round, so each pass steps all of them, and the batch shrinks as loops finish.
    """

    def __init__(self, step_batch: Callable[[list[Session], list[int]], np.ndarray]) -> None:
        self._step_batch = step_batch
        self._waiting: list[_Waiting] = []

    def join(self, session: Session) -> Step:
        """The ``step`` for `generate_tokens` of ``session``'s loop."""

        def step(token: int) -> PendingLogits:
            waiting = _Waiting(self, session, token)
            self._waiting.append(waiting)
            return waiting

        return step

    def leave(self, session: Session) -> None:
        """Withdraw ``session``'s registered token, if any: its loop ended (a stop string
        after the step was registered) and the session may be handed on."""
        self._waiting = [w for w in self._waiting if w.session is not session]

    def run(self) -> None:
        """Run every registered token as one forward pass (nothing when none waits)."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        logits = self._step_batch([w.session for w in waiting], [w.token for w in waiting])
        for w, row in zip(waiting, logits, strict=True):
            w.logits = row


def run_together(streams: Sequence[Iterator[Chunk]]) -> list[list[Chunk]]:
    """Advance ``streams`` (each one sequence's `stream`, stepping through one `StepBatch`)
    round-robin to their ends; returns each one's chunks.

    A stream is drained as soon as its last chunk (the one with a finish reason) arrives,
    so its cleanup (withdrawing a step it registered, handing its session back) runs
    before the next batched pass; on an error every stream is closed."""
    chunks: list[list[Chunk]] = [[] for _ in streams]
    going = list(range(len(streams)))
    try:
        while going:
            still = []
            for i in going:
                chunk = next(streams[i], None)
                if chunk is None:
                    continue
                chunks[i].append(chunk)
                if chunk.finish_reason is None:
                    still.append(i)
                else:
                    chunks[i].extend(streams[i])  # nothing more: runs the stream's cleanup
            going = still
    finally:
        for s in streams:
            close = getattr(s, "close", None)
            if close is not None:
                close()
    return chunks
