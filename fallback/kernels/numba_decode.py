"""The numba engine's block layouts and row decoders: GGUF rows -> float32.

- Layout helpers (``inline="always"``) that `numba_matvec` inlines too, so each packed field
  is decoded in one place: `f16_bits` (a half's bits, for the `F16_TABLE` lookup),
  `q5_high_bits` (Q5_0/Q5_1's 32 fifth bits), `k_scale_min_low` / `k_scale_min_high` (Q4_K /
  Q5_K's 12 bytes of 6-bit scales and mins).  The bit positions are those of
  `phimlx.gguf.quants`, and the loops are tested against it.
- Kernels that take the type at run time (``code``, its `GGMLType` value; compiled once for
  all types, a branch per row costs nothing next to the row): `decode_tile_by_code` (prefill
  tiles, on every CPU without AVX2 and for Q5_0/Q5_1/Q2_K/Q3_K on AVX2 ones),
  `decode_rows_by_code` (the embedding lookup, every CPU), `matvec_by_code` (decode a row,
  then the dot: Q2_K, Q3_K, F16, BF16 without AVX2).
- `decode_tile`, `decode_rows`, `matvec_float`: those kernels bound to one type, with the
  signatures of `fallback.kernels.KernelSet`.

`numba_matvec` inlines the layout helpers from here, and numba's cache is keyed by each
kernel's own file: after editing a helper, touch `numba_matvec` too (or clear
``__pycache__``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from phimlx.gguf import TYPE_SIZES, GGMLType

from . import prange_only

U = np.uint64
I = np.int32  # noqa: E741
F = np.float32

# GGMLType values (numba sees plain ints)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30

_OPTS = {"parallel": prange_only(), "fastmath": True, "cache": True, "nogil": True}

# A float32 for every float16 bit pattern: the kernels decode block scales with one lookup
# (float16 is no numba type), ``F16_TABLE[f16_bits(row, o)]``.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
F16_TABLE = F16_TABLE.astype(np.float32)


@njit(inline="always")
def f16_bits(row, o):
    """The bits of the float16 at byte ``o`` of ``row``, as an index into `F16_TABLE`."""
    return I(row[o]) | (I(row[o + U(1)]) << I(8))


@njit(inline="always")
def q5_high_bits(row, ho):
    """Q5_0 / Q5_1: the 32 fifth bits at byte ``ho`` (bit l for weight l), as uint64."""
    qh = U(row[ho]) | (U(row[ho + U(1)]) << U(8))
    return qh | (U(row[ho + U(2)]) << U(16)) | (U(row[ho + U(3)]) << U(24))


@njit(inline="always")
def k_scale_min_low(row, so, j):
    """Q4_K / Q5_K: the six-bit scale and min of sub-block ``j`` (0..3); ``so`` is the byte
    offset of the 12 scale bytes (low 6 bits of bytes j and 4 + j)."""
    return I(row[so + j]) & I(63), I(row[so + U(4) + j]) & I(63)


@njit(inline="always")
def k_scale_min_high(row, so, j):
    """Q4_K / Q5_K: the scale and min of sub-block ``4 + j`` (j = 0..3): low nibble / high
    nibble of byte 8 + j, their top two bits the top bits of bytes j / 4 + j."""
    a, bm, c = I(row[so + j]), I(row[so + U(4) + j]), I(row[so + U(8) + j])
    return (c & I(15)) | ((a >> I(6)) << I(4)), (c >> I(4)) | ((bm >> I(6)) << I(4))


@njit(inline="always")
def _q32(row, rowi, y, f16, code, bs):  # the 32-weight block types; y (cols,)
    nb = U(y.shape[0] // 32)
    for b in range(nb):
        o, yo = b * U(bs), b * U(32)
        d = f16[f16_bits(row, o)]
        if code == Q8_0:
            for l in range(U(32)):
                y[yo + l] = d * F(rowi[o + U(2) + l])
            continue
        m = F(0)
        qh = U(0)
        qo = o + U(2)
        if code == Q4_0:
            m = F(-8) * d
        elif code == Q4_1:
            m = f16[f16_bits(row, o + U(2))]
            qo = o + U(4)
        else:
            ho = o + U(2) if code == Q5_0 else o + U(4)
            m = F(-16) * d if code == Q5_0 else f16[f16_bits(row, o + U(2))]
            qh = q5_high_bits(row, ho)
            qo = ho + U(4)
        for l in range(U(16)):
            q = I(row[qo + l])
            lo = (q & I(15)) | I(((qh >> l) & U(1)) << U(4))
            hi = (q >> I(4)) | I(((qh >> (l + U(16))) & U(1)) << U(4))
            y[yo + l] = d * F(lo) + m
            y[yo + U(16) + l] = d * F(hi) + m


@njit(inline="always")
def _k_scale_min(row, so, j):  # sub-block j = 0..7
    if j < 4:
        return k_scale_min_low(row, so, j)
    return k_scale_min_high(row, so, j - U(4))


@njit(inline="always")
def _qk(row, rowi, y, f16, code, bs):  # the 256-weight K-quants; y (cols,)
    nb = U(y.shape[0] // 256)
    for b in range(nb):
        o, yo = b * U(bs), b * U(256)
        if code in (Q4_K, Q5_K):
            d, dm = f16[f16_bits(row, o)], f16[f16_bits(row, o + U(2))]
            qo = o + U(16) if code == Q4_K else o + U(48)
            for j in range(U(8)):
                sc, mn = _k_scale_min(row, o + U(4), j)
                ds, ms = d * F(sc), dm * F(mn)
                sh = I(4) * I(j & U(1))
                bo = qo + U(32) * (j >> U(1))
                for l in range(U(32)):
                    q = (I(row[bo + l]) >> sh) & I(15)
                    if code == Q5_K:
                        q |= ((I(row[o + U(16) + l]) >> I(j)) & I(1)) << I(4)
                    y[yo + U(32) * j + l] = ds * F(q) - ms
        elif code == Q6_K:
            d = f16[f16_bits(row, o + U(208))]
            for hh in range(U(2)):
                for k in range(U(4)):
                    qlo = o + U(64) * hh + U(32) * (k & U(1))
                    sh = I(4) * I(k >> U(1))
                    for l in range(U(32)):
                        q = (I(row[qlo + l]) >> sh) & I(15)
                        q |= ((I(row[o + U(128) + U(32) * hh + l]) >> I(2 * k)) & I(3)) << I(4)
                        s = F(rowi[o + U(192) + U(8) * hh + U(2) * k + (l >> U(4))])
                        y[yo + U(128) * hh + U(32) * k + l] = d * s * F(q - I(32))
        elif code == Q2_K:
            d, dm = f16[f16_bits(row, o + U(80))], f16[f16_bits(row, o + U(82))]
            for hh in range(U(2)):
                for s in range(U(4)):
                    for l in range(U(32)):
                        q = (I(row[o + U(16) + U(32) * hh + l]) >> I(2 * s)) & I(3)
                        sc = I(row[o + U(8) * hh + U(2) * s + (l >> U(4))])
                        v = d * F(sc & I(15)) * F(q) - dm * F(sc >> I(4))
                        y[yo + U(128) * hh + U(32) * s + l] = v
        else:  # Q3_K
            d = f16[f16_bits(row, o + U(108))]
            for hh in range(U(2)):
                for s in range(U(4)):
                    for l in range(U(32)):
                        g = U(8) * hh + U(2) * s + (l >> U(4))  # scale index 0..15
                        low = I(row[o + U(96) + (g & U(7))]) >> I(4 * (g >> U(3)))
                        high = (I(row[o + U(104) + (g & U(3))]) >> I(2 * (g >> U(2)))) & I(3)
                        sc = ((low & I(15)) | (high << I(4))) - I(32)
                        q = (I(row[o + U(32) + U(32) * hh + l]) >> I(2 * s)) & I(3)
                        hb = (I(row[o + l]) >> I(4 * hh + s)) & I(1)
                        y[yo + U(128) * hh + U(32) * s + l] = d * F(sc) * F(q - I(4) + I(4) * hb)


@njit(inline="always")
def _float_row(row, y, f16, code):  # F32 / F16 / BF16 rows; y (cols,)
    n = U(y.shape[0])
    if code == F16:
        for i in range(n):
            y[i] = f16[f16_bits(row, U(2) * i)]
    elif code == BF16:
        bits = y.view(np.uint32)
        for i in range(n):
            bits[i] = (np.uint32(row[U(2) * i]) << np.uint32(16)) | (
                np.uint32(row[U(2) * i + U(1)]) << np.uint32(24)
            )
    else:
        bits = y.view(np.uint32)
        for i in range(n):
            o = U(4) * i
            bits[i] = (
                np.uint32(row[o])
                | (np.uint32(row[o + U(1)]) << np.uint32(8))
                | (np.uint32(row[o + U(2)]) << np.uint32(16))
                | (np.uint32(row[o + U(3)]) << np.uint32(24))
            )


@njit(cache=True, fastmath=True, nogil=True)
def _decode_row(row, rowi, y, f16, code, bs):  # compiled once, called by the three kernels
    if code in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
        _q32(row, rowi, y, f16, code, bs)
    elif code in (F32, F16, BF16):
        _float_row(row, y, f16, code)
    else:
        _qk(row, rowi, y, f16, code, bs)


@njit(**_OPTS)
def decode_rows_by_code(w, wi8, ids, code, bs, f16, out):
    """out[i] = row ids[i] of w decoded; w uint8 (rows, row_bytes), out float32 (n, cols)."""
    for i in prange(ids.shape[0]):
        _decode_row(w[ids[i]], wi8[ids[i]], out[i], f16, code, bs)


@njit(cache=True, fastmath=True, nogil=True)
def decode_tile_by_code(w, wi8, r0, code, bs, f16, out):
    """out[i] = row r0 + i of w decoded, for i < out.shape[0] (a prefill tile), on the
    calling thread: the tile goes on to a multi-threaded BLAS sgemm, and numba's OpenMP
    workers spinning after a parallel region would take the cores BLAS wants (measured: 60x
    slower on 2 cores)."""
    for i in range(out.shape[0]):
        _decode_row(w[r0 + i], wi8[r0 + i], out[i], f16, code, bs)


@njit(**_OPTS)
def matvec_by_code(w, wi8, code, bs, x, f16, out):
    """out[r] = W[r] . x by decoding each row into a per-row buffer (the simple types)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        y = np.empty(n, np.float32)  # (cols,)
        _decode_row(w[r], wi8[r], y, f16, code, bs)
        s = F(0)
        for i in range(n):
            s += y[i] * x[i]
        out[r] = s


# The kernels bound to one type, as `fallback.kernels.KernelSet` calls them.


def decode_tile(qtype: GGMLType) -> Callable[[np.ndarray, int, np.ndarray], None]:
    """``(w, r0, out)``: ``out[i]`` = row ``r0 + i`` of the ``qtype`` matrix ``w`` (uint8
    ``(rows, row_bytes)``) as float32, on the calling thread."""
    code, bs = int(qtype), TYPE_SIZES[qtype][1]

    def run(w: np.ndarray, r0: int, out: np.ndarray) -> None:
        decode_tile_by_code(w, w.view(np.int8), r0, code, bs, F16_TABLE, out)

    return run


def decode_rows(qtype: GGMLType) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``(w, ids, out)``: ``out[i]`` = row ``ids[i]`` (int64) of ``w`` as float32."""
    code, bs = int(qtype), TYPE_SIZES[qtype][1]

    def run(w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
        if ids.size == 1:  # a decode step: one row, no thread launch
            decode_tile_by_code(w, w.view(np.int8), int(ids[0]), code, bs, F16_TABLE, out)
        else:
            decode_rows_by_code(w, w.view(np.int8), ids, code, bs, F16_TABLE, out)

    return run


def matvec_float(qtype: GGMLType) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``(w, x, out)``: ``out = w @ x`` for one ``qtype`` matrix, a row decoded at a time."""
    code, bs = int(qtype), TYPE_SIZES[qtype][1]

    def run(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        matvec_by_code(w, w.view(np.int8), code, bs, x, F16_TABLE, out)

    return run
