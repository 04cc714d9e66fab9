"""Matrices of safetensors checkpoints for the NumPy backend: mlx affine groups and floats.

`checkpoint_matrix` gives the NumPy model a matrix for a weight of a
`phimlx.formats.Checkpoint`:

- float weights (F16, BF16, F32) are `QuantMatrix` objects over the memory-mapped bytes --
  the same kernels as GGUF's F16/BF16/F32 tensors (their rows are laid out alike);
- 4-bit affine weights in groups of 32, 64 or 128 become GGUF Q4_1 blocks where int8
  activations are on (the default on AVX2; `q4_1_blocks`): Q4_1 is an affine group of 32,
  so the int8 kernels of GGUF files run them (a copy in memory the size of the codes);
  8-bit ones Q8_0 blocks plus a per-group offset (`OffsetQ8Matrix`);
- other mlx affine-quantized weights are `AffineMatrix` objects: ``uint32`` codes plus a
  scale and a bias per group, memory-mapped.  ``matmul`` (prefill) decodes a tile of rows at a time
  (`phimlx.formats.affine.dequantize_rows`: NumPy, portable) and multiplies it with BLAS,
  so memory beyond the output is one tile (`TILE_BYTES`), never the whole matrix.
  ``matvec`` (decode) does the same without numba (or for 2/3/5/6-bit codes); with numba,
  4- and 8-bit codes run a one-pass kernel over the packed bytes, and their tiles are
  decoded by numba (`affine_kernels`).
  Activations are float32 here: results equal ``x @ dequantize(W).T`` to float32 rounding.

`AffineMatrix` offers what `NumpyModel` calls on a `QuantMatrix` (``matvec``, ``matmul``,
``take_rows``, ``rows``, ``cols``, ``nbytes``); `fallback.matrix.matvec_many` and
``matmul_many`` run it one matrix at a time.
"""

from __future__ import annotations

import numpy as np

from phimlx.formats import Checkpoint, Weight
from phimlx.formats.affine import dequantize_ids, dequantize_rows, unpack_codes
from phimlx.formats.safetensors import to_float32
from phimlx.gguf import GGMLType

from .kernels import int8_activations_default, int8_kernel_available, numba_available
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


F16_ROUNDING = 2.0**-25  # half of float16's smallest subnormal: `q4_1_blocks`'s bound


def q4_1_blocks(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, w: Weight
) -> np.ndarray | None:
    """A 4-bit affine weight with groups of a multiple of 32 as GGUF Q4_1 blocks, ``uint8
    (rows, cols / 32 * 20)``: the same numbers (Q4_1 is an affine group of 32 with a float16
    scale and minimum: w = d q + m), so the int8-activation kernels can run it.  Scales and
    biases become float16: bfloat16 ones exactly within float16's normal range, and below
    it (|x| < 2^-14, float16's subnormals) rounded by at most 2^-25, so a weight moves by
    at most 16 x 2^-25 (5e-7; mlx-lm writes such tiny scales for near-constant groups).
    None where a value moves more (out of float16's range, or a float32 value with more
    precision): that weight keeps `AffineMatrix`.  The blocks are a copy in memory (about
    the size of the packed codes), written a tile of rows at a time."""
    assert w.bits == 4 and w.group_size is not None and w.group_size % 32 == 0
    rows, cols = w.shape
    nb, rep = cols // 32, w.group_size // 32
    halves = []
    for a in (scales, biases):
        f16 = _f16_or_none(a, w.dtype)
        if f16 is None:
            return None
        halves.append(np.repeat(f16, rep, axis=1).view(np.uint8).reshape(rows, nb, 2))
    out = np.empty((rows, nb, 20), np.uint8)  # ggml's block_q4_1: d, m (float16), 16 bytes
    out[:, :, 0:2], out[:, :, 2:4] = halves
    step = max(1, (TILE_BYTES // 4) // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        q = unpack_codes(codes[r0:r1], 4, cols).reshape(r1 - r0, nb, 32)
        np.bitwise_or(q[:, :, :16], q[:, :, 16:] << 4, out=out[r0:r1, :, 4:])  # j | j + 16
    return out.reshape(rows, nb * 20)


def _f16_or_none(a: np.ndarray, dtype: str) -> np.ndarray | None:
    """Scales or biases as float16 within `F16_ROUNDING` of their value, else None."""
    f32 = to_float32(np.asarray(a), dtype)
    with np.errstate(over="ignore"):
        f16 = f32.astype(np.float16)
    if not (np.abs(f16.astype(np.float32) - f32) <= F16_ROUNDING).all():
        return None  # (also NaN, and values past float16's range: inf)
    return f16


class OffsetQ8Matrix(AffineMatrix):
    """An 8-bit affine weight run by GGUF's Q8_0 int8 kernels: w = s q + b (q in 0..255) is
    s (q - 128) + (b + 128 s), so ``W @ x`` is Q8_0 blocks (d = s, quants q - 128) times x,
    plus per group (b + 128 s) times the group's sum of x (one small float32 product of a
    (rows, groups) matrix).  Row lookups (`take_rows`) stay `AffineMatrix`'s; the Q8_0
    blocks are a copy in memory (the size of the codes)."""

    int8_activations = True
    numba_matvec = True  # (the Q8_0 kernel)

    def __init__(self, q8: QuantMatrix, offsets: np.ndarray, *parts: object) -> None:
        super().__init__(*parts, use_numba=False)  # type: ignore[arg-type]
        self._q8, self._offsets = q8, offsets
        self.nbytes = int(q8.raw.nbytes + offsets.nbytes)
        self._offset_kernel = None
        if numba_available():
            from .affine_kernels import add_offsets

            self._offset_kernel = add_offsets

    def __repr__(self) -> str:
        w = self.weight
        return f"OffsetQ8Matrix(8-bit g{w.group_size} as Q8_0, {self.rows}x{self.cols})"

    def _group_sums(self, x: np.ndarray) -> np.ndarray:
        gs = self.weight.group_size or 1
        return x.reshape(*x.shape[:-1], self.cols // gs, gs).sum(axis=-1, dtype=np.float32)

    def _add_offsets(self, out: np.ndarray, x: np.ndarray) -> None:
        """out (n, rows) += the offsets times the group sums of x (n, cols)."""
        if self._offset_kernel is not None:
            self._offset_kernel(out, self._offsets, x, self.weight.group_size)
        else:
            out += self._group_sums(x) @ self._offsets.T

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``W @ x``: float32 ``[cols]`` -> float32 ``[rows]`` (optionally into ``out``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self._q8.matvec(x, out)
        self._add_offsets(out[None], x[None])
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, cols]`` -> float32 ``[n, rows]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self._q8.matmul(x)
        self._add_offsets(out, x)
        return out


def offset_q8(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, w: Weight
) -> OffsetQ8Matrix | None:
    """An 8-bit affine weight with groups of a multiple of 32 as an `OffsetQ8Matrix`; None
    where a scale is not a float16 within `F16_ROUNDING` (`q4_1_blocks`'s rule)."""
    assert w.bits == 8 and w.group_size is not None and w.group_size % 32 == 0
    rows, cols = w.shape
    nb, rep = cols // 32, w.group_size // 32
    d = _f16_or_none(scales, w.dtype)
    if d is None:
        return None
    blocks = np.empty((rows, nb, 34), np.uint8)  # ggml's block_q8_0: d (float16), 32 int8
    blocks[:, :, 0:2] = np.repeat(d, rep, axis=1).view(np.uint8).reshape(rows, nb, 2)
    q = np.asarray(codes).view(np.uint8).reshape(rows, nb, 32)  # 8-bit codes: bytes in order
    blocks[:, :, 2:] = (q ^ np.uint8(0x80)).view(np.uint8)  # q - 128 as int8's bits
    s32, b32 = to_float32(np.asarray(scales), w.dtype), to_float32(np.asarray(biases), w.dtype)
    q8 = QuantMatrix(
        blocks.reshape(rows, nb * 34), GGMLType.Q8_0, (rows, cols), int8_activations=True
    )
    return OffsetQ8Matrix(q8, b32 + np.float32(128) * s32, codes, scales, biases, w)


def _int8_wanted(int8: bool | None, qtype: GGMLType, cols: int) -> bool:
    """Whether a matrix should take the int8-activation kernels: asked for (or the default,
    `int8_activations_default`) and available for ``qtype`` here."""
    wanted = int8 if int8 is not None else int8_activations_default()
    return bool(wanted) and int8_kernel_available(qtype, cols)


def checkpoint_matrix(ckpt: Checkpoint, name: str, int8: bool | None) -> QuantMatrix | AffineMatrix:
    """The NumPy backend's matrix for the weight under GGUF name ``name`` of ``ckpt``: where
    int8 activations are on, 4-bit affine groups of 32/64/128 as Q4_1 blocks
    (`q4_1_blocks`) and 8-bit ones as Q8_0 blocks plus offsets (`offset_q8`), so GGUF's
    int8 kernels run them; other affine weights as `AffineMatrix`; float weights as
    `QuantMatrix` over the memory map."""
    w = ckpt.weight(name)
    if w.quantized:
        parts = ckpt.affine_parts(name)
        rows, cols = w.shape
        groups32 = (w.group_size or 1) % 32 == 0
        if w.bits == 4 and groups32 and _int8_wanted(int8, GGMLType.Q4_1, cols):
            blocks = q4_1_blocks(*parts, w)
            if blocks is not None:
                return QuantMatrix(blocks, GGMLType.Q4_1, (rows, cols), int8_activations=True)
        if w.bits == 8 and groups32 and _int8_wanted(int8, GGMLType.Q8_0, cols):
            offset = offset_q8(*parts, w)
            if offset is not None:
                return offset
        return AffineMatrix(*parts, w)
    qtype = _FLOAT_TYPES[w.dtype]
    rows, cols = w.shape
    if int8:  # where the type has an int8 kernel (the float types have none): float
        int8 = int8_kernel_available(qtype, cols)
    return QuantMatrix(ckpt.raw(w.module + ".weight"), qtype, (rows, cols), int8_activations=int8)


def affine_dispatchers(ckpt: Checkpoint) -> list[object]:
    """The numba kernels ``ckpt``'s quantized weights call (`fallback.kernels_cached`)."""
    if not numba_available():
        return []
    from .affine_kernels import DECODERS, add_offsets, matvec_kernel

    out: dict[int, object] = {}
    for w in ckpt.weights.values():
        if w.quantized and w.bits == 8:  # (an `OffsetQ8Matrix` where int8 activations are on)
            out[id(add_offsets)] = add_offsets
        found = matvec_kernel(w.bits or 0, w.dtype) if w.quantized else None
        if found is not None:
            out[id(found[0])] = found[0]
            out[id(DECODERS[w.bits or 0])] = DECODERS[w.bits or 0]
    return list(out.values())


def float_kinds(ckpt: Checkpoint) -> set[tuple[GGMLType, int]]:
    """(type, columns) of the checkpoint's F16/BF16 matrices and of its 4- and 8-bit affine
    ones that may run as Q4_1 / Q8_0 (`checkpoint_matrix`): the QuantMatrix kernels they run
    (`fallback.kernels_cached`); F32 goes to BLAS, other affine weights to their kernels."""
    kinds = set()
    for w in ckpt.weights.values():
        if len(w.shape) != 2:
            continue
        if not w.quantized and w.dtype != "F32":
            kinds.add((_FLOAT_TYPES[w.dtype], w.shape[1]))
        elif w.quantized and w.bits in (4, 8) and (w.group_size or 1) % 32 == 0:
            kinds.add((GGMLType.Q4_1 if w.bits == 4 else GGMLType.Q8_0, w.shape[1]))
    return kinds
