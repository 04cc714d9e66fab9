"""Quantized matrix kernels of the NumPy backend: weights stay in their memory-mapped GGUF blocks.

`QuantMatrix` is a weight matrix ``W`` (rows = out_features, cols = in_features) that is never
decoded whole:

- ``matvec`` (decode) reads the blocks in place with a numba kernel per type that dequantizes
  in registers (`_matvec_nb`); Q2_K, Q3_K, F16 and BF16 decode one row at a time into a small
  buffer instead (`_dequant_nb.mv_deq`); F32 goes straight to BLAS.
- ``matmul`` (prefill) decodes a tile of rows at a time (numba, parallel) and hands it to BLAS
  sgemm, so memory stays bounded by one tile.
- Without numba (or with ``PHIMLX_NO_NUMBA=1``, or ``use_numba=False``) the same tiles are
  decoded by `phimlx.quants.dequantize_rows`: correct and memory-bounded, not fast.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import numpy as np

from phimlx.errors import UnsupportedModelError
from phimlx.gguf import TYPE_SIZES, GGMLType
from phimlx.quants import DEQUANTIZABLE, dequantize_rows

log = logging.getLogger(__name__)

# Bytes of float32 one decoded tile may take (matmul, the NumPy path's matvec, take_rows).
TILE_BYTES = 8 << 20

_nb: Any = None  # the numba kernel modules, imported on first use
_nb_error: str | None = None


def _numba_disabled() -> bool:
    return os.environ.get("PHIMLX_NO_NUMBA", "").strip().lower() not in ("", "0", "false", "no")


def _kernels() -> Any:
    """Import the numba kernels once; None if numba is missing, broken or disabled."""
    global _nb, _nb_error
    if _nb is None and _nb_error is None:
        try:
            from . import _dequant_nb, _matvec_nb

            _nb = (_matvec_nb, _dequant_nb)
        except Exception as e:  # ImportError, or numba failing to initialise on this platform
            _nb_error = f"{type(e).__name__}: {e}"
            log.info("numba kernels unavailable (%s); using the NumPy path", _nb_error)
    return _nb


def numba_available() -> bool:
    """True if the numba kernels can be used (numba imports and PHIMLX_NO_NUMBA is not set)."""
    return not _numba_disabled() and _kernels() is not None


# A float32 for every float16 bit pattern: the kernels decode block scales with one lookup.
_F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
_F16_TABLE = _F16_TABLE.astype(np.float32)


def _physical_cores() -> int:
    """Physical cores (hyperthreads share a core's vector units: more threads do not help)."""
    pairs: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    pairs.add((phys, value.strip()))
    except OSError:
        pass
    return len(pairs) or os.cpu_count() or 1


def _set_blas_threads(n: int) -> bool:
    """Limit the BLAS behind NumPy to ``n`` threads (threadpoolctl, else OpenBLAS via ctypes)."""
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        return True
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return False
    done = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def set_threads(n: int | None = None) -> int:
    """Set the threads used by the numba kernels and by BLAS.

    Args:
        n: thread count; None means the number of physical cores.

    Returns:
        The count in effect (capped by numba's maximum, ``NUMBA_NUM_THREADS``).
    """
    want = _physical_cores() if n is None else int(n)
    want = max(1, want)
    if numba_available():
        import numba

        want = min(want, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(want)
    if not _set_blas_threads(want):
        log.debug("could not set BLAS threads (no threadpoolctl, no OpenBLAS found)")
    return want


# The types with an in-register matvec kernel; the rest decode per row (`mv_deq`).
_REGISTER_MATVEC = frozenset(
    {
        GGMLType.Q8_0,
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
    }
)


class QuantMatrix:
    """A weight matrix W (rows=out_features, cols=in_features) kept in its GGUF blocks.

    Args:
        raw: ``uint8 (rows, row_bytes)``, usually a view of the copy-on-write memory map
            (`ModelFile.raw`); it is never copied or decoded whole.  A writable array keeps
            numba to one compiled signature (read-only arrays compile a second one).
        qtype: the GGML type of the blocks.
        shape: ``(rows, cols)`` in weights.
        use_numba: force the numba kernels (True), the NumPy path (False), or pick (None:
            numba when available and ``PHIMLX_NO_NUMBA`` is unset).

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
            raise ValueError(f"numba kernels were requested but are unavailable ({_nb_error})")
        self.use_numba = bool(use_numba) and self.raw.flags.c_contiguous
        self._tile_rows = max(1, min(self.rows, TILE_BYTES // (4 * self.cols)))

    def __repr__(self) -> str:
        path = "numba" if self.use_numba else "numpy"
        return f"QuantMatrix({self.qtype.name}, {self.rows}x{self.cols}, {path})"

    def _f32(self) -> np.ndarray:
        return self.raw.view(np.float32)  # (rows, cols), F32 only

    def _xsums(self, x: np.ndarray, group: int) -> np.ndarray:
        return x.reshape(-1, group).sum(axis=1, dtype=np.float32)  # (cols / group,)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``W @ x``: float32 ``[cols]`` -> float32 ``[rows]`` (the decode step)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(self.cols)
        if self.qtype == GGMLType.F32:
            return self._f32() @ x
        if not self.use_numba:
            out = np.empty(self.rows, dtype=np.float32)
            for r0 in range(0, self.rows, self._tile_rows):
                tile = dequantize_rows(self.raw[r0 : r0 + self._tile_rows], self.qtype)
                out[r0 : r0 + tile.shape[0]] = tile @ x  # (tile_rows,)
            return out
        mv, dq = _kernels()
        out = np.empty(self.rows, dtype=np.float32)
        w, t, qk, bs = self.raw, self.qtype, self.block, self.block_bytes
        if t not in _REGISTER_MATVEC:
            dq.mv_deq(w, w.view(np.int8), int(t), bs, x, _F16_TABLE, out)
        elif t == GGMLType.Q4_K:
            mv.mv_q4_k(w, x, self._xsums(x, 32), _F16_TABLE, out, qk, bs, 32)
        elif t == GGMLType.Q6_K:
            mv.mv_q6_k(w, w.view(np.int8), x, self._xsums(x, 16), _F16_TABLE, out, qk, bs, 16)
        elif t == GGMLType.Q5_K:
            mv.mv_q5_k(w, x, self._xsums(x, 32), _F16_TABLE, out, qk, bs, 32)
        elif t == GGMLType.Q8_0:
            mv.mv_q8_0(w, w.view(np.int8), x, self._xsums(x, 32), _F16_TABLE, out, qk, bs)
        elif t == GGMLType.Q4_0:
            mv.mv_q4_0(w, x, self._xsums(x, 32), _F16_TABLE, out, qk, bs)
        elif t == GGMLType.Q4_1:
            mv.mv_q4_1(w, x, self._xsums(x, 32), _F16_TABLE, out, qk, bs)
        else:  # Q5_0, Q5_1
            has_min = t == GGMLType.Q5_1
            mv.mv_q5(w, x, self._xsums(x, 32), _F16_TABLE, out, qk, bs, has_min)
        return out

    def _decode_range(self, r0: int, out: np.ndarray) -> np.ndarray:
        """Rows ``r0 .. r0 + len(out)`` decoded into ``out`` (float32 ``(n, cols)``)."""
        n = out.shape[0]
        if self.use_numba:
            dq = _kernels()[1]
            w = self.raw
            dq.deq_range(w, w.view(np.int8), r0, int(self.qtype), self.block_bytes, _F16_TABLE, out)
            return out
        out[:] = dequantize_rows(self.raw[r0 : r0 + n], self.qtype)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, cols]`` -> float32 ``[n, rows]`` (prefill).

        A tile of rows is decoded at a time and multiplied with BLAS sgemm; memory beyond
        the output is one tile (`TILE_BYTES`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul expects x of shape (n, {self.cols}), got {x.shape}")
        if self.qtype == GGMLType.F32:
            return x @ self._f32().T
        if x.shape[0] == 1:
            return self.matvec(x[0])[None]
        out = np.empty((x.shape[0], self.rows), dtype=np.float32)  # (n, rows)
        buf = np.empty((self._tile_rows, self.cols), dtype=np.float32)  # (tile, cols)
        for r0 in range(0, self.rows, self._tile_rows):
            tile = self._decode_range(r0, buf[: min(self._tile_rows, self.rows - r0)])
            np.matmul(x, tile.T, out=out[:, r0 : r0 + tile.shape[0]])
        return out

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of W decoded: float32 ``[len(ids), cols]`` (the embedding lookup).

        Raises:
            IndexError: an id is outside ``0 .. rows - 1``.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)  # one numba signature
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)][0]
            raise IndexError(f"row id {bad} out of range for a matrix of {self.rows} rows")
        if self.qtype == GGMLType.F32:
            return self._f32()[ids]
        out = np.empty((ids.size, self.cols), dtype=np.float32)  # (n, cols)
        if self.use_numba:
            dq = _kernels()[1]
            w = self.raw
            dq.deq_rows(w, w.view(np.int8), ids, int(self.qtype), self.block_bytes, _F16_TABLE, out)
            return out
        for i0 in range(0, ids.size, self._tile_rows):
            part = ids[i0 : i0 + self._tile_rows]
            out[i0 : i0 + part.size] = dequantize_rows(self.raw[part], self.qtype)
        return out
