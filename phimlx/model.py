"""`Model`: a loaded GGUF model with its tokenizer, chat template and backend."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .chat import render_chat
from .config import ModelConfig
from .generate import Chunk, Result, stream
from .gguf import ModelFile, open_gguf
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]
Prompt = str | Messages


class Session:
    """The incremental-decode interface: one KV cache, NumPy logits on every backend.

    Obtain one with `Model.new_session`.  A session is used by one thread at a time; the
    model's lock serializes forward passes, so several sessions of one `Model` may run in
    different threads.  The generation loop drives the same class.
    """

    def __init__(self, inner: backends.Session, lock: threading.Lock) -> None:
        self._inner = inner
        self._lock = lock

    @property
    def position(self) -> int:
        """Tokens held in the cache."""
        return self._inner.position

    @property
    def max_context(self) -> int:
        """Positions this session can hold."""
        return self._inner.max_context

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt (batched); float32 logits [vocab] after its last token.

        Raises:
            ContextLengthError: the tokens do not fit in what is left of the context.
            ValueError: empty input or an id outside the vocabulary.
        """
        with self._lock:
            return np.asarray(self._inner.prefill(list(token_ids)), dtype=np.float32)

    def step(self, token_id: int) -> np.ndarray:
        """Append ``token_id``; float32 logits [vocab] for the next position.

        Raises:
            ContextLengthError: the session is full.
            ValueError: an id outside the vocabulary.
        """
        with self._lock:
            return np.asarray(self._inner.step(int(token_id)), dtype=np.float32)

    def step_async(self, token_id: int) -> backends.PendingLogits:
        """`step` that returns a handle at once; ``handle.result()`` gives the logits.  On
        MLX the step computes while the caller works (samples, streams text)."""
        with self._lock:  # the graph is built (rope, cache slots) under the lock
            return self._inner.step_async(int(token_id))

    def reset(self) -> None:
        """Forget everything (position 0)."""
        self._inner.reset()


class Model:
    """A model ready to generate.  Use `phimlx.load` to get one.

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

    # -- prompts ---------------------------------------------------------------------------

    def render(self, prompt: Prompt, *, chat: bool = True, system: str | None = None) -> str:
        """The text the model sees for ``prompt`` (chat template applied unless ``chat=False``)."""
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
        """Token ids of ``prompt`` as `stream` feeds them (no doubled BOS)."""
        text = self.render(prompt, chat=chat, system=system)
        if chat or not isinstance(prompt, str):
            return self.tokenizer.encode_chat(text)  # no second BOS after the template's
        return self.tokenizer.encode(text)

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
    ) -> Iterator[Chunk]:
        """Generate text for ``prompt``, chunk by chunk.

        Args:
            prompt: a user message (the chat template is applied; ``chat=False`` sends the
                text raw), or a list of ``{"role", "content"}`` messages.
            max_tokens: stop after this many generated tokens (finish reason ``"length"``).
            temperature: 0 is greedy; higher is more random.
            top_k, top_p, min_p: filters (None = off); see `phimlx.sampling`.
            repeat_penalty: > 1 discourages the last ``repeat_last_n`` generated tokens.
            seed: fixes the random draws (same seed, prompt and settings: same text).
            stop: strings that end generation (not included in the output).
            chat: apply the chat template to a string prompt.
            system: a system message for a string prompt.
            max_context: context for this call (default: the model's).

        Yields:
            `Chunk`s; the last has ``finish_reason`` (``"stop"``, ``"length"``,
            ``"context"``) and ``stats``.

        Raises:
            ContextLengthError: the prompt does not fit in the context.
            ValueError: an invalid sampling parameter (named in the message).
        """
        params = SamplingParams(
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed
        )
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be an integer >= 0")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        backends.check_max_context(max_context, self.config)
        session = Session(self._backend_model.new_session(max_context), self._lock)
        tok = self.tokenizer
        return stream(
            session,
            ids,
            Sampler(params),
            lambda t: tok.decode(t, skip_special=True),
            max_tokens=max_tokens,
            stop_ids=tok.stop_ids,
            stop_strings=stops,
        )

    def generate(self, prompt: Prompt, **kwargs: Any) -> Result:
        """Generate to the end and return the whole `Result` (same arguments as `stream`)."""
        parts: list[str] = []
        tokens: list[int] = []
        last: Chunk | None = None
        for chunk in self.stream(prompt, **kwargs):
            parts.append(chunk.text)
            if chunk.token is not None and chunk.finish_reason != "stop":
                tokens.append(chunk.token)
            last = chunk
        assert last is not None and last.stats is not None
        if (
            last.finish_reason == "stop"
            and last.token is not None
            and last.token not in self.tokenizer.stop_ids
        ):
            tokens.append(last.token)  # stopped by a stop string: the token was generated
        return Result("".join(parts), tokens, last.finish_reason or "stop", last.stats)

    def chat(self, messages: Messages, **kwargs: Any) -> Result:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the model's
        chat template; arguments as `stream`."""
        return self.generate(list(messages), **kwargs)

    def close(self) -> None:
        """Release the weights and the file mapping; the model is unusable afterwards."""
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
) -> Model:
    """Load a GGUF model from a local path, a preset name, or a Hugging Face hub repo.

    Args:
        model: a ``.gguf`` path; a preset such as ``"phi-3-mini-4k-instruct"`` or
            ``"smollm2-135m-instruct"``; or a hub repo id such as
            ``"microsoft/Phi-3-mini-4k-instruct-gguf"``.
        filename: the file in a hub repo (a glob such as ``"*q4*.gguf"`` is allowed).
        revision: a hub branch, tag or commit to pin.
        backend: ``"auto"`` (MLX on Apple Silicon, NumPy elsewhere; ``$PHIMLX_BACKEND``
            overrides), ``"mlx"`` or ``"numpy"``.
        threads: CPU threads for the NumPy backend (default: all physical cores).
        tokenizer_repo: use this hub repo's ``tokenizer.json`` instead of the GGUF's own.
        cache_dir: the hub cache directory (default: huggingface_hub's).
        local_files_only: never touch the network (like ``HF_HUB_OFFLINE=1``).

    Returns:
        A `Model`.

    Raises:
        GGUFError: the file is corrupt, truncated, or not a model phimlx can run.
        UnsupportedModelError: unknown architecture or tensor type (a `GGUFError`).
        ModelNotFoundError: the file is not local, not cached, and cannot be downloaded.
        BackendUnavailableError: the requested backend cannot run here.
    """
    from .hub import resolve_model

    resolved = resolve_model(
        model,
        filename=filename,
        revision=revision,
        tokenizer_repo=tokenizer_repo,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    name, reason = backends.choose(backend)
    mf = open_gguf(resolved.path)
    try:
        config = ModelConfig.from_gguf(mf)
        if resolved.tokenizer_json is not None:
            tokenizer = Tokenizer.from_file(
                resolved.tokenizer_json, architecture=config.architecture, metadata=mf.metadata
            )
        else:
            tokenizer = Tokenizer.from_gguf(mf)
        loaded = backends.load_backend(name, mf, config, threads=threads)
    except BaseException:
        mf.close()
        raise
    log.info("loaded %s with backend %s (%s)", Path(resolved.path).name, name, reason)
    return Model(mf, loaded, tokenizer, name, reason)
