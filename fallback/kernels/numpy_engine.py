"""The NumPy engine: what runs without numba (or with ``PHIMLX_NO_NUMBA=1``), and F32 weights
everywhere.

Quantized rows are decoded a tile at a time by `phimlx.gguf.dequantize_rows` (the reference
decoder) and multiplied with BLAS: correct and memory-bounded, not fast.  F32 weights need no
decoding: their matvec is BLAS on the weights as they are.  The functions bind a type and
return kernels with the signatures of `fallback.kernels.KernelSet`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from phimlx.gguf import GGMLType, dequantize_rows

# Bytes of float32 one decoded tile may take.
TILE_BYTES = 8 << 20


def _tile_rows(cols: int) -> int:
    return max(1, TILE_BYTES // (4 * cols))


def matvec_float(qtype: GGMLType) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``(w, x, out)``: ``out = w @ x`` for one ``qtype`` matrix (uint8 ``(rows,
    row_bytes)``), ``x`` float32 ``(cols,)``."""
    if qtype == GGMLType.F32:

        def blas(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
            np.matmul(w.view(np.float32), x, out=out)

        return blas

    def run(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        n = _tile_rows(x.shape[0])
        for r0 in range(0, w.shape[0], n):
            tile = dequantize_rows(w[r0 : r0 + n], qtype)  # (n, cols)
            out[r0 : r0 + tile.shape[0]] = tile @ x

    return run


def decode_tile(qtype: GGMLType) -> Callable[[np.ndarray, int, np.ndarray], None]:
    """``(w, r0, out)``: ``out[i]`` = row ``r0 + i`` of ``w`` as float32."""

    def run(w: np.ndarray, r0: int, out: np.ndarray) -> None:
        out[:] = dequantize_rows(w[r0 : r0 + out.shape[0]], qtype)

    return run


def decode_rows(qtype: GGMLType) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``(w, ids, out)``: ``out[i]`` = row ``ids[i]`` of ``w`` as float32, a tile of rows at
    a time."""

    def run(w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
        n = _tile_rows(out.shape[1])
        for i0 in range(0, ids.size, n):
            part = ids[i0 : i0 + n]
            out[i0 : i0 + part.size] = dequantize_rows(w[part], qtype)

    return run
