"""The numba engine's float matvec kernels, reading GGUF blocks in place: the portable decode
path (CPUs without AVX2, and Q5_0/Q5_1 everywhere); AVX2 CPUs run `avx2`'s LLVM IR instead.

One kernel per layout, ``out[r] = W[r] . x`` with the weights decoded in registers, all with
the signature ``(w, wi8, x, xs, f16, out, qk, bs, sub)`` (a kernel ignores what its layout
does not need); `matvec_float` binds one to a type.  The packed fields they share with the
decoders (float16 scales, Q5 fifth bits, K-quant scales and mins) come from `numba_decode`'s
layout helpers; the weights' nibbles and bit pairs are decoded in the hot loops below, in a
form of their own (masked in place, powers of two folded into the scales).  Layouts are in
`phimlx.gguf.quants`.  What makes them fast (measured on AVX2; see bench/kernels.py):

- Indices are ``uint64``: signed indices make numba emit a negative-index wraparound per load,
  which turns vector loads into byte gathers.
- Integer temporaries are cast to ``int32`` (numba widens small-integer arithmetic to int64,
  which halves the vector width); a high nibble is ``q & 0xF0`` with 1/16 folded into its
  scale, so no shift is needed at all.
- Block sizes arrive at run time: a constant 16/32-trip inner loop is fully unrolled into
  scalar code, a run-time one is vectorized.
- One accumulator *vector* ``acc[l]`` per row takes every sub-block's scaled products, so
  there is no horizontal reduction per sub-block; the zero points (Q4_0's 8, Q4_K's mins, ...)
  are applied once per block against precomputed sums of ``x`` (``xs``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from phimlx.gguf import TYPE_SIZES, GGMLType

from . import prange_only
from .numba_decode import F16_TABLE, f16_bits, k_scale_min_high, k_scale_min_low, q5_high_bits

U = np.uint64
I = np.int32  # noqa: E741
F = np.float32

_OPTS = {"parallel": prange_only(), "fastmath": True, "cache": True, "nogil": True}


@njit(**_OPTS)
def matvec_q8_0(w, wi8, x, xs, f16, out, qk, bs, sub):  # w uint8 (rows, nb*34); wi8 as int8
    nb = U(x.shape[0] // qk)
    qku, bsu = U(qk), U(bs)
    for r in prange(w.shape[0]):
        row, rowi = w[r], wi8[r]
        acc = np.zeros(qk, np.float32)  # (qk,)
        for b in range(nb):
            o = b * bsu
            d = f16[f16_bits(row, o)]
            qo, xo = o + U(2), b * qku
            for l in range(qku):
                acc[l] += d * F(rowi[qo + l]) * x[xo + l]
        out[r] = acc.sum()


@njit(**_OPTS)
def matvec_q4_0(w, wi8, x, xs, f16, out, qk, bs, sub):  # w (rows, nb*18); xs (nb,) sums of x
    nb = U(x.shape[0] // qk)
    qku, bsu, half = U(qk), U(bs), U(qk // 2)
    m15, m240 = I(15), I(240)
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.zeros(qk // 2, np.float32)  # (qk/2,)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            d = f16[f16_bits(row, o)]
            dh = d * F(0.0625)
            qo, xo = o + U(2), b * qku
            for l in range(half):
                q = I(row[qo + l])
                acc[l] += d * F(I(q & m15)) * x[xo + l] + dh * F(I(q & m240)) * x[xo + half + l]
            corr += d * xs[b]
        out[r] = acc.sum() - F(8) * corr


@njit(**_OPTS)
def matvec_q4_1(w, wi8, x, xs, f16, out, qk, bs, sub):  # w (rows, nb*20)
    nb = U(x.shape[0] // qk)
    qku, bsu, half = U(qk), U(bs), U(qk // 2)
    m15, m240 = I(15), I(240)
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.zeros(qk // 2, np.float32)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            d = f16[f16_bits(row, o)]
            dh = d * F(0.0625)
            qo, xo = o + U(4), b * qku
            for l in range(half):
                q = I(row[qo + l])
                acc[l] += d * F(I(q & m15)) * x[xo + l] + dh * F(I(q & m240)) * x[xo + half + l]
            corr += f16[f16_bits(row, o + U(2))] * xs[b]
        out[r] = acc.sum() + corr


@njit(**_OPTS)
def matvec_q5(w, wi8, x, xs, f16, out, qk, bs, sub):  # Q5_0 (rows, nb*22) / Q5_1 (nb*24)
    has_min = bs == 24  # Q5_1's block has m after d
    nb = U(x.shape[0] // qk)
    qku, bsu, half = U(qk), U(bs), U(qk // 2)
    m15, m240 = I(15), I(240)
    hoff = U(4) if has_min else U(2)
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.zeros(qk // 2, np.float32)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            d = f16[f16_bits(row, o)]
            dh, d16 = d * F(0.0625), d * F(16)
            qh = q5_high_bits(row, o + hoff)
            qo, xo = o + hoff + U(4), b * qku
            for l in range(half):
                q = I(row[qo + l])
                lo = d * F(I(q & m15)) + d16 * F((qh >> l) & U(1))
                hi = dh * F(I(q & m240)) + d16 * F((qh >> (l + half)) & U(1))
                acc[l] += lo * x[xo + l] + hi * x[xo + half + l]
            if has_min:
                corr += f16[f16_bits(row, o + U(2))] * xs[b]
            else:
                corr -= F(16) * d * xs[b]
        out[r] = acc.sum() + corr


@njit(inline="always")
def _k_scales(row, o, f16, xs, g, sc):
    """Q4_K/Q5_K block at ``o``: the 8 sub-block scales d*sc_j into sc; returns
    dmin * sum_j m_j * xs[g+j]."""
    d, dm = f16[f16_bits(row, o)], f16[f16_bits(row, o + U(2))]
    so = o + U(4)
    corr = F(0)
    for j in range(U(4)):
        s, m = k_scale_min_low(row, so, j)
        sc[j] = d * F(s)
        corr += F(m) * xs[g + j]
    for j in range(U(4)):
        s, m = k_scale_min_high(row, so, j)
        sc[j + U(4)] = d * F(s)
        corr += F(m) * xs[g + U(4) + j]
    return dm * corr


@njit(**_OPTS)
def matvec_q4_k(w, wi8, x, xs, f16, out, qk, bs, sub):  # w (rows, nb*144); xs (nb*8,) sums of 32
    nb = U(x.shape[0] // qk)
    qku, bsu, subu = U(qk), U(bs), U(sub)
    m15, m240 = I(15), I(240)
    h = F(0.0625)
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.zeros(sub, np.float32)  # (32,)
        sc = np.empty(8, np.float32)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            corr += _k_scales(row, o, f16, xs, b * U(8), sc)
            s0, s1, s2, s3 = sc[0], sc[1] * h, sc[2], sc[3] * h
            s4, s5, s6, s7 = sc[4], sc[5] * h, sc[6], sc[7] * h
            qo, xo = o + U(16), b * qku
            for l in range(subu):
                q0 = I(row[qo + l])
                q1 = I(row[qo + U(32) + l])
                q2 = I(row[qo + U(64) + l])
                q3 = I(row[qo + U(96) + l])
                acc[l] += (
                    s0 * F(I(q0 & m15)) * x[xo + l]
                    + s1 * F(I(q0 & m240)) * x[xo + U(32) + l]
                    + s2 * F(I(q1 & m15)) * x[xo + U(64) + l]
                    + s3 * F(I(q1 & m240)) * x[xo + U(96) + l]
                    + s4 * F(I(q2 & m15)) * x[xo + U(128) + l]
                    + s5 * F(I(q2 & m240)) * x[xo + U(160) + l]
                    + s6 * F(I(q3 & m15)) * x[xo + U(192) + l]
                    + s7 * F(I(q3 & m240)) * x[xo + U(224) + l]
                )
        out[r] = acc.sum() - corr


@njit(**_OPTS)
def matvec_q5_k(w, wi8, x, xs, f16, out, qk, bs, sub):  # w (rows, nb*176); xs (nb*8,)
    nb = U(x.shape[0] // qk)
    qku, bsu, subu = U(qk), U(bs), U(sub)
    m15, m240 = I(15), I(240)
    h = F(0.0625)
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.zeros(sub, np.float32)  # (32,)
        sc = np.empty(8, np.float32)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            corr += _k_scales(row, o, f16, xs, b * U(8), sc)
            # Sub-block j: scale s_j on the nibble, t_j = 16 s_j / 2^j on qh & (1 << j).
            s0, s1, s2, s3 = sc[0], sc[1] * h, sc[2], sc[3] * h
            s4, s5, s6, s7 = sc[4], sc[5] * h, sc[6], sc[7] * h
            t0, t1, t2, t3 = sc[0] * F(16), sc[1] * F(8), sc[2] * F(4), sc[3] * F(2)
            t4, t5, t6, t7 = sc[4], sc[5] * F(0.5), sc[6] * F(0.25), sc[7] * F(0.125)
            ho, qo, xo = o + U(16), o + U(48), b * qku
            for l in range(subu):
                e = I(row[ho + l])
                q0 = I(row[qo + l])
                q1 = I(row[qo + U(32) + l])
                q2 = I(row[qo + U(64) + l])
                q3 = I(row[qo + U(96) + l])
                acc[l] += (
                    (s0 * F(I(q0 & m15)) + t0 * F(I(e & I(1)))) * x[xo + l]
                    + (s1 * F(I(q0 & m240)) + t1 * F(I(e & I(2)))) * x[xo + U(32) + l]
                    + (s2 * F(I(q1 & m15)) + t2 * F(I(e & I(4)))) * x[xo + U(64) + l]
                    + (s3 * F(I(q1 & m240)) + t3 * F(I(e & I(8)))) * x[xo + U(96) + l]
                    + (s4 * F(I(q2 & m15)) + t4 * F(I(e & I(16)))) * x[xo + U(128) + l]
                    + (s5 * F(I(q2 & m240)) + t5 * F(I(e & I(32)))) * x[xo + U(160) + l]
                    + (s6 * F(I(q3 & m15)) + t6 * F(I(e & I(64)))) * x[xo + U(192) + l]
                    + (s7 * F(I(q3 & m240)) + t7 * F(I(e & I(128)))) * x[xo + U(224) + l]
                )
        out[r] = acc.sum() - corr


@njit(**_OPTS)
def matvec_q6_k(w, wi8, x, xs16, f16, out, qk, bs, sub):  # w (rows, nb*210); xs16 (nb*16,)
    nb = U(x.shape[0] // qk)
    qku, bsu, subu = U(qk), U(bs), U(sub)  # sub = 16
    m15, m240 = I(15), I(240)
    for r in prange(w.shape[0]):
        row, rowi = w[r], wi8[r]
        acc = np.zeros(sub, np.float32)  # (16,)
        corr = F(0)
        for b in range(nb):
            o = b * bsu
            d = f16[f16_bits(row, o + U(208))]
            for j in range(U(16)):
                corr += d * F(rowi[o + U(192) + j]) * xs16[b * U(16) + j]
            dq = d * F(0.0625)
            for hf in range(U(4)):
                # hh = hf >> 1, f = hf & 1.  Weight 128hh + 32k + 16f + l: ql byte
                # 64hh + 32(k&1) + 16f + l, nibble k>>1; qh byte 32hh + 16f + l, bits 2k..2k+1;
                # scale 8hh + 2k + f.  Nibbles and bit pairs are masked in place, their powers
                # of two folded into the scales.
                hh, f = hf >> U(1), hf & U(1)
                so = o + U(192) + U(8) * hh + f
                a0, a1 = d * F(rowi[so]), d * F(rowi[so + U(2)])
                a2, a3 = dq * F(rowi[so + U(4)]), dq * F(rowi[so + U(6)])
                c0, c1, c2, c3 = a0 * F(16), a1 * F(4), a2 * F(16), a3 * F(4)
                lo = o + U(64) * hh + U(16) * f
                ho = o + U(128) + U(32) * hh + U(16) * f
                xo = b * qku + U(128) * hh + U(16) * f
                for l in range(subu):
                    p0 = I(row[lo + l])
                    p1 = I(row[lo + U(32) + l])
                    e = I(row[ho + l])
                    acc[l] += (
                        (a0 * F(I(p0 & m15)) + c0 * F(I(e & I(3)))) * x[xo + l]
                        + (a1 * F(I(p1 & m15)) + c1 * F(I(e & I(12)))) * x[xo + U(32) + l]
                        + (a2 * F(I(p0 & m240)) + c2 * F(I(e & I(48)))) * x[xo + U(64) + l]
                        + (a3 * F(I(p1 & m240)) + c3 * F(I(e & I(192)))) * x[xo + U(96) + l]
                    )
        out[r] = acc.sum() - F(32) * corr


# GGMLType -> (kernel, the group of the sums of x it takes, its sub-block length).
_KERNELS = {
    GGMLType.Q8_0: (matvec_q8_0, 32, 32),
    GGMLType.Q4_0: (matvec_q4_0, 32, 32),
    GGMLType.Q4_1: (matvec_q4_1, 32, 32),
    GGMLType.Q5_0: (matvec_q5, 32, 32),
    GGMLType.Q5_1: (matvec_q5, 32, 32),
    GGMLType.Q4_K: (matvec_q4_k, 32, 32),
    GGMLType.Q5_K: (matvec_q5_k, 32, 32),
    GGMLType.Q6_K: (matvec_q6_k, 16, 16),
}
TYPES = frozenset(_KERNELS)  # the types with a kernel here


def matvec_float(qtype: GGMLType) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``(w, x, out)``: ``out = w @ x`` for one ``qtype`` matrix (uint8 ``(rows,
    row_bytes)``), ``x`` float32 ``(cols,)``.

    Raises:
        KeyError: no kernel for ``qtype`` here (`TYPES`).
    """
    kernel, group, sub = _KERNELS[qtype]
    qk, bs = TYPE_SIZES[qtype]

    def run(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        xs = x.reshape(-1, group).sum(axis=1, dtype=np.float32)  # (cols / group,)
        kernel(w, w.view(np.int8), x, xs, F16_TABLE, out, qk, bs, sub)

    return run
