"""Quantized matrix kernels of the NumPy backend: weights stay in their memory-mapped GGUF blocks.

`QuantMatrix` is a weight matrix ``W`` (rows = out_features, cols = in_features) that is never
decoded whole.  At construction it takes its kernels from `fallback.kernels.kernel_set` (the
engine, AVX2 IR / numba / NumPy, chosen once per type and machine) and from then on only
calls them:

- ``matvec`` (decode) reads the blocks in place.  On AVX2 CPUs, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
  Q6_K, F16 and BF16 run row loops written as LLVM IR (`kernels.avx2`).  By default the quantized
  types there take ``x`` quantized to int8 per 32 values and integer dot products
  (vpmaddubsw), as llama.cpp does (1.2-1.6x faster decoding); ``int8_activations=False`` or
  ``PHIMLX_INT8_ACTIVATIONS=0`` selects float activations, exact to float32 rounding (F16 and
  BF16 are always float).  Elsewhere (no AVX2; Q5_0, Q5_1) a numba kernel per type
  dequantizes in float registers (`kernels.numba_matvec`); Q2_K and Q3_K decode one row at a
  time into a small buffer (`kernels.numba_decode`); F32 goes straight to BLAS.
  ``matvec_many`` runs matrices that share ``x`` (q|k|v, gate|up) as one call (on AVX2 one
  parallel launch); every matvec can write into ``out``.
- ``matmul`` (prefill, batched decode: n rows of ``x``) runs, where ``matvec`` takes int8
  activations, the int8 matmul kernel (`kernels.avx2.matmul_int8`): ``x`` rounded to int8
  per row, each weight block read and unpacked once per few rows, every output row equal to
  ``matvec`` of that row bit for bit.  Where the CPU has AMX, from `TILES_ROWS` rows (a
  prompt) it runs on the tiles instead (`kernels.amx`: weights decoded 16 rows at a time
  and rounded to bfloat16, ``x`` too, float32 sums).  Elsewhere (float activations, the
  exact path) it decodes a tile of rows at a time (the kernel set's ``decode_tile``, on
  the calling thread) and hands it to BLAS sgemm (multi-threaded), so memory stays
  bounded by one tile.
  ``matmul_many`` is ``matvec_many`` for n rows.
- ``take_rows`` (the embedding lookup) decodes rows by id (``decode_rows``).
- Without numba (or with ``PHIMLX_NO_NUMBA=1``, or ``use_numba=False``) the same tiles are
  decoded by `phimlx.gguf.dequantize_rows`: correct and memory-bounded, not fast.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable

import numpy as np

from phimlx.errors import UnsupportedModelError
from phimlx.gguf import DEQUANTIZABLE, TYPE_SIZES, GGMLType

from . import kernels
from .kernels import (
    Matvec,
    MatvecFn,
    Octets,
    int8_activations_default,
    int8_group,
    int8_prefill,
    kernel_set,
    numba_available,
    repack_default,
)

# Bytes of float32 one decoded prefill tile may take (`QuantMatrix.matmul`).
TILE_BYTES = 8 << 20

# Matrices with fewer weights run on one thread: a parallel launch costs ~10 us.  Four
# times as many (SmolLM2's q|k|v, out and down on one thread) made a decode step alone take
# 0.82-0.90x the time in one process, but through the server, where the event loop and the
# clients share the two cores, 4 requests at once went from 513 to 470 tok/s (Zen 4 VM, 2
# threads, 12 alternating rounds; README, "Server").
SERIAL_WEIGHTS = 1 << 18

# On the int8 path, `matmul` takes the int8 kernel for up to this many rows of x, by the
# type's int8 group (32; 256 for the K-quants): batched decode, drafted tokens, a chat
# turn's new text (one weight read for all rows, where float tiles would decode every
# weight for a few rows).  Longer prompts go to float tiles and BLAS sgemm unless
# `kernels.int8_prefill`.  The crossovers, measured at 2 threads on an AVX-512 Xeon (time
# int8 / float tiles; Q4_K 8192x3072: 0.44 at 32 rows, 0.95 at 128, 1.22 at 256; Q6_K
# 3072x8192: 0.66, 1.09, 1.37; Q4_1 1536x576: 0.93 at 32, 1.68 at 64).
INT8_MATMUL_ROWS = {32: 32, 256: 128}

# Where the CPU has AMX (`kernels.amx`), from this many rows of x the int8 path's `matmul`
# runs on the tiles instead (bfloat16 weights and x, float32 sums: not equal to the matvec
# bit for bit, as the float tiles it replaces were not).  Decoding a weight panel costs
# about what 20-30 rows of the int8 product do, the tiles' product little beside it.
TILES_ROWS = 32


def _release_file_pages(view: np.ndarray) -> bool:
    """Drop the pages of a file's memory map under ``view`` from this process's resident
    memory (``madvise(MADV_DONTNEED)``; whole pages inside the view only): after a repack
    the file's blocks are no longer read, and resident they would count twice.  The map is
    the file's, never written (copy-on-write or read-only), so a page read again comes back
    from the file as it was.  Nothing for an array that is not a view of such a map (its
    memory is its owner's).  True if pages were released."""
    base: object = view
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    start = view.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + view.nbytes) // page * page
    if hi <= lo:
        return False
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return True


def _empty_like_rows(raw: np.ndarray) -> np.ndarray:
    """A (0, row_bytes) array with ``raw``'s flags, so numba reuses one compiled signature."""
    a = np.empty((0, raw.shape[1]), np.uint8)
    if not raw.flags.writeable:
        a.flags.writeable = False
    return a


def matvec_many(
    mats: list[QuantMatrix], x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``[W1; W2; ...] @ x`` for matrices sharing ``x`` (q|k|v, gate|up): float32
    ``[sum of rows]``, the outputs concatenated.  Up to three matrices with the same kernel
    (type, engine, activation kind) and columns run as a single call (on AVX2 one parallel
    launch, ``x`` summed / quantized once); anything else falls back to one
    `QuantMatrix.matvec` per matrix into slices of ``out``."""
    n = sum(m.rows for m in mats)
    if out is None:
        out = np.empty(n, np.float32)
    elif out.shape != (n,) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 ({n},), got {out.dtype} {out.shape}")
    if not mats:
        return out
    x = np.ascontiguousarray(x, dtype=np.float32)
    fused = _fused_kernel(mats) if len(mats) > 1 else None
    if fused is not None:
        if x.shape != (mats[0].cols,):
            raise ValueError(f"x has shape {x.shape}, the matrices {mats[0].cols} columns")
        kernel, (w1, w2, w3) = fused
        kernel(w1, w2, w3, x, out)
        return out
    r0 = 0
    for m in mats:
        m.matvec(x, out=out[r0 : r0 + m.rows])
        r0 += m.rows
    return out


def matmul_many(mats: list[QuantMatrix], x: np.ndarray) -> np.ndarray:
    """``x @ [W1; W2; ...].T`` for matrices sharing ``x`` (q|k|v, gate|up): float32
    ``(n, sum of rows)``.  On the int8 path, up to three matrices with the same kernel run
    as one call, ``x`` quantized once; otherwise one `QuantMatrix.matmul` per matrix."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (mats and x.shape[1] != mats[0].cols):
        raise ValueError(f"x has shape {x.shape}, the matrices {mats[0].cols} columns")
    m0 = mats[0] if mats else None
    int8 = isinstance(m0, QuantMatrix) and (m0._int8_matmul(len(x)) or m0._tiles_matmul(len(x)))
    fused = _fused_kernel(mats, x.shape[0]) if int8 else None
    if fused is None:
        outs = [m.matmul(x) for m in mats]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=-1)
    kernel, (w1, w2, w3) = fused
    out = np.empty((x.shape[0], sum(m.rows for m in mats)), np.float32)
    kernel(w1, w2, w3, x, out)
    return out


def _fused_kernel(
    mats: list[QuantMatrix], n: int | None = None
) -> tuple[MatvecFn, list[np.ndarray]] | None:
    """``(kernel, [w1, w2, w3])`` computing ``out = [W1; W2; W3] @ x`` in one call as
    ``kernel(w1, w2, w3, x, out)`` (unused slots are empty), for 1-3 matrices with the same
    `kernels.Matvec` (type, engine, activation kind) and columns; else None.  With ``n``
    (rows of ``x``), the int8 matmul instead (from `TILES_ROWS` rows the AMX tiles' product
    where the matrices have it), ``kernel(w1, w2, w3, x, out)``.  The serial form below
    `SERIAL_WEIGHTS` weights (times ``n``)."""
    m0 = mats[0]
    if not (
        all(isinstance(m, QuantMatrix) for m in mats)  # (an AffineMatrix runs on its own)
        and 1 <= len(mats) <= 3
        and all(m._matvec is m0._matvec and m.cols == m0.cols for m in mats)
        and len({m.raw.flags.writeable for m in mats}) == 1  # one compiled signature
    ):
        return None
    if n is not None and m0._tiles_matmul(n):
        return m0._tiles, [m.raw for m in mats] + [m0._empty] * (3 - len(mats))
    pair = m0._matvec if n is None else m0._matmul
    # by the matrices' size alone, so that any n calls the kernel a warm-up compiled
    small = sum(m.rows for m in mats) * m0.cols < SERIAL_WEIGHTS
    kernel = pair.serial if small else pair.parallel
    return kernel, [m.raw for m in mats] + [m0._empty] * (3 - len(mats))


def matvec_plan(mats: list[QuantMatrix]) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> [W1; W2; ...] @ x`` (a new float32 array) for matrices sharing ``x``, with the
    checks and the kernel choice of `matvec_many` made once, here: the decode step calls
    one per projection per layer, and at ~130 such calls per token on a small model their
    Python overhead counts.  ``x`` must be C-contiguous float32 ``(cols,)``; the plan does
    not check it again."""
    fused = _fused_kernel(mats)
    if fused is None:
        return functools.partial(matvec_many, mats)
    kernel, (w1, w2, w3) = fused
    n = sum(m.rows for m in mats)

    def run(x: np.ndarray) -> np.ndarray:
        out = np.empty(n, np.float32)
        kernel(w1, w2, w3, x, out)
        return out

    return run


def matmul_plan(
    mats: list[QuantMatrix], *, exact: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> x @ [W1; W2; ...].T`` (a new float32 ``(n, sum of rows)`` array) for matrices
    sharing ``x``, as `matmul_many` computes it, with the kernel choice made once, here: a
    batched decode step calls one per projection per layer, where `matmul_many`'s checks
    and choices would cost as much as a small product.  Rows of ``x`` beyond the int8
    kernel's reach (a long prompt on the float path) go through `matmul_many`; so do rows
    for the AMX tiles (few calls, long ones).  ``x`` must be float32 ``(n, cols)``; the plan
    does not check it again.

    ``exact``: the int8 kernel for any number of rows, so that each row of the result is
    the one ``x``'s row alone gives (`QuantMatrix.matvec`, bit for bit): several prompts'
    rows prefilled together (`fallback.model.NumpyModel.prefill_batch`).

    Raises:
        ValueError: ``exact`` for a matrix without an int8 kernel (`can_multiply_exactly`).
    """
    m0 = mats[0]
    int8 = isinstance(m0, QuantMatrix) and m0._matmul is not None
    if exact and not can_multiply_exactly(mats):
        raise ValueError("an exact matmul plan needs matrices with an int8 kernel")
    fused = _fused_kernel(mats, 1) if int8 else None
    if fused is None:
        if exact:  # one int8 call per matrix
            plans = [matmul_plan([m], exact=True) for m in mats]
            return lambda x: np.concatenate([p(x) for p in plans], axis=-1)
        return functools.partial(matmul_many, mats)
    kernel, (w1, w2, w3) = fused
    rows = sum(m.rows for m in mats)

    def run(x: np.ndarray) -> np.ndarray:
        if not exact and not m0._int8_matmul(x.shape[0]):  # (the tiles' rows too)
            return matmul_many(mats, x)
        x = np.ascontiguousarray(x)  # (free when it is: one compiled signature)
        out = np.empty((x.shape[0], rows), np.float32)
        kernel(w1, w2, w3, x, out)
        return out

    return run


def can_multiply_exactly(mats: list[QuantMatrix]) -> bool:
    """Whether `matmul_plan` (``exact=True``) takes ``mats``: each has an int8 kernel."""
    return all(isinstance(m, QuantMatrix) and m._matmul is not None for m in mats)


class QuantMatrix:
    """A weight matrix W (rows=out_features, cols=in_features) kept in its GGUF blocks.

    Args:
        raw: ``uint8 (rows, row_bytes)``, usually a view of the copy-on-write memory map
            (`ModelFile.raw`); it is never decoded whole, nor copied unless ``repack``.  A
            writable array keeps numba to one compiled signature (read-only arrays compile
            a second one).
        qtype: the GGML type of the blocks.
        shape: ``(rows, cols)`` in weights.
        use_numba: force the numba kernels (True), the NumPy path (False), or pick (None:
            numba when available and ``PHIMLX_NO_NUMBA`` is unset).
        int8_activations: use the int8-activation matvec kernels (AVX2; Q4_0, Q4_1, Q8_0,
            Q4_K, Q5_K, Q6_K): True, False, or None for "where available, unless
            ``PHIMLX_INT8_ACTIVATIONS=0``".  They compute ``W @ x_hat`` with ``x`` rounded
            to 8 bits per 32 values, like llama.cpp (logits move by a few percent); the
            float kernels compute ``W @ x`` to float32 rounding.  `matmul` follows the
            same choice.
        repack: on the int8 path, copy the blocks into the layout the int8 kernels read
            fastest where the type has one here (`kernels.Octets`, the same size: Q4_0
            and Q4_1 with rows a multiple of 8 interleaved by 8 rows, on any AVX2 CPU;
            other Q4_0 / Q4_1 matrices in octets where the 256-bit int8 bodies run, the
            same results bit for bit; Q4_K, Q5_K and Q6_K there; the rest rounded otherwise
            than the file's layout, within float32's bound), as llama.cpp repacks Q4_0
            and Q4_K; the file's blocks are then no longer read.  None: yes unless
            ``PHIMLX_REPACK=0``.

    Raises:
        UnsupportedModelError: ``qtype`` has no kernel (the message names the type).
        ValueError: ``raw`` does not hold ``shape`` in ``qtype``, or numba was forced but is
            unavailable.
    """

    def __init__(
        self,
        raw: np.ndarray,
        qtype: GGMLType,
        shape: tuple[int, int],
        *,
        use_numba: bool | None = None,
        int8_activations: bool | None = None,
        repack: bool | None = None,
    ) -> None:
        if qtype not in DEQUANTIZABLE:
            names = ", ".join(sorted(t.name for t in DEQUANTIZABLE))
            name = qtype.name if isinstance(qtype, GGMLType) else f"type id {int(qtype)}"
            raise UnsupportedModelError(
                f"no matrix kernel for {name} weights (supported: {names}); convert the model "
                "with llama.cpp's llama-quantize"
            )
        self.qtype = GGMLType(qtype)
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.block, self.block_bytes = TYPE_SIZES[self.qtype]
        if self.cols % self.block:
            raise ValueError(
                f"{self.qtype.name} matrix with {self.cols} columns: not whole {self.block}-blocks"
            )
        row_bytes = self.cols // self.block * self.block_bytes
        if raw.dtype != np.uint8 or raw.shape != (self.rows, row_bytes):
            raise ValueError(
                f"{self.qtype.name} {self.rows}x{self.cols} matrix needs uint8 raw of shape "
                f"{(self.rows, row_bytes)}, got {raw.dtype} {raw.shape}"
            )
        # A plain ndarray view (no copy): numba types np.memmap like any array, but the
        # subclass would survive slicing and pull memmap bookkeeping into every view.
        self.raw = raw.view(np.ndarray)
        self.nbytes = int(self.raw.nbytes)
        if use_numba is None:
            use_numba = numba_available()
        elif use_numba and not numba_available():
            raise ValueError(
                f"numba kernels were requested but are unavailable ({kernels.numba_error})"
            )
        self.use_numba = bool(use_numba) and self.raw.flags.c_contiguous
        self._tile_rows = max(1, min(self.rows, TILE_BYTES // (4 * self.cols)))
        self.kernels = kernel_set(self.qtype, self.cols, use_numba=self.use_numba)
        int8_ok = self.kernels.matvec_int8 is not None
        if int8_activations is None:
            int8_activations = int8_ok and int8_activations_default()
        elif int8_activations and not int8_ok:
            raise ValueError(
                f"no int8-activation kernel for this {self.qtype.name} matrix "
                "(needs numba, an AVX2 CPU and Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K)"
            )
        self._int8 = bool(int8_activations)
        self._matvec: Matvec = self.kernels.matvec_int8 if self._int8 else self.kernels.matvec_float
        self._matmul: Matvec | None = self.kernels.matmul_int8 if self._int8 else None
        # The int8 kernels' own layout, if repacked: `raw` then holds it (decoding unpacks).
        self._octets: Octets | None = None
        octets = None
        if self._int8 and self.use_numba:  # rows interleaved by 8 first, where they can be
            octets = next(
                (o for o in (self.kernels.rows8, self.kernels.octets)
                 if o is not None and self.rows % o.rows == 0),
                None,
            )  # fmt: skip
        if octets is not None and (repack_default() if repack is None else repack):
            file_blocks = self.raw
            self.raw, self._octets = octets.pack(file_blocks), octets
            _release_file_pages(file_blocks)
            self._matvec, self._matmul = octets.matvec_int8, octets.matmul_int8
        self._int8_prefill = int8_prefill()
        self._group = int8_group(self.qtype) if self._int8 else 0  # (asked per batched step)
        # (``PHIMLX_INT8_PREFILL=1`` keeps prompts on the int8 kernel, tiles or not)
        tiles = self._int8 and not self._int8_prefill
        self._tiles = self.kernels.matmul_tiles if tiles else None
        self._empty = _empty_like_rows(self.raw)  # the unused slots of a matvec kernel
        self._own_kernel = _fused_kernel([self])  # for `matvec`

    def __repr__(self) -> str:
        return f"QuantMatrix({self.qtype.name}, {self.rows}x{self.cols}, {self.kernels.engine})"

    def _f32(self) -> np.ndarray:
        return self.raw.view(np.float32)  # (rows, cols), F32 only

    @property
    def int8_activations(self) -> bool:
        """True if `matvec` runs the int8-activation kernel."""
        return self._int8

    @property
    def int8_group(self) -> int:
        """On the int8 path, how many values of ``x`` share one int8 scale (32; 256 for the
        K-quants); 0 on the float path."""
        return self._group

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``W @ x``: float32 ``[cols]`` -> float32 ``[rows]`` (the decode step).

        Args:
            x: float32 ``[cols]``.
            out: optional float32 ``[rows]`` (C-contiguous) to write into; returned.
        """
        if out is None:
            out = np.empty(self.rows, dtype=np.float32)
        elif out.shape != (self.rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 ({self.rows},)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (self.cols,):
            raise ValueError(f"x has shape {x.shape}, the matrix {self.cols} columns")
        kernel, (w1, w2, w3) = self._own_kernel
        kernel(w1, w2, w3, x, out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, cols]`` -> float32 ``[n, rows]`` (prefill, batched
        decode).

        With int8 activations (`int8_activations`), the int8 matmul kernel: row i of the
        result equals ``matvec(x[i])`` bit for bit.  Otherwise a tile of rows is decoded at
        a time and multiplied with BLAS sgemm; memory beyond the output is one tile
        (`TILE_BYTES`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul expects x of shape (n, {self.cols}), got {x.shape}")
        if self._int8_matmul(x.shape[0]) or self._tiles_matmul(x.shape[0]):
            return matmul_many([self], x)
        if self.qtype == GGMLType.F32:
            return x @ self._f32().T
        if x.shape[0] == 1:  # one row: the float matvec reads the blocks once, no tiles
            out = np.empty((1, self.rows), dtype=np.float32)
            fv = self.kernels.matvec_float  # (not the int8 kernel: a prefill is float)
            small = self.rows * self.cols < SERIAL_WEIGHTS
            (fv.serial if small else fv.parallel)(self.raw, self._empty, self._empty, x[0], out[0])
            return out
        out = np.empty((x.shape[0], self.rows), dtype=np.float32)  # (n, rows)
        buf = np.empty((self._tile_rows, self.cols), dtype=np.float32)  # (tile, cols)
        for r0 in range(0, self.rows, self._tile_rows):
            tile = buf[: min(self._tile_rows, self.rows - r0)]
            self.decode_tile(r0, tile)  # on this thread: BLAS wants the cores
            np.matmul(x, tile.T, out=out[:, r0 : r0 + tile.shape[0]])
        return out

    def _int8_matmul(self, n: int) -> bool:
        """Whether `matmul` of ``n`` rows runs the int8 kernel (each row equal to the
        matvec's, bit for bit)."""
        if self._matmul is None or self._tiles_matmul(n):
            return False
        return n <= INT8_MATMUL_ROWS[self._group] or self._int8_prefill

    def _tiles_matmul(self, n: int) -> bool:
        """Whether `matmul` of ``n`` rows runs on the AMX tiles (`TILES_ROWS`)."""
        return self._tiles is not None and n >= TILES_ROWS

    @property
    def repacked(self) -> bool:
        """True if the blocks were repacked at load (``repack``): `raw` is then a copy in
        the int8 kernels' layout, not the file's blocks."""
        return self._octets is not None

    def decode_tile(self, r0: int, out: np.ndarray) -> None:
        """Rows ``r0 .. r0 + len(out) - 1`` of W decoded into ``out`` (float32 ``(n, cols)``),
        on the calling thread."""
        if self._octets is None:
            self.kernels.decode_tile(self.raw, r0, out)
        else:
            ids = np.arange(r0, r0 + len(out), dtype=np.int64)
            self.kernels.decode_tile(self._octets.unpack(self.raw, ids), 0, out)

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of W decoded: float32 ``[len(ids), cols]`` (the embedding lookup).

        Raises:
            IndexError: an id is outside ``0 .. rows - 1``.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)  # one numba signature
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)][0]
            raise IndexError(f"row id {bad} out of range for a matrix of {self.rows} rows")
        out = np.empty((ids.size, self.cols), dtype=np.float32)  # (n, cols)
        if self._octets is None:
            self.kernels.decode_rows(self.raw, ids, out)
        else:
            rows = self._octets.unpack(self.raw, ids)
            self.kernels.decode_rows(rows, np.arange(ids.size, dtype=np.int64), out)
        return out
