"""The NumPy backend's matrix kernels: which exist for which type, and on this machine.

Three engines, each a set of modules:

- AVX2 (`avx2_ir`: the LLVM IR, each block layout unpacked once; `avx2`: numba drivers
  generated per type around it): float- and int8-activation matvecs, an int8-activation
  matmul for many rows (prefill, batched decode), and float prefill tile decoders, on
  x86-64 CPUs with AVX2, FMA and F16C, for the types the IR covers;
- numba (`numba_decode`: the block layouts and row decoders for every type; `numba_matvec`:
  float matvec in registers): everywhere else numba runs, and for the tasks and types the IR
  does not cover;
- NumPy (`numpy_engine`): `phimlx.gguf.dequantize_rows` in tiles, without numba (or with
  ``PHIMLX_NO_NUMBA=1``): correct and memory-bounded, not fast.  F32 weights always take it
  (BLAS reads them as they are).

`KERNELS` says, per type, what the AVX2 and numba engines have; `kernel_set` resolves it
once per type and engine into a `KernelSet`, the kernels one matrix calls, each with one
signature whatever the engine (`QuantMatrix` takes its set at construction).
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from phimlx.gguf import GGMLType

from . import numpy_engine


def prange_only() -> Any:
    """numba's ``parallel`` option for every kernel here that runs on its threads: its
    ``prange`` loops, nothing else.  ``parallel=True`` also turns the NumPy calls in a
    kernel's own body (``np.zeros``, ``np.ones``, array expressions) into parallel loops,
    each one more launch of the threads: the one-token attention kernel made four launches
    a call, not one, and took 1.1-2x the time of its serial twin where ~0.75x was to be had.

    An options object, not the dict numba takes: numba empties a dict as it reads it, so
    one dict shared by several kernels gives the second and later plain ``parallel=True``.
    (Imports numba: call it where a kernel is compiled.)"""
    from numba.core.cpu_options import ParallelOptions

    return ParallelOptions(
        {
            "prange": True,
            "numpy": False,
            "comprehension": False,
            "reduction": False,
            "inplace_binop": False,
            "setitem": False,
            "stencil": False,
        }
    )


log = logging.getLogger(__name__)

_numba: Any = None  # the numba engine's modules, imported on first use
numba_error: str | None = None
_avx2: Any = None  # the AVX2 engine's driver module, or False where the CPU lacks AVX2


def _numba_disabled() -> bool:
    return os.environ.get("PHIMLX_NO_NUMBA", "").strip().lower() not in ("", "0", "false", "no")


def numba_kernels() -> Any:
    """The numba engine's modules ``(numba_matvec, numba_decode)``, imported once; None if
    numba is missing or broken."""
    global _numba, numba_error
    if _numba is None and numba_error is None:
        try:
            from . import numba_decode, numba_matvec

            _numba = (numba_matvec, numba_decode)
        except Exception as e:  # ImportError, or numba failing to initialise on this platform
            numba_error = f"{type(e).__name__}: {e}"
            log.info("numba kernels unavailable (%s); using the NumPy path", numba_error)
    return _numba


def renamed(fn: Callable, suffix: str) -> Callable:
    """A copy of the plain function ``fn`` named ``fn.__name__ + suffix``.  numba's cache
    keys a function by its module, qualified name and first line, not by its compile
    options: one function compiled twice with ``cache=True`` (``parallel=True`` and not)
    would share one cache entry, and the variant compiled second would load the first's
    code.  Compile each variant from its own copy."""
    f = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__
    )
    f.__qualname__ = fn.__qualname__ + suffix
    f.__doc__, f.__module__, f.__kwdefaults__ = fn.__doc__, fn.__module__, fn.__kwdefaults__
    return f


def numba_available() -> bool:
    """True if the numba kernels can be used (numba imports and PHIMLX_NO_NUMBA is not set)."""
    return not _numba_disabled() and numba_kernels() is not None


def avx2_kernels() -> Any:
    """The AVX2 engine's driver module (`avx2`), or None (no numba, no AVX2)."""
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


def amx_kernels() -> Any:
    """The AMX module (`amx`) where this process may use the tiles (`amx.available`),
    else None."""
    if avx2_kernels() is None:
        return None
    from . import amx

    return amx if amx.available() else None


def _env_switch(name: str) -> bool | None:
    """The environment's switch ``name``: None where unset (or empty), False for ``0`` /
    ``false`` / ``no`` / ``off`` (any case), True for anything else."""
    v = os.environ.get(name, "").strip().lower()
    return None if not v else v not in ("0", "false", "no", "off")


def int8_activations_default() -> bool:
    """Whether matrices use the int8-activation kernels where they exist, unless told: yes,
    unless ``PHIMLX_INT8_ACTIVATIONS`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return _env_switch("PHIMLX_INT8_ACTIVATIONS") is not False


def repack_default() -> bool:
    """Whether matrices on the int8 path are repacked at load where their type has a packed
    layout here (`Octets`), unless told: yes, unless ``PHIMLX_REPACK`` is ``0`` / ``false``
    / ``no`` / ``off`` (the weights then stay in the memory-mapped file)."""
    return _env_switch("PHIMLX_REPACK") is not False


class TypeKernels(NamedTuple):
    """What the engines have for one type (the NumPy engine has every type).

    ``avx2``: an AVX2 float matvec and tile decoder (taken when the columns are a multiple of
    32); ``avx2_int8``: an AVX2 int8-activation matvec too; ``numba``: numba's float matvec,
    ``"blocks"`` (decoded in registers, `numba_matvec`) or ``"rows"`` (a row decoded at a time,
    `numba_decode`), None for no numba kernels (F32: BLAS reads the weights as they are)."""

    avx2: bool
    avx2_int8: bool
    numba: Literal["blocks", "rows"] | None


# The one table of which kernels run which type.  Row and tile decoders for embeddings and
# prefill exist in every engine that has the type.
KERNELS: dict[GGMLType, TypeKernels] = {
    GGMLType.F32: TypeKernels(avx2=False, avx2_int8=False, numba=None),
    GGMLType.F16: TypeKernels(avx2=True, avx2_int8=False, numba="rows"),
    GGMLType.BF16: TypeKernels(avx2=True, avx2_int8=False, numba="rows"),
    GGMLType.Q4_0: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
    GGMLType.Q4_1: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
    GGMLType.Q5_0: TypeKernels(avx2=False, avx2_int8=False, numba="blocks"),
    GGMLType.Q5_1: TypeKernels(avx2=False, avx2_int8=False, numba="blocks"),
    GGMLType.Q8_0: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
    GGMLType.Q2_K: TypeKernels(avx2=False, avx2_int8=False, numba="rows"),
    GGMLType.Q3_K: TypeKernels(avx2=False, avx2_int8=False, numba="rows"),
    GGMLType.Q4_K: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
    GGMLType.Q5_K: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
    GGMLType.Q6_K: TypeKernels(avx2=True, avx2_int8=True, numba="blocks"),
}

# out[: n1 + n2 + n3] = [w1; w2; w3] @ x, as fn(w1, w2, w3, x, out): up to three matrices of
# one type and width sharing x (q|k|v, gate|up); unused slots are (0, row_bytes) arrays.
MatvecFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
# out = x_hat @ [w1; w2; w3].T, float32 (n, rows), as fn(w1, w2, w3, x, out): n float32
# activation rows, rounded to int8 inside as `quantize_rows` does; unused slots as for MatvecFn.
MatmulFn = MatvecFn
# out[i] = row r0 + i of w, float32, as fn(w, r0, out), on the calling thread.
DecodeTileFn = Callable[[np.ndarray, int, np.ndarray], None]
# out[i] = row ids[i] of w, float32, as fn(w, ids, out), ids int64.
DecodeRowsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
Engine = Literal["avx2", "numba", "numpy"]


@dataclass(frozen=True)
class Matvec:
    """One matrix kernel (a `MatvecFn`, or a `MatmulFn` in ``matmul_int8``) in two forms:
    ``parallel`` (rows split across the threads) and ``serial`` (on the calling thread:
    below a size a thread launch costs more than it saves).  The same function where an
    engine has one form."""

    parallel: MatvecFn
    serial: MatvecFn


@dataclass(frozen=True)
class Octets:
    """A type's int8 kernels for rows in another layout, made once per matrix at load
    (`fallback.kernels.avx2.pack_octets` or `~fallback.kernels.avx2.pack_rows8`, what
    llama.cpp calls repacking): ``pack(raw)`` a new array of ``raw``'s shape in the layout,
    ``unpack(packed, ids)`` the file's blocks of rows ``ids`` (int64) back; ``matvec_int8``
    and ``matmul_int8`` as `KernelSet`'s on packed rows; ``rows``: the rows of a matrix
    must be a multiple of this."""

    pack: Callable[[np.ndarray], np.ndarray]
    unpack: Callable[[np.ndarray, np.ndarray], np.ndarray]
    matvec_int8: Matvec
    matmul_int8: Matvec
    rows: int = 1


@dataclass(frozen=True)
class KernelSet:
    """The kernels a matrix of one type calls on this machine, resolved by `kernel_set`.

    ``engine`` names who runs the matvec; ``matvec_float`` computes ``W @ x`` (to float32
    rounding), ``matvec_int8`` ``W @ x_hat`` with ``x`` rounded to int8 per 32 values (None
    where the type has no such kernel here), ``matmul_int8`` the same for n rows of ``x``
    at once (each block read once per few rows; each row equal to ``matvec_int8``'s, bit
    for bit; None where ``matvec_int8`` is); ``matmul_tiles`` ``bf16(x) @ bf16(W).T`` on
    AMX tiles for many rows of ``x`` (`amx.matmul_bf16`; None without AMX, or without
    ``matmul_int8``: it stands in for it from `fallback.matrix.TILES_ROWS` rows);
    ``decode_tile`` decodes
    prefill tiles (rows ``r0 ..``) and ``decode_rows`` rows by id (the embedding lookup);
    ``octets`` the int8 kernels for rows packed at load (`Octets`; Q4_0, Q4_1 and the
    K-quants Q4_K, Q5_K, Q6_K where the 256-bit int8 bodies run, else None); ``rows8``
    those of Q4_0 and Q4_1 matrices whose rows interleave by 8 (`avx2.pack_rows8`), taken
    before ``octets`` where the rows are a multiple of 8.
    One field per task: a new task is a new field, filled per engine in `_resolve`."""

    qtype: GGMLType
    engine: Engine
    matvec_float: Matvec
    matvec_int8: Matvec | None
    matmul_int8: Matvec | None
    decode_tile: DecodeTileFn
    decode_rows: DecodeRowsFn
    matmul_tiles: MatmulFn | None = None
    octets: Octets | None = None
    rows8: Octets | None = None


def _each_matrix(single: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> Matvec:
    """A `Matvec` from a one-matrix kernel ``single(w, x, out)``, run per slot."""

    def run(w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        if not (w2.shape[0] or w3.shape[0]):  # one matrix, the usual case: no slicing
            single(w1, x, out)
            return
        n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
        single(w1, x, out[:n1])
        single(w2, x, out[n1:n2])
        if w3.shape[0]:
            single(w3, x, out[n2:])

    return Matvec(parallel=run, serial=run)


@functools.cache
def _resolve(qtype: GGMLType, engine: Engine) -> KernelSet:
    """The `KernelSet` of ``qtype`` on ``engine`` (built once: matrices of one type share
    it, which `fallback.matrix` relies on to fuse them)."""
    kinds = KERNELS[qtype]
    if engine == "numpy":
        single = numpy_engine.matvec_float(qtype)
        tile, rows = numpy_engine.decode_tile(qtype), numpy_engine.decode_rows(qtype)
        return KernelSet(qtype, engine, _each_matrix(single), None, None, tile, rows)
    numba_matvec, numba_decode = numba_kernels()
    rows = numba_decode.decode_rows(qtype)
    if engine == "numba":
        single = (numba_matvec if kinds.numba == "blocks" else numba_decode).matvec_float(qtype)
        tile = numba_decode.decode_tile(qtype)
        return KernelSet(qtype, engine, _each_matrix(single), None, None, tile, rows)
    avx2 = avx2_kernels()
    fv = Matvec(avx2.matvec_float(qtype, parallel=True), avx2.matvec_float(qtype, parallel=False))
    iv = im = tiles = octets = rows8 = None
    if kinds.avx2_int8:
        iv = Matvec(avx2.matvec_int8(qtype, parallel=True), avx2.matvec_int8(qtype, parallel=False))
        im = Matvec(avx2.matmul_int8(qtype, parallel=True), avx2.matmul_int8(qtype, parallel=False))
        amx = amx_kernels()
        tiles = None if amx is None else amx.matmul_bf16(qtype)
    if kinds.avx2_int8 and qtype in avx2.PACKED_TYPES:
        octets = Octets(
            functools.partial(avx2.pack_octets, qtype=qtype),
            lambda packed, ids: avx2.unpack_octets(packed[ids], qtype),
            Matvec(
                avx2.matvec_int8(qtype, parallel=True, packed=True),
                avx2.matvec_int8(qtype, parallel=False, packed=True),
            ),
            Matvec(
                avx2.matmul_int8(qtype, parallel=True, packed=True),
                avx2.matmul_int8(qtype, parallel=False, packed=True),
            ),
        )
    if kinds.avx2_int8 and qtype in avx2.ROWS8_TYPES:
        rows8 = Octets(
            functools.partial(avx2.pack_rows8, qtype=qtype),
            functools.partial(avx2.rows8_rows, qtype=qtype),
            Matvec(
                avx2.matvec_rows8(qtype, parallel=True), avx2.matvec_rows8(qtype, parallel=False)
            ),
            Matvec(
                avx2.matmul_rows8(qtype, parallel=True), avx2.matmul_rows8(qtype, parallel=False)
            ),
            rows=8,
        )
    return KernelSet(qtype, engine, fv, iv, im, avx2.decode_tile(qtype), rows, tiles, octets, rows8)


def kernel_set(qtype: GGMLType, cols: int, *, use_numba: bool) -> KernelSet:
    """The kernels a ``qtype`` matrix of ``cols`` columns runs with here: AVX2 where the CPU
    has it and the type has its kernels (``cols`` a multiple of 32), else numba, else (or
    with ``use_numba=False``) NumPy.

    Raises:
        KeyError: ``qtype`` is not in `KERNELS`.
    """
    qtype = GGMLType(qtype)
    kinds = KERNELS[qtype]
    engine: Engine = "numpy"
    if use_numba and kinds.numba is not None and numba_kernels() is not None:
        avx2 = kinds.avx2 and cols % 32 == 0 and avx2_kernels() is not None
        engine = "avx2" if avx2 else "numba"
    return _resolve(qtype, engine)


def int8_kernel_available(qtype: GGMLType, cols: int) -> bool:
    """True if a ``qtype`` matrix of ``cols`` columns has an int8-activation matvec kernel
    here (numba, an AVX2 CPU, Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K, whole groups of 32)."""
    if qtype not in KERNELS:
        return False
    return kernel_set(qtype, cols, use_numba=numba_available()).matvec_int8 is not None


def quantize_activations(
    x: np.ndarray, group: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the int8 kernels multiply with: ``x`` (float32, a multiple of ``group`` values)
    rounded to int8 with one scale per ``group`` values (32; 256 for the K-quants, see
    `int8_group`), as ``(xq, dx, xs)``: int8 ``(n,)``, float32 ``(n/32,)`` scales (max|x| /
    127 over the scale's group, stored per 32) and ``dx * sum(xq)`` per 32; the vector is
    ``x_hat = xq * dx`` (per 32).

    Raises:
        ValueError: no int8 kernels here, or ``x`` is not whole groups.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    _check_int8(x.shape, group)
    return avx2_kernels().quantized_int8(x, group)


def quantize_rows(x: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_activations` of each row of ``x`` (float32 ``(n, cols)``): ``(xq, dx, xs)``
    of shapes ``(n, cols)``, ``(n, cols / 32)`` twice, each row rounded exactly as alone.

    Raises:
        ValueError: no int8 kernels here, or the rows are not whole groups.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows needs a 2-d array, got shape {x.shape}")
    _check_int8(x.shape, group)
    return avx2_kernels().quantized_rows_int8(x, group)


def int8_group(qtype: GGMLType) -> int:
    """How many activation values share one int8 scale in ``qtype``'s int8 kernels (256 for
    the K-quants, whose sub-block dots then sum in integers, as llama.cpp's Q8_K; else 32)."""
    return avx2_kernels().x_scale(qtype)


def int8_prefill() -> bool:
    """Whether a long product (a prompt) of a matrix on the int8 path runs the
    int8 matmul rather than the AMX tiles (`amx`, where the CPU has them) or float tiles and
    BLAS sgemm.  ``PHIMLX_INT8_PREFILL`` = 1 / 0 decides; else yes where the int8 products
    take the 256-bit bodies (CPUs without AVX-512, and AMD's Zen: `avx2_ir.wide_bodies`),
    and no where they take the 512-bit ones (Intel's AVX-512 CPUs, where 512-bit sgemm
    outran them: see the README's figures).  On a Zen 4 VM, 2 threads, SmolLM2's 512-token
    prompts ran at 825 tok/s this way against 505 on float tiles.  On an AVX2
    EPYC, 2 threads, the int8 path took Phi-3-mini shapes' 128-token prompts 1.6-1.8x as
    fast in Q4_0 and 1.2-1.4x in Q8_0, and SmolLM2's (Q4_1) prompts of 38-512 tokens
    1.0-2.0x (K-quants: see the README)."""
    switch = _env_switch("PHIMLX_INT8_PREFILL")
    if switch is not None:
        return switch
    avx2 = avx2_kernels()
    return avx2 is not None and not avx2.AVX512


def _check_int8(shape: tuple[int, ...], group: int) -> None:
    if avx2_kernels() is None:
        raise ValueError("int8 activations need numba and an AVX2 CPU")
    if group not in (32, 256) or shape[-1] % group:
        raise ValueError(f"int8 activations need whole groups of {group} values, got {shape}")
