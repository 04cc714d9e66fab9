"""The NumPy backend's transformer: phi3 and llama from GGUF blocks, with a KV cache.

One layer loop, `NumpyModel._layers`, serves both architectures (what differs is in
`ModelConfig`: fused or split projections, rope style, LongRoPE factors, sliding window)
and every call: prefill chunks of up to `PREFILL_CHUNK` tokens (`NumpySession._forward`),
decode steps (the same), batched steps of several sessions (`NumpyModel.step_batch`) and
several sessions' prompts at once (`NumpyModel.prefill_batch`).
Two choices made per call plug into it:

- the projections: for one token, vectors through matvec plans (`matvec_plan`: the kernel
  chosen once at load, int8 activations where enabled); for a chunk or a batch, (T, n) rows
  through matmul plans (`matmul_plan`: on the int8 path the int8 matmul for up to
  `matrix.INT8_MATMUL_ROWS` rows, each row equal to the matvec's; float tiles and BLAS sgemm
  for longer prompts, see `kernels.int8_prefill`);
- the attention block (rope q and k, write k and v into the cache, attend): for one token,
  the compiled one-call block (`ops.attend_rows`, split across numba's threads by kv heads
  and, over long caches, by positions: no BLAS call in a decode step, so only numba's
  threads run); for a prefill chunk `ops.attend`, batched BLAS products on one BLAS thread,
  a large block's query rows split over the threads (`ops.row_parts`), except a short chunk
  over a cache that is not long, whose tokens take the one-token block each, at its own
  position (`ops.prefill_by_rows`).  See `fallback.ops`.
  A batch of B sessions (or a run of drafted tokens) runs the same compiled block for all B
  rows in one call (`_attend_rows`): each token attends over its own cache at its own
  position, as its step would, bit for bit.

The KV cache is stored as ``kv_cache_type`` says (`phimlx.backends.KV_CACHE_TYPES`: float16
by default, float32, or Q8_0 blocks), one cache per layer (see "KV cache storage" in
`fallback.ops`); `NumpySession.kv_state` converts to float32 and `load_kv_state` back.

A small model's decode step is dominated by Python glue (SmolLM2-135M: 30 layers in a few
milliseconds), so a layer is eight compiled calls with nothing between them: each residual
add is fused with the norm that follows it (`ops.add_rms_norm`; after the last layer, the
output norm), and the per-layer callables come pre-built in `_LayerCalls` tuples.

Weight matrices stay in their GGUF blocks (`QuantMatrix`); only norms are decoded to
float32.  Shapes: T = tokens in this call, P = positions in the cache, H = query heads,
KV = key/value heads, D = head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from phimlx.backends import (
    Finished,
    check_kv_cache_type,
    check_kv_state,
    check_trim,
    checked_batch,
    checked_prefills,
    checked_tokens,
)
from phimlx.config import ModelConfig
from phimlx.formats import Checkpoint
from phimlx.gguf import ModelFile

from . import ops
from .kernels import int8_kernel_available
from .matrix import QuantMatrix, can_multiply_exactly, matmul_plan, matvec_plan
from .threads import set_threads, use_threads

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # tokens per prefill chunk: bounds the (H, T, P) score matrix
_CACHE_GROW = 256  # KV cache capacity grows in steps of this many positions

_Project = Callable[[np.ndarray], np.ndarray]
_Attend = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (qkv, kc, vc) -> att


def _matrix(mf: ModelFile | Checkpoint, name: str, int8: bool | None) -> QuantMatrix:
    if isinstance(mf, Checkpoint):  # a safetensors folder: float or mlx affine weights
        from .affine import checkpoint_matrix

        return checkpoint_matrix(mf, name, int8)  # type: ignore[return-value]
    t = mf.info(name)
    rows, cols = t.shape[0], t.shape[1]
    if int8:  # where this type has an int8 kernel; float elsewhere
        int8 = int8_kernel_available(t.type, cols)
    return QuantMatrix(mf.raw(name), t.type, (rows, cols), int8_activations=int8)


def _attend_each(
    attends: list[_Attend],
    qkv: np.ndarray,
    kcs: tuple[np.ndarray, ...],
    vcs: tuple[np.ndarray, ...],
) -> np.ndarray:
    """The attention plug-in of a batch: row b of qkv (B, (H + 2 KV) * D), one token of
    session b, through that session's own attention (``attends[b]``, bound to its position)
    over its own caches (``kcs[b]``, ``vcs[b]``: (KV, cap, D)); returns (B, H * D), or
    (H * D,) for the vector qkv of one token."""
    if qkv.ndim == 1:
        return attends[0](qkv, kcs[0], vcs[0])
    return np.stack([a(row, kc, vc) for a, row, kc, vc in zip(attends, qkv, kcs, vcs, strict=True)])


def _attend_segments(
    attends: list[_Attend],
    bounds: list[int],
    qkv: np.ndarray,
    kcs: tuple[np.ndarray, ...],
    vcs: tuple[np.ndarray, ...],
) -> np.ndarray:
    """The attention plug-in of several prompts' rows together: rows ``bounds[i] ..
    bounds[i + 1] - 1`` of qkv are prompt i's, through its session's prefill attention
    (``attends[i]``) over its caches (``kcs[i]``, ``vcs[i]``); returns (T, H * D)."""
    return np.concatenate(
        [
            a(qkv[lo:hi], kc, vc)
            for a, lo, hi, kc, vc in zip(attends, bounds, bounds[1:], kcs, vcs, strict=False)
        ]
    )


@dataclass
class _Layer:
    attn_norm: np.ndarray  # (hidden,)
    ffn_norm: np.ndarray  # (hidden,)
    qkv: list[QuantMatrix]  # one fused matrix, or q, k, v
    out: QuantMatrix
    gate_up: list[QuantMatrix]  # one fused matrix (gate rows first), or gate, up
    down: QuantMatrix


class _LayerCalls(NamedTuple):
    """One layer as the forward pass's loop unpacks it."""

    qkv: _Project  # h -> [q | k | v]
    out: _Project  # attention -> hidden
    gate_up: _Project  # h -> [gate | up]
    down: _Project  # ffn -> hidden
    ffn_norm: np.ndarray  # (hidden,): the norm after the attention's residual add
    next_norm: np.ndarray  # (hidden,): after the FFN's: the next layer's attn_norm, or output


class NumpyModel:
    """A model loaded for the NumPy backend (implements `phimlx.backends.LoadedModel`).

    ``int8_activations``: decode with llama.cpp-style int8 activations where a kernel exists
    (True), exact float32 activations (False), or the default (None: int8 unless
    ``PHIMLX_INT8_ACTIVATIONS=0``); see `fallback.kernels`.  ``kv_cache_type``: how its
    sessions store K and V (`phimlx.backends.KV_CACHE_TYPES`; None: ``"f16"``)."""

    def __init__(
        self,
        mf: ModelFile,
        config: ModelConfig,
        *,
        threads: int | None = None,
        int8_activations: bool | None = None,
        kv_cache_type: str | None = None,
    ):
        check_kv_cache_type(kv_cache_type)
        self.kv_cache_type = kv_cache_type or "f16"
        # The norms are not checked for NaN/Inf here: `ModelConfig.from_gguf` refuses them.
        self.config = config
        self.file = mf
        self.threads = set_threads(threads)
        c = config
        i8 = int8_activations
        # an untied embedding only looks rows up: a folder's stays packed (no int8 copy)
        lookup_only = not c.tied_embeddings and isinstance(mf, Checkpoint)
        self.embed = _matrix(mf, "token_embd.weight", False if lookup_only else i8)
        self.output = self.embed if c.tied_embeddings else _matrix(mf, "output.weight", i8)
        self.output_norm = mf.dequantize("output_norm.weight")
        self.output_mv = matvec_plan([self.output])
        self.output_mm = matmul_plan([self.output])
        self.layers: list[_Layer] = []
        for i in range(c.n_layers):
            b = f"blk.{i}."
            qkv = ["attn_qkv"] if c.fused_qkv else ["attn_q", "attn_k", "attn_v"]
            gu = ["ffn_up"] if c.fused_gate_up else ["ffn_gate", "ffn_up"]
            self.layers.append(
                _Layer(
                    attn_norm=mf.dequantize(b + "attn_norm.weight"),
                    ffn_norm=mf.dequantize(b + "ffn_norm.weight"),
                    qkv=[_matrix(mf, f"{b}{n}.weight", i8) for n in qkv],
                    out=_matrix(mf, b + "attn_output.weight", i8),
                    gate_up=[_matrix(mf, f"{b}{n}.weight", i8) for n in gu],
                    down=_matrix(mf, b + "ffn_down.weight", i8),
                )
            )
        self.weight_bytes = sum(m.nbytes for m in self._matrices())
        self.attn_scale = np.float32(1.0 / np.sqrt(c.head_dim))
        # one token: vectors through matvec plans (kernels chosen once, here)
        self.token_calls = self._layer_calls(matvec_plan)
        # a chunk: (T, n) rows through tiled matmuls
        self.chunk_calls = self._layer_calls(matmul_plan)

    def _layer_calls(self, plan: Callable[[list[QuantMatrix]], _Project]) -> list[_LayerCalls]:
        """Each layer's `_LayerCalls`, its projections through ``plan``."""
        nexts = [layer.attn_norm for layer in self.layers[1:]] + [self.output_norm]
        return [
            _LayerCalls(
                plan(la.qkv), plan([la.out]), plan(la.gate_up), plan([la.down]), la.ffn_norm, nxt
            )
            for la, nxt in zip(self.layers, nexts, strict=True)
        ]

    def _matrices(self) -> list[QuantMatrix]:
        mats = [self.embed] if self.output is self.embed else [self.embed, self.output]
        for layer in self.layers:
            mats += [*layer.qkv, layer.out, *layer.gate_up, layer.down]
        return mats

    def new_session(self, max_context: int | None = None) -> NumpySession:
        """A fresh KV cache for up to ``max_context`` tokens (default: the model's context)."""
        return NumpySession(self, max_context or self.config.context_length)

    def step_batch(self, sessions: Sequence[NumpySession], token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids[b]`` to ``sessions[b]`` for each b in one forward pass; float32
        logits (B, vocab).  See `phimlx.backends.LoadedModel.step_batch`.

        The B rows go through each weight matrix at once (`QuantMatrix.matmul`, as a prefill
        chunk's tokens do); each row attends over its own session's cache with the attention
        `step` would choose for it.  B = 1 is `step` itself (the decode kernels).

        Raises:
            ValueError: see `phimlx.backends.checked_batch`.
            ContextLengthError: a session is full.
        """
        ids = checked_batch(
            sessions,
            token_ids,
            self.config,
            lambda s: isinstance(s, NumpySession) and s.model is self,
        )
        if ids.size == 1:
            return sessions[0].step(int(ids[0]))[None]
        for s in sessions:
            s._ensure_capacity(s._pos + 1)
        attend, ks, vs = self._attend_rows([(s, s._pos) for s in sessions])
        h = self._layers(self._embed(ids), self.chunk_calls, attend, ks, vs)  # (B, hidden)
        for s in sessions:
            s._pos += 1
        return self.output_mm(h)  # (B, vocab)

    def prefill_batch(
        self, sessions: Sequence[NumpySession], token_lists: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """Prefill ``token_lists[b]`` into ``sessions[b]`` for each b; float32 logits (B,
        vocab), row b those after list b's last token.  Row b and session b's cache are
        what ``sessions[b].prefill(token_lists[b])`` gives, bit for bit.

        Lists that the int8 matmul takes alone (up to `matrix.INT8_MATMUL_ROWS` tokens on
        the int8 path, up to `PREFILL_CHUNK` where prompts take the int8 kernels:
        `kernels.int8_prefill`) go through each weight matrix together, in one pass (each weight
        block read once for all their rows, one call per matrix rather than one per list),
        each list's rows attending as its own prefill would; the rest (longer lists, float
        activations) are prefilled one after another, as alone.

        Raises:
            ValueError: see `phimlx.backends.checked_prefills`.
            ContextLengthError: a list does not fit its session.
        """
        lists = checked_prefills(
            sessions,
            token_lists,
            self.config,
            lambda s: isinstance(s, NumpySession) and s.model is self,
        )
        out = np.empty((len(lists), self.config.vocab_size), np.float32)
        together = [i for i, ids in enumerate(lists) if self._prefills_exactly(ids.size)]
        if len(together) < 2:
            together = []
        for i, (s, ids) in enumerate(zip(sessions, lists, strict=True)):
            if i not in together:
                out[i] = s.prefill(ids)
        if not together:
            return out
        group = [sessions[i] for i in together]
        ids = [lists[i] for i in together]
        bounds = np.cumsum([0] + [a.size for a in ids]).tolist()
        for s, a in zip(group, ids, strict=True):
            s._ensure_capacity(s._pos + a.size)
        plugs = [s._prefill_attention(a.size) for s, a in zip(group, ids, strict=True)]
        attend = functools.partial(_attend_segments, [a for a, _, _ in plugs], bounds)
        ks = zip(*(k for _, k, _ in plugs), strict=True)
        vs = zip(*(v for _, _, v in plugs), strict=True)
        x = self._embed(np.concatenate(ids))
        layer_calls, output = self._exact_calls
        h = self._layers(x, layer_calls, attend, ks, vs)  # (T, hidden)
        for s, a in zip(group, ids, strict=True):
            s._pos += a.size
        out[together] = output(np.ascontiguousarray(h[np.array(bounds[1:]) - 1]))
        return out

    def _prefills_exactly(self, n: int) -> bool:
        """Whether a prefill of ``n`` tokens takes the int8 matmul in every matrix (the
        output's matvec too), so that its rows can share a pass with others'."""
        layers = [m for la in self.layers for m in (*la.qkv, la.out, *la.gate_up, la.down)]
        return (
            n <= PREFILL_CHUNK
            and can_multiply_exactly([self.output, *layers])
            and all(m._int8_matmul(n) for m in layers)
        )

    @functools.cached_property
    def _exact_calls(self) -> tuple[list[_LayerCalls], Callable[[np.ndarray], np.ndarray]]:
        """The layer calls and the output product of `prefill_batch`: every row through the
        int8 kernel, as each list's own prefill (and its output matvec) takes it."""
        exact = functools.partial(matmul_plan, exact=True)
        return self._layer_calls(exact), exact([self.output])

    def _attend_rows(
        self, rows: Sequence[tuple[NumpySession, int]]
    ) -> tuple[_Attend, Iterable[Any], Iterable[Any]]:
        """The attention of B single tokens, row b one token of session ``rows[b][0]`` at
        position ``rows[b][1]`` (its cache must have room), attending as that session's
        `step` would there, bit for bit: ``(attend, ks, vs)`` for `_layers`, which calls
        ``attend(qkv, k, v)`` with qkv (B, ...) (or a vector for one token) and what ks
        and vs yield for the layer.  One compiled call for all rows (`ops.attend_rows`:
        ks the rows' cache tables, vs a cache of their type), or without numba one
        `ops.attend` per row (ks, vs the rows' caches as tuples)."""
        c = self.config
        p0s = np.array([p for _, p in rows], dtype=np.int64)
        sessions = [s for s, _ in rows]
        if ops.attend_batch is None:
            attends = [s._attention(1, p0=p) for s, p in rows]
            return (
                functools.partial(_attend_each, attends),
                zip(*(s._k for s in sessions), strict=True),
                zip(*(s._v for s in sessions), strict=True),
            )
        n = np.minimum(p0s + 1, c.sliding_window) if c.sliding_window else p0s + 1
        H, KV, D = c.n_heads, c.n_kv_heads, c.head_dim
        parts = np.array([ops.token_parts(int(k), H, KV, D, self.threads) for k in n], np.int64)
        attend = functools.partial(
            ops.attend_rows,
            ops.attend_kernel(parts, p0s, H, D),
            parts,
            np.stack([s._cos[p] for s, p in rows]),  # (B, rope_dim/2)
            np.stack([s._sin[p] for s, p in rows]),
            c.rope_style == "neox",
            p0s,
            c.sliding_window or 0,
            self.attn_scale,
            H,
        )
        if len(set(map(id, sessions))) == 1:  # one session: its table, repeated per row
            tables = sessions[0]._tables
            ks = tables if len(rows) == 1 else (np.repeat(t, len(rows), 0) for t in tables)
        else:
            ks = (np.concatenate(t) for t in zip(*(s._tables for s in sessions), strict=True))
        return attend, ks, sessions[0]._k

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """The start of every forward pass: this model's thread count for the calling
        thread (`use_threads`: numba keeps it per thread), then the rows of ``ids``
        looked up in the embedding, float32 (T, hidden)."""
        use_threads(self.threads)
        return self.embed.take_rows(ids)

    def _layers(
        self,
        x: np.ndarray,
        calls: list[_LayerCalls],
        attend: _Attend,
        ks: Iterable[np.ndarray],
        vs: Iterable[np.ndarray],
    ) -> np.ndarray:
        """The layer loop, for every kind of call: ``x`` the residual stream, (T, hidden)
        rows or one (hidden,) vector, updated in place; ``calls`` the projections (matvec
        plans or matmuls); ``attend(qkv, kc, vc)`` the attention block; ``ks``, ``vs`` what
        it gets as kc, vc per layer.  Returns the output-normed hidden state, shaped as x."""
        c = self.config
        add_norm, silu_mul, eps, ffn = ops.add_rms_norm, ops.silu_mul, c.norm_eps, c.ffn_size
        h = ops.rms_norm(x, self.layers[0].attn_norm, eps)
        for (qkv, out, gate_up, down, ffn_norm, next_norm), kc, vc in zip(
            calls, ks, vs, strict=True
        ):
            att = attend(qkv(h), kc, vc)  # kc, vc: (KV, cap, D), or a batch's tuples of them
            h = add_norm(x, out(att), ffn_norm, eps)  # x += attention; h = norm(x)
            h = add_norm(x, down(silu_mul(gate_up(h), ffn)), next_norm, eps)
        return h  # output-normed after the last layer

    def warm_up(self) -> None:
        """Call every compiled kernel a generation calls once (`fallback.warm_up`), so that
        numba loads each from its disk cache (or compiles it) now: `phimlx.Model.warm_up`."""
        from . import warm_up
        from .kernels import numba_available

        if numba_available():  # (the pure NumPy path has nothing to load)
            warm_up(self)

    def close(self) -> None:
        self.layers, self.token_calls, self.chunk_calls = [], [], []
        self.__dict__.pop("_exact_calls", None)
        self.file.close()


class NumpySession:
    """KV cache and position of one sequence (implements `phimlx.backends.Session`)."""

    def __init__(self, model: NumpyModel, max_context: int):
        c = model.config
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        self.model = model
        self.max_context = max_context
        self.kv_cache_type = model.kv_cache_type
        self._pos = 0
        self._cap = 0
        # per layer, (KV, capacity, D) rows of kv_cache_type (`ops.new_cache`), grown on
        # demand so memory follows the tokens held
        self._k = self._new_caches(0)
        self._v = self._new_caches(0)
        self._tables = self._cache_tables()
        inv_freq = c.rope_inv_freq(max_context).astype(np.float64)
        self._inv_freq = inv_freq  # (rope_dim / 2,)

    @property
    def position(self) -> int:
        return self._pos

    def reset(self) -> None:
        self._pos = 0

    def trim(self, n: int) -> int:
        """Forget positions ``n ..``: the cache rows past them are overwritten by what comes
        next (attention never reads past the position)."""
        self._pos = check_trim(n, self._pos)
        return self._pos

    def _new_caches(self, cap: int) -> list[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        c = self.model.config
        return [
            ops.new_cache(self.kv_cache_type, c.n_kv_heads, cap, c.head_dim)
            for _ in range(c.n_layers)
        ]

    def _cache_tables(self) -> list[np.ndarray]:
        """Per layer, `ops.cache_table` of this session's caches (1, 5): what the compiled
        one-token attention reads them through; rebuilt whenever they are reallocated."""
        return [ops.cache_table([(k, v)]) for k, v in zip(self._k, self._v, strict=True)]

    def kv_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of K (after rope) and V of the positions held: float32
        (layers, KV, position, D) each, converted from the cache's type."""
        p = self._pos
        k = np.stack([ops.cache_rows(kc, p) for kc in self._k])
        v = np.stack([ops.cache_rows(vc, p) for vc in self._v])
        return k, v

    def fork(self, n: int) -> NumpySession:
        """A new session holding positions 0 .. n - 1 of this one, their stored bytes
        copied (whatever the ``kv_cache_type``)."""
        n = check_trim(n, self._pos, "fork at")
        other = NumpySession(self.model, self.max_context)
        other._ensure_capacity(n)
        for dst, src in zip(other._k + other._v, self._k + self._v, strict=True):
            ops.cache_copy(dst, src, n)
        other._pos = n
        return other

    def load_kv_state(self, k: np.ndarray, v: np.ndarray) -> None:
        """Replace the cache with ``k``, ``v`` (float32 (layers, KV, P, D), as `kv_state`
        gives them), stored as this session's ``kv_cache_type``; the position becomes P.

        Raises:
            ValueError: a dtype or shape that does not fit the model or ``max_context``.
        """
        c = self.model.config
        n = check_kv_state(k, v, c, self.max_context, np.dtype(np.float32))
        self._pos = 0  # nothing to carry over when the capacity grows
        self._ensure_capacity(n)
        for kc, vc, kl, vl in zip(self._k, self._v, k, v, strict=True):
            ops.cache_write(kc, 0, kl, exact=True)  # q8_0: the codes they came from
            ops.cache_write(vc, 0, vl, exact=True)
        self._pos = n

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run the prompt in chunks; float32 logits [vocab] after its last token, or with
        ``all_logits`` (T, vocab) after each (the output matrix through `QuantMatrix.matmul`
        over every row)."""
        ids = checked_tokens(token_ids, self._pos, self.max_context, self.model.config)
        out = np.empty((ids.size, self.model.config.vocab_size), np.float32) if all_logits else None
        logits = None
        for start in range(0, ids.size, PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            logits = self._forward(chunk, decode=False, all_logits=all_logits)
            if out is not None:
                out[start : start + chunk.size] = logits
        return logits if out is None else out

    def step(self, token_id: int) -> np.ndarray:
        ids = checked_tokens([token_id], self._pos, self.max_context, self.model.config)
        return self._forward(ids, decode=True)

    def step_async(self, token_id: int) -> Finished:
        """`step`, computed now (this backend is eager); the handle holds the logits."""
        return Finished(self.step(token_id))

    def verify(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` in one pass and return float32 logits (T, vocab) after each,
        equal bit for bit to T `step` calls (speculative decoding's check of drafted
        tokens): the T rows go through each matrix at once with the int8 matmul, whose
        rows equal the decode matvec, and each row attends with the decode attention at
        its own position.  (A long prefill's batched attention sums in another order; with int8
        activations that rounding difference can flip an activation's rounding and grow to
        the int8 noise level, which would change a near-tie.)"""
        ids = checked_tokens(token_ids, self._pos, self.max_context, self.model.config)
        if ids.size == 1:
            return self.step(int(ids[0]))[None]
        m, T, p0 = self.model, ids.size, self._pos
        mats = [m.output, *(x for la in m.layers for x in (*la.qkv, la.out, *la.gate_up, la.down))]
        if any(
            getattr(x, "int8_activations", False) and not x._int8_matmul(T) for x in mats
        ):  # float tiles for these rows where a step takes int8: no equality to keep
            return self.prefill(ids, all_logits=True)
        self._ensure_capacity(p0 + T)
        attend, ks, vs = m._attend_rows([(self, p0 + i) for i in range(T)])  # row i at p0 + i
        h = m._layers(m._embed(ids), m.chunk_calls, attend, ks, vs)  # (T, hidden)
        self._pos = p0 + T
        return m.output_mm(h)  # (T, vocab)

    def _ensure_capacity(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_context, -(-n // _CACHE_GROW) * _CACHE_GROW)
        k, v = self._new_caches(cap), self._new_caches(cap)
        for new, old in zip(k + v, self._k + self._v, strict=True):
            ops.cache_copy(new, old, self._pos)
        self._k, self._v, self._cap = k, v, cap
        self._tables = self._cache_tables()
        # cos/sin (cap, rope_dim/2) of every position the cache can hold, LongRoPE's
        # attention factor applied; angles in float64 so far positions stay exact
        ang = np.arange(cap, dtype=np.float64)[:, None] * self._inv_freq[None, :]
        f = self.model.config.rope_attn_factor
        self._cos = (np.cos(ang) * f).astype(np.float32)
        self._sin = (np.sin(ang) * f).astype(np.float32)

    def _attention(self, T: int, p0: int | None = None) -> _Attend:
        """The attention plug-in of a prefill chunk, T tokens from position ``p0``
        (default: the current one; the cache must hold P = p0 + T): ``attend(qkv, kc,
        vc)`` (`ops.attend`, BLAS's batched products) with this call's rope rows and
        position bound.  (Decode steps take `NumpyModel._attend_rows`.)"""
        m, c = self.model, self.model.config
        p0 = self._pos if p0 is None else p0
        P = p0 + T
        return functools.partial(
            ops.attend,
            self._cos[p0:P],  # (T, rope_dim/2)
            self._sin[p0:P],
            c.rope_style == "neox",
            p0,
            c.sliding_window or 0,
            m.attn_scale,
            c.n_heads,
            threads=m.threads,
        )  # then attend(qkv, kc, vc) -> (T, H * D), or (H * D,) for one token

    def _prefill_attention(self, T: int) -> tuple[_Attend, Iterable[Any], Iterable[Any]]:
        """`NumpyModel._layers`' ``(attend, ks, vs)`` for a prefill of T tokens from the
        current position (the cache must have room): each token through the compiled
        one-token attention at its own position (`NumpyModel._attend_rows`, as `verify`
        takes it) where `ops.prefill_by_rows` finds that cheaper (a short chunk over a
        cache that is not long), else `_attention`'s batched products."""
        m, c, p0 = self.model, self.model.config, self._pos
        if ops.prefill_by_rows(T, p0 + T, c.n_heads, c.head_dim):
            return m._attend_rows([(self, p0 + i) for i in range(T)])
        return self._attention(T), self._k, self._v

    def _forward(self, ids: np.ndarray, *, decode: bool, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` (T tokens at positions pos .. pos + T - 1) through the model, adding
        them to the cache; returns float32 logits [vocab] of the last, or with
        ``all_logits`` (T, vocab) of each.

        ``decode``: a generation step (one token): matvecs with the decode kernels (int8
        activations by default).  A prefill, even of one token, multiplies as a prompt
        does (`QuantMatrix.matmul`).  With float activations a prompt continued from a
        cached prefix gets the logits a full prefill gives (to float rounding); on the int8
        path that holds where both take the same kernel (a short continuation takes the
        int8 matmul, a long prompt may take float tiles: logits then differ at the int8
        rounding's level, a few percent)."""
        m = self.model
        T, p0 = ids.size, self._pos
        self._ensure_capacity(p0 + T)
        if decode:  # one token: activations are vectors, through the matvec plans
            x = m._embed(ids)[0]  # (hidden,), a fresh array: the residual stream
            h = m._layers(x, m.token_calls, *m._attend_rows([(self, p0)]))
        else:
            x = m._embed(ids)  # (T, hidden)
            h = m._layers(x, m.chunk_calls, *self._prefill_attention(T))
        self._pos = p0 + T
        if all_logits:
            return m.output_mm(np.ascontiguousarray(h.reshape(T, -1)))  # (T, vocab)
        return m.output_mv(h[-1] if h.ndim == 2 else h)
