"""Backend registry: the incremental-decode protocol, backends by name, and the auto choice.

A backend is a module with two functions:

    probe() -> str | None
        None when the backend can run here, else the reason it cannot (and how to fix it).
    load(mf: ModelFile, config: ModelConfig, *, threads: int | None) -> LoadedModel

Modules are imported only when a backend is probed or chosen, so `import phimlx` never
imports mlx or numba.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .config import ModelConfig
from .errors import BackendUnavailableError, ContextLengthError
from .gguf import ModelFile


class PendingLogits(Protocol):
    """Logits of a step that may still be computing; `result` waits for them."""

    def result(self) -> np.ndarray:
        """float32 logits [vocab] (a NumPy array, whatever the backend computes with)."""
        ...


class Finished:
    """A `PendingLogits` whose logits are already computed (backends that compute eagerly)."""

    __slots__ = ("_logits",)

    def __init__(self, logits: np.ndarray) -> None:
        self._logits = logits

    def result(self) -> np.ndarray:
        return self._logits


@runtime_checkable
class Session(Protocol):
    """One conversation's state: a KV cache of at most ``max_context`` positions.

    Every method that appends tokens validates them first (`checked_tokens`), so a bad id
    or a full context is an error before anything is computed or cached.
    """

    max_context: int
    kv_cache_type: str  # how K and V are stored: one of KV_CACHE_TYPES

    @property
    def position(self) -> int:
        """Tokens held in the cache."""
        ...

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run ``token_ids`` (batched, not one by one); float32 logits [vocab] of the last,
        or with ``all_logits`` float32 [T, vocab] of every one (row i: the logits after
        ``token_ids[i]``, for scoring a text or checking drafted tokens)."""
        ...

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; float32 logits [vocab] for the next position."""
        ...

    def step_async(self, token_id: int) -> PendingLogits:
        """`step`, returning before the logits are needed: a backend that computes lazily
        (MLX) overlaps the next step with the caller's work (sampling, detokenizing);
        an eager one returns a `Finished` handle."""
        ...

    def trim(self, n: int) -> int:
        """Forget positions ``n`` and later (``0 <= n <= position``), so the session can
        continue from a shared prefix; returns the position afterwards: ``n``, or 0 where
        the cache cannot go back that far (a sliding-window cache that has already
        overwritten the positions before ``n``), in which case it was emptied."""
        ...

    def kv_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of K (after rope) and V of the positions held, each of shape
        ``(n_layers, n_kv_heads, position, head_dim)``: float32 on the NumPy backend
        (whatever its ``kv_cache_type``), the compute dtype on MLX.

        Raises:
            ValueError: the cache no longer holds every position from 0 (a sliding-window
                cache that has wrapped).
        """
        ...

    def load_kv_state(self, k: np.ndarray, v: np.ndarray) -> None:
        """Replace the cache with these positions (as `kv_state` returns them); the
        position becomes ``k.shape[2]``.

        Raises:
            ValueError: a shape or dtype that does not fit the model or ``max_context``.
        """
        ...

    def fork(self, n: int) -> Session:
        """A new session of the same ``max_context`` holding this one's first ``n``
        positions (``0 <= n <= position``) exactly as this one holds them; this one is
        unchanged.

        Raises:
            ValueError: ``n`` out of range, or the cache no longer holds every position
                from 0 (a sliding-window cache that has wrapped).
        """
        ...

    def reset(self) -> None:
        """Empty the cache (position 0)."""
        ...


@runtime_checkable
class LoadedModel(Protocol):
    """Weights resident on the backend's device, ready to open sessions.

    A backend may also have ``prefill_batch(sessions, token_lists) -> logits (B, vocab)``,
    several sessions' prompts in one forward pass, each row what the session's own
    ``prefill`` returns (the NumPy backend's, validated by `checked_prefills`); without it,
    `phimlx.Model.prefill_batch` prefills them one after another.  And ``warm_up()``: ready
    whatever `phimlx.Model.warm_up`'s passes do not reach (the NumPy backend calls every
    compiled kernel once)."""

    config: ModelConfig

    def new_session(self, max_context: int | None = None) -> Session:
        """A fresh session; ``max_context`` defaults to the model's context length."""
        ...

    def step_batch(self, sessions: Sequence[Session], token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids[b]`` to ``sessions[b]`` for each b, in one forward pass: the
        weight matrices are applied once to all B rows, attention runs per sequence over
        its own cache and positions.  Returns float32 logits [B, vocab], row b the logits
        ``sessions[b].step(token_ids[b])`` would return (to float rounding; B = 1 is
        exactly `step`).

        It lives on the model, not on a session, because it spans sessions: each must be
        one this model opened.  Everything is validated (`checked_batch`) before anything
        is computed, so an error leaves every session unchanged.

        Raises:
            ValueError: no sessions, a count of ids that differs, a session of another
                model or given twice, an id outside the vocabulary.
            ContextLengthError: a session is full.
        """
        ...

    def close(self) -> None:
        """Release weights and file mappings."""
        ...


def check_fits(n: int, position: int, max_context: int, model_context: int | None = None) -> None:
    """Raise unless ``n`` new tokens fit in a session holding ``position`` of ``max_context``.

    Raises:
        ValueError: ``n`` is 0 (a session needs at least one token).
        ContextLengthError: they do not fit.
    """
    if n == 0:
        raise ValueError("no tokens given (an empty prompt?); give at least one token")
    if position + n > max_context:
        limit = f" (at most the model's context length {model_context})" if model_context else ""
        raise ContextLengthError(
            f"{n} tokens do not fit: the session's context holds {max_context} and "
            f"{position} are used; shorten the prompt or use a larger max_context{limit}"
        )


def check_trim(n: int, position: int, what: str = "trim to") -> int:
    """``n`` as a position to trim a session at ``position`` back to (``what``: the
    operation, as the message names it: "trim to", "fork at").

    Raises:
        ValueError: ``n`` is not an integer in ``0 .. position``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= position:
        raise ValueError(f"cannot {what} {n!r}: the session holds {position} positions")
    return int(n)


def check_kv_state(
    k: np.ndarray, v: np.ndarray, config: ModelConfig, max_context: int, dtype: np.dtype
) -> int:
    """Raise unless ``k`` and ``v`` are a KV state a session of ``max_context`` positions
    with caches of ``dtype`` can hold; returns the position count.

    Raises:
        ValueError: a wrong dtype, shape, or more positions than ``max_context`` (named).
    """
    c = config
    for name, a in (("k", k), ("v", v)):
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"KV state {name} must be a {np.dtype(dtype)} array, got {got}")
        if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != (
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
        ):
            raise ValueError(
                f"KV state {name} has shape {a.shape}; this model's is (n_layers={c.n_layers}, "
                f"n_kv_heads={c.n_kv_heads}, positions, head_dim={c.head_dim})"
            )
    if k.shape != v.shape:
        raise ValueError(f"KV state k {k.shape} and v {v.shape} differ in shape")
    if k.shape[2] > max_context:
        raise ValueError(
            f"KV state holds {k.shape[2]} positions; the session's max_context is {max_context}"
        )
    return int(k.shape[2])


def checked_tokens(
    token_ids: Sequence[int], position: int, max_context: int, config: ModelConfig
) -> np.ndarray:
    """Validate tokens a session is asked to append; returns them as an int64 array.

    Raises:
        ValueError: no tokens, or an id outside the vocabulary.
        ContextLengthError: they do not fit in what is left of the session's context.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    check_fits(ids.size, position, max_context, config.context_length)
    vocab = config.vocab_size
    lo, hi = (int(ids[0]),) * 2 if ids.size == 1 else (ids.min(), ids.max())
    if lo < 0 or hi >= vocab:
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return ids


def checked_batch(
    sessions: Sequence[Session],
    token_ids: Sequence[int],
    config: ModelConfig,
    owns: Callable[[object], bool],
) -> np.ndarray:
    """Validate a batched step (`LoadedModel.step_batch`) before anything is computed;
    returns the ids as an int64 array [B].  ``owns(session)`` says whether the model asked
    opened that session.

    Raises:
        ValueError: no sessions, not one id per session, a session ``owns`` refuses or
            that appears twice, an id outside the vocabulary.
        ContextLengthError: a session is full (the error `step` raises, naming the session).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(sessions) == 0:
        raise ValueError("no sessions given; give at least one session and its token id")
    if ids.shape != (len(sessions),):
        raise ValueError(
            f"give one token id per session: {len(sessions)} sessions, token ids of shape "
            f"{ids.shape}"
        )
    _check_distinct(sessions, owns)
    for i, s in enumerate(sessions):
        _checked_row(i, s, ids[i : i + 1], config)
    return ids


def checked_prefills(
    sessions: Sequence[Session],
    token_lists: Sequence[Sequence[int]],
    config: ModelConfig,
    owns: Callable[[object], bool],
) -> list[np.ndarray]:
    """Validate a batched prefill (`LoadedModel.prefill_batch`) before anything is
    computed; returns each session's ids as an int64 array.

    Raises:
        ValueError: no sessions, not one list per session, a session ``owns`` refuses or
            that appears twice, an empty list, an id outside the vocabulary.
        ContextLengthError: a list does not fit in what is left of its session's context.
    """
    if len(sessions) == 0:
        raise ValueError("no sessions given; give at least one session and its token ids")
    if len(token_lists) != len(sessions):
        raise ValueError(
            f"give one list of token ids per session: {len(sessions)} sessions, "
            f"{len(token_lists)} lists"
        )
    _check_distinct(sessions, owns)
    pairs = enumerate(zip(sessions, token_lists, strict=True))
    return [_checked_row(i, s, t, config) for i, (s, t) in pairs]


def _check_distinct(sessions: Sequence[Session], owns: Callable[[object], bool]) -> None:
    seen: set[int] = set()
    for i, s in enumerate(sessions):
        if not owns(s):
            raise ValueError(
                f"sessions[{i}] ({type(s).__name__}) was not opened by this model; a batch "
                "advances sessions of one model (open them with its new_session)"
            )
        if id(s) in seen:
            raise ValueError(f"sessions[{i}] appears twice; a session advances once per pass")
        seen.add(id(s))


def _checked_row(i: int, s: Session, token_ids: Sequence[int], config: ModelConfig) -> np.ndarray:
    try:
        return checked_tokens(token_ids, s.position, s.max_context, config)
    except ValueError as e:  # ContextLengthError too, keeping its type
        raise type(e)(f"sessions[{i}]: {e}") from e


# How a session stores K and V (`load(kv_cache_type=...)`): float16 (the default, as
# llama.cpp), float32, or Q8_0 blocks (int8 with a scale per 32 values).
KV_CACHE_TYPES = ("f16", "f32", "q8_0")


def check_kv_cache_type(kv_cache_type: str | None) -> None:
    """Raise `ValueError` unless ``kv_cache_type`` is None (the backend's default) or one of
    `KV_CACHE_TYPES`."""
    if kv_cache_type is not None and kv_cache_type not in KV_CACHE_TYPES:
        raise ValueError(
            f"kv_cache_type={kv_cache_type!r} is invalid: give one of "
            f"{', '.join(repr(t) for t in KV_CACHE_TYPES)}, or None for the default"
        )


def check_threads(threads: int | None) -> None:
    """Raise `ValueError` unless ``threads`` is None (all physical cores) or a positive int."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(
            f"threads={threads!r} is invalid: give a positive integer, or None for all cores"
        )


def check_max_context(max_context: int | None, config: ModelConfig) -> None:
    """Raise `ValueError` unless ``max_context`` is None or in 1 .. the model's context."""
    c = config.context_length
    if max_context is not None and not (isinstance(max_context, int) and 0 < max_context <= c):
        raise ValueError(
            f"max_context={max_context!r} must be between 1 and the model's context length {c}"
        )


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend: its module and what to install for it."""

    name: str
    module: str
    install_hint: str


_REGISTRY: dict[str, BackendInfo] = {}


def register_backend(name: str, module: str, install_hint: str) -> None:
    """Register a backend module under ``name`` (see the module docstring for its contract)."""
    _REGISTRY[name] = BackendInfo(name, module, install_hint)


register_backend(
    "mlx",
    "phimlx.mlx",
    'pip install "phimlx" on Apple Silicon, or `pip install "mlx[cpu]" mlx-lm` on Linux',
)
register_backend("numpy", "fallback", "pip install numpy (numba is optional, for speed)")


def available_backends() -> list[str]:
    """Names of all registered backends, in preference order for ``auto``."""
    return list(_REGISTRY)


def probe(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not (with the fix)."""
    info = _info(name)
    try:
        mod = importlib.import_module(info.module)
    except ImportError as e:
        return f"cannot import {info.module} ({e}); install with: {info.install_hint}"
    reason = mod.probe()
    return None if reason is None else f"{reason}; {info.install_hint}"


def _info(name: str) -> BackendInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}"
        ) from None


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose(requested: str | None = "auto") -> tuple[str, str]:
    """Pick the backend to use and say why.

    ``requested`` (or ``$PHIMLX_BACKEND`` when it is ``None`` or ``"auto"``) may name a
    backend; ``auto`` means MLX on Apple Silicon when MLX and Metal work, NumPy otherwise.

    Returns:
        ``(name, reason)``.

    Raises:
        BackendUnavailableError: a named backend cannot run here (the message says why).
        ValueError: the name is not a backend.
    """
    env = os.environ.get("PHIMLX_BACKEND", "").strip()
    source = "backend="
    if (requested is None or requested == "auto") and env and env != "auto":
        requested, source = env, "PHIMLX_BACKEND"
    if requested not in (None, "auto"):
        _info(requested)
        why_not = probe(requested)
        if why_not is not None:
            raise BackendUnavailableError(
                f"backend {requested!r} ({source}) is unavailable: {why_not}"
            )
        return requested, f"requested by {source}{requested}"
    if _is_apple_silicon():
        why_not = probe("mlx")
        if why_not is None:
            return "mlx", "auto: Apple Silicon with MLX and Metal available"
        return "numpy", f"auto: Apple Silicon but MLX is unavailable ({why_not})"
    return "numpy", f"auto: {sys.platform}/{platform.machine()} is not Apple Silicon"


def load_backend(
    name: str,
    mf: ModelFile,
    config: ModelConfig,
    *,
    threads: int | None = None,
    kv_cache_type: str | None = None,
) -> LoadedModel:
    """Load ``mf`` with backend ``name`` (already chosen with :func:`choose`)."""
    check_kv_cache_type(kv_cache_type)
    mod = importlib.import_module(_info(name).module)
    return mod.load(mf, config, threads=threads, kv_cache_type=kv_cache_type)
