"""The transformer's small operations: RMS norm, SiLU gate, rotary embedding, attention.

Two engines compute them:

- NumPy (the ``*_np`` functions): vectorized expressions, the reference in tests and what
  runs where numba is missing.  `attention_np` is batched matmuls: the engine for prefill
  chunks, where the score matrix is large; `attend` splits a large block's query rows over
  the threads (`row_parts`), each part a BLAS problem on one BLAS thread.
- numba: loops compiled into one call each.  A decode step of a small model is dominated
  by interpreter round trips (a NumPy expression costs several, each op a handful), so the
  whole attention block of one token (rope q and k, write k and v into the cache, attend)
  is a single call, at every cache length: a decode step never calls BLAS, whose threads
  would fight numba's (`fallback.threads`).  One kernel computes it for B tokens at once
  (a batched step's sessions, a run of drafted tokens; `attend_rows`) and for one
  (`attend_token`), compiled twice from one source: `attend_batch` runs the (token, kv
  head, part) items on numba's threads, `attend_batch_serial` on the calling thread (short
  caches); each token's positions split into parts over long caches (flash-decoding: per
  part a max, a sum and an unnormalized output, merged at the end; `token_parts` chooses
  how many by size, `LOOP_ATTENTION_MAX`).  Both run the same compiled per-part and merge
  functions, so a token gets the same bits alone or in any batch.  It streams each K and V
  row once from memory for the G query heads that share it, prefetching 64 rows ahead
  (`PREFETCH_ROWS`), from a cache of any type ("KV cache storage" below): float32 and
  float16 caches a vector of rows at a time through two LLVM IR kernels (`vector_kernels`:
  W scores from W rows, summed across lanes together; W weighted V rows into the output),
  the rest four rows or one at a time in numba loops; rope is written once per engine
  (`_rope_row`).

The unsuffixed names (`rms_norm`, `add_rms_norm`, `silu_mul`, `rope`) are the compiled
versions where numba is available and the NumPy ones elsewhere.  `attend` is the attention
block of T tokens on the BLAS engine; `attend_token` and `attend_rows` (numba only; the
kernel `attend_batch` is None without it) the same block for one token, or B.  They take
the per-call values first, so the forward pass binds them once (`functools.partial`) and
calls ``attend(qkv, kc, vc)`` per layer.

Activations are ``(T, n)`` for T tokens or ``(n,)`` for one (the decode step, whose matvecs
take and return vectors); the norms and the SiLU gate accept both, C-contiguous.

Shapes: T tokens, H query heads, KV key/value heads, G = H // KV, D head dim, P positions
in the cache (cap: its capacity), rd/2 rotated pairs per head.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable

import numpy as np

from phimlx.backends import KV_CACHE_TYPES

from .kernels import numba_available, prange_only, renamed
from .threads import one_blas_thread, tbb_loaded

# One token's decode attention of up to this many multiply-adds per layer (positions
# attended x H x D) runs on the calling thread, one part per kv head; above, its positions
# split into parts (`token_parts`) on numba's threads.  Below it the parts' launch and merge
# cost more than they save: one token in parts against the calling thread's one part
# (SmolLM2-135M, 2 threads, AMD EPYC VM, 12 alternations a size, `prange_only` kernels) on
# TBB 1.01-1.12x the time at 74k-230k and 0.70x at 461k; on OpenMP 1.02-1.16x at 74k-230k.
# (Figures from before `prange_only`, when the threads' kernel made four launches a call:
# parity at ~450k on TBB and 250k-350k on OpenMP on a 2-core Xeon VM.)
LOOP_ATTENTION_MAX = 7 << 16 if tbb_loaded() else 1 << 18

# Two tokens or more (a batched step's rows, a run of drafted tokens), each attending in one
# part per kv head, go to numba's threads from this many multiply-adds in all: their (row,
# kv head) items split across the threads with nothing to merge, and the kernel's one
# launch pays for itself sooner than a token's parts do.  SmolLM2-135M, 2 threads, AMD EPYC
# VM, the threads' kernel against the calling thread's (12 alternations a size, after a
# parallel product as in a step): on TBB 1.06x the time at 37k (4 rows of 16 positions),
# 0.98-0.99x at 74k, 0.82-0.85x at 147k, 0.74-0.79x at 230k-460k; on OpenMP 0.85x at 74k.
ROWS_ATTENTION_MAX = 1 << 16

# A prefill chunk of T tokens over P positions attends token by token through the compiled
# one-token kernel (`attend_rows`, as a batched step's rows do) where it does fewer than
# ROWS_PREFILL_SMALL multiply-adds (T x P x H x D), or fewer than ROWS_PREFILL_MAX in at
# most ROWS_PREFILL_TOKENS tokens; else through BLAS (`attend`).  `attend` first converts
# the cache's P rows to float32, a cost that does not shrink with T; the compiled kernel
# reads the cache as stored, but each token reads it again, which loses once the cache
# outgrows the CPU's caches (Phi-3-mini, 3000 positions: 1.03x `attend`'s time at 16
# tokens, 3.8x at 48).  Zen 4 VM, 2 threads, TBB, one layer, `attend_rows` over `attend`:
# SmolLM2-135M 0.34x at 4 tokens over 2000 positions, 0.42x at 13 over 500, 0.63x at 13
# over 2000, 0.72-0.73x at 16 over 4000-7000, 0.59-0.72x at 64-128 over 28; Phi-3-mini
# 0.36x at 13 over 1000, 0.35x at 4 over 3000, 0.47x at 13 over 200.  Where it lost:
# SmolLM2 0.95-1.23x at 32-128 tokens over 500-4000, Phi-3-mini above.
ROWS_PREFILL_SMALL = 1 << 23
ROWS_PREFILL_MAX = 1 << 26
ROWS_PREFILL_TOKENS = 16


def prefill_by_rows(T: int, P: int, n_heads: int, head_dim: int) -> bool:
    """Whether a prefill chunk of T tokens whose last attends over P positions takes the
    compiled one-token attention for each token (`attend_rows`) rather than `attend`
    (see `ROWS_PREFILL_MAX`).  Never without numba."""
    if attend_batch is None:
        return False
    work = T * P * n_heads * head_dim
    return work <= ROWS_PREFILL_SMALL or (T <= ROWS_PREFILL_TOKENS and work <= ROWS_PREFILL_MAX)


# ---------------------------------------------------------------------------- NumPy engine


def rms_norm_np(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (..., n) normalized by its root mean square over the last axis, times w (n,)."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * w


def add_rms_norm_np(x: np.ndarray, y: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x += y (the residual add, in place), then return `rms_norm_np` (x, w)."""
    x += y
    return rms_norm_np(x, w, eps)


def silu_mul_np(gu: np.ndarray, ffn: int) -> np.ndarray:
    """SiLU(gate) * up for gu = [gate | up] (..., 2 * ffn); returns (..., ffn)."""
    gate, up = gu[..., :ffn], gu[..., ffn:]
    with np.errstate(over="ignore"):  # exp overflow -> inf -> SiLU = -0, as intended
        return gate / (1.0 + np.exp(-gate)) * up


def rope_np(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate x (T, heads, D) in place; cos/sin (T, rd/2) cover the first rd dims."""
    half = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:  # pairs (i, i + rd/2)
        a, b = x[..., :half].copy(), x[..., half : 2 * half].copy()
        x[..., :half] = a * c - b * s
        x[..., half : 2 * half] = b * c + a * s
    else:  # pairs (2i, 2i + 1)
        a, b = x[..., 0 : 2 * half : 2].copy(), x[..., 1 : 2 * half : 2].copy()
        x[..., 0 : 2 * half : 2] = a * c - b * s
        x[..., 1 : 2 * half : 2] = b * c + a * s


def attention_np(
    q: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int, window: int, scale: float
) -> np.ndarray:
    """Causal attention of q (T, H, D) at positions p0.. over the cache kc/vc (KV, cap, D),
    which already holds these tokens; window > 0 limits keys to i - j < window.
    Returns (T, H * D).

    The softmax runs in place on the score array, one NumPy pass each (mask, max, exp,
    sum, divide): the mask is added (0 or -inf) to the columns it can hide only, the last
    T (causal) or all of them (a window)."""
    T, H, D = q.shape
    KV = kc.shape[0]
    G = H // KV
    P = p0 + T
    qg = (q * np.float32(scale)).reshape(T, KV, G, D).transpose(1, 2, 0, 3).reshape(KV, G * T, D)
    scores = qg @ kc[:, :P].transpose(0, 2, 1)  # (KV, G*T, P)
    qpos = np.arange(p0, P)[:, None]
    lo = 0 if window else p0 + 1  # columns before lo are visible to every row
    kpos = np.arange(lo, P)[None, :]
    hidden = kpos > qpos
    if window:
        hidden |= qpos - kpos >= window
    if hidden.any():
        tail = scores.reshape(KV, G, T, P)[..., lo:]
        np.add(tail, np.where(hidden, np.float32(-np.inf), np.float32(0.0)), out=tail)
    np.subtract(scores, scores.max(axis=-1, keepdims=True), out=scores)
    np.exp(scores, out=scores)
    np.divide(scores, scores.sum(axis=-1, keepdims=True), out=scores)
    out = scores @ vc[:, :P]  # (KV, G*T, D)
    return out.reshape(KV, G, T, D).transpose(2, 0, 1, 3).reshape(T, H * D)


@functools.lru_cache(maxsize=256)  # (every layer of a chunk asks the same)
def row_parts(T: int, p0: int, n: int) -> tuple[int, ...]:
    """Bounds ``(0, b1, ..., T)`` splitting T query rows at positions p0.. into at most
    ``n`` runs for `attention_np`, where a run ``[a, b)`` costs ``(b - a) * (p0 + b)`` (its
    rows against every position before its end): the largest run as small as can be
    (a bisection on that cost, each step a greedy split of at most n runs)."""
    n = max(1, min(n, T))
    if n == 1:
        return (0, T)

    def runs(cost: int) -> list[int] | None:  # each run as long as ``cost`` allows
        bounds = [0]
        while bounds[-1] < T:
            if len(bounds) > n:
                return None  # more than n runs
            a = bounds[-1]  # the largest b with (b - a) * (p0 + b) <= cost, at least a + 1
            b = int((a - p0 + ((p0 - a) ** 2 + 4 * (a * p0 + cost)) ** 0.5) / 2)
            while (b + 1 - a) * (p0 + b + 1) <= cost:  # (the square root's rounding)
                b += 1
            while b > a + 1 and (b - a) * (p0 + b) > cost:
                b -= 1
            bounds.append(min(T, max(a + 1, b)))
        return bounds

    lo, hi = 0, T * (p0 + T)  # a cost that needs more than n runs; one that does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) is not None else (mid, hi)
    best = runs(hi)
    assert best is not None
    return tuple(best)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _attention_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run the other runs of a split prefill attention (NumPy's matmuls
    and ufuncs release the GIL), made again when the thread count changes."""
    global _pool
    with _pool_lock:  # (a replaced pool is not shut down: a caller may still submit to it)
        if _pool is None or _pool._max_workers != workers:
            _pool = concurrent.futures.ThreadPoolExecutor(workers, "phimlx-attention")
        return _pool


# ------------------------------------------------------------------ KV cache storage
# One layer's K (or V) cache, (KV, cap, D) rows, in one of three types:
#   "f32":  a float32 array;
#   "f16":  a uint16 array holding float16 bits (numba has no float16 type: the kernels
#           convert with the CPU's instruction, F16C's vcvtph2ps, `_f32_from_f16`);
#   "q8_0": a tuple (int8 (KV, cap, D), float32 (KV, cap, nb)): blocks of 32 values along D
#           with one float32 scale each (llama.cpp's Q8_0 with a float32 rather than float16
#           scale), or one block per row when D is not a multiple of 32; q = rint(x / d),
#           d = max|x| / 127.

Q8_BLOCK = 32


def new_cache(kind: str, n_kv: int, cap: int, head_dim: int) -> np.ndarray | tuple:
    """An empty (zeroed) cache of ``kind`` (one of `KV_CACHE_TYPES`) for (n_kv, cap, head_dim)."""
    shape = (n_kv, cap, head_dim)
    if kind == "f32":
        return np.zeros(shape, np.float32)
    if kind == "f16":
        return np.zeros(shape, np.uint16)
    if kind == "q8_0":
        nb = head_dim // Q8_BLOCK if head_dim % Q8_BLOCK == 0 else 1
        return np.zeros(shape, np.int8), np.zeros((n_kv, cap, nb), np.float32)
    raise ValueError(f"kv_cache_type={kind!r} is not one of {', '.join(KV_CACHE_TYPES)}")


def cache_copy(dst: np.ndarray | tuple, src: np.ndarray | tuple, n: int) -> None:
    """Copy positions 0 .. n - 1 of ``src`` into ``dst``, two caches of the same type."""
    for d, s in zip(dst, src, strict=True) if isinstance(dst, tuple) else ((dst, src),):
        d[:, :n] = s[:, :n]


def cache_shape(c: np.ndarray | tuple) -> tuple[int, int, int]:
    """(KV, cap, D) of a cache of any type."""
    return c[0].shape if isinstance(c, tuple) else c.shape


def cache_rows(c: np.ndarray | tuple, P: int) -> np.ndarray:
    """Positions 0 .. P - 1 of a cache as float32 (KV, P, D): a view for "f32", else a copy."""
    if isinstance(c, tuple):
        q, d = c
        KV, _, D = q.shape
        nb = d.shape[2]
        x = q[:, :P].reshape(KV, P, nb, D // nb).astype(np.float32) * d[:, :P, :, None]
        return x.reshape(KV, P, D)
    if c.dtype == np.uint16:
        return _f16_rows(c, P)
    return c[:, :P]


def _f16_rows_np(c: np.ndarray, P: int) -> np.ndarray:
    """Positions 0 .. P - 1 of a float16 cache (uint16 bits) as float32 (KV, P, D)."""
    return c[:, :P].view(np.float16).astype(np.float32)


_f16_rows = _f16_rows_np  # compiled below where numba is (F16C's vcvtph2ps: NumPy's is scalar)


def _q8_0_codes(xb: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Blocks ``xb`` (..., block) rounded to int8 codes (as float32) against ``scale`` (...)."""
    inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale > 0)
    return np.rint(xb * inv[..., None])


def _q8_0_exact(xb: np.ndarray, scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Whether ``codes x scale`` gives every value of each block of ``xb`` back exactly."""
    return (codes * scale[..., None] == xb).all(axis=-1)


def cache_write(c: np.ndarray | tuple, p0: int, x: np.ndarray, *, exact: bool = False) -> None:
    """Store float32 rows x (KV, T, D) at positions p0 .. p0 + T - 1 of a cache.

    ``exact`` (q8_0): where a block's values are already q8_0 values (a cache's rows as
    `cache_rows` gives them, loaded back), store the codes and scale that give them back
    bit for bit.  ``max|x| / 127`` can miss the scale they came from by an ulp or two
    (127 x scale rounds, and the compiled kernels' scale is ``max|x| x (1 / 127)``), so
    the scales within two ulps of it are tried too."""
    T = x.shape[1]
    if isinstance(c, tuple):
        q, d = c
        nb = d.shape[2]
        xb = x.reshape(*x.shape[:2], nb, -1)  # (KV, T, nb, block)
        scale = np.abs(xb).max(axis=-1) / np.float32(127.0)  # (KV, T, nb)
        codes = _q8_0_codes(xb, scale)
        same = _q8_0_exact(xb, scale, codes) if exact else None
        if same is not None and not same.all():
            hi, lo = np.float32(np.inf), np.float32(0)
            up, down = np.nextafter(scale, hi), np.nextafter(scale, lo)
            for near in (up, down, np.nextafter(up, hi), np.nextafter(down, lo)):
                c2 = _q8_0_codes(xb, near)
                same2 = _q8_0_exact(xb, near, c2)
                take = same2 & ~same
                scale = np.where(take, near, scale)
                codes = np.where(take[..., None], c2, codes)
                same |= same2
        q[:, p0 : p0 + T] = codes.reshape(x.shape).astype(np.int8)
        d[:, p0 : p0 + T] = scale
    elif c.dtype == np.uint16:
        c[:, p0 : p0 + T] = x.astype(np.float16).view(np.uint16)
    else:
        c[:, p0 : p0 + T] = x


# Prefill attention of this many multiply-adds x 2 (QK^T and PV) or more splits its query rows
# over the threads (`row_parts`); every part runs BLAS on one thread.  (Before, BLAS's own
# threads took blocks of 2 GFLOP or more and one thread the rest: two BLAS threads made the
# Phi-3-mini shapes' 61 tokens after 62 cached 6.0 s instead of 4.8.)
SPLIT_ATTENTION_FLOP = 2**23


def attend(
    cos: np.ndarray,
    sin: np.ndarray,
    neox: bool,
    p0: int,
    window: int,
    scale: float,
    n_heads: int,
    qkv: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    *,
    threads: int = 1,
) -> np.ndarray:
    """The attention block of T tokens at positions p0 .. p0 + T - 1: rotate the q and k
    parts of qkv in place (`rope`), write k and v into the caches, attend (`attention_np`).

    Args:
        cos, sin: (T, rd/2) rotation of each token's position.
        neox: rotate pairs (i, i + rd/2) rather than (2i, 2i + 1).
        p0: position of the first token; the caches hold the positions before it.
        window: sliding window (0: none).
        scale: the attention scale.
        n_heads: H.
        qkv: (T, (H + 2 KV) * D) projections [q | k | v], or ((H + 2 KV) * D,) for one.
        kc, vc: this layer's caches (KV, cap, D), cap >= p0 + T, of any KV cache type
            (`new_cache`); the rows this call reads are converted to float32.
        threads: threads a large block's query rows are split over (`row_parts`).

    Returns:
        (T, H * D), or (H * D,) for a one-dimensional qkv.
    """
    KV, _, D = cache_shape(kc)
    T, H = cos.shape[0], n_heads
    rows = qkv.reshape(T, -1)  # (T, (H + 2 KV) * D)
    q = rows[:, : H * D].reshape(T, H, D)
    k = rows[:, H * D : (H + KV) * D].reshape(T, KV, D)
    v = rows[:, (H + KV) * D :].reshape(T, KV, D)
    rope(q, cos, sin, neox)
    rope(k, cos, sin, neox)
    cache_write(kc, p0, k.transpose(1, 0, 2))
    cache_write(vc, p0, v.transpose(1, 0, 2))
    P = p0 + T
    k, v = cache_rows(kc, P), cache_rows(vc, P)
    # BLAS's own threads fight numba's around each call (`one_blas_thread`); a block worth
    # it is split by query rows over the threads instead, each a whole BLAS problem
    n = threads if 4 * T * P * D * H >= SPLIT_ATTENTION_FLOP else 1
    bounds = row_parts(T, p0, n)
    with one_blas_thread():
        if len(bounds) == 2:
            out = attention_np(q, k, v, p0, window, scale)  # (T, H*D)
        else:
            out = np.empty((T, H * D), np.float32)

            def run(a: int, b: int) -> None:
                ka, va = k[:, : p0 + b], v[:, : p0 + b]
                out[a:b] = attention_np(q[a:b], ka, va, p0 + a, window, scale)

            pool = _attention_pool(len(bounds) - 2)
            rest = [pool.submit(run, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
            run(0, bounds[1])
            for f in rest:
                f.result()
    return out.reshape(*qkv.shape[:-1], H * D)


def decode_parts(n_positions: int, n_kv: int, threads: int) -> int:
    """Parts per kv head of a long cache's one-token attention (`token_parts`): about four
    per thread, KV x parts a multiple of the threads (numba splits a prange evenly), each
    at least 64 positions."""
    parts = -(-4 * threads // n_kv)
    while (n_kv * parts) % threads:
        parts += 1
    return max(1, min(parts, -(-n_positions // 64)))


def attend_kernel(parts: np.ndarray, p0s: np.ndarray, n_heads: int, head_dim: int) -> Callable:
    """The kernel `attend_rows` runs for tokens at positions ``p0s`` in ``parts`` parts:
    `attend_batch_serial` on the calling thread where every row takes one part and they
    attend up to `LOOP_ATTENTION_MAX` multiply-adds in all (one token) or
    `ROWS_ATTENTION_MAX` (several: a launch of numba's threads would cost more), else
    `attend_batch` on numba's threads."""
    work = int(p0s.sum() + len(p0s)) * n_heads * head_dim
    limit = LOOP_ATTENTION_MAX if len(p0s) == 1 else ROWS_ATTENTION_MAX
    return attend_batch_serial if work <= limit and parts.max() == 1 else attend_batch


def attend_rows(
    kernel: Callable,
    parts: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    neox: bool,
    p0s: np.ndarray,
    window: int,
    scale: float,
    n_heads: int,
    qkv: np.ndarray,
    table: np.ndarray,
    like: np.ndarray | tuple,
) -> np.ndarray:
    """The one-token attention block of B rows in one call of ``kernel`` (numba only;
    `attend_kernel` chooses it for these rows): row b of ``qkv`` (B, (H + 2 KV) * D) is a
    token at position ``p0s[b]`` over the caches of row b of ``table`` (`cache_table`:
    sessions of a batched step, or one session's cache repeated for a run of consecutive
    tokens; ``like``: a cache of their type and head shape), rotated by row b of ``cos``
    / ``sin`` (B, rd/2), its positions split into
    ``parts[b]`` parts per kv head (flash-decoding: each part's max, sum and unnormalized
    output, merged at the end).  Either kernel (the (row, kv head, part) items on numba's
    threads, or on the calling thread) does the same arithmetic, so a token gets the same
    bits alone or in any batch.  Returns (B, H * D), or (H * D,) for a one-dimensional
    qkv (one token); qkv is rotated in place."""
    if qkv.ndim == 1:
        return kernel(parts, cos, sin, neox, p0s, window, scale, n_heads, qkv[None], like, table)[0]
    return kernel(parts, cos, sin, neox, p0s, window, scale, n_heads, qkv, like, table)


def attend_token(
    cos: np.ndarray,
    sin: np.ndarray,
    neox: bool,
    p0: int,
    window: int,
    scale: float,
    n_heads: int,
    qkv: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    parts: int = 1,
) -> np.ndarray:
    """`attend` for one token at position p0 (qkv a vector, cos / sin (1, rd/2)) in one
    compiled call (numba only): `attend_rows` of one row in ``parts`` parts per kv head.
    Returns (H * D,)."""
    one, p = np.array([parts], dtype=np.int64), np.array([p0], dtype=np.int64)
    kernel = attend_kernel(one, p, n_heads, cache_shape(kc)[2])
    table = cache_table([(kc, vc)])
    return attend_rows(kernel, one, cos, sin, neox, p, window, scale, n_heads, qkv, table, kc)


def token_parts(n_positions: int, n_heads: int, n_kv: int, head_dim: int, threads: int) -> int:
    """How many parts per kv head one token's attention over ``n_positions`` positions
    takes: 1 up to `LOOP_ATTENTION_MAX` multiply-adds (or on one thread), else
    `decode_parts`'s count."""
    if threads <= 1 or n_positions * n_heads * head_dim <= LOOP_ATTENTION_MAX:
        return 1
    return decode_parts(n_positions, n_kv, threads)


# ---------------------------------------------------------------------------- numba engine
# Plain Python here; compiled at the bottom of the module where numba is available.

_exp = np.exp  # replaced by `_exp_f32` where numba compiles the loops


def _exp_f32(x):  # noqa: ANN001, ANN202
    """exp(x) in float32 from arithmetic LLVM can vectorize (libm's expf is a scalar call,
    most of a SiLU or a softmax): Cephes' range reduction x = k ln2 + r, |r| <= ln2 / 2, a
    degree-7 polynomial for e^r, 2^k from the exponent bits.  Relative error < 2e-7; 0 below
    -86.5 (float32 turns denormal at -87.3), inf above ~88.72, like expf."""
    lo = np.float32(-86.5)
    xc = min(max(x, lo), np.float32(88.72284))
    k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    # 2^k as 2 * 2^(k-1): k reaches 128 just below the overflow bound
    y = p * _f32_from_bits((np.int32(k) + np.int32(126)) << np.int32(23)) * np.float32(2.0)
    return np.float32(0.0) if x < lo else y


def _rows(a, n):  # noqa: ANN001, ANN202
    """A C-contiguous (..., n) array as a (rows, n) view: one loop serves (n,) and (T, n)."""
    return a.reshape(a.size // n, n)


def _rms_norm_loop(x, w, eps):  # noqa: ANN001, ANN202
    n = x.shape[-1]
    out = np.empty_like(x)
    x2, o2 = _rows(x, n), _rows(out, n)
    for t in range(x2.shape[0]):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x2[t, i] * x2[t, i]
        r = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            o2[t, i] = x2[t, i] * r * w[i]
    return out


def _add_rms_norm_loop(x, y, w, eps):  # noqa: ANN001, ANN202
    """x += y (the residual add), then return rms_norm(x) * w: one call per junction."""
    n = x.shape[-1]
    out = np.empty_like(x)
    x2, y2, o2 = _rows(x, n), _rows(y, n), _rows(out, n)
    for t in range(x2.shape[0]):
        ss = np.float32(0.0)
        for i in range(n):
            x2[t, i] += y2[t, i]
            ss += x2[t, i] * x2[t, i]
        r = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            o2[t, i] = x2[t, i] * r * w[i]
    return out


def _silu_mul_loop(gu, ffn):  # noqa: ANN001, ANN202
    out = np.empty(gu.shape[:-1] + (ffn,), dtype=np.float32)
    g2, o2 = _rows(gu, 2 * ffn), _rows(out, ffn)
    for t in range(g2.shape[0]):
        for i in range(ffn):
            g = g2[t, i]
            o2[t, i] = g / (np.float32(1.0) + _exp(-g)) * g2[t, ffn + i]
    return out


def _rope_row(x, o, cos, sin, t, neox):  # noqa: ANN001, ANN202
    """Rotate one head, x[o : o + D], by the angles of row t of cos/sin (T, rd/2)."""
    half = cos.shape[1]
    for i in range(half):
        if neox:
            ia, ib = o + i, o + i + half
        else:
            ia, ib = o + 2 * i, o + 2 * i + 1
        a, b = x[ia], x[ib]
        c, s = cos[t, i], sin[t, i]
        x[ia] = a * c - b * s
        x[ib] = b * c + a * s


def _rope_loop(x, cos, sin, neox):  # noqa: ANN001, ANN202
    """`rope_np`: x (T, heads, D) in place."""
    T, heads, _ = x.shape
    for t in range(T):
        for h in range(heads):
            _rope_row(x[t, h], 0, cos, sin, t, neox)


# Reading and writing one cache row, per cache type (see "KV cache storage" above).  The
# attention loops call the dispatching names (`_dot4`, `_dot1`, `_axpy4`, `_axpy1`,
# `_store_row`, `_cache_kv_dim`); numba compiles them into the loops as the `_f32` / `_f16`
# / `_q8` version that matches the cache's type (`_by_cache_type`).  Four rows at a time:
# four dot products share the loads of q, four V rows one load/store of the output, ~20%
# faster than one.  (Float32 and float16 caches take `_dot_rows` / `_pv_rows` first, a
# vector of rows a call; these loops then do q8_0 caches and the last rows.)


def _dot4_f32(q, c, kv, r, D):  # noqa: ANN001, ANN202
    """q (D,) . rows r .. r + 3 of kv head ``kv``.  q is a slice of its own (an index
    ``q0 + d`` into the whole row would be compiled as a gather: numba wraps negative
    indices, so LLVM cannot prove the loads consecutive)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for d in range(D):
        qd = q[d]
        a0 += qd * c[kv, r, d]
        a1 += qd * c[kv, r + 1, d]
        a2 += qd * c[kv, r + 2, d]
        a3 += qd * c[kv, r + 3, d]
    return a0, a1, a2, a3


def _dot4_f16(q, c, kv, r, D):  # noqa: ANN001, ANN202
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for d in range(D):
        qd = q[d]
        a0 += qd * _f32_from_f16(c[kv, r, d])
        a1 += qd * _f32_from_f16(c[kv, r + 1, d])
        a2 += qd * _f32_from_f16(c[kv, r + 2, d])
        a3 += qd * _f32_from_f16(c[kv, r + 3, d])
    return a0, a1, a2, a3


def _dot4_q8(q, c, kv, r, D):  # noqa: ANN001, ANN202
    cq, cs = c
    nb = cs.shape[2]
    bs = D // nb
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for b in range(nb):  # integer quants times q per block, then the block's scales
        b0 = b1 = b2 = b3 = np.float32(0.0)
        for i in range(bs):
            d = b * bs + i
            qd = q[d]
            b0 += qd * np.float32(cq[kv, r, d])
            b1 += qd * np.float32(cq[kv, r + 1, d])
            b2 += qd * np.float32(cq[kv, r + 2, d])
            b3 += qd * np.float32(cq[kv, r + 3, d])
        a0 += b0 * cs[kv, r, b]
        a1 += b1 * cs[kv, r + 1, b]
        a2 += b2 * cs[kv, r + 2, b]
        a3 += b3 * cs[kv, r + 3, b]
    return a0, a1, a2, a3


def _dot1_f32(q, c, kv, r, D):  # noqa: ANN001, ANN202
    acc = np.float32(0.0)
    for d in range(D):
        acc += q[d] * c[kv, r, d]
    return acc


def _dot1_f16(q, c, kv, r, D):  # noqa: ANN001, ANN202
    acc = np.float32(0.0)
    for d in range(D):
        acc += q[d] * _f32_from_f16(c[kv, r, d])
    return acc


def _dot1_q8(q, c, kv, r, D):  # noqa: ANN001, ANN202
    cq, cs = c
    nb = cs.shape[2]
    bs = D // nb
    acc = np.float32(0.0)
    for b in range(nb):
        ab = np.float32(0.0)
        for i in range(bs):
            ab += q[b * bs + i] * np.float32(cq[kv, r, b * bs + i])
        acc += ab * cs[kv, r, b]
    return acc


def _axpy4_f32(o, g, p0, p1, p2, p3, c, kv, r):  # noqa: ANN001, ANN202
    """o[g] += p0 V[r] + p1 V[r + 1] + p2 V[r + 2] + p3 V[r + 3] (V rows of kv head kv)."""
    for d in range(o.shape[1]):
        o[g, d] += (p0 * c[kv, r, d] + p1 * c[kv, r + 1, d]) + (
            p2 * c[kv, r + 2, d] + p3 * c[kv, r + 3, d]
        )


def _axpy4_f16(o, g, p0, p1, p2, p3, c, kv, r):  # noqa: ANN001, ANN202
    h = _f32_from_f16
    for d in range(o.shape[1]):
        o[g, d] += (p0 * h(c[kv, r, d]) + p1 * h(c[kv, r + 1, d])) + (
            p2 * h(c[kv, r + 2, d]) + p3 * h(c[kv, r + 3, d])
        )


def _axpy4_q8(o, g, p0, p1, p2, p3, c, kv, r):  # noqa: ANN001, ANN202
    cq, cs = c
    nb = cs.shape[2]
    bs = o.shape[1] // nb
    for b in range(nb):
        w0, w1 = p0 * cs[kv, r, b], p1 * cs[kv, r + 1, b]
        w2, w3 = p2 * cs[kv, r + 2, b], p3 * cs[kv, r + 3, b]
        for i in range(bs):
            d = b * bs + i
            o[g, d] += (w0 * np.float32(cq[kv, r, d]) + w1 * np.float32(cq[kv, r + 1, d])) + (
                w2 * np.float32(cq[kv, r + 2, d]) + w3 * np.float32(cq[kv, r + 3, d])
            )


def _axpy1_f32(o, g, p, c, kv, r):  # noqa: ANN001, ANN202
    for d in range(o.shape[1]):
        o[g, d] += p * c[kv, r, d]


def _axpy1_f16(o, g, p, c, kv, r):  # noqa: ANN001, ANN202
    for d in range(o.shape[1]):
        o[g, d] += p * _f32_from_f16(c[kv, r, d])


def _axpy1_q8(o, g, p, c, kv, r):  # noqa: ANN001, ANN202
    cq, cs = c
    nb = cs.shape[2]
    bs = o.shape[1] // nb
    for b in range(nb):
        w = p * cs[kv, r, b]
        for i in range(bs):
            o[g, b * bs + i] += w * np.float32(cq[kv, r, b * bs + i])


def _store_row_f32(c, kv, p, x, x0):  # noqa: ANN001, ANN202
    """Row p of kv head kv = x[x0 : x0 + D]."""
    for d in range(c.shape[2]):
        c[kv, p, d] = x[x0 + d]


def _store_row_f16(c, kv, p, x, x0):  # noqa: ANN001, ANN202
    for d in range(c.shape[2]):
        c[kv, p, d] = _f16_from_f32(x[x0 + d])


def _store_row_q8(c, kv, p, x, x0):  # noqa: ANN001, ANN202
    cq, cs = c
    nb = cs.shape[2]
    bs = cq.shape[2] // nb
    for b in range(nb):
        amax = np.float32(0.0)
        for i in range(bs):
            amax = max(amax, abs(x[x0 + b * bs + i]))
        scale = amax / np.float32(127.0)
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        for i in range(bs):
            cq[kv, p, b * bs + i] = np.int8(np.rint(x[x0 + b * bs + i] * inv))
        cs[kv, p, b] = scale


def _cache_kv_dim_array(c):  # noqa: ANN001, ANN202
    return c.shape[0], c.shape[2]


def _cache_kv_dim_q8(c):  # noqa: ANN001, ANN202
    return c[0].shape[0], c[0].shape[2]


def _dot_rows(q, q0, c, kv, r, s, g, j, scale):  # noqa: ANN001, ANN202
    """s[g, j : j + DOT_ROWS] = scale * (q[q0 : q0 + D] . rows r .. r + DOT_ROWS - 1 of kv
    head ``kv``); returns how many rows it computed: DOT_ROWS, or 0 where the compiled
    kernel does not take this cache (q8_0, D not a multiple of DOT_ROWS, no AVX2)."""
    return 0


def _prefetch_rows(c, kv, r, n):  # noqa: ANN001, ANN202
    """Ask the CPU to fetch rows r .. r + n - 1 of kv head ``kv`` of a cache (compiled only;
    nothing in plain Python)."""


# Decode attention streams K and V once from memory; the CPU's prefetcher alone ran it at
# about 40% of the read bandwidth (SmolLM2 at 4096 positions, 1 thread: the scores of 30
# layers 9.7 ms, 4.1 ms with software prefetch 64 rows ahead; 32 rows: 6.3 ms, 128: 4.8 ms).
PREFETCH_ROWS = 64


def _pv_rows(o, g, s, j, c, kv, r):  # noqa: ANN001, ANN202
    """o[g] += sum over i < DOT_ROWS of s[g, j + i] * row r + i of kv head ``kv``; returns
    the rows it took: DOT_ROWS, or 0 where `_dot_rows` would return 0."""
    return 0


# Rows per `_dot_rows` call: one vector of scores (16 lanes with AVX-512, else 8); 0: none.
DOT_ROWS = 0

# the dispatching names: plain Python (the NumPy engine never calls them) reads float32
_dot4, _dot1, _axpy4, _axpy1 = _dot4_f32, _dot1_f32, _axpy4_f32, _axpy1_f32
_store_row, _cache_kv_dim = _store_row_f32, _cache_kv_dim_array


def _f16_from_f32_soft(x):  # noqa: ANN001, ANN202
    """float32 -> float16 bits, rounding to nearest even, in integer arithmetic: where the CPU
    has no conversion instruction (x86 without F16C).  Inf and NaN are kept."""
    u = _bits_of_f32(x)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf, nan
        h = np.uint32(0x7C00) | (np.uint32(0x200) if a > np.uint32(0x7F800000) else np.uint32(0))
    elif a >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        h = np.uint32(0x7C00)
    elif a < np.uint32(0x38800000):  # below 2^-14: a subnormal half, (|x| * 2^24) rounded
        h = np.uint32(np.rint(abs(x) * np.float32(16777216.0)))
    else:
        h = (
            a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1)) - np.uint32(0x38000000)
        ) >> np.uint32(13)
    return np.uint16(sign | h)


def _f32_from_f16_soft(h):  # noqa: ANN001, ANN202
    """float16 bits -> float32, exactly, in integer arithmetic (no F16C)."""
    u = np.uint32(h)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    e = (u >> np.uint32(10)) & np.uint32(0x1F)
    m = u & np.uint32(0x3FF)
    if e == 0:  # zero, subnormal: m * 2^-24
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:
        return _f32_from_bits(np.int32(sign | np.uint32(0x7F800000) | (m << np.uint32(13))))
    return _f32_from_bits(
        np.int32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))
    )


_f32_from_f16 = _f32_from_f16_soft  # replaced by the conversion instruction where there is one
_f16_from_f32 = _f16_from_f32_soft


def _attend_part(qkv, kc, vc, kv, G, a, n, scale, o, m, l, s):  # noqa: ANN001, ANN202, E741
    """Query heads kv * G .. kv * G + G - 1 (their q at qkv[h * D :]) over cache rows
    a .. a + n - 1 of kv head ``kv``, unnormalized: m (G,) the largest score, l (G,) the
    sum of exp(score - m), o (G, D) the sum of exp(score - m) * V row.  s: scratch (G, >= n).
    Each K and V row is read once for the G heads (grouped-query attention)."""
    D = o.shape[1]
    q0 = kv * G * D
    j = 0
    pf = PREFETCH_ROWS
    while j + DOT_ROWS <= n and DOT_ROWS > 0:  # a vector of scores at a time
        if j + pf < n:
            _prefetch_rows(kc, kv, a + j + pf, DOT_ROWS)
        done = 0
        for g in range(G):
            done = _dot_rows(qkv, q0 + g * D, kc, kv, a + j, s, g, j, scale)
        if done == 0:
            break
        j += done
    while j + 4 <= n:
        if j + pf < n:
            _prefetch_rows(kc, kv, a + j + pf, 4)
        for g in range(G):
            a0, a1, a2, a3 = _dot4(qkv[q0 + g * D : q0 + g * D + D], kc, kv, a + j, D)
            s[g, j], s[g, j + 1], s[g, j + 2], s[g, j + 3] = (
                a0 * scale,
                a1 * scale,
                a2 * scale,
                a3 * scale,
            )
        j += 4
    for i in range(j, n):  # the rest, one row at a time
        for g in range(G):
            s[g, i] = _dot1(qkv[q0 + g * D : q0 + g * D + D], kc, kv, a + i, D) * scale
    _prefetch_rows(vc, kv, a, min(n, pf))  # V's first rows arrive during the softmax
    for g in range(G):
        mx = np.float32(-np.inf)
        for i in range(n):
            mx = max(mx, s[g, i])
        total = np.float32(0.0)
        for i in range(n):
            e = _exp(s[g, i] - mx)
            s[g, i] = e
            total += e
        m[g], l[g] = mx, total
        for d in range(D):
            o[g, d] = np.float32(0.0)
    j = 0
    while j + DOT_ROWS <= n and DOT_ROWS > 0:
        if j + pf < n:
            _prefetch_rows(vc, kv, a + j + pf, DOT_ROWS)
        done = 0
        for g in range(G):
            done = _pv_rows(o, g, s, j, vc, kv, a + j)
        if done == 0:
            break
        j += done
    while j + 4 <= n:
        if j + pf < n:
            _prefetch_rows(vc, kv, a + j + pf, 4)
        for g in range(G):
            _axpy4(o, g, s[g, j], s[g, j + 1], s[g, j + 2], s[g, j + 3], vc, kv, a + j)
        j += 4
    for i in range(j, n):
        for g in range(G):
            _axpy1(o, g, s[g, i], vc, kv, a + i)


def _rope_store(cos, sin, neox, p0, n_heads, qkv, kc, vc):  # noqa: ANN001, ANN202
    """Rotate the q and k heads of qkv in place and write k and v at row p0 of the caches;
    returns (KV, D)."""
    KV, D = _cache_kv_dim(kc)
    for h in range(n_heads + KV):  # q heads, then k heads
        _rope_row(qkv, h * D, cos, sin, 0, neox)
    koff, voff = n_heads * D, (n_heads + KV) * D
    for kv in range(KV):
        _store_row(kc, kv, p0, qkv, koff + kv * D)
        _store_row(vc, kv, p0, qkv, voff + kv * D)
    return KV, D


def _merge_parts(o, m, l, i0, C, G, D, out, h0):  # noqa: ANN001, ANN202, E741
    """Normalize the C parts i0 .. i0 + C - 1 of one kv head's G query heads (their
    maxima ``m``, sums ``l`` and unnormalized outputs ``o``) into out[h0 :]: a part alone
    divided by its sum, several rescaled to their common maximum first (their m is
    overwritten)."""
    for g in range(G):
        h = h0 + g * D
        if C == 1:
            inv = np.float32(1.0) / l[i0, g]
            for d in range(D):
                out[h + d] = o[i0, g, d] * inv
            continue
        mx = np.float32(-np.inf)
        for c in range(i0, i0 + C):
            mx = max(mx, m[c, g])
        total = np.float32(0.0)
        for c in range(i0, i0 + C):
            w = _exp(m[c, g] - mx) if l[c, g] > 0 else np.float32(0.0)
            m[c, g] = w
            total += w * l[c, g]
        for d in range(D):
            out[h + d] = np.float32(0.0)
        for c in range(i0, i0 + C):
            w = m[c, g] / total
            for d in range(D):
                out[h + d] += w * o[c, g, d]


def _view(like, a, s, cap):  # noqa: ANN001, ANN202
    """The cache of ``like``'s type and head shape with ``cap`` positions at address a
    (and its q8_0 scales at s): an array view made in compiled code (see `cache_table`)."""
    raise NotImplementedError  # compiled only


def _row_caches(like, table, r):  # noqa: ANN001, ANN202
    """Row r's (K, V) caches from `cache_table`'s ``table``."""
    cap = table[r, 0]
    return _view(like, table[r, 1], table[r, 2], cap), _view(like, table[r, 3], table[r, 4], cap)


def cache_table(rows: list[tuple[np.ndarray | tuple, np.ndarray | tuple]]) -> np.ndarray:
    """The addresses and capacities of B rows' (K, V) caches of one layer, as int64 (B, 5):
    capacity, K's data (q8_0: codes), K's q8_0 scales (else 0), V's, V's scales.  The caller
    keeps the caches alive while a kernel reads them through this table: numba unboxes a
    tuple of B arrays per call, costlier than the attention of a short cache."""
    out = np.empty((len(rows), 5), np.int64)
    for i, (k, v) in enumerate(rows):
        out[i, 0] = cache_shape(k)[1]
        for j, c in ((1, k), (3, v)):
            if isinstance(c, tuple):
                out[i, j], out[i, j + 1] = c[0].ctypes.data, c[1].ctypes.data
            else:
                out[i, j], out[i, j + 1] = c.ctypes.data, 0
    return out


def _attend_batch_loop(parts, cos, sin, neox, p0s, window, scale, n_heads, qkv, like, table):  # noqa: ANN001, ANN202, E501
    """One token for each of B rows at once: row b of qkv (B, (H + 2 KV) * D) at position
    p0s[b] over the caches of row b of ``table`` (`cache_table`; rows may share a cache, as
    a run of drafted tokens does; ``like`` is a cache of their type and head shape),
    rotated by row b of cos / sin (B, rd/2).  Returns (B, H * D).  Rotations and cache
    writes come first, in row order; then the (row, kv head, part) items run on numba's
    threads; row b's positions are split into parts[b] parts, merged by `_merge_parts`."""
    B = qkv.shape[0]
    KV, D = _cache_kv_dim(like)
    G = n_heads // KV
    first = np.zeros(B + 1, dtype=np.int64)  # row b's items: first[b] .. first[b + 1] - 1
    start = np.zeros(B, dtype=np.int64)
    n = np.zeros(B, dtype=np.int64)
    C = np.ones(B, dtype=np.int64)
    rows = np.zeros(B, dtype=np.int64)
    for b in range(B):
        kc, vc = _row_caches(like, table, b)
        _rope_store(cos[b : b + 1], sin[b : b + 1], neox, p0s[b], n_heads, qkv[b], kc, vc)
        start[b] = max(0, p0s[b] - window + 1) if window > 0 else 0
        n[b] = p0s[b] + 1 - start[b]
        C[b] = max(1, min(parts[b], n[b]))
        rows[b] = -(-n[b] // C[b])
        first[b + 1] = first[b] + KV * C[b]
    total = first[B]
    o = np.empty((total, G, D), dtype=np.float32)
    m = np.empty((total, G), dtype=np.float32)
    l = np.empty((total, G), dtype=np.float32)  # noqa: E741
    for it in _prange(total):  # (names of its own: a `+=` on an outer name is a reduction)
        r = np.searchsorted(first, it, side="right") - 1  # the item's row
        j = it - first[r]
        h, part = j // C[r], j % C[r]
        a = start[r] + part * rows[r]
        cnt = max(0, min(rows[r], start[r] + n[r] - a))
        s = np.empty((G, rows[r]), dtype=np.float32)
        kr, vr = _row_caches(like, table, r)
        _attend_part(qkv[r], kr, vr, h, G, a, cnt, scale, o[it], m[it], l[it], s)
    out = np.zeros((B, n_heads * D), dtype=np.float32)
    for b in range(B):
        for kv in range(KV):
            _merge_parts(o, m, l, first[b] + kv * C[b], C[b], G, D, out[b], kv * G * D)
    return out


_prange = range  # numba.prange where numba compiles the loops


def _hardware_f16() -> bool:
    """Whether LLVM can convert float16 with an instruction here (x86 F16C, any AArch64):
    elsewhere it would call compiler-rt helpers that numba's JIT does not link."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        from llvmlite import binding

        return "+f16c" in binding.get_host_cpu_features().flatten().split(",")
    except Exception:  # noqa: BLE001 - unknown: take the portable conversion
        return False


if numba_available():
    import inspect

    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic, overload

    # error_model="numpy": a zero norm gives inf/nan like NumPy, never ZeroDivisionError.
    _jit = numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
    # helpers inlined into the loops that call them (a real call per head costs 3x)
    _inline = numba.njit(inline="always", fastmath=True, error_model="numpy")

    @intrinsic
    def _f32_from_bits(typingctx, i):  # noqa: ANN001, ANN202, ARG001
        """The float32 whose bit pattern is the int32 ``i`` (a register bitcast)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @intrinsic
    def _bits_of_f32(typingctx, x):  # noqa: ANN001, ANN202, ARG001
        """The uint32 bit pattern of the float32 ``x``."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    if _hardware_f16():

        @intrinsic
        def _f32_from_f16(typingctx, h):  # noqa: ANN001, ANN202, ARG001
            """float16 bits (uint16) -> float32: LLVM's fpext half, vcvtph2ps with F16C."""

            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

            return types.float32(types.uint16), codegen

        @intrinsic
        def _f16_from_f32(typingctx, x):  # noqa: ANN001, ANN202, ARG001
            """float32 -> float16 bits, rounding to nearest even (vcvtps2ph)."""

            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

            return types.uint16(types.float32), codegen

    else:  # pragma: no cover - x86 CPUs without F16C
        _f32_from_f16 = _inline(_f32_from_f16_soft)
        _f16_from_f32 = _inline(_f16_from_f32_soft)

    def _cache_kind(c):  # noqa: ANN001, ANN202
        """The cache type of a numba argument type: "f32", "f16", "q8_0" or None."""
        if isinstance(c, types.Array) and c.ndim == 3:
            return {types.float32: "f32", types.uint16: "f16"}.get(c.dtype)
        if isinstance(c, types.BaseTuple) and len(c) == 2:
            return "q8_0"
        return None

    def _by_cache_type(stub, arg, f32, f16, q8, inline="always"):  # noqa: ANN001, ANN202
        """Compile calls of ``stub`` as the version for the type of argument ``arg``."""
        impls = {"f32": f32, "f16": f16, "q8_0": q8}
        opts = dict(fastmath=True, error_model="numpy")

        def typer(*args):  # noqa: ANN002, ANN202
            return impls.get(_cache_kind(args[arg]))

        typer.__signature__ = inspect.signature(stub)  # numba matches it with the impls'
        overload(stub, inline=inline, jit_options=opts)(typer)

    def _dot4(q, c, kv, r, D):  # noqa: ANN001, ANN202
        raise NotImplementedError  # compiled only (`_by_cache_type`)

    def _dot1(q, c, kv, r, D):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def _axpy4(o, g, p0, p1, p2, p3, c, kv, r):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def _axpy1(o, g, p, c, kv, r):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def _store_row(c, kv, p, x, x0):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def _cache_kv_dim(c):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def _pointer_to(dtype):  # noqa: ANN001, ANN202
        """An intrinsic: an int64 address as a pointer to ``dtype`` values."""

        @intrinsic
        def to_pointer(typingctx, addr):  # noqa: ANN001, ANN202, ARG001
            ptr = types.CPointer(dtype)

            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                return builder.inttoptr(args[0], context.get_value_type(ptr))

            return ptr(types.int64), codegen

        return to_pointer

    _POINTERS = {t: _pointer_to(t) for t in (types.float32, types.uint16, types.int8)}

    @overload(_view, inline="always")
    def _view_impl(like, a, s, cap):  # noqa: ANN001, ANN202
        if isinstance(like, types.BaseTuple):  # q8_0: int8 codes, float32 scales
            codes, scales = _POINTERS[types.int8], _POINTERS[types.float32]

            def q8(like, a, s, cap):  # noqa: ANN001, ANN202
                KV, _, D = like[0].shape
                nb = like[1].shape[2]
                return (
                    numba.carray(codes(a), (KV, cap, D)),
                    numba.carray(scales(s), (KV, cap, nb)),
                )

            return q8
        values = _POINTERS[like.dtype]

        def array(like, a, s, cap):  # noqa: ANN001, ANN202
            KV, _, D = like.shape
            return numba.carray(values(a), (KV, cap, D))

        return array

    def _vector_lanes() -> int:
        """Float32 lanes of this x86 CPU's vectors for `_dot_rows` (16 with AVX-512, 8 with
        AVX2 + FMA + F16C), 0 elsewhere (the scalar loops then compute every score)."""
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return 0
        try:
            from llvmlite import binding

            feats = set(binding.get_host_cpu_features().flatten().split(","))
        except Exception:  # noqa: BLE001 - unknown: the loops
            return 0
        if "+avx512f" in feats:
            return 16
        return 8 if {"+avx2", "+fma", "+f16c"} <= feats else 0

    DOT_ROWS = _vector_lanes()

    class _IR:
        """Codegen helpers for the attention intrinsics: vectors of W float lanes."""

        def __init__(self, context, builder, W):  # noqa: ANN001
            self.ctx, self.b, self.W = context, builder, W
            self.f32, self.i32 = ir.FloatType(), ir.IntType(32)
            self.i8p = ir.IntType(8).as_pointer()
            self.vf = ir.VectorType(self.f32, self.W)

        def n(self, v):  # an i64 constant
            return ir.Constant(ir.IntType(64), v)

        def array(self, aty, aval):  # (byte pointer to the data, shape, strides)
            a = self.ctx.make_array(aty)(self.ctx, self.b, aval)
            dims = aty.ndim
            shape = cgutils.unpack_tuple(self.b, a.shape, dims)
            strides = cgutils.unpack_tuple(self.b, a.strides, dims)
            return self.b.bitcast(a.data, self.i8p), shape, strides

        def at(self, p, *offsets):  # p + sum of (index x stride) byte offsets
            off = self.n(0)
            for i, stride in offsets:
                off = self.b.add(off, self.b.mul(i, stride))
            return self.b.gep(p, [off])

        def vload(self, p, half):  # W float16 or float32 values at p, as W x float32
            b = self.b
            t = ir.VectorType(ir.HalfType() if half else self.f32, self.W)
            v = b.load(b.bitcast(p, t.as_pointer()), align=2 if half else 4)
            return b.fpext(v, self.vf) if half else v

        def splat(self, x):
            undef = ir.Constant(self.vf, ir.Undefined)
            v = self.b.insert_element(undef, x, self.i32(0))
            return self.b.shuffle_vector(
                v, undef, ir.Constant(ir.VectorType(self.i32, self.W), [0] * self.W)
            )

        def fma(self, a, c, acc):
            fnty = ir.FunctionType(self.vf, [self.vf] * 3)
            fn = cgutils.get_or_insert_function(self.b.module, fnty, f"llvm.fma.v{self.W}f32")
            return self.b.call(fn, [a, c, acc])

        def lanes_sum(self, vecs):
            """W vectors -> one whose lane i is the sum of vecs[i]: pairs of vectors halve
            their partial sums per row at each level (two shuffles and an add per pair,
            vpermt2ps on AVX-512), rows kept in order: 3 (W - 1) instructions for W rows,
            where a horizontal sum per row takes about 2 log2(W) + 2."""
            W, w = self.W, self.W  # w: partial sums per row in each vector
            while len(vecs) > 1:
                half, rows = w // 2, W // w
                masks = []
                for first in (0, half):
                    idx = [k * w + first + p for k in range(rows) for p in range(half)]
                    masks.append(
                        ir.Constant(ir.VectorType(self.i32, W), idx + [W + x for x in idx])
                    )
                pairs = zip(vecs[0::2], vecs[1::2], strict=True)
                vecs = [
                    self.b.fadd(*(self.b.shuffle_vector(u, v, m) for m in masks)) for u, v in pairs
                ]
                w = half
            return vecs[0]

    @intrinsic
    def _prefetch_array(typingctx, c, kv, r, n):  # noqa: ANN001, ANN202, ARG001
        """Prefetch rows r .. r + n - 1 of kv head ``kv`` of a (KV, cap, D) array, a cache
        line at a time (a prefetch never faults: rows past the end cost nothing)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            h = _IR(context, builder, 1)
            ca, kvv, rv, nv = args
            data, _, st = h.array(c, ca)
            base = h.at(data, (kvv, st[0]), (rv, st[1]))
            fnty = ir.FunctionType(ir.VoidType(), [h.i8p, h.i32, h.i32, h.i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
            lines = builder.udiv(builder.mul(nv, st[1]), h.n(64))
            with cgutils.for_range(builder, lines) as loop:
                line = h.at(base, (loop.index, h.n(64)))
                builder.call(fn, [line, h.i32(0), h.i32(3), h.i32(1)])  # read, keep, data
            return context.get_dummy_value()

        return types.void(c, kv, r, n), codegen

    @overload(_prefetch_rows, inline="always")
    def _prefetch_rows_impl(c, kv, r, n):  # noqa: ANN001, ANN202
        if isinstance(c, types.BaseTuple):  # q8_0: codes and scales

            def both(c, kv, r, n):  # noqa: ANN001, ANN202
                _prefetch_array(c[0], kv, r, n)
                _prefetch_array(c[1], kv, r, n)

            return both
        return lambda c, kv, r, n: _prefetch_array(c, kv, r, n)

    def vector_kernels(W: int) -> tuple:
        """The two attention intrinsics for vectors of W float lanes: ``dot_rows(q, q0, c,
        kv, r, s, g, j, scale)`` (`_dot_rows` of a float32 / float16 cache whose D is a
        multiple of W) and ``pv_rows(o, g, s, j, c, kv, r)`` (`_pv_rows` likewise); the
        module compiles them for DOT_ROWS lanes, tests for every width a CPU may give."""

        @intrinsic
        def dot_rows(typingctx, q, q0, c, kv, r, s, g, j, scale):  # noqa: ANN001, ANN202, ARG001
            """`_dot_rows` of a float32 or float16 (uint16) cache whose D is a multiple of W:
            one accumulator vector per row, fma'd over D in W-lane chunks, then summed
            across lanes into one vector of W scores (`_IR.lanes_sum`)."""
            half = c.dtype == types.uint16

            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                h = _IR(context, builder, W)
                esize = 2 if half else 4
                qa, q0v, ca, kvv, rv, sa, gv, jv, sc = args
                qdata, _, _ = h.array(q, qa)
                cdata, cshape, cst = h.array(c, ca)
                sdata, _, sst = h.array(s, sa)
                rows = h.at(cdata, (kvv, cst[0]), (rv, cst[1]))
                qp = h.at(qdata, (q0v, h.n(4)))
                zero = ir.Constant(h.vf, [ir.Constant(h.f32, 0.0)] * W)
                accs = [cgutils.alloca_once_value(builder, zero) for _ in range(W)]
                with cgutils.for_range(builder, builder.udiv(cshape[2], h.n(W))) as loop:
                    ci = builder.mul(loop.index, h.n(W))
                    qv = h.vload(h.at(qp, (ci, h.n(4))), False)
                    for i, acc in enumerate(accs):
                        kv_ = h.vload(h.at(rows, (h.n(i), cst[1]), (ci, h.n(esize))), half)
                        builder.store(h.fma(kv_, qv, builder.load(acc)), acc)
                scores = h.lanes_sum([builder.load(acc) for acc in accs])
                out = h.at(sdata, (gv, sst[0]), (jv, h.n(4)))
                scores = builder.fmul(scores, h.splat(sc))
                builder.store(scores, builder.bitcast(out, h.vf.as_pointer()), align=4)
                return context.get_dummy_value()

            return types.void(q, q0, c, kv, r, s, g, j, scale), codegen

        @intrinsic
        def pv_rows(typingctx, o, g, s, j, c, kv, r):  # noqa: ANN001, ANN202, ARG001
            """`_pv_rows` of a float32 or float16 cache whose D is a multiple of W: the
            W weights broadcast once; per W-lane chunk of D, o[g]'s chunk loaded once, the
            W rows fma'd into it over four independent chains, stored once."""
            half = c.dtype == types.uint16

            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                h = _IR(context, builder, W)
                esize = 2 if half else 4
                oa, gv, sa, jv, ca, kvv, rv = args
                odata, _, ost = h.array(o, oa)
                sdata, _, sst = h.array(s, sa)
                cdata, cshape, cst = h.array(c, ca)
                rows = h.at(cdata, (kvv, cst[0]), (rv, cst[1]))
                orow = h.at(odata, (gv, ost[0]))
                sp = builder.bitcast(h.at(sdata, (gv, sst[0]), (jv, h.n(4))), h.f32.as_pointer())
                weights = [
                    h.splat(builder.load(builder.gep(sp, [h.i32(i)]), align=4)) for i in range(W)
                ]
                zero = ir.Constant(h.vf, [ir.Constant(h.f32, 0.0)] * W)
                with cgutils.for_range(builder, builder.udiv(cshape[2], h.n(W))) as loop:
                    ci = builder.mul(loop.index, h.n(W))
                    op = builder.bitcast(h.at(orow, (ci, h.n(4))), h.vf.as_pointer())
                    chains = [builder.load(op, align=4), zero, zero, zero]
                    for i in range(W):
                        v = h.vload(h.at(rows, (h.n(i), cst[1]), (ci, h.n(esize))), half)
                        chains[i % 4] = h.fma(weights[i], v, chains[i % 4])
                    pair = builder.fadd(chains[0], chains[1]), builder.fadd(chains[2], chains[3])
                    builder.store(builder.fadd(*pair), op, align=4)
                return context.get_dummy_value()

            return types.void(o, g, s, j, c, kv, r), codegen

        return dot_rows, pv_rows

    _dot_rows_ir, _pv_rows_ir = vector_kernels(DOT_ROWS or 8)

    def _takes(c) -> bool:  # noqa: ANN001
        """Whether `_dot_rows_ir` / `_pv_rows_ir` compile for cache type ``c`` (they still
        decline a D that is not a multiple of DOT_ROWS, at run time)."""
        return DOT_ROWS > 0 and _cache_kind(c) in ("f32", "f16")

    @overload(_dot_rows, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
    def _dot_rows_impl(q, q0, c, kv, r, s, g, j, scale):  # noqa: ANN001, ANN202
        if not _takes(c):
            return lambda q, q0, c, kv, r, s, g, j, scale: 0

        def impl(q, q0, c, kv, r, s, g, j, scale):  # noqa: ANN001, ANN202
            if c.shape[2] % DOT_ROWS != 0:
                return 0
            _dot_rows_ir(q, q0, c, kv, r, s, g, j, np.float32(scale))
            return DOT_ROWS

        return impl

    @overload(_pv_rows, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
    def _pv_rows_impl(o, g, s, j, c, kv, r):  # noqa: ANN001, ANN202
        if not _takes(c):
            return lambda o, g, s, j, c, kv, r: 0

        def impl(o, g, s, j, c, kv, r):  # noqa: ANN001, ANN202
            if c.shape[2] % DOT_ROWS != 0:
                return 0
            _pv_rows_ir(o, g, s, j, c, kv, r)
            return DOT_ROWS

        return impl

    def _f16_rows_loop(c, P):  # noqa: ANN001, ANN202
        KV, _, D = c.shape
        out = np.empty((KV, P, D), np.float32)
        for kv in range(KV):
            for p in range(P):
                for d in range(D):
                    out[kv, p, d] = _f32_from_f16(c[kv, p, d])
        return out

    _f16_rows = _jit(_f16_rows_loop)

    _by_cache_type(_dot4, 1, _dot4_f32, _dot4_f16, _dot4_q8)
    _by_cache_type(_dot1, 1, _dot1_f32, _dot1_f16, _dot1_q8)
    _by_cache_type(_axpy4, 6, _axpy4_f32, _axpy4_f16, _axpy4_q8)
    _by_cache_type(_axpy1, 3, _axpy1_f32, _axpy1_f16, _axpy1_q8)
    _by_cache_type(_store_row, 0, _store_row_f32, _store_row_f16, _store_row_q8, "never")
    _by_cache_type(_cache_kv_dim, 0, _cache_kv_dim_array, _cache_kv_dim_array, _cache_kv_dim_q8)

    _prange = numba.prange
    _exp = _inline(_exp_f32)
    _rows = _inline(_rows)
    _rope_row = _inline(_rope_row)
    # compiled on their own, not inlined: the serial and the parallel batch kernel then
    # run the same machine code for a token (inlined, each is vectorized its own way and
    # the two disagree in the last bits)
    _attend_part = _jit(_attend_part)
    _merge_parts = _jit(_merge_parts)
    _rope_store = _inline(_rope_store)
    _row_caches = _inline(_row_caches)
    rms_norm = _jit(_rms_norm_loop)
    add_rms_norm = _jit(_add_rms_norm_loop)
    silu_mul = _jit(_silu_mul_loop)
    rope = _jit(_rope_loop)
    attend_batch = numba.njit(
        cache=True, fastmath=True, nogil=True, error_model="numpy", parallel=prange_only()
    )(renamed(_attend_batch_loop, "_parallel"))
    attend_batch_serial = _jit(renamed(_attend_batch_loop, "_serial"))
    FUSED_DECODE = True  # the forward pass may call attend_token
else:  # pragma: no cover - exercised where numba is missing
    rms_norm, add_rms_norm, silu_mul, rope = rms_norm_np, add_rms_norm_np, silu_mul_np, rope_np
    attend_batch = attend_batch_serial = None
    FUSED_DECODE = False
