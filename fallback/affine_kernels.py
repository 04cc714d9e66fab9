"""numba kernels for mlx's affine 4- and 8-bit groups (mlx-lm folders): matvecs for the
decode step, tile decoders for the prefill's tiles.

One pass over the packed codes, no decoded tile: per row and group,
``scale * sum(q_j * x_j) + bias * sum(x_j)`` with the group sums of ``x`` computed once per
call.  4-bit codes pair up as the low and high nibble of a byte (elements 2k and 2k+1), so
``x`` is split once into its even and odd elements and the inner loop reads both
contiguously.  Scales and biases stay as stored: float16 and bfloat16 bits are widened
through a 65536-entry table (exact), float32 is read directly.  Results equal NumPy's
``dequantize(W) @ x`` to float32 rounding (the sums run in another order).

Imported only where numba is available (`fallback.affine` checks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from .kernels import prange_only

F = np.float32

# float16 / bfloat16 bits -> float32, exactly
F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

_OPTS = {"parallel": prange_only(), "fastmath": True, "cache": True, "nogil": True}


# Each matvec: the groups' dot products of a row first (one loop, 2-D indexing, int32
# codes: numba vectorizes it, 3-5x faster than over a row slice), then the scales and biases
# (``sum_k (s q_k + b) x_k = s (q . x) + b sum x``).  codes uint8: (rows, cols/2) for 4 bits,
# (rows, cols) for 8; scales, biases (rows, G) as float16/bfloat16 bits read through
# ``table`` or as float32; x float32 (cols,).


@njit(inline="always", fastmath=True)
def _q4_group_sums(codes, r, xe, xo, half, sums):  # noqa: ANN001, ANN202
    for g in range(sums.shape[0]):
        base = g * half
        s = F(0.0)
        for j in range(half):
            b = np.int32(codes[r, base + j])
            s += F(b & 15) * xe[base + j] + F(b >> 4) * xo[base + j]
        sums[g] = s


@njit(inline="always", fastmath=True)
def _q8_group_sums(codes, r, x, group, sums):  # noqa: ANN001, ANN202
    for g in range(sums.shape[0]):
        base = g * group
        s = F(0.0)
        for j in range(group):
            s += F(np.int32(codes[r, base + j])) * x[base + j]
        sums[g] = s


@njit(**_OPTS)
def _q4_table(codes, scales, biases, table, x, out, group):  # noqa: ANN001, ANN202
    n_groups = x.shape[0] // group
    xe, xo = x[0::2].copy(), x[1::2].copy()  # (cols/2,) each
    xs = x.reshape(n_groups, group).sum(axis=1)  # (G,)
    for r in prange(codes.shape[0]):
        sums = np.empty(n_groups, np.float32)
        _q4_group_sums(codes, r, xe, xo, group // 2, sums)
        acc = F(0.0)
        for g in range(n_groups):
            acc += table[scales[r, g]] * sums[g] + table[biases[r, g]] * xs[g]
        out[r] = acc


@njit(**_OPTS)
def _q4_f32(codes, scales, biases, table, x, out, group):  # noqa: ANN001, ANN202, ARG001
    n_groups = x.shape[0] // group
    xe, xo = x[0::2].copy(), x[1::2].copy()  # (cols/2,) each
    xs = x.reshape(n_groups, group).sum(axis=1)  # (G,)
    for r in prange(codes.shape[0]):
        sums = np.empty(n_groups, np.float32)
        _q4_group_sums(codes, r, xe, xo, group // 2, sums)
        acc = F(0.0)
        for g in range(n_groups):
            acc += scales[r, g] * sums[g] + biases[r, g] * xs[g]
        out[r] = acc


@njit(**_OPTS)
def _q8_table(codes, scales, biases, table, x, out, group):  # noqa: ANN001, ANN202
    n_groups = x.shape[0] // group
    xs = x.reshape(n_groups, group).sum(axis=1)  # (G,)
    for r in prange(codes.shape[0]):
        sums = np.empty(n_groups, np.float32)
        _q8_group_sums(codes, r, x, group, sums)
        acc = F(0.0)
        for g in range(n_groups):
            acc += table[scales[r, g]] * sums[g] + table[biases[r, g]] * xs[g]
        out[r] = acc


@njit(**_OPTS)
def _q8_f32(codes, scales, biases, table, x, out, group):  # noqa: ANN001, ANN202, ARG001
    n_groups = x.shape[0] // group
    xs = x.reshape(n_groups, group).sum(axis=1)  # (G,)
    for r in prange(codes.shape[0]):
        sums = np.empty(n_groups, np.float32)
        _q8_group_sums(codes, r, x, group, sums)
        acc = F(0.0)
        for g in range(n_groups):
            acc += scales[r, g] * sums[g] + biases[r, g] * xs[g]
        out[r] = acc


@njit(**_OPTS)
def decode_tile4(codes, scales, biases, out, group):  # noqa: ANN001, ANN202
    # codes uint8 (n, cols/2); scales, biases float32 (n, G); out float32 (n, cols)
    half = group // 2
    for r in prange(codes.shape[0]):
        row, o = codes[r], out[r]
        for g in range(scales.shape[1]):
            s, b = scales[r, g], biases[r, g]
            for k in range(g * half, (g + 1) * half):
                c = row[k]
                o[2 * k] = F(c & 15) * s + b
                o[2 * k + 1] = F(c >> 4) * s + b


@njit(**_OPTS)
def decode_tile8(codes, scales, biases, out, group):  # noqa: ANN001, ANN202
    # codes uint8 (n, cols)
    for r in prange(codes.shape[0]):
        row, o = codes[r], out[r]
        for g in range(scales.shape[1]):
            s, b = scales[r, g], biases[r, g]
            for k in range(g * group, (g + 1) * group):
                o[k] = F(row[k]) * s + b


DECODERS: dict[int, Callable[..., None]] = {4: decode_tile4, 8: decode_tile8}

KERNELS: dict[tuple[int, bool], Callable[..., None]] = {
    (4, True): _q4_table,
    (4, False): _q4_f32,
    (8, True): _q8_table,
    (8, False): _q8_f32,
}


def matvec_kernel(bits: int, dtype: str) -> tuple[Callable[..., None], np.ndarray] | None:
    """``(kernel, table)`` for codes of ``bits`` with scales stored as ``dtype`` (F16, BF16,
    F32), called as ``kernel(codes_u8, scales, biases, table, x, out, group)``; None for
    widths without a kernel (2, 3, 5, 6 bits: the NumPy tiles)."""
    if bits not in (4, 8):
        return None
    table = {"F16": F16_TABLE, "BF16": BF16_TABLE}.get(dtype)
    return KERNELS[bits, table is not None], (table if table is not None else F16_TABLE)


@njit(**_OPTS)
def add_offsets(out, offsets, x, group):  # noqa: ANN001, ANN202
    """out (n, rows) += the group sums of x (n, cols) times offsets (rows, G).T: the
    offset part of `fallback.affine.OffsetQ8Matrix` on numba's threads (a BLAS call here
    would wake BLAS's threads between numba's kernels, and they fight)."""
    n, G = x.shape[0], offsets.shape[1]
    sums = np.empty((n, G), dtype=np.float32)
    for i in range(n):
        for g in range(G):
            acc = F(0.0)
            for j in range(group):
                acc += x[i, g * group + j]
            sums[i, g] = acc
    for r in prange(offsets.shape[0]):  # (names of its own: an outer `+=` is a reduction)
        for i in range(n):
            total = F(0.0)
            for g in range(G):
                total += offsets[r, g] * sums[i, g]
            out[i, r] += total
