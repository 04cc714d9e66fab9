"""mlx's affine quantization, decoded with NumPy: rows of codes -> float32.

The layout (``mx.quantize(w, group_size, bits)``; see also `phimlx.mlx.quant`): each row is
cut into groups of ``group_size`` elements, element = ``scale * q + bias`` with one scale and
bias per group; the codes ``q`` of a row form one little-endian bit stream (element ``i`` at
bits ``i*bits .. i*bits+bits-1``) stored as ``uint32`` words.  So 8-bit codes are the row's
bytes, 4-bit codes its nibbles (low first), 2-bit codes its bit pairs; 3-, 5- and 6-bit codes
straddle bytes and are unpacked bit by bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .safetensors import to_float32

if TYPE_CHECKING:
    from .checkpoint import Weight


def unpack_codes(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """``uint32 (n, cols * bits / 32)`` packed codes -> ``uint8 (n, cols)``."""
    n = words.shape[0]
    b = np.ascontiguousarray(words).view(np.uint8).reshape(n, -1)  # (n, cols * bits / 8)
    if bits == 8:
        return b
    if bits == 4:
        out = np.empty((n, cols), np.uint8)
        np.bitwise_and(b, 0x0F, out=out[:, 0::2])
        np.right_shift(b, 4, out=out[:, 1::2])
        return out
    if bits == 2:
        return ((b[:, :, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(n, cols)
    bitplane = np.unpackbits(b, axis=1, bitorder="little").reshape(n, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    return (bitplane * weights).sum(axis=2, dtype=np.uint8)


def dequantize_rows(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, w: Weight, r0: int, r1: int
) -> np.ndarray:
    """Rows ``r0:r1`` of quantized weight ``w`` as float32 ``(r1 - r0, cols)``.

    ``codes``, ``scales``, ``biases`` are the stored arrays (`Checkpoint.affine_parts`):
    only their rows ``r0:r1`` are read."""
    assert w.bits is not None and w.group_size is not None
    cols = w.shape[1]
    q = unpack_codes(codes[r0:r1], w.bits, cols)  # (n, cols)
    n, groups = q.shape[0], cols // w.group_size
    s = to_float32(scales[r0:r1], w.dtype)[:, :, None]  # (n, groups, 1)
    b = to_float32(biases[r0:r1], w.dtype)[:, :, None]
    out = q.reshape(n, groups, w.group_size).astype(np.float32)
    out *= s
    out += b
    return out.reshape(n, cols)


def dequantize_ids(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, w: Weight, ids: np.ndarray
) -> np.ndarray:
    """Rows ``ids`` (any order, repeats allowed) of ``w`` as float32 ``(len(ids), cols)``."""
    assert w.bits is not None and w.group_size is not None
    cols = w.shape[1]
    q = unpack_codes(codes[ids], w.bits, cols)
    n, groups = q.shape[0], cols // w.group_size
    s = to_float32(scales[ids], w.dtype)[:, :, None]
    b = to_float32(biases[ids], w.dtype)[:, :, None]
    out = q.reshape(n, groups, w.group_size).astype(np.float32) * s + b
    return out.reshape(n, cols)
