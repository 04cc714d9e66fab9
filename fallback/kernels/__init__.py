"""The NumPy backend's compiled kernels: which exist on this machine, and for which types.

- `avx2_ir` / `avx2`: row loops written as LLVM IR with explicit 8-wide vectors (x86-64 with
  AVX2, FMA and F16C): float- and int8-activation matvec, and tile decoders for prefill;
- `numba_matvec` / `numba_decode`: plain numba loops for every other CPU and type (float
  matvec in registers, row and tile decoders);
- without numba (or with ``PHIMLX_NO_NUMBA=1``) `phimlx.gguf.dequantize_rows` decodes tiles in
  NumPy: correct and memory-bounded, not fast.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from phimlx.gguf import GGMLType

log = logging.getLogger(__name__)

_numba: Any = None  # the numba kernel modules, imported on first use
numba_error: str | None = None
_avx2: Any = None  # the AVX2 kernels module, or False where the CPU lacks AVX2


def _numba_disabled() -> bool:
    return os.environ.get("PHIMLX_NO_NUMBA", "").strip().lower() not in ("", "0", "false", "no")


def numba_kernels() -> Any:
    """Import the numba kernels once; None if numba is missing, broken or disabled."""
    global _numba, numba_error
    if _numba is None and numba_error is None:
        try:
            from . import numba_decode, numba_matvec

            _numba = (numba_matvec, numba_decode)
        except Exception as e:  # ImportError, or numba failing to initialise on this platform
            numba_error = f"{type(e).__name__}: {e}"
            log.info("numba kernels unavailable (%s); using the NumPy path", numba_error)
    return _numba


def numba_available() -> bool:
    """True if the numba kernels can be used (numba imports and PHIMLX_NO_NUMBA is not set)."""
    return not _numba_disabled() and numba_kernels() is not None


def avx2_kernels() -> Any:
    """The AVX2 matvec kernels (`avx2`), or None (no numba, no AVX2)."""
    global _avx2
    if _avx2 is None:
        _avx2 = False
        if numba_kernels() is not None:
            try:
                from . import avx2 as mod

                _avx2 = mod if mod.AVAILABLE else False
            except Exception as e:  # an LLVM without the x86 intrinsics, ...
                log.info("AVX2 matvec kernels unavailable (%s: %s)", type(e).__name__, e)
    return _avx2 or None


def int8_activations_default() -> bool:
    """Whether matrices use the int8-activation kernels where they exist, unless told: yes,
    unless ``PHIMLX_INT8_ACTIVATIONS`` is ``0`` / ``false`` / ``no`` / ``off``."""
    v = os.environ.get("PHIMLX_INT8_ACTIVATIONS", "").strip().lower()
    return v not in ("0", "false", "no", "off")


def int8_kernel_available(qtype: GGMLType, cols: int) -> bool:
    """True if a ``qtype`` matrix of ``cols`` columns has an int8-activation matvec kernel
    here (numba, an AVX2 CPU, Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K, whole groups of 32)."""
    return (
        qtype in AVX2_INT8 and cols % 32 == 0 and numba_available() and avx2_kernels() is not None
    )


# A float32 for every float16 bit pattern: the kernels decode block scales with one lookup.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
F16_TABLE = F16_TABLE.astype(np.float32)


# The types with AVX2 kernels in `avx2` (float and int8 activations): name suffixes.
AVX2_INT8 = {
    GGMLType.Q4_0: "q4_0",
    GGMLType.Q4_1: "q4_1",
    GGMLType.Q8_0: "q8_0",
    GGMLType.Q4_K: "q4_k",
    GGMLType.Q5_K: "q5_k",
    GGMLType.Q6_K: "q6_k",
}
# ... and with float activations only (columns a multiple of 32).
AVX2_FLOAT = {**AVX2_INT8, GGMLType.F16: "f16", GGMLType.BF16: "bf16"}

# The types with an in-register float matvec kernel in `numba_matvec` (no AVX2, Q5_0, Q5_1);
# the rest decode per row (`mv_deq`).
NUMBA_REGISTER_MATVEC = frozenset(
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


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the int8 kernels multiply with: ``x`` (float32, a multiple of 32 values) rounded
    to int8 with one scale per 32 values, as ``(xq, dx, xs)``: int8 ``(n,)``, float32
    ``(n/32,)`` scales (max|x| / 127 per group) and ``dx * sum(xq)`` per group; the vector
    is ``x_hat = xq * dx`` (per group).

    Raises:
        ValueError: no int8 kernels here, or ``x`` is not whole groups of 32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if avx2_kernels() is None:
        raise ValueError("int8 activations need numba and an AVX2 CPU")
    if x.size % 32:
        raise ValueError(f"int8 activations need a multiple of 32 values, got {x.size}")
    return avx2_kernels().quantized(x)
