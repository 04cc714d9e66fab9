"""Matrices of safetensors checkpoints for the NumPy backend: mlx affine groups and floats.

`checkpoint_matrix` gives the NumPy model a matrix for a weight of a
`phimlx.formats.Checkpoint`:

- float weights (F16, BF16, F32) are `QuantMatrix` objects over the memory-mapped bytes --
  the same kernels as GGUF's F16/BF16/F32 tensors (their rows are laid out alike);
- mlx affine-quantized weights are `AffineMatrix` objects: ``uint32`` codes plus a scale and
  a bias per group, memory-mapped.  ``matmul`` (prefill) decodes a tile of rows at a time
  (`phimlx.formats.affine.dequantize_rows`: NumPy, portable) and multiplies it with BLAS,
  so memory beyond the output is one tile (`TILE_BYTES`), never the whole matrix.
  ``matvec`` (decode) does the same without numba (or for 2/3/5/6-bit codes); with numba,
  4- and 8-bit codes run a one-pass kernel over the packed bytes, and their tiles are
  decoded by numba (`affine_kernels`).
  Activations are float32: results equal ``x @ dequantize(W).T`` to float32 rounding.

`AffineMatrix` offers what `NumpyModel` calls on a `QuantMatrix` (``matvec``, ``matmul``,
``take_rows``, ``rows``, ``cols``, ``nbytes``); `fallback.matrix.matvec_many` and
``matmul_many`` run it one matrix at a time.
"""

from __future__ import annotations

import numpy as np

from phimlx.formats import Checkpoint, Weight
from phimlx.formats.affine import dequantize_ids, dequantize_rows
from phimlx.formats.safetensors import to_float32
from phimlx.gguf import GGMLType

from .kernels import int8_kernel_available, numba_available
from .matrix import TILE_BYTES, QuantMatrix

_FLOAT_TYPES = {"F16": GGMLType.F16, "BF16": GGMLType.BF16, "F32": GGMLType.F32}


class AffineMatrix:
    """A weight matrix in mlx's affine quantization (rows = out_features), kept packed.

    Args:
        codes: ``uint32 (rows, cols * bits / 32)``, the packed codes.
        scales, biases: ``(rows, cols / group_size)`` of the weight's dtype (F16, F32;
            BF16 as ``uint16`` bits).
        weight: the checkpoint's `Weight` (shape, bits, group size, dtype).
    """

    use_numba = False  # (no QuantMatrix kernel set for the warm-up's tile pass)
    int8_activations = False
    int8_group = 0

    def __init__(
        self,
        codes: np.ndarray,
        scales: np.ndarray,
        biases: np.ndarray,
        weight: Weight,
        *,
        use_numba: bool | None = None,
    ) -> None:
        if not weight.quantized or len(weight.shape) != 2:
            raise ValueError(f"{weight.module}: not a quantized matrix")
        self.weight = weight
        self.rows, self.cols = weight.shape
        self.codes, self.scales, self.biases = codes, scales, biases
        self.nbytes = int(codes.nbytes + scales.nbytes + biases.nbytes)
        self._tile_rows = max(1, min(self.rows, TILE_BYTES // (4 * self.cols)))
        self._kernel = self._decoder = None
        if numba_available() if use_numba is None else use_numba:
            from .affine_kernels import DECODERS, matvec_kernel

            self._decoder = DECODERS.get(weight.bits or 0)

            found = matvec_kernel(weight.bits or 0, weight.dtype)
            if found is not None:
                self._kernel, table = found
                bits16 = weight.dtype != "F32"  # F16 / BF16 as their bits, through the table
                self._kernel_args = (
                    codes.view(np.uint8).reshape(self.rows, -1),  # (rows, cols * bits / 8)
                    scales.view(np.uint16) if bits16 else scales,
                    biases.view(np.uint16) if bits16 else biases,
                    table,
                )

    @property
    def numba_matvec(self) -> bool:
        """True if `matvec` runs the one-pass numba kernel (else NumPy tiles)."""
        return self._kernel is not None

    def __repr__(self) -> str:
        w = self.weight
        return f"AffineMatrix({w.bits}-bit g{w.group_size} {w.dtype}, {self.rows}x{self.cols})"

    def _tiles(self):  # noqa: ANN202 - (r0, r1, float32 tile) for each tile of rows
        w = self.weight
        buf = np.empty((self._tile_rows, self.cols), np.float32) if self._decoder else None
        for r0 in range(0, self.rows, self._tile_rows):
            r1 = min(self.rows, r0 + self._tile_rows)
            if buf is None:
                yield r0, r1, dequantize_rows(self.codes, self.scales, self.biases, w, r0, r1)
                continue
            tile = buf[: r1 - r0]  # (n, cols), decoded by numba from the packed codes
            self._decoder(
                np.ascontiguousarray(self.codes[r0:r1]).view(np.uint8),
                to_float32(self.scales[r0:r1], w.dtype),
                to_float32(self.biases[r0:r1], w.dtype),
                tile,
                w.group_size,
            )
            yield r0, r1, tile

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (tests only)."""
        return dequantize_rows(self.codes, self.scales, self.biases, self.weight, 0, self.rows)

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``W @ x``: float32 ``[cols]`` -> float32 ``[rows]`` (optionally into ``out``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (self.cols,):
            raise ValueError(f"x has shape {x.shape}, the matrix {self.cols} columns")
        if out is None:
            out = np.empty(self.rows, np.float32)
        elif out.shape != (self.rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 ({self.rows},)")
        if self._kernel is not None:
            self._kernel(*self._kernel_args, x, out, self.weight.group_size)
            return out
        for r0, r1, tile in self._tiles():
            np.matmul(tile, x, out=out[r0:r1])
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, cols]`` -> float32 ``[n, rows]``, a tile at a time."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul expects x of shape (n, {self.cols}), got {x.shape}")
        out = np.empty((x.shape[0], self.rows), np.float32)
        for r0, r1, tile in self._tiles():
            np.matmul(x, tile.T, out=out[:, r0:r1])
        return out

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` decoded: float32 ``[len(ids), cols]`` (the embedding lookup).

        Raises:
            IndexError: an id is outside ``0 .. rows - 1``.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)][0]
            raise IndexError(f"row id {bad} out of range for a matrix of {self.rows} rows")
        return dequantize_ids(self.codes, self.scales, self.biases, self.weight, ids)


def checkpoint_matrix(ckpt: Checkpoint, name: str, int8: bool | None) -> QuantMatrix | AffineMatrix:
    """The NumPy backend's matrix for the weight under GGUF name ``name`` of ``ckpt``."""
    w = ckpt.weight(name)
    if w.quantized:
        return AffineMatrix(*ckpt.affine_parts(name), w)
    qtype = _FLOAT_TYPES[w.dtype]
    rows, cols = w.shape
    if int8:  # where the type has an int8 kernel (the float types have none): float
        int8 = int8_kernel_available(qtype, cols)
    return QuantMatrix(ckpt.raw(w.module + ".weight"), qtype, (rows, cols), int8_activations=int8)


def affine_dispatchers(ckpt: Checkpoint) -> list[object]:
    """The numba kernels ``ckpt``'s quantized weights call (`fallback.kernels_cached`)."""
    if not numba_available():
        return []
    from .affine_kernels import DECODERS, matvec_kernel

    out: dict[int, object] = {}
    for w in ckpt.weights.values():
        found = matvec_kernel(w.bits or 0, w.dtype) if w.quantized else None
        if found is not None:
            out[id(found[0])] = found[0]
            out[id(DECODERS[w.bits or 0])] = DECODERS[w.bits or 0]
    return list(out.values())


def float_kinds(ckpt: Checkpoint) -> set[tuple[GGMLType, int]]:
    """(type, columns) of the checkpoint's F16/BF16 matrices: the QuantMatrix kernels they
    run (`fallback.kernels_cached`); F32 goes to BLAS, affine weights to NumPy."""
    return {
        (_FLOAT_TYPES[w.dtype], w.shape[1])
        for w in ckpt.weights.values()
        if len(w.shape) == 2 and not w.quantized and w.dtype != "F32"
    }
