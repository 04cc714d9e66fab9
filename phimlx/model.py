"""`Model`: a loaded GGUF model with its tokenizer, chat template and backend."""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .chat import render_chat
from .config import ModelConfig
from .constrain import Constraint
from .generate import Chunk, Logprobs, Result, StepBatch, run_together, stream
from .gguf import ModelFile, open_gguf
from .prompt_cache import PromptCache, ReplyIds
from .sampling import LogitsProcessor, Sampler, SamplingParams
from .scoring import Score
from .session import Session, prefill_batch, step_batch
from .speculative import Drafter
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

_OVERFLOW_POLICIES = ("drop_oldest", "error")
# Prompt-cache budget: KV bytes kept across calls (the most recent session always stays).
DEFAULT_CACHE_BYTES = 2 << 30

# `Model.warm_up`'s prompts: a short one (the NumPy backend's int8 kernels take it; two of
# them share a pass) and a longer one (past the 32 rows after which, on CPUs with AVX-512,
# Q4_0 / Q4_1 / Q8_0 prompts leave the int8 kernels for float tiles and BLAS).
WARM_UP_SHORT = 12
WARM_UP_LONG = 48

Messages = Sequence[Mapping[str, str]]
Prompt = str | Messages | Sequence[int]


@dataclass(frozen=True)
class _Call:
    """A `stream` call, validated: what `Model._stream` runs."""

    ids: list[int]
    dropped: int  # messages left out to fit the context
    params: SamplingParams
    stops: list[str]
    stop_ids: frozenset[int]
    max_tokens: int
    context: int
    cache: bool
    logprobs: int | None = None
    constraint: Constraint | None = None
    draft: str | Model | None = None
    num_draft_tokens: int = 8


class Model:
    """A model ready to generate.  Use `phimlx.load` to get one.

    Threads: a `Model` may be shared between threads.  Each call generates in its own
    session; forward passes take turns under one lock (each already uses every core); the
    prompt cache lends a kept session to one call at a time.  A `Session` itself is for one
    thread at a time.

    Attributes:
        config: the model's shape (`ModelConfig`).
        backend: ``"numpy"`` or ``"mlx"``.
        backend_reason: why that backend was chosen.
        tokenizer: the model's `Tokenizer`.
        path: the GGUF file.
    """

    def __init__(
        self,
        mf: ModelFile,
        loaded: backends.LoadedModel,
        tokenizer: Tokenizer,
        backend: str,
        backend_reason: str,
    ) -> None:
        self._file = mf
        self._loaded: backends.LoadedModel | None = loaded
        self.config: ModelConfig = loaded.config
        self.tokenizer = tokenizer
        self.backend = backend
        self.backend_reason = backend_reason
        self.path = mf.path
        self.chat_template: str | None = mf.metadata.get("tokenizer.chat_template")
        # Backends compute with all cores already; one forward pass at a time keeps two
        # threads streaming from one Model correct (each has its own session).
        self._lock = threading.Lock()
        c = self.config
        kv_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4  # K and V, float32
        self._prompt_cache = PromptCache(kv_bytes, DEFAULT_CACHE_BYTES)
        self._replies = ReplyIds()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self.path.name!r}, {c.architecture}, {c.n_layers} layers, "
            f"backend={self.backend!r})"
        )

    @property
    def _backend_model(self) -> backends.LoadedModel:
        if self._loaded is None:
            raise RuntimeError("this model has been closed; load it again")
        return self._loaded

    def new_session(self, max_context: int | None = None) -> Session:
        """A fresh incremental-decode session (its own KV cache).

        Args:
            max_context: positions to allow; default the model's context length.
        """
        backends.check_max_context(max_context, self.config)
        return Session(self._backend_model.new_session(max_context), self._lock)

    def step_batch(self, sessions: Sequence[Session], token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids[b]`` to ``sessions[b]`` for each b, in one forward pass: the
        weights are applied once to all B tokens, each attends over its own session's cache
        (sessions of different lengths are fine).  Row b equals what
        ``sessions[b].step(token_ids[b])`` returns, to float rounding; one session is `step`.

        Args:
            sessions: distinct sessions of this model (`new_session`).
            token_ids: one id per session.

        Returns:
            float32 logits of shape ``(len(sessions), vocab)``.

        Raises:
            ContextLengthError: a session is full.
            ValueError: no sessions, not one id per session, a session given twice or not
                of this model, an id outside the vocabulary.  Nothing has changed then.
            TypeError: something that is not a `Session`.
        """
        return step_batch(self._backend_model, self._lock, sessions, token_ids)

    def prefill_batch(
        self, sessions: Sequence[Session], token_lists: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """Prefill ``token_lists[b]`` into ``sessions[b]`` for each b: on the NumPy backend
        the lists its int8 kernels take (up to 32 tokens on CPUs with AVX-512, 128 for
        K-quants; up to 256 on CPUs without it) in one forward pass, each weight
        block read once for all their rows, each list attending over its own session's
        cache; longer ones (and every list on MLX) one after another.  Row b equals what
        ``sessions[b].prefill(token_lists[b])`` returns, bit for bit on the NumPy backend.

        Args:
            sessions: distinct sessions of this model (`new_session`).
            token_lists: one non-empty list of ids per session.

        Returns:
            float32 logits of shape ``(len(sessions), vocab)``: each after its list's last id.

        Raises:
            ContextLengthError: a list does not fit in what is left of its session.
            ValueError: no sessions, not one list per session, an empty list, a session given
                twice or not of this model, an id outside the vocabulary.  Nothing has
                changed then.
            TypeError: something that is not a `Session`.
        """
        return prefill_batch(self._backend_model, self._lock, sessions, token_lists)

    def warm_up(self) -> float:
        """Run each kind of forward pass generation uses once, on two scratch sessions, so
        that the first requests do not wait while the backend readies its kernels (the
        NumPy backend's numba kernels load from their disk cache on first use, about a
        second in all; the very first run on a machine compiles them).  A server does this
        before it takes requests, as llama.cpp's does.

        The passes: a batched prefill of two short prompts, a longer prefill after one of
        them, a step, and a batched step of both (`prefill_batch`, `Session.prefill`,
        `Session.step`, `step_batch`), then the backend's own warm-up where it has one (the
        NumPy backend's calls each compiled kernel, those of long caches and big batches
        too).  Before them a short prompt is encoded (through the chat template where the
        model has one) and decoded: the tokenizer builds its BPE of the whole vocabulary on
        first use (0.3 s for SmolLM2's 49k tokens).  The prompt cache and every other
        session are left as they were.

        Returns:
            The seconds it took.
        """
        t0 = time.perf_counter()
        chat = (self.chat_template or self.config.arch.chat_template) is not None
        self.tokenizer.decode(self.encode_prompt("Hello", chat=chat))
        c = self.config
        short = max(2, min(WARM_UP_SHORT, (c.context_length - 2) // 4))
        long = max(1, min(WARM_UP_LONG, c.context_length - short - 2))
        ids = [1 + i % (c.vocab_size - 1) for i in range(short + long)]
        a, b = self.new_session(short + long + 1), self.new_session(short + 1)
        self.prefill_batch([a, b], [ids[:short], ids[: short - 1]])
        a.prefill(ids[short:])
        b.step(ids[0])
        self.step_batch([a, b], [ids[1], ids[2]])
        backend_warm_up = getattr(self._backend_model, "warm_up", None)
        if backend_warm_up is not None:  # what these passes did not reach (the NumPy
            backend_warm_up()  # backend's kernels for long caches and big batches)
        return time.perf_counter() - t0

    # -- prompts ---------------------------------------------------------------------------

    def render(self, prompt: Prompt, *, chat: bool = True, system: str | None = None) -> str:
        """The text the model sees for ``prompt`` (chat template applied unless ``chat=False``)."""
        if not isinstance(prompt, (str, Sequence)) or isinstance(prompt, bytes):
            raise TypeError(
                "prompt must be a string or a list of {'role': ..., 'content': ...} messages, "
                f"not {type(prompt).__name__}"
            )
        if isinstance(prompt, str):
            if not chat:
                return prompt
            messages: list[Mapping[str, str]] = []
            if system is not None:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": prompt})
        else:
            messages = list(prompt)
        tok = self.tokenizer
        template = self.chat_template
        if template is None:
            template = self.config.arch.chat_template
        if template is None:
            log.warning(
                "%s has no chat template; using the messages as a raw prompt", self.path.name
            )
            return "\n".join(m["content"] for m in messages)
        return render_chat(
            messages,
            template=template,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            add_generation_prompt=True,
        )

    def encode_prompt(
        self, prompt: Prompt, *, chat: bool = True, system: str | None = None
    ) -> list[int]:
        """Token ids of ``prompt`` as `stream` feeds them (no doubled BOS); a list of ids is
        used as it is.

        An assistant message whose text is a reply this model generated recently is
        encoded with the ids it was generated as, not re-tokenized (which can give other
        ids), so a conversation fed back continues the cached session."""
        if _is_ids(prompt):
            return [int(t) for t in prompt]  # type: ignore[union-attr]
        text = self.render(prompt, chat=chat, system=system)
        if not (chat or not isinstance(prompt, str)):
            return self.tokenizer.encode(text)
        if not isinstance(prompt, str):
            spliced = self._encode_with_replies(list(prompt), text)
            if spliced is not None:
                return spliced
        return self.tokenizer.encode_chat(text)  # no second BOS after the template's

    def _encode_with_replies(
        self, messages: list[Mapping[str, str]], text: str
    ) -> list[int] | None:
        """`encode_prompt` of ``messages`` (rendered: ``text``) with the generated ids of
        its recent replies spliced in; None when there are none, or when the template does
        not render each reply's text as it is, cut off from its neighbours (a special token
        on each side), so that splicing changes nothing but the reply's own ids."""
        generated: dict[str, tuple[int, ...]] = {}  # mark -> the reply's generated ids
        original: dict[str, str] = {}  # mark -> the reply's text
        marked = []
        for m in messages:
            content = m.get("content", "")
            ids = self._replies.get(content) if m.get("role") == "assistant" else None
            if ids is None:
                marked.append(m)
                continue
            mark = f"\ue000{len(generated)}\ue001"  # private-use characters
            generated[mark], original[mark] = ids, content
            marked.append({**m, "content": mark})
        if not generated:
            return None
        try:
            rendered = self.render(marked)
        except Exception:  # noqa: BLE001 - a template that chokes on the marks: no splicing
            return None
        parts = re.split("(\ue000\\d+\ue001)", rendered)  # text, mark, text, ..., mark, text
        if sorted(parts[1::2]) != sorted(generated):  # each reply rendered exactly once
            return None
        if "".join(original.get(p, p) if i % 2 else p for i, p in enumerate(parts)) != text:
            return None  # the template changed the text (stripped it, escaped it, ...)
        tok = self.tokenizer
        spliced = tok.encode_chat(parts[0])
        plain = list(spliced)
        for mark, after in zip(parts[1::2], parts[2::2], strict=True):
            rest = tok.encode(after, add_bos=False) if after else []
            spliced += [*generated[mark], *rest]
            plain += [*tok.encode(original[mark], add_bos=False), *rest]
        # The pieces encoded apart must give the whole prompt's ids, or a cut fell inside a
        # text run and the spliced prompt would differ from the plain one around the reply.
        return spliced if plain == tok.encode_chat(text) else None

    # -- generation ------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float = 1.1,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = True,
        system: str | None = None,
        max_context: int | None = None,
        cache: bool = True,
        context_overflow: str = "drop_oldest",
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        logprobs: int | None = None,
        json_schema: Mapping[str, Any] | str | bool | None = None,
        regex: str | None = None,
        grammar: str | None = None,
        draft: str | Model | None = None,
        num_draft_tokens: int | None = None,
    ) -> Iterator[Chunk]:
        """Generate text for ``prompt``, chunk by chunk.

        Args:
            prompt: a user message (the chat template is applied; ``chat=False`` sends the
                text raw), a list of ``{"role", "content"}`` messages, or a list of token
                ids (fed as they are).
            max_tokens: stop after this many generated tokens (finish reason ``"length"``).
            temperature: 0 is greedy; higher is more random.
            top_k, top_p, min_p: filters (None = off); see `phimlx.sampling`.
            repeat_penalty: > 1 discourages the last ``repeat_last_n`` generated tokens.
            seed: fixes the random draws (same seed, prompt and settings: same text).
            stop: strings that end generation (not included in the output).
            chat: apply the chat template to a string prompt.
            system: a system message for a string prompt.
            max_context: context for this call (default: the model's).
            cache: continue the kept session that shares the longest prefix with this
                prompt (only the rest is prefilled; ``stats.cached_tokens`` says how much
                was reused) and keep this call's session for the next one.  The output is
                a fresh prefill's to float rounding; with int8 activations (the NumPy
                backend's default) a cached reply holds its decode-time values, which can
                move a near-tie.  The same call again reproduces its output.
            context_overflow: a list of messages too long for the context (with room for
                ``max_tokens``, or a quarter of the context if less): ``"drop_oldest"``
                leaves out the oldest turns after the system messages, keeping the last
                message (``stats.dropped_messages`` counts them); ``"error"`` raises.
            ignore_eos: go on past the end-of-generation tokens (benchmarks: a fixed
                number of tokens).
            presence_penalty, frequency_penalty: OpenAI's penalties over the tokens
                generated so far (``logit -= frequency * count + presence * (count > 0)``).
            logit_bias: token id -> value added to its logit (``-inf`` bans it).
            logits_processors: functions ``f(generated_ids, logits) -> logits`` applied
                after the penalties, before the temperature (see `phimlx.sampling`).
            logprobs: give each chunk `Logprobs`: the chosen token's log-probability and
                the ``logprobs`` most likely tokens' (0: the chosen one's only), under the
                model's own distribution (before processors, temperature and filters).
            json_schema: constrain the output to JSON valid for this schema (a dict or
                JSON text; ``True``: any JSON object), enforced token by token by
                llguidance; generation ends when the JSON is complete.
            regex: constrain the output to match this regular expression.
            grammar: constrain the output to a grammar, Lark (llguidance's dialect) or
                llama.cpp GBNF.
            draft: speculative decoding: ``"lookup"`` drafts the next tokens by n-gram
                lookup in the prompt and the output so far (fast where the output copies
                the input); a loaded `Model` with the same vocabulary drafts them greedily.
                The model checks the drafts in one forward pass; the output is exactly
                what it is without ``draft`` (same seed, same text).  ``stats`` counts
                ``draft_tokens`` and ``accepted_tokens``.
            num_draft_tokens: the longest draft (default 8 for lookup, 4 for a model); the
                length adapts to how many drafts are taken.

        Yields:
            `Chunk`s; the last has ``finish_reason`` (``"stop"``, ``"length"``,
            ``"context"``) and ``stats``.

        Raises:
            ContextLengthError: the prompt does not fit in the context.
            ConstraintError: an invalid ``json_schema``, ``regex`` or ``grammar`` (before
                any compute), or llguidance is not installed.
            ValueError: an invalid parameter (named in the message).
        """
        return self._stream(
            self._prepare(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n,
                seed=seed,
                stop=stop,
                chat=chat,
                system=system,
                max_context=max_context,
                cache=cache,
                context_overflow=context_overflow,
                ignore_eos=ignore_eos,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                logit_bias=logit_bias,
                logits_processors=logits_processors,
                logprobs=logprobs,
                json_schema=json_schema,
                regex=regex,
                grammar=grammar,
                draft=draft,
                num_draft_tokens=num_draft_tokens,
            )
        )

    def _prepare(
        self,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None,
        repeat_penalty: float,
        repeat_last_n: int,
        seed: int | None,
        stop: str | Sequence[str] | None,
        chat: bool,
        system: str | None,
        max_context: int | None,
        cache: bool,
        context_overflow: str,
        ignore_eos: bool,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        logprobs: int | None = None,
        json_schema: Mapping[str, Any] | str | bool | None = None,
        regex: str | None = None,
        grammar: str | None = None,
        draft: str | Model | None = None,
        num_draft_tokens: int | None = None,
    ) -> _Call:
        """`stream`'s arguments checked and its prompt encoded (its defaults are `stream`'s)."""
        params = SamplingParams(
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n,
            seed,
            presence_penalty,
            frequency_penalty,
            dict(logit_bias) if logit_bias else None,
            tuple(logits_processors or ()),
        )
        vocab = self.config.vocab_size
        if params.logit_bias and not all(0 <= k < vocab for k in params.logit_bias):
            bad = next(k for k in params.logit_bias if not 0 <= k < vocab)
            raise ValueError(
                f"logit_bias={logit_bias!r} is invalid: token {bad} is outside the "
                f"vocabulary of {vocab} tokens"
            )
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0
        ):
            raise ValueError(
                f"logprobs={logprobs!r} is invalid: give the number of top tokens to report "
                "(0: only the chosen token's), or None"
            )
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be an integer >= 0")
        if context_overflow not in _OVERFLOW_POLICIES:
            raise ValueError(
                f"context_overflow={context_overflow!r} is invalid: use one of "
                f"{', '.join(map(repr, _OVERFLOW_POLICIES))}"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        backends.check_max_context(max_context, self.config)
        context = max_context or self.config.context_length
        ids, dropped = self._fit_prompt(prompt, chat, system, context, max_tokens, context_overflow)
        self._backend_model  # noqa: B018 - a closed model fails here, not at the first chunk
        # a prompt that cannot fit fails here, at the call, not at the first chunk
        backends.check_fits(len(ids), 0, context, self.config.context_length)
        stop_ids = frozenset() if ignore_eos else self.tokenizer.stop_ids
        if draft is not None and draft != "lookup":
            self._check_draft_model(draft)
        if num_draft_tokens is None:
            num_draft_tokens = 8 if draft == "lookup" else 4
        if (
            isinstance(num_draft_tokens, bool)
            or not isinstance(num_draft_tokens, int)
            or num_draft_tokens < 1
        ):
            raise ValueError(
                f"num_draft_tokens={num_draft_tokens!r} is invalid: must be an integer >= 1"
            )
        constraint = Constraint.create(
            self.tokenizer, vocab, json_schema=json_schema, regex=regex, grammar=grammar
        )
        return _Call(
            ids, dropped, params, stops, stop_ids, max_tokens, context, cache,
            logprobs, constraint, draft, num_draft_tokens,
        )  # fmt: skip

    def _check_draft_model(self, draft: object) -> None:
        """A draft model must be a loaded `Model` other than this one, with this vocabulary."""
        if not isinstance(draft, Model):
            raise ValueError(f"draft={draft!r} is invalid: give 'lookup' or a loaded phimlx Model")
        if draft is self:
            raise ValueError("draft is this model itself: give a smaller model, or 'lookup'")
        mine, theirs = self.tokenizer, draft.tokenizer
        same = mine.vocab_size == theirs.vocab_size and all(
            mine.token_bytes(i) == theirs.token_bytes(i) for i in range(mine.vocab_size)
        )
        if not same or draft.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"draft model {draft.path.name} has another vocabulary than {self.path.name} "
                f"({theirs.vocab_size} against {mine.vocab_size} tokens, or other tokens): "
                "drafts must use the same token ids"
            )

    def _stream(self, call: _Call, batch: StepBatch | None = None) -> Iterator[Chunk]:
        """`stream` after validation: take (or open) a session, generate, keep it.  With
        ``batch``, decode steps go through it (`batch_generate`)."""
        ids, cache, stop_ids = call.ids, call.cache, call.stop_ids
        if batch is not None and call.draft is not None:
            raise ValueError("draft (speculative decoding) does not combine with a batch")
        session, shared = self._prompt_cache.take(ids, call.context) if cache else (None, 0)
        if session is None:
            session = self.new_session(call.context)
        # Continue from the shared prefix.  Generation starts from the logits after the
        # prompt's last id: kept if a prefill ended exactly there (the same prompt again),
        # else that id is fed again.
        kept = session.logits_at(len(ids)) if shared == len(ids) else None
        if kept is not None:
            cached = session.trim(len(ids))
            kept = kept if cached == len(ids) else None
        else:
            cached = session.trim(min(shared, len(ids) - 1)) if session.position else 0
        tok = self.tokenizer
        generated: list[int] = []
        text: list[str] = []
        drafter = self._drafter(call)
        chunks = None
        try:
            constraint = call.constraint
            chunks = stream(
                session,
                ids,
                Sampler(call.params, constraint.mask if constraint is not None else None),
                lambda t: tok.decode(t, skip_special=True),
                max_tokens=call.max_tokens,
                stop_ids=stop_ids,
                stop_strings=call.stops,
                cached=cached,
                cached_logits=kept,
                step=batch.join(session) if batch is not None else None,
                logprobs=call.logprobs,
                constraint=constraint,
                token_text=lambda t: tok.decode([t]),
                drafter=drafter,
            )
            for chunk in chunks:
                if chunk.token is not None and chunk.token not in stop_ids:
                    generated.append(chunk.token)
                text.append(chunk.text)
                if chunk.stats is not None:
                    chunk.stats.dropped_messages = call.dropped
                yield chunk
            reply = "".join(text)
            if tok.decode(generated, skip_special=True) == reply:  # not cut by a stop string
                self._replies.remember(reply, generated)
        finally:
            if chunks is not None:
                chunks.close()  # its own cleanup (drafts trimmed) before the session moves
            if drafter is not None:
                drafter.close()
            if batch is not None:  # before the session is handed on
                batch.leave(session)
            if cache:
                self._prompt_cache.put(session)

    def _drafter(self, call: _Call) -> Drafter | None:
        """The speculative-decoding drafter a call asks for."""
        from .speculative import Drafter, DraftModel, PromptLookup

        if call.draft is None:
            return None
        if call.draft == "lookup":
            return Drafter(PromptLookup(), call.num_draft_tokens)
        assert isinstance(call.draft, Model)
        return Drafter(DraftModel(call.draft, call.context), call.num_draft_tokens)

    def _fit_prompt(
        self,
        prompt: Prompt,
        chat: bool,
        system: str | None,
        context: int,
        max_tokens: int,
        policy: str,
    ) -> tuple[list[int], int]:
        """The prompt's ids, with the oldest turns left out while it does not fit (the
        ``"drop_oldest"`` policy, message lists only); and how many messages were left out."""
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        if isinstance(prompt, str) or _is_ids(prompt) or policy == "error":
            return ids, 0
        room = min(max_tokens, context // 4)
        messages = list(prompt)
        dropped = 0
        while len(ids) + room > context:
            first = next(
                (i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages)
            )
            if first >= len(messages) - 1:  # only system messages and the last one are left
                break
            del messages[first]
            dropped += 1
            while first < len(messages) - 1 and messages[first].get("role") != "user":
                del messages[first]  # a turn starts with the user's message
                dropped += 1
            ids = self.encode_prompt(messages, chat=chat, system=system)
        if dropped:
            log.info("left out the %d oldest messages to fit the context of %d", dropped, context)
        return ids, dropped

    def save_prompt_cache(
        self,
        path: str | os.PathLike[str],
        prompt: Prompt,
        *,
        chat: bool = True,
        system: str | None = None,
        max_context: int | None = None,
    ) -> int:
        """Prefill ``prompt`` (a long system prompt, a document) and save its KV cache to
        ``path``, a safetensors file that `load_prompt_cache` reads back, so a later process
        starts from it instead of prefilling again.  The prompt is encoded as `stream`
        encodes it; a chat prompt ends with the assistant's header, so save the part that
        later prompts share (``chat=False`` and a plain text or ids keep it open-ended).

        Returns:
            The number of tokens saved.

        Raises:
            ContextLengthError: the prompt does not fit in the context.
            PromptCacheError: the cache cannot be saved (a sliding-window MLX cache that
                has wrapped).
        """
        from . import cache_file

        backends.check_max_context(max_context, self.config)
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        context = max_context or self.config.context_length
        session, shared = self._prompt_cache.take(ids, context)
        if session is None:
            session = self.new_session(context)
        try:
            session.trim(min(shared, len(ids)))
            if session.position < len(ids):
                session.prefill(ids[session.position :])
            cache_file.save(path, session, self)
        finally:
            self._prompt_cache.put(session)
        return len(ids)

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> int:
        """Read a cache written by `save_prompt_cache` (for this model file and backend)
        into the prompt cache: a later call whose prompt starts with the saved ids prefills
        only the rest.

        Returns:
            The number of tokens loaded.

        Raises:
            PromptCacheError: the file is missing, damaged, or made for another model,
                backend or KV type.
        """
        from . import cache_file

        session = cache_file.load(path, self)
        self._prompt_cache.put(session)
        return session.position

    def clear_cache(self) -> None:
        """Forget the sessions kept for prefix reuse (and the memory they hold)."""
        self._prompt_cache.clear()

    def generate(self, prompt: Prompt, **kwargs: Any) -> Result:
        """Generate to the end and return the whole `Result` (same arguments as `stream`)."""
        return self._result(self.stream(prompt, **kwargs), kwargs.get("logprobs") is not None)

    def batch_generate(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Result]:
        """Generate for several prompts at once: each is prefilled on its own, then all are
        decoded together, one batched forward pass (`step_batch`) per token over the
        sequences still going; a sequence that finishes (its own stop token, stop string,
        ``max_tokens`` or context) leaves the batch.

        Each sequence runs `generate`'s own loop, so its `Result` is what
        ``generate(prompt, **kwargs)`` returns for that prompt alone, up to the float
        rounding of the batched logits (greedy text is the same but for near-ties).  With
        ``seed``, every sequence draws from its own generator seeded with it, as each
        ``generate(prompt, seed=seed)`` call does.  ``cache`` works as in `stream`: each
        sequence may continue a kept session (not one another sequence of the batch holds)
        and is kept afterwards.  Stats time each sequence's own prefill; its generation
        time is the batch's.

        Args:
            prompts: a list of prompts, each as `stream` takes one (text, messages, ids).
            **kwargs: `stream`'s keyword arguments, applied to every prompt.

        Returns:
            One `Result` per prompt, in order.

        Raises:
            ContextLengthError: a prompt does not fit in the context (before anything runs).
            ValueError: an invalid parameter (named in the message).
            TypeError: ``prompts`` is one prompt rather than a list of them, or an unknown
                keyword.
        """
        if isinstance(prompts, (str, bytes)) or _is_ids(prompts):
            raise TypeError(
                "prompts must be a list of prompts; for one prompt use generate(), or "
                "batch_generate([prompt])"
            )
        bind = inspect.signature(self.stream).bind
        calls = []
        for prompt in prompts:  # every prompt checked before anything runs
            args = bind(prompt, **kwargs)
            args.apply_defaults()
            call = self._prepare(**args.arguments)
            backends.check_fits(len(call.ids), 0, call.context, self.config.context_length)
            calls.append(call)
        batch = StepBatch(self.step_batch)
        chunks = run_together([self._stream(call, batch) for call in calls])
        return [
            self._result(c, call.logprobs is not None)
            for c, call in zip(chunks, calls, strict=True)
        ]

    def _result(self, chunks: Iterable[Chunk], with_logprobs: bool = False) -> Result:
        """A stream's chunks joined into its `Result`."""
        parts: list[str] = []
        tokens: list[int] = []
        logprobs: list[Logprobs] = []
        last: Chunk | None = None
        for chunk in chunks:
            parts.append(chunk.text)
            if chunk.token is not None and chunk.finish_reason != "stop":
                tokens.append(chunk.token)
            if chunk.logprobs is not None:
                logprobs.append(chunk.logprobs)
            last = chunk
        assert last is not None and last.stats is not None
        if (
            last.finish_reason == "stop"
            and last.token is not None
            and last.token not in self.tokenizer.stop_ids
        ):
            tokens.append(last.token)  # stopped by a stop string: the token was generated
        result = Result("".join(parts), tokens, last.finish_reason or "stop", last.stats)
        if with_logprobs:
            result.logprobs = logprobs
        return result

    def score(self, text: str | Sequence[int], *, context: int | None = None) -> Score:
        """Log-probability of each token of ``text`` given the ones before it: one prefill
        returning every position's logits per window of ``context`` tokens (a text longer
        than that is scored in windows, as ``llama-perplexity`` does: see `phimlx.scoring`).

        Args:
            text: a plain text (encoded as it is, BOS first where the model adds one; no
                chat template) or a list of token ids.
            context: the window length (default: the model's context length).

        Returns:
            A `Score` (``logprobs``, ``positions``, ``nll``, ``perplexity``).

        Raises:
            ValueError: an empty text, or a bad ``context``.
        """
        from .scoring import score_ids

        ids = self.encode_prompt(text, chat=False) if isinstance(text, str) else list(text)
        if len(ids) < 2:
            raise ValueError(f"score needs at least 2 tokens; the text has {len(ids)}")
        backends.check_max_context(context, self.config)
        window = context or self.config.context_length
        if window < 2:
            raise ValueError(f"context={context!r} is invalid: give at least 2 tokens")
        score, _ = score_ids(ids, self._all_logits, context=window, bos=self.tokenizer.bos_id)
        return score

    def _all_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) of ``ids`` from a fresh session."""
        session = self.new_session(max(len(ids), 1))
        return session.prefill(ids, all_logits=True)

    def chat(self, messages: Messages, **kwargs: Any) -> Result:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the model's
        chat template; arguments as `stream`."""
        return self.generate(list(messages), **kwargs)

    def close(self) -> None:
        """Release the weights and the file mapping; the model is unusable afterwards."""
        self._prompt_cache.clear()
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    model: str | os.PathLike[str],
    *,
    filename: str | None = None,
    revision: str | None = None,
    backend: str = "auto",
    threads: int | None = None,
    tokenizer_repo: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    kv_cache_type: str | None = None,
) -> Model:
    """Load a model from a local path, a preset name, or a Hugging Face hub repo: a GGUF
    file, or a safetensors folder (mlx-lm's, affine-quantized; or a Hugging Face
    float16/bfloat16/float32 checkpoint) of a phi3 or llama model.

    Args:
        model: a ``.gguf`` path; a folder with ``config.json`` and ``*.safetensors``; a
            preset such as ``"phi-3-mini-4k-instruct"`` or ``"smollm2-135m-instruct"``; or a
            hub repo id such as ``"microsoft/Phi-3-mini-4k-instruct-gguf"`` (a repo without
            GGUF files is fetched as a safetensors snapshot).
        filename: the file in a hub repo (a glob such as ``"*q4*.gguf"`` is allowed).
        revision: a hub branch, tag or commit to pin.
        backend: ``"auto"`` (MLX on Apple Silicon, NumPy elsewhere; ``$PHIMLX_BACKEND``
            overrides), ``"mlx"`` or ``"numpy"``.
        threads: CPU threads for the NumPy backend (default: all physical cores).
        tokenizer_repo: use this hub repo's ``tokenizer.json`` instead of the GGUF's own.
        cache_dir: the hub cache directory (default: huggingface_hub's).
        local_files_only: never touch the network (like ``HF_HUB_OFFLINE=1``).
        kv_cache_type: how sessions store K and V: ``"f16"`` (the NumPy backend's default,
            as llama.cpp), ``"f32"``, or ``"q8_0"`` (int8 blocks of 32 with a float32 scale;
            NumPy backend only).  None: the backend's default (MLX: its compute dtype,
            the only type it accepts).

    Returns:
        A `Model`.

    Raises:
        GGUFError: the file is corrupt, truncated, or not a model phimlx can run.
        CheckpointError: a safetensors folder is corrupt, truncated, or disagrees with
            its config.json (`phimlx.formats`).
        UnsupportedModelError: unknown architecture or tensor type (a `GGUFError`; for a
            folder also a `CheckpointError`).
        ModelNotFoundError: the file is not local, not cached, and cannot be downloaded.
        BackendUnavailableError: the requested backend cannot run here.
        ValueError: a bad ``threads`` or ``kv_cache_type`` (the message lists the allowed
            values), or a ``kv_cache_type`` the backend does not support.
    """
    from .formats import Checkpoint, open_checkpoint
    from .hub import resolve_model

    backends.check_kv_cache_type(kv_cache_type)

    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(
            f"threads={threads!r} is invalid: give a positive integer, or None for all cores"
        )
    resolved = resolve_model(
        model,
        filename=filename,
        revision=revision,
        tokenizer_repo=tokenizer_repo,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    name, reason = backends.choose(backend)
    folder = Path(resolved.path).is_dir()  # an mlx-lm / Hugging Face safetensors folder
    mf = open_checkpoint(resolved.path) if folder else open_gguf(resolved.path)
    try:
        config = mf.config if isinstance(mf, Checkpoint) else ModelConfig.from_gguf(mf)
        if resolved.tokenizer_json is not None:
            tokenizer = Tokenizer.from_file(
                resolved.tokenizer_json, architecture=config.architecture, metadata=mf.metadata
            )
        elif isinstance(mf, Checkpoint):
            tokenizer = Tokenizer.from_folder(mf.path, architecture=config.architecture)
        else:
            tokenizer = Tokenizer.from_gguf(mf)
        loaded = backends.load_backend(
            name, mf, config, threads=threads, kv_cache_type=kv_cache_type
        )
    except BaseException:
        mf.close()
        raise
    log.info("loaded %s with backend %s (%s)", Path(resolved.path).name, name, reason)
    return Model(mf, loaded, tokenizer, name, reason)  # type: ignore[arg-type]


def _is_ids(prompt: object) -> bool:
    """True for a non-empty list (or tuple, array) of token ids."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 and prompt.dtype.kind in "iu" and prompt.size > 0
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
    )
