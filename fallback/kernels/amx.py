"""Long products (prompts) on Intel AMX: weights decoded to bfloat16, multiplied by tiles.

On CPUs with AMX (Xeon 4th generation and later: ``amx-tile`` and ``amx-bf16``), a
``tdpbf16ps`` multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into 16 x 16 float32
sums in one instruction: 8192 multiply-adds, where a 512-bit int8 dot product does 64.
For a product with many rows of ``x`` (a prompt), `matmul_bf16` decodes 16 weight rows at a
time (`avx2_ir.decode_row`, the float path's exact weights) and rounds them to bfloat16,
rounds ``x`` to bfloat16 once, and lets the tiles multiply them, 16 weight rows by 32 rows of
``x`` per tile step, summed in float32.  Decoding a row costs what reading it does, so the
product pays off from a few dozen rows of ``x`` (`fallback.matrix.TILES_ROWS`); below, the
int8 kernels, each row equal to the matvec's, stay.

Rounding: bfloat16 keeps 8 significant bits, as the int8 path's ``x`` keeps about 7 (one
scale per 32 or 256 values); here the weights round too (by at most 2^-9 of each), and the
sums are float32.  What the product computes is ``bf16(x) @ bf16(W).T``, to float32
rounding (`tests/test_kernels.py` checks it against that, in float64); both round to
nearest even, the weights by ``vcvtne2ps2bf16`` (which also flushes float32 denormals to
zero), ``x`` in integer arithmetic (`bf16_pairs`, once per call: it keeps them).

Linux asks a process to request the tile state before its first use
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); `available` does, once, and says
no where the kernel refuses (or on other systems: the permission call is Linux's).
``PHIMLX_AMX=0`` turns the product off.  The tile instructions are inline assembly
(numba's LLVM has no AMX intrinsics that llvmlite can name).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
from typing import Any

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from phimlx.gguf import GGMLType

from . import prange_only
from .avx2 import _OPTS, FLOAT_TYPES, IR_STAMP
from .avx2_ir import TYPES, decode_row
from .avx2_ir import _feat as _host_features

log = logging.getLogger(__name__)

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@functools.cache
def available() -> bool:
    """True if this process may use the AMX tiles: an x86-64 Linux whose CPU has
    ``amx-tile``, ``amx-bf16`` and ``avx512bf16`` (the weights' rounding) and whose kernel
    grants the tile state, and ``PHIMLX_AMX`` is not ``0``."""
    if os.environ.get("PHIMLX_AMX", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")):
        return False
    if not all(_host_features.get(f) for f in ("amx-tile", "amx-bf16", "avx512bf16")):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError) as e:
        log.info("AMX unavailable: %s", e)
        return False
    if not ok:
        log.info(
            "AMX unavailable: the kernel refused the tile state (errno %d)", ctypes.get_errno()
        )
    return ok


# The tile configuration: palette 1; tiles 0-4 of 16 rows x 64 bytes (C0, A, B0, C1, B1).
_CONFIG = np.zeros(64, np.uint8)
_CONFIG[0] = 1
_CONFIG[16:26].view(np.uint16)[:] = 64
_CONFIG[48:53] = 16

_I8P = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)


def _asm(builder: Any, text: str, constraints: str, args: list) -> None:
    """Inline assembly with side effects that reads and writes memory (the tiles are state
    LLVM does not see: each statement stays in order, after the stores before it)."""
    fty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    cons = ",".join([c for c in (constraints, "~{memory}") if c])
    builder.asm(fty, text, cons, args, True)


def _ptr(context: Any, builder: Any, aty: Any, aval: Any) -> Any:
    return builder.bitcast(context.make_array(aty)(context, builder, aval).data, _I8P)


@intrinsic
def tile_config(typingctx, cfg):  # noqa: ANN001, ANN201
    """``ldtilecfg`` of ``cfg`` (uint8 (64,)) on the calling thread."""

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        _asm(builder, "ldtilecfg ($0)", "r", [_ptr(context, builder, signature.args[0], args[0])])
        return context.get_dummy_value()

    return types.none(cfg), codegen


@intrinsic
def tile_release(typingctx):  # noqa: ANN001, ANN201
    """``tilerelease``: the calling thread's tiles back to their initial state."""

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        _asm(builder, "tilerelease", "", [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def tile_block(typingctx, a, xb, out, c0):  # noqa: ANN001, ANN201
    """``out[:, c0 : c0 + 32] = a @ x[c0 : c0 + 32].T`` on the tiles: ``a`` bfloat16 (as
    uint16) ``(16, K)``, 16 weight rows; ``xb`` uint16 ``(K / 2, n_pad, 2)``, the rows of
    ``x`` as bfloat16 pairs (`bf16_pairs`); ``out`` float32 ``(16, n_pad)``.  Per 32 values
    of K: one A tile (16 rows x 32), two B tiles (32 x 16 columns each), two ``tdpbf16ps``."""
    sig = types.none(a, xb, out, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        ta, tx, to = signature.args[:3]
        pa, px, po = (
            _ptr(context, builder, t, v) for t, v in zip((ta, tx, to), args[:3], strict=True)
        )
        xarr = context.make_array(tx)(context, builder, args[1])
        k2, n_pad = (builder.extract_value(xarr.shape, i) for i in (0, 1))
        a_stride = builder.mul(k2, _I64(4))  # bytes per row of a: K * 2
        x_stride = builder.mul(n_pad, _I64(4))  # bytes per pair row of xb (and out's rows)
        col = builder.mul(args[3], _I64(4))
        _asm(builder, "tilezero %tmm0", "", [])
        _asm(builder, "tilezero %tmm3", "", [])
        with cgutils.for_range(builder, builder.udiv(k2, _I64(16))) as loop:
            s = loop.index  # K step of 32 values: a's bytes 64 s .., xb's pair rows 16 s ..
            pas = builder.gep(pa, [builder.mul(s, _I64(64))])
            pb0 = builder.gep(
                px, [builder.add(builder.mul(builder.mul(s, _I64(16)), x_stride), col)]
            )
            pb1 = builder.gep(pb0, [_I64(64)])
            _asm(builder, "tileloadd ($0,$1,1), %tmm1", "r,r", [pas, a_stride])
            _asm(builder, "tileloadd ($0,$1,1), %tmm2", "r,r", [pb0, x_stride])
            _asm(builder, "tileloadd ($0,$1,1), %tmm4", "r,r", [pb1, x_stride])
            _asm(builder, "tdpbf16ps %tmm2, %tmm1, %tmm0", "", [])
            _asm(builder, "tdpbf16ps %tmm4, %tmm1, %tmm3", "", [])
        po0 = builder.gep(po, [col])
        _asm(builder, "tilestored %tmm0, ($0,$1,1)", "r,r", [po0, x_stride])
        _asm(
            builder, "tilestored %tmm3, ($0,$1,1)", "r,r", [builder.gep(po0, [_I64(64)]), x_stride]
        )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def bf16_row(typingctx, src, dst):  # noqa: ANN001, ANN201
    """``dst[:] = bfloat16(src)``: float32 ``src`` (1-d, a multiple of 32 values) rounded to
    nearest even into uint16 ``dst``, 32 values per ``vcvtne2ps2bf16`` (inline assembly:
    llvmlite has no bfloat type to call the intrinsic with)."""
    v16f, v32i16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(16), 32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        sa = context.make_array(signature.args[0])(context, builder, args[0])
        ps = _ptr(context, builder, signature.args[0], args[0])
        pd = _ptr(context, builder, signature.args[1], args[1])
        n = builder.extract_value(sa.shape, 0)
        fty = ir.FunctionType(v32i16, [v16f, v16f])
        with cgutils.for_range(builder, builder.udiv(n, _I64(32))) as loop:
            off = builder.mul(loop.index, _I64(128))
            lo, hi = (
                builder.load(builder.bitcast(builder.gep(ps, [o]), v16f.as_pointer()), align=4)
                for o in (off, builder.add(off, _I64(64)))
            )
            packed = builder.asm(fty, "vcvtne2ps2bf16 $2, $1, $0", "=v,v,v", [hi, lo], False)
            dst = builder.gep(pd, [builder.udiv(off, _I64(2))])
            builder.store(packed, builder.bitcast(dst, v32i16.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.none(src, dst), codegen


@njit(**_OPTS)
def _bf16(u):
    """float32 bits (uint32) -> bfloat16 bits, rounded to nearest even."""
    return np.uint16(
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    )


@njit(**_OPTS)
def bf16_pairs(x, n_pad):
    """``x`` float32 ``(n, K)`` as the B tiles take it: uint16 ``(K / 2, n_pad, 2)``,
    ``[k, c, i]`` = bfloat16 of ``x[c, 2 k + i]``, rows ``n .. n_pad - 1`` zero."""
    n, cols = x.shape
    out = np.zeros((cols // 2, n_pad, 2), np.uint16)
    u = x.view(np.uint32)
    for c0 in range(0, n, 16):  # 16 rows of x read side by side, out written in order
        for k in range(cols // 2):
            for c in range(c0, min(c0 + 16, n)):
                out[k, c, 0] = _bf16(u[c, 2 * k])
                out[k, c, 1] = _bf16(u[c, 2 * k + 1])
    return out


@functools.cache
def matmul_bf16(qtype: GGMLType) -> Any:
    """The driver ``(w1, w2, w3, x, out)``: ``out = bf16(x) @ bf16([w1; w2; w3]).T``
    (float32 ``(n, rows)``) for ``qtype`` matrices (uint8 ``(rows, row_bytes)``, rows
    stacked as in `avx2.matmul_int8`) and float32 ``x`` ``(n, cols)``, on numba's threads,
    16 weight rows at a time.  Only where `available`.

    Raises:
        KeyError: no row decoder for ``qtype`` here (`avx2.FLOAT_TYPES`).
    """
    if qtype not in FLOAT_TYPES:
        raise KeyError(f"no AVX2 row decoder for {GGMLType(qtype).name}")
    if not available():  # (which also asks Linux for the tile state: without, SIGILL)
        raise RuntimeError("AMX is not available in this process")
    code, block = int(qtype), TYPES[qtype].block
    stamp = IR_STAMP

    def driver(w1, w2, w3, x, out, cfg, threads):  # noqa: ANN001, ANN202
        if stamp < 0:  # never: the IR's hash in the closure (see `avx2.matvec_int8`)
            return
        n, cols = x.shape
        n_pad = (n + 31) // 32 * 32
        xb = bf16_pairs(x, n_pad)
        nb = cols // block
        n1, n2 = w1.shape[0], w1.shape[0] + w2.shape[0]
        rows = n2 + w3.shape[0]
        panels = (rows + 15) // 16
        parts = min(threads, panels)
        for p in prange(parts):
            row = np.empty((1, cols), np.float32)
            a = np.zeros((16, cols), np.uint16)
            acc = np.empty((16, n_pad), np.float32)
            tile_config(cfg)
            for q in range(p * panels // parts, (p + 1) * panels // parts):
                r0 = q * 16
                m = min(16, rows - r0)
                for i in range(m):
                    r = r0 + i
                    if r < n1:
                        decode_row(code, w1, r, row, 0, nb)
                    elif r < n2:
                        decode_row(code, w2, r - n1, row, 0, nb)
                    else:
                        decode_row(code, w3, r - n2, row, 0, nb)
                    bf16_row(row[0], a[i])
                for i in range(m, 16):
                    a[i, :] = 0
                for c0 in range(0, n_pad, 32):
                    tile_block(a, xb, acc, c0)
                for c in range(n):
                    for i in range(m):
                        out[c, r0 + i] = acc[i, c]
            tile_release()

    name = f"matmul_bf16_{GGMLType(qtype).name.lower()}"
    driver.__name__ = driver.__qualname__ = name
    compiled = njit(parallel=prange_only(), **_OPTS)(driver)

    def run(w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        compiled(w1, w2, w3, x, out, _CONFIG, get_num_threads())

    run.dispatcher = compiled  # (what `fallback.kernels_cached` asks numba's cache about)
    return run
