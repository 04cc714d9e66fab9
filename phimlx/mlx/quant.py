"""GGUF blocks -> MLX affine-quantized arrays, with NumPy bit manipulation only.

MLX's affine format (``mx.quantize(w, group_size, bits)``): each row is cut into groups of
``group_size`` elements, element = ``scale * q + bias`` with one scale and bias per group;
the codes ``q`` (``bits`` wide) form one little-endian bit stream per row (element ``i``
occupies bits ``i*bits .. i*bits+bits-1``), stored as ``uint32`` words.  That holds for
every width 2..8, so one packer serves them all (checked against ``mx.dequantize`` in
``tests/test_mlx_quant.py``).

How each GGUF type lands (group size 32 throughout):

========  ======  ======  ===============================================================
type      bits    exact   why
========  ======  ======  ===============================================================
Q4_0      4       yes     d*(q-8): scale d, bias -8d
Q4_1      4       yes     d*q + m
Q5_0      5       yes     d*(q-16)
Q5_1      5       yes     d*q + m
Q8_0      8       yes     d*q with int8 q: code q+128, bias -128d
Q4_K      4       yes     each 32-wide sub-block is d*sc_j*q - dmin*m_j
Q5_K      5       yes     as Q4_K with a fifth bit plane
Q6_K      8       no      16-wide sub-blocks with int8 scales; a 32-group spans two of them.
                          8 bits: error <= 64*s_max/255/2 = 0.126 s_max (s = d*|sc|), a
                          quarter of the source's own rounding error s_max/2
Q3_K      4       no      16-wide sub-blocks, d*(sc-32)*(q-4): group range <= 8 s_max,
                          4 bits: error <= 0.27 s_max, about half the source's s_max/2
Q2_K      5       no      16-wide sub-blocks, d*sc*q - dmin*m: range <= 3 d sc_max +
                          15 dmin, 5 bits: error <= 0.29 max(d sc_max, dmin), about half
                          the source's own max(d sc_max, dmin)/2
========  ======  ======  ===============================================================

"Exact" means equal to ``gguf.quants.dequantize`` up to the rounding of ``d*sc`` and
``dmin*m`` to the scale dtype (float32: exact to float rounding; float16: relative 2^-11 of
the scale).  The inexact types are re-quantized from their exact values in float32, one
chunk of rows at a time; the bounds above are measured in the tests.  Float tensors stay
float.  Nothing here touches MLX: the results are NumPy arrays, turned into ``mx.array``
by the caller, so conversion can run tensor by tensor with memory near one tensor's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedModelError
from ..gguf import TYPE_SIZES, GGMLType

GROUP = 32
# Rows converted at once: bounds the NumPy temporaries (~16 bytes per element) to a few MB.
_CHUNK_ELEMENTS = 1 << 20

# Target width for each quantized GGUF type, and whether the mapping is exact.
MLX_BITS: dict[GGMLType, int] = {
    GGMLType.Q4_0: 4,
    GGMLType.Q4_1: 4,
    GGMLType.Q5_0: 5,
    GGMLType.Q5_1: 5,
    GGMLType.Q8_0: 8,
    GGMLType.Q4_K: 4,
    GGMLType.Q5_K: 5,
    GGMLType.Q6_K: 8,
    GGMLType.Q3_K: 4,
    GGMLType.Q2_K: 5,
}
EXACT_TYPES: frozenset[GGMLType] = frozenset(
    {
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
    }
)
FLOAT_TYPES: frozenset[GGMLType] = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})


@dataclass(frozen=True)
class Quantized:
    """One tensor in MLX's affine layout (NumPy arrays; rows are the output features).

    ``weight`` is ``uint32 (rows, cols*bits/32)``; ``scales`` and ``biases`` are
    ``(rows, cols/group_size)`` in the scale dtype.
    """

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int = GROUP

    def rows(self, start: int, stop: int) -> Quantized:
        """Rows ``start:stop`` (quantization is per row, so slicing is exact)."""
        return Quantized(
            self.weight[start:stop],
            self.scales[start:stop],
            self.biases[start:stop],
            self.bits,
            self.group_size,
        )


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes`` (unsigned ints < 2**bits, last axis a multiple of 32) into MLX's
    little-endian bit stream: ``uint32 (..., n*bits/32)``."""
    c = codes.astype(np.uint8, copy=False)
    lead, n = c.shape[:-1], c.shape[-1]
    if bits == 8:
        return np.ascontiguousarray(c).view(np.uint32)
    if bits == 4:
        out = c[..., 0::2] | (c[..., 1::2] << 4)
        return np.ascontiguousarray(out).view(np.uint32)
    # 8 codes of `bits` bits = `bits` whole bytes: gather them in a uint64, keep `bits` bytes.
    c8 = c.reshape(*lead, n // 8, 8).astype(np.uint64)
    acc = np.zeros(c8.shape[:-1], np.uint64)
    for k in range(8):
        acc |= c8[..., k] << np.uint64(k * bits)
    by = acc.view(np.uint8).reshape(*acc.shape, 8)[..., :bits]
    return np.ascontiguousarray(by).reshape(*lead, n * bits // 8).view(np.uint32)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte ``at`` of each block, as float32 ``(rows, nb)``."""
    return (
        np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)
    )


def _bits_le(b: np.ndarray) -> np.ndarray:
    """Bytes ``(..., k)`` -> their bits ``(..., 8k)``, bit ``i`` of the little-endian stream."""
    return np.unpackbits(b, axis=-1, bitorder="little")


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and mins (ggml's get_scale_min_k4)."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


# Each decoder maps blocks (rows, nb, block_bytes) -> codes (rows, nb*block) and per-group
# (rows, nb*block/32) float32 scale and bias, exactly (exact types), or float32 values
# (rows, nb*block) for the types that must be re-quantized.


def _q4_0(b: np.ndarray):
    d = _f16(b, 0)
    qs = b[..., 2:18]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # element j, j+16
    return codes, d, -8 * d


def _q4_1(b: np.ndarray):
    qs = b[..., 4:20]
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1), _f16(b, 0), _f16(b, 2)


def _q5(b: np.ndarray, qh_at: int):
    qs = b[..., qh_at + 4 : qh_at + 20]
    low = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return low | (_bits_le(b[..., qh_at : qh_at + 4]) << 4)  # bit j of qh is element j's


def _q5_0(b: np.ndarray):
    d = _f16(b, 0)
    return _q5(b, 2), d, -16 * d


def _q5_1(b: np.ndarray):
    return _q5(b, 4), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray):
    d = _f16(b, 0)
    return b[..., 2:34] ^ 0x80, d, -128 * d  # int8 q -> q + 128


def _q4_k(b: np.ndarray):
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=-2)  # (rows, nb, 4, 2, 32): sub-block 2i, 2i+1
    return _flat(codes), _flat(d * sc), _flat(-dmin * mn)


def _q5_k(b: np.ndarray):
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    qh = b[..., 16:48]  # bit j of qh[l]: fifth bit of element l of sub-block j
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    low = np.stack([qs & 0xF, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (rows, nb, 8, 32)
    return _flat(low | (high << 4)), _flat(d * sc), _flat(-dmin * mn)


def _q6_k_values(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 2, 32)  # (n, half, l)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    d = _f16(b, 208)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    low4 = np.concatenate([ql & 0xF, ql >> 4], axis=-2)  # (…, 2, 4, 32): element 128n + 32t + l
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = (low4 | (((qh >> shifts) & 3) << 4)).astype(np.int8) - 32
    q = q.reshape(*lead, 16, 16).astype(np.float32)  # sub-block j = element // 16
    return _flat(q * (d[..., None] * sc)[..., None])


def _q3_k_values(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    hmask = b[..., 0:32]
    qs = b[..., 32:96].reshape(*lead, 2, 1, 32)  # (n, ., l)
    s = b[..., 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low nibbles from bytes 0..7, high 2 bits from bytes 8..11.
    low = np.concatenate([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], axis=-1)  # scale j, j+8
    high = (s[..., 8:12, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # (…, 4 bytes, 4)
    high = np.swapaxes(high, -1, -2).reshape(*lead, 16)  # scale 4k+i <- byte i
    sc = (low | (high << 4)).astype(np.float32) - 32
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    q2 = (qs >> shifts) & 3  # (…, 2, 4, 32): element 128n + 32j + l
    hbit = (
        hmask[..., None, None, :]
        >> (4 * np.arange(2, dtype=np.uint8)[:, None, None] + np.arange(4, dtype=np.uint8)[:, None])
    ) & 1
    q = (q2 | (hbit << 2)).astype(np.float32) - 4
    q = q.reshape(*lead, 16, 16)
    return _flat(q * (d[..., None] * sc)[..., None])


def _q2_k_values(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    s = b[..., 0:16]
    qs = b[..., 16:80].reshape(*lead, 2, 1, 32)
    d, dmin = _f16(b, 80)[..., None], _f16(b, 82)[..., None]
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = ((qs >> shifts) & 3).reshape(*lead, 16, 16).astype(np.float32)
    scale = d * (s & 0xF).astype(np.float32)
    bias = dmin * (s >> 4).astype(np.float32)
    return _flat(q * scale[..., None] - bias[..., None])


def _flat(a: np.ndarray) -> np.ndarray:
    """Merge every axis after the first (rows) into one."""
    return a.reshape(a.shape[0], -1)


_EXACT = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
}
_VALUES = {
    GGMLType.Q6_K: _q6_k_values,
    GGMLType.Q3_K: _q3_k_values,
    GGMLType.Q2_K: _q2_k_values,
}


def requantize(values: np.ndarray, bits: int, scale_dtype: type) -> tuple[np.ndarray, ...]:
    """Min/max affine quantization of float32 ``values (rows, n)`` in groups of 32:
    ``(codes, scales, biases)``, the scale and bias rounded to ``scale_dtype`` first so the
    codes are chosen for the values that will be used."""
    g = values.reshape(values.shape[0], -1, GROUP)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(scale_dtype).astype(np.float32)
    bias = lo.astype(scale_dtype).astype(np.float32)
    safe = np.where(scale == 0, 1, scale)
    codes = np.clip(np.rint((g - bias[..., None]) / safe[..., None]), 0, levels)
    return codes.astype(np.uint8).reshape(values.shape), scale, bias


def convert_rows(raw: np.ndarray, qtype: GGMLType, scale_dtype: type = np.float16) -> Quantized:
    """Convert GGUF blocks ``raw (rows, row_bytes)`` of a quantized ``qtype`` to MLX layout.

    Raises:
        UnsupportedModelError: ``qtype`` has no MLX mapping here.
    """
    if qtype not in MLX_BITS:
        raise UnsupportedModelError(
            f"tensor type {qtype.name} cannot be converted for MLX "
            f"(supported: {', '.join(t.name for t in MLX_BITS)})"
        )
    block, size = TYPE_SIZES[qtype]
    rows, row_bytes = raw.shape
    bits = MLX_BITS[qtype]
    cols = row_bytes // size * block
    weight = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // GROUP), np.float32)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        blocks = np.asarray(raw[r : r + step]).reshape(-1, row_bytes // size, size)
        if qtype in _EXACT:
            codes, s, bias = _EXACT[qtype](blocks)
            s, bias = _flat(s), _flat(bias)
        else:
            codes, s, bias = requantize(_VALUES[qtype](blocks), bits, scale_dtype)
        weight[r : r + step] = pack(_flat(codes), bits)
        scales[r : r + step] = s
        biases[r : r + step] = bias
    with np.errstate(over="ignore"):  # checked just below
        out_s, out_b = scales.astype(scale_dtype), biases.astype(scale_dtype)
    if scale_dtype is not np.float32 and not (
        np.isfinite(out_s).all() and np.isfinite(out_b).all()
    ):
        # A scale beyond float16's range (no real model has one): keep float32 for this tensor.
        out_s, out_b = scales, biases
    return Quantized(weight, out_s, out_b, bits)


def dequantize_rows(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """Float32 values of quantized GGUF blocks ``raw (rows, row_bytes)`` (our own decoders;
    used for tests and for the tensors that must be re-quantized)."""
    block, size = TYPE_SIZES[qtype]
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, size)
    if qtype in _VALUES:
        return _VALUES[qtype](blocks)
    codes, s, bias = _EXACT[qtype](blocks)
    g = codes.reshape(raw.shape[0], -1, GROUP).astype(np.float32)
    return _flat(g * _flat(s)[..., None] + _flat(bias)[..., None])
