"""The AVX2 engine's numba drivers: per type and task, a compiled loop over rows around the
LLVM IR of `avx2_ir`.  Used only where the CPU has AVX2, FMA and F16C (`AVAILABLE`).

The numba loops of `numba_matvec` leave LLVM to vectorize Python loops; with blocks of 32
weights the loops are too short and the per-block scale decoding is scalar, so they reach ~1
weight per instruction.  Here each row's dot product is one IR loop with explicit 8-wide
vectors (`avx2_ir`).  Three tasks, each a driver per type:

- `matvec_float` (exact to float32 rounding; F16, BF16, and the quantized types with
  ``int8_activations=False``): ``out = [w1; w2; w3] @ x``, the sums of ``x`` per group that
  the zero points / mins need computed inside the call;
- `matvec_int8` (the quantized types' default): ``x`` quantized to int8 first with one scale
  per 32 values (per 256 for the K-quants: `avx2_ir.IRType.x_scale`; `quantize_int8`, what
  llama.cpp does), so ``out = [w1; w2; w3] @ x_hat``; then laid out as the type's bodies
  take it (`pair_inputs` for the paired ones, `step_inputs` for the transposed ones);
- `matmul_int8`: the same for n rows of ``x`` (prefill, batched decode), each row quantized
  as a vector is, each weight block unpacked once per `GEMM_COLS` rows;
- `decode_tile`: rows ``r0 ..`` decoded to float32, for prefill tiles handed to BLAS sgemm.

Matvec drivers take up to three matrices (``w1, w2, w3``, rows concatenated, unused ones
empty) so that q|k|v or gate|up run as one parallel call; ``parallel=False`` gives the same
loop on the calling thread (a parallel launch costs more than a small matrix).

The drivers are generated: one definition per task, closed over the type's integer code
(and block size), which the `avx2_ir` intrinsics take as a compile-time constant.  numba
caches a closure per pickled cell values, so a closure over ints caches per type (one over
an intrinsic or a function would not cache); each driver also gets its own name
(``matvec_int8_q4_k_serial``), hence its own cache file.  numba keys its cache by the
content of the file that defines a function (this one), not of the files its intrinsics
come from: every driver's closure also holds `IR_STAMP`, a hash of `avx2_ir`'s source, so
an edited (or upgraded) IR is compiled afresh rather than loaded stale from the cache.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit, prange

from phimlx.gguf import GGMLType

from . import avx2_ir, prange_only, renamed
from .avx2_ir import (
    AVAILABLE,
    AVX512,
    OCTET_TAIL,
    TYPES,
    abs_max,
    decode_row,
    dot_float,
    dot_int8,
    gemm_int8,
    gemm_rows8,
    round32,
)

__all__ = [
    "AVAILABLE",
    "AVX512",
    "FLOAT_TYPES",
    "INT8_TYPES",
    "PACKED_TYPES",
    "ROWS8_TYPES",
    "decode_tile",
    "matvec_float",
    "matmul_int8",
    "matvec_int8",
    "matvec_rows8",
    "matmul_rows8",
    "pack_octets",
    "pack_rows8",
    "rows8_rows",
    "quantize_int8",
    "quantized_rows_int8",
    "quantized_rows_int8_serial",
    "quantized_int8",
    "pair_inputs",
    "pair_rows",
    "step_inputs",
    "step_rows",
    "sum_groups",
    "sums16",
    "sums16_rows",
    "unpack_octets",
    "unpack_rows8",
    "x_scale",
]

_OPTS = {"fastmath": True, "cache": True, "nogil": True}

# The IR's source and the instruction sets it was built for (`avx2_ir.AVX512`, as
# `avx2_ir.wide_bodies` chooses), hashed into every driver's cache key (see the module
# docstring).
_FLAGS = repr((avx2_ir.AVX512, avx2_ir.VNNI, avx2_ir.VNNI512, avx2_ir.DPBUSD)).encode()
IR_STAMP = int(hashlib.sha256(Path(avx2_ir.__file__).read_bytes() + _FLAGS).hexdigest()[:15], 16)

# The types with a float matvec and a tile decoder here; those with an int8 matvec too;
# those whose int8 kernels also read rows in `pack_octets`'s layout (Q4_0, Q4_1, Q4_K,
# Q5_K, Q6_K where the 256-bit bodies run: `avx2_ir.wide_bodies`).
FLOAT_TYPES = frozenset(GGMLType(c) for c in TYPES)
INT8_TYPES = frozenset(GGMLType(c) for c, t in TYPES.items() if t.int8_body is not None)
PACKED_TYPES = frozenset(GGMLType(c - avx2_ir.OCTETS) for c in avx2_ir.PACKED_TYPES)
# The types whose rows interleave by 8 (`pack_rows8`).
ROWS8_TYPES = frozenset(GGMLType(c) for c in avx2_ir.ROWS8_TYPES)


def _octet_layout(qtype: GGMLType) -> tuple[int, int]:
    """A Q4_0 / Q4_1 block's size and the bytes before its quants (2 or 4)."""
    size = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20}[GGMLType(qtype)]
    return size, size - 16


@functools.cache
def _octet_order(qtype: GGMLType) -> np.ndarray:
    """``order[k]``: the byte of a full octet of the file's blocks (8 x size) that byte k
    of the packed octet holds (`pack_octets`)."""
    size, head = _octet_layout(qtype)
    order = np.empty(8 * size, np.int64)
    for j in range(8):  # block j: its scale (and min), its 4 words of quants
        for t in range(head):  # the file's byte t of the block: packed at 2 j + 16 (t // 2)
            order[2 * j + 16 * (t // 2) + t % 2] = size * j + t
        for g in range(4):
            for t in range(4):
                order[8 * head + 32 * g + 4 * j + t] = size * j + head + 4 * g + t
    return order


@njit(parallel=prange_only(), **_OPTS)
def _octets_moved(src, dst, order, scatter):  # noqa: ANN001, ANN202
    """Each full octet of each row of ``src`` into ``dst`` (a copy of it: the bytes after a
    row's last full octet are in place) by ``order``: ``dst[k] = src[order[k]]``, or where
    ``scatter`` ``dst[order[k]] = src[k]``."""
    n = order.shape[0]
    octets = src.shape[1] // n
    for r in prange(src.shape[0]):
        for o in range(octets):
            base = n * o
            if scatter:
                for k in range(n):
                    dst[r, base + order[k]] = src[r, base + k]
            else:
                for k in range(n):
                    dst[r, base + k] = src[r, base + order[k]]


def pack_octets(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """A new uint8 ``(rows, row_bytes)`` copy of the Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K matrix
    ``raw`` (the file's blocks) in the layout the 256-bit int8 kernels read fastest
    (``packed=True``; `avx2_ir.wide_bodies`), the same size.  Q4_0 / Q4_1: each row's full
    octets of 8 blocks as the 8 scales (f16), Q4_1's 8 mins, then the quants transposed, 4 x
    32 bytes whose 4 bytes at ``32 g + 4 j`` are block j's quant bytes ``4 g .. 4 g + 3``; a
    row's last ``nb % 8`` blocks stay as they are.  Q4_K / Q5_K: each block's 8 sub-blocks
    as an octet of Q4_1 blocks, Q5_K's 5th bits transposed likewise (`_qk_moved`); Q6_K: its
    low 4 bits so, its high 2 bits transposed likewise (`_q6k_moved`).  `unpack_octets`
    reverses it."""
    return _moved(raw, qtype, False)


def unpack_octets(packed: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """The file's blocks of rows in `pack_octets`'s layout: a new uint8 array of their shape."""
    return _moved(packed, qtype, True)


def _moved(rows: np.ndarray, qtype: GGMLType, unpack: bool) -> np.ndarray:
    """`pack_octets` (or, ``unpack``, `unpack_octets`) of ``rows`` by `packer`'s function:
    the K-quants' write every byte (no copy first), Q4's move full octets in a copy."""
    src = np.ascontiguousarray(rows, dtype=np.uint8)
    move, qtype = packer(qtype), GGMLType(qtype)
    if move is _octets_moved:
        out = src.copy()
        move(src, out, _octet_order(qtype), unpack)
        return out
    out = np.empty_like(src)
    if move is _q6k_moved:
        move(src, out, unpack)
    else:
        move(src.view(np.uint32), out.view(np.uint32), unpack, qtype == GGMLType.Q5_K)
    return out


def packer(qtype: GGMLType) -> Any:
    """The compiled function that `pack_octets` runs for ``qtype`` (to check numba's cache)."""
    if GGMLType(qtype) == GGMLType.Q6_K:
        return _q6k_moved
    return _qk_moved if GGMLType(qtype) in (GGMLType.Q4_K, GGMLType.Q5_K) else _octets_moved


@njit(inline="always", **_OPTS)
def _transpose8(x):  # noqa: ANN001, ANN202
    """The 8 x 8 bit matrix x (byte r's bit c at bit 8 r + c) transposed (Hacker's Delight)."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@njit(parallel=prange_only(), **_OPTS)
def _q6k_moved(src, dst, unpack):  # noqa: ANN001, ANN202
    """`pack_octets` of Q6_K, or (``unpack``) its inverse, from the rows ``src`` into
    ``dst`` (every byte written).  The file keeps quant y = 128 n + 32 m + l of a block
    (n 0..1, m 0..3, l 0..31; sub-block j = 4 n + m) as nibble m >> 1 of ql byte
    64 n + 32 (m & 1) + l, and bits 2 m, 2 m + 1 of qh byte 32 n + l (ql the block's first
    128 bytes, qh the next 64; then 16 scales and d, left in place).  Packed, the low 4
    bits are a Q4 octet's quants (`_qk_moved`: sub-block j's quants i, 16 + i as byte
    32 (i >> 2) + 4 j + (i & 3)'s low and high nibble, i 0..15) and the high 2 bits two
    vectors: quant 4 G + t's at bits 2 (G & 3) of byte 128 + 32 (G >> 2) + 4 j + t."""
    blocks = src.shape[1] // 210
    for r in prange(src.shape[0]):
        for b in range(blocks):
            o = 210 * b
            for k in range(o + 192, o + 210):
                dst[r, k] = src[r, k]
            if not unpack:  # each packed byte from its sources at once
                for j in range(8):
                    a, s = o + 64 * (j >> 2) + 32 * (j & 1), 4 * ((j >> 1) & 1)
                    m2, qh = 2 * (j & 3), o + 128 + 32 * (j >> 2)
                    for g in range(4):
                        for t in range(4):
                            lo = (src[r, a + 4 * g + t] >> s) & 15
                            hi = (src[r, a + 16 + 4 * g + t] >> s) & 15
                            dst[r, o + 32 * g + 4 * j + t] = lo | (hi << 4)
                    for half in range(2):
                        for t in range(4):
                            v = 0
                            for s2 in range(4):
                                v |= ((src[r, qh + 4 * (4 * half + s2) + t] >> m2) & 3) << (2 * s2)
                            dst[r, o + 128 + 32 * half + 4 * j + t] = v
                continue
            for k in range(o, o + 192):  # unpacking: each quant's bits back in turn
                dst[r, k] = 0
            for j in range(8):
                n, m = j >> 2, j & 3
                for i in range(32):
                    lo_at = o + 32 * ((i & 15) >> 2) + 4 * j + (i & 3)
                    hi_at = o + 128 + 32 * (i >> 4) + 4 * j + (i & 3)
                    low = (src[r, lo_at] >> (4 * (i >> 4))) & 15
                    high = (src[r, hi_at] >> (2 * ((i >> 2) & 3))) & 3
                    dst[r, o + 64 * n + 32 * (m & 1) + i] |= low << (4 * (m >> 1))
                    dst[r, o + 128 + 32 * n + i] |= high << (2 * m)


@njit(parallel=prange_only(), **_OPTS)
def _qk_moved(src, dst, unpack, five):  # noqa: ANN001, ANN202
    """`pack_octets` of Q4_K (Q5_K where ``five``), or (``unpack``) its inverse, on the
    uint32 words of rows (a block is 36 (44): 4 of header, copied as they are, (8 of 5th
    bits,) 32 of quants) from ``src`` into ``dst`` (every word written).

    The file keeps sub-block j's quant l (0..31) in nibble j & 1 of byte 32 (j >> 1) + l of
    a block's 128 quant bytes (Q5_K: its 5th bit, bit j of byte l of the 32 before them).
    Packed, sub-block j is a Q4_1 block's 16 bytes (byte l: quant l low, quant 16 + l
    high), transposed as an octet's: its bytes 4 g .. 4 g + 3 at byte 32 g + 4 j
    (`avx2_ir._oct_cols` reads the 8 sub-blocks as lanes).  So packed word 8 g + j of a
    block takes its four bytes from the file's words 8 p + g and 8 p + 4 + g (p = j >> 1):
    their low nibbles (j even) or high ones, as a byte's low and high.  Q5_K's 5th bits:
    packed byte 4 j + t's bit G is quant 4 G + t's of sub-block j, so for each t the 8
    bytes 4 G + t and the 8 bytes 4 j + t are transposed 8 x 8 bit matrices."""
    lo4, hi4 = np.uint32(0x0F0F0F0F), np.uint32(0xF0F0F0F0)
    four, byte = np.uint32(4), np.uint64(0xFF)
    size, q0 = (44, 12) if five else (36, 4)
    blocks = src.shape[1] // size
    for r in prange(src.shape[0]):
        for b in range(blocks):
            base = size * b
            q = base + q0
            for k in range(base, base + 4):
                dst[r, k] = src[r, k]
            if five:  # words base + 4 .. base + 11: the 5th bits
                for t in range(4):
                    sh = np.uint64(8 * t)
                    x = np.uint64(0)
                    for i in range(8):
                        x |= ((np.uint64(src[r, base + 4 + i]) >> sh) & byte) << np.uint64(8 * i)
                    y = _transpose8(x)
                    for i in range(8):
                        word = np.uint32((y >> np.uint64(8 * i)) & byte) << np.uint32(8 * t)
                        dst[r, base + 4 + i] = (dst[r, base + 4 + i] if t else 0) | word
            for p in range(4):
                for g in range(4):
                    if unpack:
                        a, c = src[r, q + 8 * g + 2 * p], src[r, q + 8 * g + 2 * p + 1]
                        dst[r, q + 8 * p + g] = (a & lo4) | ((c & lo4) << four)
                        dst[r, q + 8 * p + 4 + g] = ((a >> four) & lo4) | (c & hi4)
                    else:
                        a, c = src[r, q + 8 * p + g], src[r, q + 8 * p + 4 + g]
                        dst[r, q + 8 * g + 2 * p] = (a & lo4) | ((c & lo4) << four)
                        dst[r, q + 8 * g + 2 * p + 1] = ((a >> four) & lo4) | (c & hi4)


@njit(**_OPTS)
def quantize_int8(x, xq, dx, xs, group):
    """x float32 (n,) -> xq int8 (n,) with one scale per ``group`` (32 or 256) values; dx
    (n/32,) the scales (one per 32: a scale shared by 256 values is stored eight times), xs
    (n/32,) the sums ``dx * sum(xq)`` per 32."""
    for g0 in range(0, x.shape[0], group):
        amax = abs_max(x, g0, group)
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        for g in range(g0 // 32, (g0 + group) // 32):
            t = round32(x, 32 * g, inv, xq)  # rint(x * inv) as int8, and their sum
            dx[g] = d
            xs[g] = d * np.float32(t)


@njit(**_OPTS)
def quantized_int8(x, group):
    """(xq, dx, xs) of `quantize_int8`, allocated."""
    xq = np.empty(x.shape[0], np.int8)
    dx = np.empty(x.shape[0] // 32, np.float32)
    xs = np.empty(x.shape[0] // 32, np.float32)
    quantize_int8(x, xq, dx, xs, group)
    return xq, dx, xs


def _rows_int8(x, group):  # noqa: ANN001, ANN202
    n, cols = x.shape
    xq = np.empty((n, cols), np.int8)
    dx = np.empty((n, cols // 32), np.float32)
    xs = np.empty((n, cols // 32), np.float32)
    for i in prange(n):
        quantize_int8(x[i], xq[i], dx[i], xs[i], group)
    return xq, dx, xs


# `quantized_int8` of each row of x (float32 (n, cols)): xq int8 (n, cols), dx and xs float32
# (n, cols / 32), each row exactly as `quantize_int8` rounds it alone; on numba's threads, or
# (`_serial`) on the calling thread.
quantized_rows_int8 = njit(parallel=prange_only(), **_OPTS)(renamed(_rows_int8, "_parallel"))
quantized_rows_int8_serial = njit(**_OPTS)(renamed(_rows_int8, "_serial"))


@njit(**_OPTS)
def pair_inputs(xq, dx, xs, k):
    """A row of int8 activations (`quantize_int8`'s ``xq``, ``dx`` and ``xs``) in the form
    the paired int8 bodies take (`avx2_ir._pair_acc`): ``dx8``, one value per 4 of ``xq``
    (a lane of ``vpdpbusd``'s sums), the scale of the value's 32-block; and ``aux``: for a
    type whose weights carry the integer offset ``k`` (Q4_0: 8, Q8_0: 128) the dot's
    starting values ``-k * sum(xq)`` per 4, as int32 (in a float32 array's bytes, so that
    every type's driver has one signature), else (Q4_1) ``xs`` itself, ``dx * sum(xq)`` per
    32-block."""
    n4 = xq.shape[0] // 4
    dx8 = np.empty(n4, np.float32)
    for i in range(n4):
        dx8[i] = dx[i >> 3]
    if k == 0:
        return dx8, xs
    aux = np.empty(n4, np.float32)
    off = aux.view(np.int32)
    for i in range(n4):
        t = np.int32(xq[4 * i]) + np.int32(xq[4 * i + 1])
        t += np.int32(xq[4 * i + 2]) + np.int32(xq[4 * i + 3])
        off[i] = -k * t
    return dx8, aux


@njit(**_OPTS)
def pair_rows(xq, dx, xs, k):
    """`pair_inputs` of each row: ``(n, cols / 4)`` float32, and ``aux`` ``(n, cols / 4)``
    (``xs`` itself where ``k`` is 0)."""
    n, cols = xq.shape
    dx8 = np.empty((n, cols // 4), np.float32)
    aux = xs if k == 0 else np.empty((n, cols // 4), np.float32)
    for i in range(n):
        d, a = pair_inputs(xq[i], dx[i], xs[i], k)
        dx8[i] = d
        if k != 0:
            aux[i] = a
    return dx8, aux


@njit(**_OPTS)
def step_fill(xq, dx, xs, k, S, xt, dx8, aux):
    """`step_inputs` into ``xt``, ``dx8``, ``aux`` (zeros where no block lands)."""
    nb = xq.shape[0] // 32
    full = nb // S
    tail = OCTET_TAIL if S == 8 else S
    natural = S * full if nb % S < tail else nb  # (the tail's blocks)
    lane = 32 // S  # bytes of a block in each vector
    words = lane // 4
    src, dst = xq.view(np.int32), xt.view(np.int32)  # 4 values a move
    # The full steps: vector g of step t, lane j <- block S t + j's bytes lane * g ..., as
    # rows of 2-d views with constant bounds (which LLVM unrolls: ten times the speed of
    # the same moves through computed indices of the 1-d views).
    if S == 8:
        blocks, vectors = src[: 8 * nb].reshape(nb, 8), dst.reshape(-1, 8)
        for t in range(full):
            for g in range(8):
                v = vectors[8 * t + g]
                for j in range(8):
                    v[j] = blocks[8 * t + j, g]
    else:  # quads: 8 bytes a block and vector
        blocks8, vectors8 = xq.view(np.int64).reshape(nb, 4), xt.view(np.int64).reshape(-1, 4)
        for t in range(full):
            for g in range(4):
                v = vectors8[4 * t + g]
                for j in range(4):
                    v[j] = blocks8[4 * t + j, g]
    for i in range(8 * S * full, dst.shape[0]):  # the last, partial step's slots
        dst[i] = 0
    for i in range(dx8.shape[0]):
        dx8[i] = dx[i] if i < nb else 0
        aux[i] = 0
    # an octet's tail of 2-3 blocks: its first two transposed by 16 bytes (`_int8_q4_pair16`)
    pair = natural if S == 8 and nb - natural >= 2 else nb
    for b in range(S * full, nb):
        if pair <= b < pair + 2:  # vector g: bytes 16 g .. of both, 16 bytes each
            for g in range(2):
                for w in range(4):
                    dst[8 * pair + 8 * g + 4 * (b - pair) + w] = src[8 * b + 4 * g + w]
            continue
        base = 8 * S * (b // S) + words * (b % S)
        for g in range(S):  # vector g of the step: the block's bytes lane * g ..
            for w in range(words):
                i = base + 8 * g + w if b < natural else 8 * b + words * g + w
                dst[i] = src[8 * b + words * g + w]
    if k == 0:
        for b in range(nb):
            aux[b] = xs[b]
    elif S == 4:  # quads: lanes 2 j, 2 j + 1 sum block j's even and odd 4-byte groups
        halves = aux.view(np.int16)  # -(their sums), int16 each (`_int8_q8_0_quad`)
        for b in range(nb):
            for odd in range(2):
                t = np.int32(0)
                for g in range(odd, 8, 2):
                    for j in range(32 * b + 4 * g, 32 * b + 4 * g + 4):
                        t += np.int32(xq[j])
                halves[2 * b + odd] = np.int16(-t)
    else:
        off = aux.view(np.int32)
        for b in range(nb):
            t = np.int32(0)
            for j in range(32 * b, 32 * b + 32):
                t += np.int32(xq[j])
            off[b] = -k * t


@njit(**_OPTS)
def step_inputs(xq, dx, xs, k, S):
    """A row of int8 activations (`quantize_int8`'s ``xq``, ``dx`` and ``xs``) in the form
    the transposed bodies take (`avx2_ir._steps`), ``S`` blocks (8 or 4) a step, zeros for
    those a last step lacks: ``xt``, ``xq`` transposed, ``32 S`` bytes a step whose
    32-byte vector g holds block j's bytes ``32 / S * g ..`` at ``32 / S * j`` (an
    octet's tail: two blocks by 16 bytes, then one as it is, the one-block body's);
    ``dx8``, the blocks' scales; ``aux``, for a type whose weights carry the integer
    offset ``k`` (Q4_0: 8), ``-k * sum(xq)`` per block as int32 (in a float32 array's
    bytes; quads: ``-sum(xq)`` of the block's even and odd 4-byte groups, as int16), else
    ``xs``."""
    ns = (xq.shape[0] // 32 + S - 1) // S
    xt = np.empty(32 * S * ns, np.int8)
    dx8 = np.empty(S * ns, np.float32)
    aux = np.empty(S * ns, np.float32)
    step_fill(xq, dx, xs, k, S, xt, dx8, aux)
    return xt, dx8, aux


@njit(**_OPTS)
def step_rows(xq, dx, xs, k, S):
    """`step_inputs` of each row: ``xt`` int8 ``(n, 32 S * steps)``, ``dx8`` and ``aux``
    float32 ``(n, S * steps)``."""
    n, cols = xq.shape
    ns = (cols // 32 + S - 1) // S
    xt = np.empty((n, 32 * S * ns), np.int8)
    dx8 = np.empty((n, S * ns), np.float32)
    aux = np.empty((n, S * ns), np.float32)
    for i in range(n):
        step_fill(xq[i], dx[i], xs[i], k, S, xt[i], dx8[i], aux[i])
    return xt, dx8, aux


@njit(**_OPTS)
def sums16(xq):
    """The sums of each 16 values of a row of int8 activations ``xq``, as int16 in the
    bytes of a float32 array of ``len(xq) / 32`` (the ``xs`` that the bodies with
    `avx2_ir.IRType.int8_sums16` take)."""
    out = np.empty(xq.shape[0] // 32, np.float32)
    v = out.view(np.int16)
    for i in range(v.shape[0]):
        t = np.int32(0)
        for j in range(16 * i, 16 * i + 16):
            t += np.int32(xq[j])
        v[i] = np.int16(t)
    return out


@njit(**_OPTS)
def sums16_rows(xq):
    """`sums16` of each row: ``(n, cols / 32)`` float32."""
    out = np.empty((xq.shape[0], xq.shape[1] // 32), np.float32)
    for i in range(xq.shape[0]):
        out[i] = sums16(xq[i])
    return out


@njit(**_OPTS)
def sum_groups(x, g):
    """float32 (n / g,): the sum of each g consecutive values of x."""
    s = np.empty(x.shape[0] // g, np.float32)
    for i in range(s.shape[0]):
        t = np.float32(0.0)
        for j in range(g * i, g * i + g):
            t += x[j]
        s[i] = t
    return s


def _compiled(driver: Any, name: str, parallel: bool) -> Any:
    """``driver`` compiled under ``name`` (its own cache file); ``parallel`` turns its
    ``prange`` into threads."""
    driver.__name__ = driver.__qualname__ = name
    return njit(parallel=prange_only() if parallel else False, **_OPTS)(driver)


def _name(task: str, qtype: GGMLType, parallel: bool, packed: bool | str = False) -> str:
    layout = packed if isinstance(packed, str) else "_octets" if packed else ""
    return f"{task}_{GGMLType(qtype).name.lower()}{layout}" + ("" if parallel else "_serial")


def _int8_layout(qtype: GGMLType, packed: bool) -> tuple[int, ...]:
    """What an int8 driver of ``qtype`` closes over (ints only): the IR's type code (the
    GGMLType value, or where ``packed`` its `avx2_ir.PACKED_TYPES` code), the block, the
    x scale's group, whether the bodies are paired and x's offset for them, whether they
    take sums per 16, whether they are transposed, x's offset and the blocks of a step
    for those.  KeyError where there is no such kernel."""
    if qtype not in INT8_TYPES:
        raise KeyError(f"no AVX2 int8 kernel for {GGMLType(qtype).name}")
    code = avx2_ir.OCTETS + int(qtype) if packed else int(qtype)
    if code not in TYPES and code not in avx2_ir.PACKED_TYPES:
        raise KeyError(f"no AVX2 int8 kernel for {GGMLType(qtype).name} in packed octets here")
    spec = avx2_ir.spec(code)
    paired, steps = spec.int8_pair is not None, spec.int8_step is not None
    x_step = spec.step_blocks * spec.block // 32  # x's blocks of 32 a step (Q4_K: 1 x 256)
    return (code, spec.block, spec.x_scale, paired, spec.x_offset, spec.int8_sums16, steps,
            spec.step_offset, x_step)  # fmt: skip


# A driver's closure holds only ints (code, block, group, the IR's stamp): see the module
# docstring.


def x_scale(qtype: GGMLType) -> int:
    """How many int8 activation values share one scale for ``qtype``'s int8 kernels (32
    for a type without them)."""
    spec = TYPES.get(int(qtype))
    return 32 if spec is None else spec.x_scale


@functools.cache
def matvec_int8(qtype: GGMLType, *, parallel: bool, packed: bool = False) -> Any:
    """The driver ``(w1, w2, w3, x, out)``: ``out = [w1; w2; w3] @ x_hat`` for ``qtype``
    matrices (uint8 ``(rows, row_bytes)``; ``packed``: in `pack_octets`'s layout), ``x``
    float32 ``(cols,)`` quantized to int8 per 32 values inside the call.

    Raises:
        KeyError: no int8 kernel for ``qtype`` (`INT8_TYPES`; ``packed``: `PACKED_TYPES`).
    """
    code, block, group, paired, k, by16, steps, sk, sb = _int8_layout(qtype, packed)

    stamp = IR_STAMP

    def driver(w1, w2, w3, x, out):
        if stamp < 0:  # never: the IR's hash in the closure, hence in the cache key
            return
        nb = x.shape[0] // block
        xq, dx, xs = quantized_int8(x, group)
        if by16:  # (before a transposition: the sums of x's natural 16s)
            xs = sums16(xq)
        if paired:
            dx, xs = pair_inputs(xq, dx, xs, k)
        if steps:
            xq, dx, xs = step_inputs(xq, dx, xs, sk, sb)
        n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
        for r in prange(n2 + w3.shape[0]):
            if r < n1:
                out[r] = dot_int8(code, w1, r, xq, dx, xs, nb)
            elif r < n2:
                out[r] = dot_int8(code, w2, r - n1, xq, dx, xs, nb)
            else:
                out[r] = dot_int8(code, w3, r - n2, xq, dx, xs, nb)

    return _compiled(driver, _name("matvec_int8", qtype, parallel, packed), parallel)


# The int8 product's register tile (activation rows per unpacked weight block; must be a
# multiple of 4, `matmul_int8`'s remainder step) and the weight rows of one parallel task:
# the task's rows and GEMM_COLS activation rows stay in L1 while they meet.
GEMM_COLS = 8
GEMM_TASK_ROWS = 8


# Up to this many rows of x, the parallel int8 matmul rounds them to int8 on the calling
# thread: a second parallel launch would cost more than it saves.
QUANTIZE_SERIAL_ROWS = 16


@functools.cache
def matmul_int8(qtype: GGMLType, *, parallel: bool, packed: bool = False) -> Any:
    """The driver ``(w1, w2, w3, x, out)``: ``out = x_hat @ [w1; w2; w3].T`` for ``qtype``
    matrices and n activation rows ``x`` (float32 ``(n, cols)``), each rounded to int8
    inside the call as `matvec_int8` rounds a vector (`quantized_rows_int8`, with the
    type's `x_scale`): ``out`` float32 ``(n, rows)``.  Each weight block is read and
    unpacked once per `GEMM_COLS` rows of ``x``; each of out's rows equals `matvec_int8` of
    that row of ``x``, bit for bit.

    The serial driver must not call the parallel row rounding, even in a branch never
    taken: numba records that a function needs its thread pool started (on loading it from
    the cache) only when the parallel callee was compiled in the same process, so an entry
    compiled against a cached callee crashed the next process that ran it first.

    ``packed``: the matrices in `pack_octets`'s layout.

    Raises:
        KeyError: no int8 kernel for ``qtype`` (`INT8_TYPES`; ``packed``: `PACKED_TYPES`).
    """
    code, block, group, paired, k, by16, steps, sk, sb = _int8_layout(qtype, packed)
    nc, task_rows = GEMM_COLS, GEMM_TASK_ROWS
    serial_rows, threaded = QUANTIZE_SERIAL_ROWS, int(parallel)

    stamp = IR_STAMP

    def driver(w1, w2, w3, x, out):
        if stamp < 0:  # never (see `matvec_int8`)
            return
        n, cols = x.shape
        # `threaded` is a constant: numba drops the branch not taken before typing, so the
        # serial driver holds no parallel code (see the docstring).
        if threaded > 0 and n > serial_rows:
            xq, dx, xs = quantized_rows_int8(x, group)
        else:
            xq, dx, xs = quantized_rows_int8_serial(x, group)
        if by16:  # (before a transposition, as in `matvec_int8`)
            xs = sums16_rows(xq)
        if paired:
            dx, xs = pair_rows(xq, dx, xs, k)
        if steps:
            xq, dx, xs = step_rows(xq, dx, xs, sk, sb)
        nb = cols // block
        rows = w1.shape[0] + w2.shape[0] + w3.shape[0]
        for t in prange((rows + task_rows - 1) // task_rows):
            r0, r1 = t * task_rows, min(rows, (t + 1) * task_rows)
            c = 0  # nc activation rows (in L1) against the task's rows (in L1), in turn
            while c + nc <= n:
                for r in range(r0, r1):
                    gemm_int8(code, w1, w2, w3, r, xq, dx, xs, c, nc, out, nb)
                c += nc
            left = n - c
            for r in range(r0, r1):
                if left >= 4:
                    gemm_int8(code, w1, w2, w3, r, xq, dx, xs, c, 4, out, nb)
                c4 = c + 4 if left >= 4 else c
                if n - c4 == 1:
                    gemm_int8(code, w1, w2, w3, r, xq, dx, xs, c4, 1, out, nb)
                elif n - c4 == 2:
                    gemm_int8(code, w1, w2, w3, r, xq, dx, xs, c4, 2, out, nb)
                elif n - c4 == 3:
                    gemm_int8(code, w1, w2, w3, r, xq, dx, xs, c4, 3, out, nb)

    return _compiled(driver, _name("matmul_int8", qtype, parallel, packed), parallel)


@functools.cache
def _rows8_order(qtype: GGMLType, nb: int) -> np.ndarray:
    """``order[k]``: the byte of a group of 8 rows of ``nb`` Q4_0 / Q4_1 blocks (the rows
    one after the other, as the file stores them) that byte k of the group packed by
    `pack_rows8` holds."""
    size = avx2_ir.ROWS8_TYPES[int(qtype)]
    head, rb = size - 16, nb * size
    r = np.arange(8)[:, None]
    order = np.empty((nb, 8 * size), np.int64)
    for b in range(nb):
        src = r * rb + size * b  # (8, 1): each row's block b
        for t in range(head):  # the f16 scales (and mins) of the 8 rows, each in a run of 16
            order[b, 16 * (t // 2) + 2 * np.arange(8) + t % 2] = src[:, 0] + t
        q = np.arange(16).reshape(4, 1, 4)  # vector g, lane r: the row's bytes 4 g .. 4 g + 3
        order[b, 8 * head :] = (src[None] + head + q).reshape(-1)
    return order.reshape(-1)


def pack_rows8(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """A new uint8 ``(rows, row_bytes)`` copy of the Q4_0 / Q4_1 matrix ``raw`` (the file's
    blocks; rows a multiple of 8) with each 8 rows interleaved, as `avx2_ir.gemm_rows8`
    reads them: group g (the bytes of rows ``8 g .. 8 g + 7``) holds per block b, at ``8 *
    size * b``, the 8 rows' f16 scales, Q4_1's 8 mins, then 4 x 32 bytes of quants whose
    4 bytes at ``32 g + 4 r`` are row r's quant bytes ``4 g .. 4 g + 3``.  `unpack_rows8`
    reverses it."""
    return _rows8_moved(raw, qtype, False)


def unpack_rows8(packed: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """The file's blocks of whole groups of 8 rows in `pack_rows8`'s layout: a new uint8
    array of their shape."""
    return _rows8_moved(packed, qtype, True)


def rows8_rows(packed: np.ndarray, ids: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """The file's blocks of rows ``ids`` (int64) of a matrix in `pack_rows8`'s layout, in
    that order: each group of 8 that holds one unpacked once."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    groups, where = np.unique(ids // 8, return_inverse=True)
    rows = unpack_rows8(packed[(8 * groups[:, None] + np.arange(8)).reshape(-1)], qtype)
    return rows[8 * where.reshape(-1) + ids % 8]


def _rows8_moved(rows: np.ndarray, qtype: GGMLType, unpack: bool) -> np.ndarray:
    src = np.ascontiguousarray(rows, dtype=np.uint8)
    n, rb = src.shape
    if n % 8:
        raise ValueError(f"rows interleave by 8: {n} rows")
    order = _rows8_order(GGMLType(qtype), rb // avx2_ir.ROWS8_TYPES[int(qtype)])
    out = np.empty_like(src)
    _octets_moved(src.reshape(n // 8, 8 * rb), out.reshape(n // 8, 8 * rb), order, unpack)
    return out


@functools.cache
def matvec_rows8(qtype: GGMLType, *, parallel: bool) -> Any:
    """The driver ``(w1, w2, w3, x, out)`` of `matvec_int8` for matrices in `pack_rows8`'s
    layout (rows a multiple of 8): ``x`` quantized as there, then 8 rows a step
    (`avx2_ir.gemm_rows8`)."""
    code, stamp = int(qtype), IR_STAMP

    def driver(w1, w2, w3, x, out):
        if stamp < 0:  # never (see `matvec_int8`)
            return
        cols = x.shape[0]
        xq, dx, xs = quantized_int8(x, 32)
        xq2, dx2, xs2 = (
            xq.reshape((1, cols)),
            dx.reshape((1, cols // 32)),
            xs.reshape((1, cols // 32)),
        )
        out2 = out.reshape((1, out.shape[0]))
        for g in prange((w1.shape[0] + w2.shape[0] + w3.shape[0]) // 8):
            gemm_rows8(code, w1, w2, w3, g, xq2, dx2, xs2, 0, 1, out2, cols // 32)

    return _compiled(driver, _name("matvec_int8", qtype, parallel, "_rows8"), parallel)


@functools.cache
def matmul_rows8(qtype: GGMLType, *, parallel: bool) -> Any:
    """The driver ``(w1, w2, w3, x, out)`` of `matmul_int8` for matrices in `pack_rows8`'s
    layout: each group of 8 weight rows against 4 rows of ``x`` at a time; each of out's
    rows equals `matvec_rows8` of that row of ``x``, bit for bit."""
    code, stamp = int(qtype), IR_STAMP
    serial_rows, threaded = QUANTIZE_SERIAL_ROWS, int(parallel)

    def driver(w1, w2, w3, x, out):
        if stamp < 0:  # never (see `matvec_int8`)
            return
        n, cols = x.shape
        if threaded > 0 and n > serial_rows:  # (see `matmul_int8`)
            xq, dx, xs = quantized_rows_int8(x, 32)
        else:
            xq, dx, xs = quantized_rows_int8_serial(x, 32)
        nb = cols // 32
        for g in prange((w1.shape[0] + w2.shape[0] + w3.shape[0]) // 8):
            c = 0
            while c + 4 <= n:
                gemm_rows8(code, w1, w2, w3, g, xq, dx, xs, c, 4, out, nb)
                c += 4
            if n - c == 1:
                gemm_rows8(code, w1, w2, w3, g, xq, dx, xs, c, 1, out, nb)
            elif n - c == 2:
                gemm_rows8(code, w1, w2, w3, g, xq, dx, xs, c, 2, out, nb)
            elif n - c == 3:
                gemm_rows8(code, w1, w2, w3, g, xq, dx, xs, c, 3, out, nb)

    return _compiled(driver, _name("matmul_int8", qtype, parallel, "_rows8"), parallel)


@functools.cache
def matvec_float(qtype: GGMLType, *, parallel: bool) -> Any:
    """The driver ``(w1, w2, w3, x, out)``: ``out = [w1; w2; w3] @ x`` for ``qtype``
    matrices, ``x`` float32 ``(cols,)``, ``cols`` a multiple of 32.

    Raises:
        KeyError: no AVX2 kernel for ``qtype`` (`FLOAT_TYPES`).
    """
    if qtype not in FLOAT_TYPES:
        raise KeyError(f"no AVX2 float matvec for {GGMLType(qtype).name}")
    code, block, group = int(qtype), TYPES[qtype].block, TYPES[qtype].x_group

    stamp = IR_STAMP

    def driver(w1, w2, w3, x, out):
        if stamp < 0:  # never (see `matvec_int8`)
            return
        nb = x.shape[0] // block
        xs = sum_groups(x, group) if group else x[:0]
        n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
        for r in prange(n2 + w3.shape[0]):
            if r < n1:
                out[r] = dot_float(code, w1, r, x, xs, nb)
            elif r < n2:
                out[r] = dot_float(code, w2, r - n1, x, xs, nb)
            else:
                out[r] = dot_float(code, w3, r - n2, x, xs, nb)

    return _compiled(driver, _name("matvec_float", qtype, parallel), parallel)


@functools.cache
def decode_tile(qtype: GGMLType) -> Any:
    """The driver ``(w, r0, out)``: ``out[i]`` = row ``r0 + i`` of ``w`` as float32, on the
    calling thread (the tile then goes to a multi-threaded sgemm; see
    `numba_decode.decode_tile`).

    Raises:
        KeyError: no AVX2 kernel for ``qtype`` (`FLOAT_TYPES`).
    """
    if qtype not in FLOAT_TYPES:
        raise KeyError(f"no AVX2 tile decoder for {GGMLType(qtype).name}")
    code, block = int(qtype), TYPES[qtype].block

    stamp = IR_STAMP

    def driver(w, r0, out):
        if stamp < 0:  # never (see `matvec_int8`)
            return
        nb = out.shape[1] // block
        for i in range(out.shape[0]):
            decode_row(code, w, r0 + i, out, i, nb)

    return _compiled(driver, f"decode_tile_{GGMLType(qtype).name.lower()}", False)
