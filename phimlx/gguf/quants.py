"""Block layouts of the GGUF quant types and their dequantization to float32 (NumPy, vectorized).

Each quantized row is a run of blocks; a block packs ``block_size`` weights into ``type_size``
bytes (`TYPE_SIZES`).  The layouts, as ggml's ``ggml-quants.c`` writes them (little-endian;
``f16`` is an IEEE half):

==========  =====  ==========================================================================
type        bytes  layout of one block -> weight ``i``
==========  =====  ==========================================================================
Q8_0        34     d:f16, q:int8[32]                      -> d * q[i]
Q4_0        18     d:f16, qs:u8[16]                       -> d * (nib(i) - 8)
Q4_1        20     d:f16, m:f16, qs:u8[16]                -> d * nib(i) + m
Q5_0        22     d:f16, qh:u32, qs:u8[16]               -> d * (nib(i) | bit_i(qh) << 4) - 16)
Q5_1        24     d:f16, m:f16, qh:u32, qs:u8[16]        -> d * (nib(i) | bit_i(qh) << 4) + m
Q2_K        84     sc:u8[16], qs:u8[64], d:f16, dmin:f16  -> d * (sc & 15) * q2 - dmin * (sc >> 4)
Q3_K        110    hmask:u8[32], qs:u8[64], sc:12 bytes (16 x 6-bit), d:f16
                                                          -> d * (sc - 32) * (q2 - 4 * !hbit)
Q4_K        144    d:f16, dmin:f16, sc:12 bytes (8 x 6-bit scale, 8 x 6-bit min), qs:u8[128]
                                                          -> d * sc_j * q4 - dmin * m_j
Q5_K        176    as Q4_K, with qh:u8[32] (the 5th bit) before qs
Q6_K        210    ql:u8[128], qh:u8[64], sc:int8[16], d:f16 -> d * sc_j * (q6 - 32)
==========  =====  ==========================================================================

In the 32-blocks, ``nib(i)`` is the low nibble of ``qs[i]`` for ``i < 16`` and the high nibble
of ``qs[i - 16]`` otherwise.  The bit-plane positions of the K-quants are spelled out at each
decoder below.  ``dequantize_rows`` is what the NumPy backend calls on a tile of rows; nothing
here ever touches a whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import GGUFError, UnsupportedModelError
from .format import TYPE_SIZES, GGMLType

QK_K = 256
# Rows decoded per step by `dequantize`, so temporaries stay near 4x this many weights.
_CHUNK_WEIGHTS = 1 << 20

_U8 = np.uint8


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32, read as a little-endian half."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) uint8 -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & _U8(15), qs >> _U8(4)], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8, a little-endian u32 -> (n, 32) uint8 of its bits, bit 0 first."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8.0  # (n, 32)
    return _f16(b[:, :2]) * q


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:]).astype(np.float32)  # (n, 32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b: np.ndarray, qh_at: int) -> np.ndarray:
    """The 5-bit code (n, 32) of Q5_0 / Q5_1 blocks whose qh field starts at byte ``qh_at``."""
    return _nibbles(b[:, qh_at + 4 :]) | (_bits32(b[:, qh_at : qh_at + 4]) << _U8(4))


def _q5_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * (_q5(b, 2).astype(np.float32) - 16.0)


def _q5_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * _q5(b, 4).astype(np.float32) + _f16(b[:, 2:4])


def _crumbs(qs: np.ndarray, groups: int) -> np.ndarray:
    """2-bit fields: (n, 32 * groups) uint8 -> (n, groups, 4, 32).

    Byte ``32 * g + l`` holds the weights ``128 * g + 32 * s + l`` in bits ``2s..2s+1``."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=_U8).reshape(1, 1, 4, 1)
    return (qs.reshape(n, groups, 1, 32) >> shifts) & _U8(3)


def _q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = b[:, :16]  # (n, 16): one per 16 weights, low nibble scale, high nibble min
    q = _crumbs(b[:, 16:80], 2).reshape(n, 16, 16).astype(np.float32)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])  # (n, 1)
    dl = (d * (sc & _U8(15)).astype(np.float32))[:, :, None]  # (n, 16, 1)
    ml = (dmin * (sc >> _U8(4)).astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])  # (n, 1)
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles for 0..7, high for 8..15),
    # high 2 bits of scale s from byte 8 + s % 4, bits 2 * (s // 4).
    low = _nibbles(packed[:, :8])  # (n, 16)
    shifts = np.array([0, 2, 4, 6], dtype=_U8).reshape(1, 4, 1)
    high = ((packed[:, None, 8:12] >> shifts) & _U8(3)).reshape(n, 16)
    sc = (low | (high << _U8(4))).astype(np.float32) - 32.0  # (n, 16)
    q = _crumbs(qs, 2).astype(np.int8)  # (n, 2, 4, 32): weight 128g + 32s + l
    # hmask bit (4g + s) of byte l set: no -4 offset.
    hbit = (hmask[:, None, :] >> np.arange(8, dtype=_U8).reshape(1, 8, 1)) & _U8(1)
    q = q - (4 * (1 - hbit.astype(np.int8))).reshape(n, 2, 4, 32)
    w = (d * sc)[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)
    return w.reshape(n, QK_K)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes (n, 12) -> six-bit scales and mins, each (n, 8) float32.

    For j < 4: sc = p[j] & 63, m = p[j + 4] & 63.  For j >= 4: the low 4 bits are the nibbles
    of p[j + 4] (scale low, min high) and the top 2 bits are the top bits of p[j - 4] (scale)
    and p[j] (min)."""
    a, bm, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & _U8(63), (c & _U8(15)) | ((a >> _U8(6)) << _U8(4))], axis=-1)
    mn = np.concatenate([bm & _U8(63), (c >> _U8(4)) | ((bm >> _U8(6)) << _U8(4))], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Apply Q4_K / Q5_K scales and mins to the codes ``q`` (n, 8, 32)."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # (n, 1)
    sc, mn = _k_scales(b[:, 4:16])  # (n, 8)
    w = (d * sc)[:, :, None] * q.astype(np.float32) - (dmin * mn)[:, :, None]
    return w.reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # Byte 32c + l of qs: sub-block 2c in its low nibble, sub-block 2c + 1 in its high one.
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=_U8).reshape(1, 1, 2, 1)) & _U8(15)  # (n, 4, 2, 32)
    return _k_affine(b, q.reshape(n, 8, 32))


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=_U8).reshape(1, 1, 2, 1)) & _U8(15)  # (n, 4, 2, 32)
    # Bit j of qh[l] is the 5th bit of weight 32j + l.
    hbit = (b[:, None, 16:48] >> np.arange(8, dtype=_U8).reshape(1, 8, 1)) & _U8(1)
    return _k_affine(b, q.reshape(n, 8, 32) | (hbit << _U8(4)))


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16): one per 16 weights
    d = _f16(b[:, 208:210])  # (n, 1)
    # Weight 128h + 32k + l (k < 4, l < 32): low 4 bits in ql[64h + 32(k & 1) + l], nibble k >> 1;
    # high 2 bits in qh[32h + l], bits 2k..2k+1.
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=_U8).reshape(1, 1, 2, 1)) & _U8(15)
    lo = lo.reshape(n, 2, 4, 32)
    hi = _crumbs(qh, 2)  # (n, 2, 4, 32)
    q = (lo | (hi << _U8(4))).astype(np.float32) - 32.0
    w = (d * sc)[:, :, None] * q.reshape(n, 16, 16)
    return w.reshape(n, QK_K)


_BLOCK_DECODERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
DEQUANTIZABLE: frozenset[GGMLType] = frozenset((*_BLOCK_DECODERS, *_FLOAT_TYPES))


def _unsupported(qtype: GGMLType | int) -> UnsupportedModelError:
    name = qtype.name if isinstance(qtype, GGMLType) else f"type id {int(qtype)}"
    names = ", ".join(sorted(t.name for t in DEQUANTIZABLE))
    return UnsupportedModelError(
        f"cannot dequantize tensors of type {name} (supported: {names}); convert the model "
        "with llama.cpp's llama-quantize"
    )


def dequantize_rows(rows: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """Decode a tile of rows: ``uint8 (n, row_bytes)`` -> ``float32 (n, cols)``.

    Temporaries are a few times the output; callers keep tiles small.

    Raises:
        UnsupportedModelError: ``qtype`` is not one phimlx decodes.
        GGUFError: ``row_bytes`` is not a whole number of blocks.
    """
    if qtype not in DEQUANTIZABLE:
        raise _unsupported(qtype)
    rows = np.asarray(rows)
    n, row_bytes = rows.shape
    block, size = TYPE_SIZES[GGMLType(qtype)]
    if row_bytes % size:
        raise GGUFError(
            f"{GGMLType(qtype).name} rows of {row_bytes} bytes are not a whole number of "
            f"{size}-byte blocks"
        )
    cols = row_bytes // size * block
    if qtype == GGMLType.F32:
        return np.ascontiguousarray(rows).view(np.float32).copy()
    if qtype == GGMLType.F16:
        return np.ascontiguousarray(rows).view(np.float16).astype(np.float32)
    if qtype == GGMLType.BF16:
        bits = np.ascontiguousarray(rows).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    blocks = rows.reshape(n * (row_bytes // size), size)  # (n_blocks, type_size)
    return _BLOCK_DECODERS[qtype](blocks).reshape(n, cols)


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ``raw`` bytes (``uint8``, rows last) of type ``qtype`` into float32 ``shape``.

    Args:
        raw: the tensor's bytes, any shape whose size is the tensor's byte size (e.g. the
            ``(rows, row_bytes)`` view of `ModelFile.raw`).
        qtype: the GGML type of the bytes.
        shape: the tensor's shape in NumPy order (last axis contiguous).

    Returns:
        A new float32 array of ``shape``.

    Raises:
        UnsupportedModelError: ``qtype`` is not one phimlx decodes (the message names it).
        GGUFError: the byte count does not match ``shape`` for ``qtype``.
    """
    if qtype not in DEQUANTIZABLE:
        raise _unsupported(qtype)
    qtype = GGMLType(qtype)
    block, size = TYPE_SIZES[qtype]
    cols = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if cols % block:
        raise GGUFError(f"{qtype.name} rows of {cols} weights are not whole {block}-blocks")
    row_bytes = cols // block * size
    if raw.size != n_rows * row_bytes:
        raise GGUFError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs {n_rows * row_bytes} bytes, "
            f"got {raw.size}"
        )
    rows = raw.reshape(n_rows, row_bytes)
    out = np.empty((n_rows, cols), dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // max(cols, 1))
    for r0 in range(0, n_rows, step):
        out[r0 : r0 + step] = dequantize_rows(rows[r0 : r0 + step], qtype)
    return out.reshape(shape)
