"""AVX2 matrix kernels over GGUF blocks, written as LLVM IR (numba ``@intrinsic``, `avx2_ir`).

The numba loops in `numba_matvec` leave LLVM to vectorize Python loops; with blocks of 32
weights the loops are too short and the per-block scale decoding is scalar, so they reach
~1 weight per instruction.  Here each row's dot product is one IR loop over the blocks, with
explicit 8-wide vectors, two alternating accumulators and the block scales decoded with
vector shuffles.  Three families share the unpacking code:

- float activations (``fv_*``, exact to float32 rounding; F16, BF16, and the quantized
  types with ``int8_activations=False``): weights widened to 8 x i32 (vpmovzxbd), masked,
  converted and fma'd with ``x``; each 32-group's partial vector is scaled once; zero
  points / mins are applied against float sums of ``x`` (``xsums``);
- int8 activations (``mv_*``, the quantized types' default): ``x`` quantized to int8 with
  one scale per 32 values (``quantize_x``, what llama.cpp does), weights unpacked to bytes
  and multiplied by ``vpmaddubsw`` (u8 x i8 -> i16 pairs) then ``vpmaddwd`` (-> i32, with 1
  or the K-quants' integer sub-block scales), converted and fma'd by ``d * dx`` per 32
  values.  The result is ``W @ x_hat``, ``x_hat`` = ``x`` rounded to 8 bits per 32 values;
- row decoders (``dq_*``) writing float32 rows, for prefill tiles handed to BLAS sgemm.

Drivers take up to three matrices (``w1, w2, w3``, rows concatenated) so that q|k|v or
gate|up run as one parallel call; the ``*1_`` variants run on the calling thread.  Used only
when the CPU has AVX2, FMA and F16C (`AVAILABLE`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .avx2_ir import (  # noqa: F401  (AVAILABLE is this module's API)
    AVAILABLE,
    _deq_bf16,
    _deq_f16,
    _deq_q4_0,
    _deq_q4_1,
    _deq_q4_k,
    _deq_q5_k,
    _deq_q6_k,
    _deq_q8_0,
    _dot_q4_0,
    _dot_q4_1,
    _dot_q4_k,
    _dot_q5_k,
    _dot_q6_k,
    _dot_q8_0,
    _fdot_bf16,
    _fdot_f16,
    _fdot_q4_0,
    _fdot_q4_1,
    _fdot_q4_k,
    _fdot_q5_k,
    _fdot_q6_k,
    _fdot_q8_0,
)

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}
_SER = {"fastmath": True, "cache": True, "nogil": True}


@njit(**_SER)
def quantize_x(x, xq, dx, xs):
    """x float32 (n,) -> xq int8 (n,), dx (n/32,) scales, xs (n/32,) sums of dx * xq."""
    for g in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        for i in range(32 * g, 32 * g + 32):
            amax = max(amax, abs(x[i]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        t = np.int32(0)
        for i in range(32 * g, 32 * g + 32):
            q = np.int32(np.rint(x[i] * inv))
            xq[i] = np.int8(q)
            t += q
        dx[g] = d
        xs[g] = d * np.float32(t)


# Tile decoders: out[i] = row r0 + i of w, on the calling thread (the tile then goes to a
# multi-threaded sgemm; see `numba_decode.deq_range_serial`).
@njit(**_SER)
def dq_q4_0(w, r0, out):
    nb = out.shape[1] // 32
    for i in range(out.shape[0]):
        _deq_q4_0(w, r0 + i, out, i, nb)


@njit(**_SER)
def dq_q4_1(w, r0, out):
    nb = out.shape[1] // 32
    for i in range(out.shape[0]):
        _deq_q4_1(w, r0 + i, out, i, nb)


@njit(**_SER)
def dq_q8_0(w, r0, out):
    nb = out.shape[1] // 32
    for i in range(out.shape[0]):
        _deq_q8_0(w, r0 + i, out, i, nb)


@njit(**_SER)
def dq_q4_k(w, r0, out):
    nb = out.shape[1] // 256
    for i in range(out.shape[0]):
        _deq_q4_k(w, r0 + i, out, i, nb)


@njit(**_SER)
def dq_q5_k(w, r0, out):
    nb = out.shape[1] // 256
    for i in range(out.shape[0]):
        _deq_q5_k(w, r0 + i, out, i, nb)


@njit(**_SER)
def dq_q6_k(w, r0, out):
    nb = out.shape[1] // 256
    for i in range(out.shape[0]):
        _deq_q6_k(w, r0 + i, out, i, nb)


# Drivers: out[: n1 + n2 + n3] = [w1; w2; w3] @ x, rows split across threads (mv_*, fv_*) or
# on the calling thread (mv1_*, fv1_*: a parallel launch costs more than a small matrix).
# mv_* quantize x to int8 first (`quantize_x`), fv_* take the float sums of x per 16/32
# (`xsums`); both inside the compiled call, so a matvec costs one dispatch from Python.
# They are written out per type: numba caches a function by its source location, and an
# intrinsic cannot be passed as an argument.


@njit(**_SER)
def xsums(x, g):
    """float32 (n / g,): the sum of each g consecutive values of x."""
    s = np.empty(x.shape[0] // g, np.float32)
    for i in range(s.shape[0]):
        t = np.float32(0.0)
        for j in range(g * i, g * i + g):
            t += x[j]
        s[i] = t
    return s


@njit(**_SER)
def quantized(x):
    """(xq, dx, xs) of `quantize_x`, allocated."""
    xq = np.empty(x.shape[0], np.int8)
    dx = np.empty(x.shape[0] // 32, np.float32)
    xs = np.empty(x.shape[0] // 32, np.float32)
    quantize_x(x, xq, dx, xs)
    return xq, dx, xs


@njit(**_OPTS)
def mv_q4_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_0(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_0(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_0(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q4_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_0(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_0(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_0(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q4_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_0(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_0(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_0(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q4_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_0(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_0(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_0(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def mv_q4_1(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_1(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_1(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_1(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q4_1(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_1(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_1(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_1(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q4_1(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_1(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_1(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_1(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q4_1(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_1(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_1(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_1(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def mv_q8_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q8_0(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q8_0(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q8_0(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q8_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q8_0(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q8_0(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q8_0(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q8_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q8_0(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q8_0(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q8_0(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q8_0(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q8_0(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q8_0(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q8_0(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def mv_q4_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q4_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q4_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q4_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q4_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q4_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_k(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q4_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q4_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q4_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q4_k(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def mv_q5_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q5_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q5_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q5_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q5_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q5_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q5_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q5_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q5_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q5_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q5_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q5_k(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q5_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 32)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q5_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q5_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q5_k(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def mv_q6_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q6_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q6_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q6_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_SER)
def mv1_q6_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xq, dx, xs = quantized(x)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _dot_q6_k(w1, r, xq, dx, xs, nb)
        elif r < n2:
            out[r] = _dot_q6_k(w2, r - n1, xq, dx, xs, nb)
        else:
            out[r] = _dot_q6_k(w3, r - n2, xq, dx, xs, nb)


@njit(**_OPTS)
def fv_q6_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 16)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q6_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q6_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q6_k(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_q6_k(w1, w2, w3, x, out):
    nb = x.shape[0] // 256
    xs = xsums(x, 16)
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_q6_k(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_q6_k(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_q6_k(w3, r - n2, x, xs, nb)


@njit(**_OPTS)
def fv_f16(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = x[:0]
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_f16(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_f16(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_f16(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_f16(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = x[:0]
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_f16(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_f16(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_f16(w3, r - n2, x, xs, nb)


@njit(**_SER)
def dq_f16(w, r0, out):
    nb = out.shape[1] // 32
    for i in range(out.shape[0]):
        _deq_f16(w, r0 + i, out, i, nb)


@njit(**_OPTS)
def fv_bf16(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = x[:0]
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in prange(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_bf16(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_bf16(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_bf16(w3, r - n2, x, xs, nb)


@njit(**_SER)
def fv1_bf16(w1, w2, w3, x, out):
    nb = x.shape[0] // 32
    xs = x[:0]
    n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
    for r in range(n2 + w3.shape[0]):
        if r < n1:
            out[r] = _fdot_bf16(w1, r, x, xs, nb)
        elif r < n2:
            out[r] = _fdot_bf16(w2, r - n1, x, xs, nb)
        else:
            out[r] = _fdot_bf16(w3, r - n2, x, xs, nb)


@njit(**_SER)
def dq_bf16(w, r0, out):
    nb = out.shape[1] // 32
    for i in range(out.shape[0]):
        _deq_bf16(w, r0 + i, out, i, nb)
