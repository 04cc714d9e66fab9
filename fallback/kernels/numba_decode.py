"""numba row decoders: GGUF rows -> float32, for prefill tiles, embeddings and the types
without an in-register matvec (Q2_K, Q3_K, F16, BF16).

The layouts are documented in `phimlx.gguf.quants`; these loops follow the same bit positions and
are tested against it.  ``code`` is the `GGMLType` value; every kernel is compiled once for all
types (a branch per row costs nothing next to the row itself).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

U = np.uint64
I = np.int32  # noqa: E741
F = np.float32

# GGMLType values (numba sees plain ints)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}


@njit(inline="always")
def _h(row, o):
    return I(row[o]) | (I(row[o + U(1)]) << I(8))


@njit(inline="always")
def _q32(row, rowi, y, f16, code, bs):  # the 32-weight block types; y (cols,)
    nb = U(y.shape[0] // 32)
    for b in range(nb):
        o, yo = b * U(bs), b * U(32)
        d = f16[_h(row, o)]
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
            m = f16[_h(row, o + U(2))]
            qo = o + U(4)
        else:
            ho = o + U(2) if code == Q5_0 else o + U(4)
            m = F(-16) * d if code == Q5_0 else f16[_h(row, o + U(2))]
            qh = U(row[ho]) | (U(row[ho + U(1)]) << U(8))
            qh |= (U(row[ho + U(2)]) << U(16)) | (U(row[ho + U(3)]) << U(24))
            qo = ho + U(4)
        for l in range(U(16)):
            q = I(row[qo + l])
            lo = (q & I(15)) | I(((qh >> l) & U(1)) << U(4))
            hi = (q >> I(4)) | I(((qh >> (l + U(16))) & U(1)) << U(4))
            y[yo + l] = d * F(lo) + m
            y[yo + U(16) + l] = d * F(hi) + m


@njit(inline="always")
def _k_scale_min(row, o, j):  # Q4_K/Q5_K six-bit scale and min of sub-block j (0..7)
    if j < 4:
        return I(row[o + j]) & I(63), I(row[o + U(4) + j]) & I(63)
    a, bm, c = I(row[o + j - U(4)]), I(row[o + j]), I(row[o + U(4) + j])
    return (c & I(15)) | ((a >> I(6)) << I(4)), (c >> I(4)) | ((bm >> I(6)) << I(4))


@njit(inline="always")
def _qk(row, rowi, y, f16, code, bs):  # the 256-weight K-quants; y (cols,)
    nb = U(y.shape[0] // 256)
    for b in range(nb):
        o, yo = b * U(bs), b * U(256)
        if code in (Q4_K, Q5_K):
            d, dm = f16[_h(row, o)], f16[_h(row, o + U(2))]
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
            d = f16[_h(row, o + U(208))]
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
            d, dm = f16[_h(row, o + U(80))], f16[_h(row, o + U(82))]
            for hh in range(U(2)):
                for s in range(U(4)):
                    for l in range(U(32)):
                        q = (I(row[o + U(16) + U(32) * hh + l]) >> I(2 * s)) & I(3)
                        sc = I(row[o + U(8) * hh + U(2) * s + (l >> U(4))])
                        v = d * F(sc & I(15)) * F(q) - dm * F(sc >> I(4))
                        y[yo + U(128) * hh + U(32) * s + l] = v
        else:  # Q3_K
            d = f16[_h(row, o + U(108))]
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
            y[i] = f16[_h(row, U(2) * i)]
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
def _row(row, rowi, y, f16, code, bs):  # compiled once, called by the three drivers
    if code in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
        _q32(row, rowi, y, f16, code, bs)
    elif code in (F32, F16, BF16):
        _float_row(row, y, f16, code)
    else:
        _qk(row, rowi, y, f16, code, bs)


@njit(**_OPTS)
def deq_rows(w, wi8, ids, code, bs, f16, out):
    """out[i] = row ids[i] of w decoded; w uint8 (rows, row_bytes), out float32 (n, cols)."""
    for i in prange(ids.shape[0]):
        _row(w[ids[i]], wi8[ids[i]], out[i], f16, code, bs)


@njit(**_OPTS)
def deq_range(w, wi8, r0, code, bs, f16, out):
    """out[i] = row r0 + i of w decoded, for i < out.shape[0] (a prefill tile)."""
    for i in prange(out.shape[0]):
        _row(w[r0 + i], wi8[r0 + i], out[i], f16, code, bs)


@njit(cache=True, fastmath=True, nogil=True)
def deq_range_serial(w, wi8, r0, code, bs, f16, out):
    """`deq_range` on the calling thread: a prefill tile goes on to a multi-threaded BLAS
    sgemm, and numba's OpenMP workers spinning after a parallel region would take the cores
    BLAS wants (measured: 60x slower on 2 cores)."""
    for i in range(out.shape[0]):
        _row(w[r0 + i], wi8[r0 + i], out[i], f16, code, bs)


@njit(**_OPTS)
def mv_deq(w, wi8, code, bs, x, f16, out):
    """out[r] = W[r] . x by decoding each row into a per-row buffer (the simple types)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        y = np.empty(n, np.float32)  # (cols,)
        _row(w[r], wi8[r], y, f16, code, bs)
        s = F(0)
        for i in range(n):
            s += y[i] * x[i]
        out[r] = s
