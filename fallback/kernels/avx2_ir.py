"""LLVM IR of the AVX2 engine: each GGUF block layout unpacked in one place, three row loops.

Per layout, one helper reads a block's header (scales, mins) and one yields its quants, in
the form the caller asks for: 32 bytes for ``vpmaddubsw`` (``wide=False``, the int8 dot) or
8 x i32 vectors for float math (``wide=True``, the float dot and the decoder).  The bit
positions are those of `phimlx.gguf.quants`.  Around them, per type, a block body for each
task:

- int8 dot: ``x`` as int8 with one scale per 32 values; weights x ``x`` by ``vpmaddubsw``
  (u8 x i8 -> i16 pairs) then ``vpmaddwd`` (-> i32), converted and fma'd by ``d * dx``.
  With AVX-512 (where `wide_bodies` takes it: by default not on AMD's Zen, where the
  transposed bodies below ran faster on a Zen 4), Q4_0 / Q4_1 / Q8_0 take two blocks a
  step on 512-bit vectors (`_pairs`; ``vpdpbusd`` where the CPU has VNNI: u8 x i8 summed
  into i32 in one instruction), Q4_0's 8 and Q8_0's 128 (its weights read as q + 128)
  taken off in the integer dot, Q4_1's min times ``dx * sum(xq)``; ``x`` in a per-lane
  form (`avx2.pair_inputs`): 1.2-1.5x the one-block body on an AVX-512 Xeon.  The scales
  (and Q4_1's mins) of 16 blocks come in one gather, the mins applied once per 16 blocks
  and column (`_pairs`): 0.85-0.9x the time of reading each pair's headers.  Without them
  the bodies are transposed (`_steps`):
  Q4_0 / Q4_1 take eight blocks a step with lane j of every vector block j (4 bytes of it
  a vector), Q8_0 four with lanes 2 j, 2 j + 1 block j (8 bytes); a column's products
  sum into the blocks' integer dots by vertical adds, and its float work (conversion,
  scale, fma) comes once a step instead of once a block; ``x`` transposed likewise
  (`avx2.step_inputs`); an octet's tail of 2-3 blocks takes two in a pair transposed by
  16 bytes (`_int8_q4_pair16`).  On a 2-core Zen 3 (one thread, SmolLM2's shapes), Q4_1
  takes 0.55-0.58x the one-block body's time for 4 rows of ``x``, 0.45-0.47x for 8,
  0.81-0.87x for one; Q8_0 0.82x for 4, 0.67x for 8, the same for one.  Q4_0 / Q4_1 rows
  repacked at load (`avx2.pack_octets`: each full octet already transposed) take their own
  type codes (`PACKED_TYPES`), whose octets are 2-3 loads and 4 where the file's layout
  needs a gather and 12 shuffles (`_oct_packed`); so do the K-quants' rows, a block's 8
  sub-blocks repacked as an octet of Q4_1 blocks (`_int8_qk_octet`, `_int8_q6_k_octet`);
  Q4_0 / Q4_1 matrices whose rows are a multiple of 8 are repacked instead with 8 rows
  interleaved (`avx2.pack_rows8`; `gemm_rows8`, any CPU with AVX2): lane r of every vector
  row r of a group, ``x``'s 4 bytes broadcast, so a block's 8 integer dots need no sum
  across lanes and a row's end no tail (on a Zen 4, SmolLM2's shapes out of cache, 2
  threads: 0.71-0.77x the octets' time for 4 rows of ``x``, 0.89-0.92x for one);
- float dot: weights widened to 8 x i32, converted, fma'd with ``x``; each 32-group's partial
  vector scaled once; zero points / mins applied against float sums of ``x``;
- decode: weights stored as float32.

`TYPES` lists the types and their bodies.  Three numba intrinsics run one row of one type,
the type given as a compile-time constant code (its `GGMLType` value), so one intrinsic
serves every type and the drivers of `avx2` differ only in that constant:

- ``dot_int8(code, w, r, xq, dx, xs, nb) -> float32``: row ``r`` of ``w`` times ``x_hat``;
- ``dot_float(code, w, r, x, xs, nb) -> float32``: row ``r`` of ``w`` times ``x``;
- ``decode_row(code, w, r, y, i, nb)``: row ``r`` of ``w`` into row ``i`` of ``y``.

Two more round activations to int8 (`avx2.quantize_int8`) on vectors: ``abs_max`` and
``round32``.

Dots loop over the blocks unrolled by two, alternating two vector accumulators so that
consecutive fma's do not wait on each other.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from llvmlite import binding as _llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from phimlx.gguf import GGMLType

# Inline assembly (`_B.madd_acc512`) needs LLVM's assembly parser for the host.
_llvm.initialize_native_asmparser()
_feat = _llvm.get_host_cpu_features()
AVAILABLE = all(_feat.get(k, False) for k in ("avx2", "fma", "f16c"))


def wide_bodies(features: dict[str, bool], cpu_name: str, setting: str = "") -> bool:
    """Whether the int8 products take the 512-bit bodies (`_pairs`, the K-quants' 16-lane
    sums) rather than the transposed 256-bit ones (`_steps`, repacked octets).

    ``setting`` is ``PHIMLX_AVX512``: ``0`` (or false, no, off) the 256-bit bodies, ``1``
    (true, yes, on) the 512-bit ones where the CPU has AVX-512F and BW; unset, the 512-bit
    ones on such CPUs except AMD's Zen (LLVM's ``znver*``).  On a Zen 4 VM (2 threads,
    SmolLM2 Q4_1, `phimlx bench`) the 256-bit bodies ran prompts at 1.6x the speed, one
    sequence's decode at 1.3x and 4 sequences' at 1.5x.  The 512-bit ones were measured
    only against the one-block 256-bit bodies, on an Intel Xeon (1.2-1.5x); Zen 5 was not
    measured.  (`avx2.IR_STAMP` keeps the two builds' compiled code apart.)"""
    has = features.get("avx512f", False) and features.get("avx512bw", False)
    choice = setting.strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    if choice in ("1", "true", "yes", "on"):
        return has
    return has and not cpu_name.startswith("znver")


AVX512 = wide_bodies(_feat, _llvm.get_host_cpu_name(), os.environ.get("PHIMLX_AVX512", ""))
# Whether the bodies may use the CPU's VNNI instructions: ``PHIMLX_VNNI=0`` (or false, no,
# off) makes them take the instructions of CPUs without (the tests run those bodies so).
_USE_VNNI = os.environ.get("PHIMLX_VNNI", "").strip().lower() not in ("0", "false", "no", "off")
# AVX-VNNI (or AVX-512 VNNI on 256-bit vectors): vpdpwssd fuses vpmaddwd and the add.
VNNI = _USE_VNNI and (
    _feat.get("avxvnni", False)
    or (AVX512 and _feat.get("avx512vnni", False) and _feat.get("avx512vl", False))
)
VNNI512 = _USE_VNNI and AVX512 and _feat.get("avx512vnni", False)
# vpdpbusd on 256-bit vectors, whichever bodies run (Zen 4 has it with AVX-512 VNNI and VL,
# Intel's cores since Alder Lake as AVX-VNNI): the transposed bodies' dots of Q8_0's quads
# (`_int8_q8_0_quad`) and Q4_0 / Q4_1's octets (`_oct_dpbusd`), the same integers in
# the same lanes as without it, so the same bits.
DPBUSD = _USE_VNNI and (
    _feat.get("avxvnni", False) or (_feat.get("avx512vnni", False) and _feat.get("avx512vl", False))
)

i1, i8, i16, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f16, f32 = ir.HalfType(), ir.FloatType()


def _vt(t, n):
    return ir.VectorType(t, n)


V16I8, V32I8, V8I8 = _vt(i8, 16), _vt(i8, 32), _vt(i8, 8)
V16I16, V8I32, V8F = _vt(i16, 16), _vt(i32, 8), _vt(f32, 8)
V64I8, V32I16, V16I32 = _vt(i8, 64), _vt(i16, 32), _vt(i32, 16)
V16F, V2F = _vt(f32, 16), _vt(f32, 2)


def _c(vty, vals):
    """A constant vector of ``vty``; ``vals`` a scalar (splat) or a list."""
    n = vty.count
    if not isinstance(vals, (list, tuple)):
        vals = [vals] * n
    return ir.Constant(vty, [ir.Constant(vty.element, v) for v in vals])


class _B:
    """IR helpers bound to one builder."""

    def __init__(self, context, builder):
        self.ctx, self.b = context, builder

    def data(self, aty, aval):
        return self.ctx.make_array(aty)(self.ctx, self.b, aval).data

    def row(self, aty, aval, r):
        """Pointer to row ``r`` of a 2-d array (no view object: a view would incref/decref
        the parent's meminfo once per row, atomics that two threads fight over)."""
        a = self.ctx.make_array(aty)(self.ctx, self.b, aval)
        stride = cgutils.unpack_tuple(self.b, a.strides, 2)[0]
        return self.at(a.data, self.b.mul(r, stride))

    def at(self, p, off):  # byte offset
        return self.b.gep(p, [off], source_etype=i8)

    def load(self, p, off, ty, align=1):
        return self.b.load(self.at(p, off), typ=ty, align=align)

    def f16(self, p, off):
        return self.b.fpext(self.load(p, off, f16), f32)

    def call(self, name, ret, args):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        fn = cgutils.get_or_insert_function(self.b.module, fnty, name)
        return self.b.call(fn, args)

    def shuf(self, a, bvec, idx):
        return self.b.shuffle_vector(a, bvec, _c(_vt(i32, len(idx)), list(idx)))

    def splat(self, s, n=8):
        v = self.b.insert_element(ir.Constant(_vt(s.type, n), ir.Undefined), s, i32(0))
        return self.shuf(v, ir.Constant(_vt(s.type, n), ir.Undefined), [0] * n)

    def lane(self, v, j, n=8):  # broadcast lane j of v
        return self.shuf(v, ir.Constant(v.type, ir.Undefined), [j] * n)

    def maddubs(self, u, s):  # u8 x i8 pairs -> i16
        return self.call("llvm.x86.avx2.pmadd.ub.sw", V16I16, [u, s])

    def maddwd(self, a, c):  # i16 x i16 pairs -> i32
        return self.call("llvm.x86.avx2.pmadd.wd", V8I32, [a, c])

    def madd_acc(self, acc, a, c):  # acc (8 x i32) + vpmaddwd(a, c)
        if not VNNI:
            return self.b.add(acc, self.maddwd(a, c))
        i32s = [self.b.bitcast(v, V8I32) for v in (a, c)]
        return self.call("llvm.x86.avx512.vpdpwssd.256", V8I32, [acc, *i32s])

    def maddubs512(self, u, s):  # the same on 64 bytes (AVX-512BW)
        return self.call("llvm.x86.avx512.pmaddubs.w.512", V32I16, [u, s])

    def madd_acc512(self, acc, a, c):  # acc (16 x i32) + vpmaddwd(a, c) on 512 bits
        if not VNNI512:
            return self.b.add(acc, self.call("llvm.x86.avx512.pmaddw.d.512", V16I32, [a, c]))
        # As inline assembly: LLVM's machine combiner splits a chain of vpdpwssd (the
        # intrinsic) into vpmaddwd + vpaddd on CPUs it does not tune as fast at it, one
        # more vector instruction per 64 weights and column where the K-quant loops are
        # bound by them (0.86-0.88x time for the Q4_K/Q5_K/Q6_K products here, results
        # unchanged).
        i32s = [self.b.bitcast(v, V16I32) for v in (a, c)]
        fty = ir.FunctionType(V16I32, [V16I32, V16I32, V16I32])
        return self.b.asm(fty, "vpdpwssd $2, $1, $0", "=v,v,v,0", [*i32s, acc], False)

    def dpbusd512(self, u, s, acc=None):
        """u8 x i8, each 4 consecutive products summed -> 16 x i32, plus ``acc`` if given."""
        if not VNNI512:
            pairs = self.maddubs512(u, s)
            sums = self.call("llvm.x86.avx512.pmaddw.d.512", V16I32, [pairs, _ONES32])
            return sums if acc is None else self.b.add(acc, sums)
        i32s = [self.b.bitcast(v, V16I32) for v in (u, s)]
        init = _c(V16I32, 0) if acc is None else acc
        return self.call("llvm.x86.avx512.vpdpbusd.512", V16I32, [init, *i32s])

    def pair(self, a, c):  # two scalars as a 2-vector
        v = self.b.insert_element(ir.Constant(_vt(a.type, 2), ir.Undefined), a, i32(0))
        return self.b.insert_element(v, c, i32(1))

    def cat(self, a, c):  # two vectors of one type, one after the other
        return self.shuf(a, c, range(2 * a.type.count))

    def fma(self, a, c, acc):
        return self.call("llvm.fma.v8f32", V8F, [a, c, acc])

    def tofloat(self, v):
        return self.b.sitofp(v, V8F)

    def hsum(self, v):
        lo = self.shuf(v, v, [0, 1, 2, 3])
        hi = self.shuf(v, v, [4, 5, 6, 7])
        s = self.b.fadd(lo, hi)
        s2 = self.b.fadd(self.shuf(s, s, [0, 1]), self.shuf(s, s, [2, 3]))
        return self.b.fadd(self.b.extract_element(s2, i32(0)), self.b.extract_element(s2, i32(1)))

    def var(self, init):
        p = cgutils.alloca_once(self.b, init.type)
        self.b.store(init, p)
        return p


_ONES16 = _c(V16I16, 1)
_ONES32 = _c(V32I16, 1)


class _Acc:
    """A row's accumulators: two float vectors (alternated so that consecutive fma's do not
    wait on each other), a float vector and a scalar for zero-point / min corrections; and,
    where the bodies sum in 512-bit vectors (``wide``: `IRType.wide_acc`), a 16-lane vector
    and a 16-lane correction."""

    def __init__(self, h, wide=False):
        self.v = [h.var(_c(V8F, 0.0)), h.var(_c(V8F, 0.0))]
        self.corr = h.var(_c(V8F, 0.0))
        self.s = h.var(ir.Constant(f32, 0.0))
        self.wide = wide
        if wide:
            self.w, self.c16 = h.var(_c(V16F, 0.0)), h.var(_c(V16F, 0.0))

    def total(self, h):
        b = h.b
        tot = b.fadd(b.fadd(b.load(self.v[0]), b.load(self.v[1])), b.load(self.corr))
        s = b.load(self.s)
        if self.wide:
            w = b.fadd(b.load(self.w), b.load(self.c16))
            tot = b.fadd(tot, b.fadd(h.shuf(w, w, range(8)), h.shuf(w, w, range(8, 16))))
        return b.fadd(h.hsum(tot), s)


def _blocks(h, n, body):
    """``body(b, k)`` for b in 0..n-1, unrolled by two: k (0 or 1) picks the accumulator."""
    b = h.b
    with cgutils.for_range(b, b.sdiv(n, i64(2))) as loop:
        i = b.mul(loop.index, i64(2))
        body(i, 0)
        body(b.add(i, i64(1)), 1)
    with b.if_then(b.icmp_signed("!=", b.srem(n, i64(2)), i64(0))):
        body(b.sub(n, i64(1)), 0)


def _headers16(h, pr, b0, size):
    """The first 4 bytes of blocks b0 .. b0 + 15 of a row of ``size``-byte blocks as 16 x
    i32, lane j block b0 + j, in one ``vpgatherdd``."""
    first = h.splat(h.b.trunc(b0, i32), 16)
    idx = h.b.mul(h.b.add(_c(V16I32, list(range(16))), first), _c(V16I32, size))
    fty = ir.FunctionType(V16I32, [V16I32, pr.type, V16I32, _vt(i1, 16), i32])
    fn = cgutils.get_or_insert_function(h.b.module, fty, "llvm.x86.avx512.mask.gather.dpi.512")
    return h.b.call(fn, [_c(V16I32, 0), pr, idx, ir.Constant(_vt(i1, 16), [1] * 16), i32(1)])


def _halves16(h, words):  # the f16 in the low half of each i32 lane, as 16 floats
    return h.b.fpext(h.b.bitcast(h.b.trunc(words, _vt(i16, 16)), _vt(f16, 16)), V16F)


def _pairs(h, spec, pr, cols, nb):
    """The paired bodies over a row's ``nb`` blocks: per 16 blocks, their headers in one
    gather (`_headers16`: the scales, and Q4_1's mins, which meet each column's per-block
    ``xs`` there in one 16-lane fma), then ``spec.int8_pair(b, d16)`` for the block pairs
    (b, b + 1), ``d16`` their two scales spread over 8 lanes each (one shuffle); the pairs
    after the last 16 blocks read their two headers alone (`_pair_scales`); the one-block
    body takes the last block of an odd ``nb``."""
    b = h.b
    full = b.sdiv(nb, i64(16))
    with cgutils.for_range(b, full) as group:
        b0 = b.mul(group.index, i64(16))
        words = _headers16(h, pr, b0, spec.pair_bytes)
        dv = _halves16(h, words)
        if spec.pair_min:
            mv = _halves16(h, b.lshr(words, _c(V16I32, 16)))
            for c in cols:  # xs per block (`avx2.pair_inputs`)
                _mins_fma(h, c, mv, h.load(c.ps, b.mul(b0, i64(4)), V16F, 4))
        for j in range(0, 16, 2):
            d16 = h.shuf(dv, dv, [j] * 8 + [j + 1] * 8)
            spec.int8_pair(h, pr, cols, b.add(b0, i64(j)), d16)
    b1 = b.mul(full, i64(16))
    with cgutils.for_range(b, b.sdiv(b.sub(nb, b1), i64(2))) as pair:
        blk = b.add(b1, b.mul(pair.index, i64(2)))
        o0 = b.mul(blk, i64(spec.pair_bytes))
        dm = _pair_scales(h, pr, o0, b.add(o0, i64(spec.pair_bytes)))
        spec.int8_pair(h, pr, cols, blk, h.shuf(dm, dm, [0] * 8 + [2] * 8))
        if spec.pair_min:
            m16 = h.shuf(dm, _c(_vt(f32, 4), 0.0), [1, 3] + [4] * 14)
            for c in cols:
                xs2 = h.load(c.ps, b.mul(blk, i64(4)), V2F, 4)
                _mins_fma(h, c, m16, h.shuf(xs2, _c(V2F, 0.0), [0, 1] + [2] * 14))
    with b.if_then(b.icmp_signed("!=", b.srem(nb, i64(2)), i64(0))):
        spec.int8_body(h, pr, cols, b.sub(nb, i64(1)), 0)


def _mins_fma(h, c, m16, xs16):  # column c's 16-lane correction += Q4_1's mins * its xs
    h.b.store(h.call("llvm.fma.v16f32", V16F, [m16, xs16, h.b.load(c.acc.c16)]), c.acc.c16)


def _pair_scales(h, pr, o0, o1):
    """The f16 pairs at byte offsets ``o0`` and ``o1`` of a row (a block's scale and the
    next two bytes: Q4_1's min, else the first quants) as four floats ``(d0, m0, d1, m1)``."""
    w = h.pair(h.load(pr, o0, i32), h.load(pr, o1, i32))
    return h.b.fpext(h.b.bitcast(w, _vt(f16, 4)), _vt(f32, 4))


def _pair_acc(h, cols, q, d16, has_min, b):
    """Each column's sums over the 64 weights of blocks b, b + 1 (32 each, one scale per
    block): ``q`` their 64 quants as unsigned bytes, ``d16`` the blocks' two scales spread
    over 8 lanes each (a weight is ``d * q + m`` where ``has_min``: Q4_1, whose mins
    `_pairs` applies; else ``d * (q - k)``, k the type's `IRType.x_offset`).  The columns'
    ``x`` comes as the paired bodies take it (`avx2.pair_inputs`), ``dx`` spread to one
    value per 4 of ``xq`` (lane l of a 16-lane vector covers values 4l .. 4l + 3 of the
    pair, as ``vpdpbusd``'s sums do) and, where ``k`` > 0, the dot's starting values ``-k *
    sum(xq)`` per 4 as int32.  Per column: the integer dots (the offsets come off in
    integers), times ``d * dx`` into the 16-lane accumulator.  (The loop is bound by its
    vector instructions per column: taking the offsets off in the dot removes one, the
    spread scales another, the mins applied per 16 blocks a third.)"""
    xo = h.b.mul(b, i64(32))
    for c in cols:
        init = None if has_min else h.load(c.ps, xo, V16I32, 4)
        isum = h.dpbusd512(q, h.load(c.pq, xo, V64I8), init)
        s16 = h.b.fmul(d16, h.load(c.pd, xo, V16F, 4))
        w = c.acc.w
        h.b.store(h.call("llvm.fma.v16f32", V16F, [h.b.sitofp(isum, V16F), s16, h.b.load(w)]), w)


def _dx(h, c, b):
    """Column ``c``'s int8 scale of the 32 values of block ``b`` (`_Col.dstep` apart)."""
    return h.load(c.pd, h.b.mul(b, i64(c.dstep)), f32, 4)


def _acc_fma(h, acc, v, s, k):  # accumulator k += v * s
    p = acc.v[k & 1]
    h.b.store(h.fma(v, s, h.b.load(p)), p)


def _corr_scalar(h, acc, s):
    h.b.store(h.b.fadd(h.b.load(acc.s), s), acc.s)


def _corr_fma(h, acc, a, c):  # correction vector += a * c
    h.b.store(h.fma(a, c, h.b.load(acc.corr)), acc.corr)


def _u8x8(h, p, off):  # 8 bytes -> 8 x i32 (zero-extended)
    return h.b.zext(h.load(p, off, V8I8), V8I32)


def _s8x8(h, p, off):  # 8 bytes -> 8 x i32 (sign-extended)
    return h.b.sext(h.load(p, off, V8I8), V8I32)


def _xv(h, px, idx):  # x[idx : idx + 8], idx an i64 element index
    return h.load(px, h.b.mul(idx, i64(4)), V8F, 4)


def _dot4(h, vals, xs):  # sum of vals[i] * xs[i] (float vectors) as one vector
    t = h.b.fmul(vals[0], xs[0])
    for v, x in zip(vals[1:], xs[1:], strict=True):
        t = h.fma(v, x, t)
    return t


def _store(h, py, idx, v):  # y[idx : idx + 8] = v, idx an i64 element index
    h.b.store(v, h.b.bitcast(h.at(py, h.b.mul(idx, i64(4))), V8F.as_pointer()), align=4)


def _neg(h, s):  # -s, a float scalar
    return h.b.fsub(ir.Constant(f32, 0.0), s)


# ---------------------------------------------------------------------------------------------
# Several blocks a step on 256-bit vectors, transposed (Q4_0, Q4_1: 8 blocks, Q8_0: 4; where
# there is no AVX-512): lane j of every vector belongs to block j (Q8_0: lanes 2 j, 2 j + 1),
# so that each column's products of a step sum into the blocks' integer dots by vertical
# adds, and the float work per column is one conversion, one scale and one fma a step (the
# one-block body: per block).  The weights are transposed as they are read (`_oct_words`,
# `_int8_q8_0_quad`); ``x`` comes transposed the same way (`avx2.step_inputs`).


# A row's last nb % 8 blocks, where fewer than this, run the one-block body (x in its
# natural order there: `avx2.step_inputs`); more, a partial octet.
OCTET_TAIL = 4


def _steps(h, spec, pr, cols, nb):
    """The transposed bodies over a row's ``nb`` blocks, ``S`` = `IRType.step_blocks` a
    step: ``spec.int8_step(blks, si, full)`` for blocks ``S si .. S si + S - 1``.  The last
    ``nb % S`` blocks: the one-block body's, each (an octet's tail: two of them in
    ``spec.step_pair``, transposed by 16 bytes), or (octets, from `OCTET_TAIL` blocks) a
    partial step (``full`` False) that reads its missing blocks' slots from the row's last
    block (valid memory), where the columns' ``x`` and scales are 0 (`avx2.step_inputs`),
    so that they add exact zeros."""
    b, S = h.b, spec.step_blocks
    full = b.sdiv(nb, i64(S))
    with cgutils.for_range(b, full) as loop:
        b0 = b.mul(loop.index, i64(S))
        if spec.block_bytes:
            _prefetch(h, pr, b0, spec.block_bytes, S * spec.block_bytes)
        spec.int8_step(h, pr, cols, [b.add(b0, i64(j)) for j in range(S)], loop.index, True)
    if S == 1:  # (one block a step, the K-quants repacked: nothing left over)
        return
    b0, rem = b.mul(full, i64(S)), b.srem(nb, i64(S))
    partial_from = OCTET_TAIL if S == 8 else S  # (a quad's tail: always one-block bodies)
    with b.if_else(b.icmp_signed(">=", rem, i64(partial_from))) as (partial, tail):
        with partial:
            last = b.sub(nb, i64(1))
            blks = [b0] + [
                b.select(b.icmp_signed("<", b.add(b0, i64(j)), nb), b.add(b0, i64(j)), last)
                for j in range(1, S)
            ]
            spec.int8_step(h, pr, cols, blks, full, False)
        with tail:
            if spec.step_pair is None:
                with cgutils.for_range(b, rem) as loop:
                    spec.int8_body(h, pr, cols, b.add(b0, loop.index), 1)
            else:  # an octet's tail of 1-3 blocks: two in one transposed pair, one alone
                with b.if_then(b.icmp_signed(">=", rem, i64(2))):
                    spec.step_pair(h, pr, cols, b0)
                with b.if_then(b.icmp_signed("==", b.srem(rem, i64(2)), i64(1))):
                    spec.int8_body(h, pr, cols, b.sub(nb, i64(1)), 1)


def _oct_scales(h, pr, offs, size, full, has_min):
    """The f16 scales at byte offsets ``offs`` of a row (8 blocks of ``size`` bytes; a
    ``full`` octet's 8 in a row) as 8 floats, lane j block j, their 4-byte words in one
    ``vpgatherdd``; and, where ``has_min`` (the f16 after each scale: Q4_1's min), the
    mins likewise."""
    b = h.b
    if full:
        base, idx = h.at(pr, offs[0]), _c(V8I32, [size * j for j in range(8)])
    else:
        base, idx = pr, ir.Constant(V8I32, ir.Undefined)
        for j, o in enumerate(offs):
            idx = b.insert_element(idx, b.trunc(o, i32), i32(j))
    words = h.call(
        "llvm.x86.avx2.gather.d.d.256", V8I32, [_c(V8I32, 0), base, idx, _c(V8I32, -1), i8(1)]
    )
    w = b.bitcast(words, V16I16)
    d = b.fpext(b.bitcast(h.shuf(w, w, range(0, 16, 2)), _vt(f16, 8)), V8F)
    if not has_min:
        return d, None
    return d, b.fpext(b.bitcast(h.shuf(w, w, range(1, 16, 2)), _vt(f16, 8)), V8F)


def _oct_words(h, pr, offs):
    """The 16 bytes at byte offsets ``offs`` of a row (8 blocks' Q4 quants) transposed: 4
    vectors of 8 x i32, vector g lane j block j's bytes 4 g .. 4 g + 3 (loads of 16 bytes,
    two blocks a vector, then 32-bit and 64-bit unpacks)."""
    ys = [
        h.cat(h.load(pr, offs[j], _vt(i32, 4)), h.load(pr, offs[j + 4], _vt(i32, 4)))
        for j in range(4)
    ]
    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    a0, a1 = h.shuf(ys[0], ys[1], lo), h.shuf(ys[0], ys[1], hi)
    c0, c1 = h.shuf(ys[2], ys[3], lo), h.shuf(ys[2], ys[3], hi)
    lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    return [h.shuf(a0, c0, lo64), h.shuf(a0, c0, hi64), h.shuf(a1, c1, lo64), h.shuf(a1, c1, hi64)]


def _oct_acc(h, c, isum, d8, oi):
    """Column ``c`` += ``isum`` (8 x i32, the 8 blocks' integer dots) times ``d8 * dx``,
    ``dx`` its scales in the octet form (`avx2.step_inputs`)."""
    sc = h.b.fmul(d8, h.load(c.pd, h.b.mul(oi, i64(32)), V8F, 4))
    _acc_fma(h, c.acc, h.tofloat(isum), sc, 0)


def _oct_x(h, c, oi, g):  # column c's transposed x, vector g of octet oi (32 bytes)
    return h.load(c.pq, h.b.add(h.b.mul(oi, i64(256)), i64(32 * g)), V32I8)


# ---------------------------------------------------------------------------------------------
# Q4_0 (18 bytes: f16 d, 16 bytes of nibbles) and Q4_1 (20 bytes: f16 d, f16 m, nibbles):
# weight l is the low nibble of byte l, weight 16 + l the high one; d * q - 8 d or d * q + m.


def _q4_block(h, pr, b, has_min):
    """Block ``b``: ``(o, d, byte offset of its 16 quant bytes)``, o its byte offset."""
    o = h.b.mul(b, i64(20 if has_min else 18))
    return o, h.f16(pr, o), h.b.add(o, i64(4 if has_min else 2))


def _q4_min(h, pr, o):  # Q4_1's m of the block at o: read where each body uses it
    return h.f16(pr, h.b.add(o, i64(2)))


def _q4_quants(h, pr, qo, wide):
    """The 32 quants (0..15) in weight order: 32 x i8, or (``wide``) four 8 x i32."""
    if not wide:
        q16 = h.load(pr, qo, V16I8)
        lo, hi = h.b.and_(q16, _c(V16I8, 15)), h.b.lshr(q16, _c(V16I8, 4))
        return h.shuf(lo, hi, range(32))
    z0, z1 = _u8x8(h, pr, qo), _u8x8(h, pr, h.b.add(qo, i64(8)))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    return [h.b.and_(z0, m15), h.b.and_(z1, m15), h.b.lshr(z0, s4), h.b.lshr(z1, s4)]


def _int8_q4(h, pr, cols, b, k, has_min):
    o, d, qo = _q4_block(h, pr, b, has_min)
    m = _q4_min(h, pr, o) if has_min else None
    q = _q4_quants(h, pr, qo, False)
    xo, go = h.b.mul(b, i64(32)), h.b.mul(b, i64(4))
    for c in cols:
        xv = h.load(c.pq, xo, V32I8)
        s = h.b.fmul(d, _dx(h, c, b))
        if has_min:
            _acc_fma(h, c.acc, h.tofloat(h.maddwd(h.maddubs(q, xv), _ONES16)), h.splat(s), k)
            _corr_scalar(h, c.acc, h.b.fmul(m, h.load(c.ps, go, f32, 4)))  # xs per block
        else:
            p = h.b.sub(h.maddubs(q, xv), h.maddubs(_c(V32I8, 8), xv))  # sum (q - 8) x, pairs
            _acc_fma(h, c.acc, h.tofloat(h.maddwd(p, _ONES16)), h.splat(s), k)


def _int8_q4_pair(h, pr, cols, b, d16, has_min):
    # Q4_0's (q - 8): the 8 comes off in the integer dot (`_pair_acc`).
    size, skip = (20, 4) if has_min else (18, 2)
    qo0 = h.b.add(h.b.mul(b, i64(size)), i64(skip))
    q = h.cat(h.load(pr, qo0, V16I8), h.load(pr, h.b.add(qo0, i64(size)), V16I8))
    lo, hi = h.b.and_(q, _c(V32I8, 15)), h.b.lshr(q, _c(V32I8, 4))
    order = [*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]
    _pair_acc(h, cols, h.shuf(lo, hi, order), d16, has_min, b)


def _int8_q4_octet(h, pr, cols, blks, oi, full, has_min, packed=False):
    # Q4_0's (q - 8): the 8 comes off in the integer dots, against `avx2.step_inputs`'s
    # -8 * sum(xq) per block; Q4_1's mins meet its ``dx * sum(xq)`` per block there, into
    # the column's accumulator itself: a correction vector of its own kept 16 vectors live
    # at 4 columns, and the loop spilled them (0.92-0.94x the time at 4 columns on a Zen 3,
    # SmolLM2's shapes; the same at 1 and 8).  The products' pair sums (at most 2 * 15 *
    # 127) stay in int16 for 16 of them.  ``packed``: a full octet is stored as this body
    # reads it (`_oct_packed`); a partial one, as the file stores it.
    size, skip = (20, 4) if has_min else (18, 2)
    offs = [h.b.mul(bk, i64(size)) for bk in blks]
    if packed and full:
        d8, m8, words = _oct_packed(h, pr, offs[0], has_min)
    else:
        d8, m8 = _oct_scales(h, pr, offs, size, full, has_min)
        words = [
            h.b.bitcast(w, V32I8) for w in _oct_words(h, pr, [h.b.add(o, i64(skip)) for o in offs])
        ]
    _oct_cols(h, cols, oi, words, d8, m8, has_min)


def _oct_cols(h, cols, oi, words, d8, m8, has_min, fifth=None):
    """Each column's products with a transposed step of 8 blocks of 32 (lane j block j):
    ``words`` the 4 x 32 bytes of quant pairs (low nibble weight l, high weight 16 + l of
    block j's 4 bytes at 32 g + 4 j), ``d8`` the blocks' float scales, ``m8`` (where
    ``has_min``) their mins, against ``xs`` in the step form; else Q4_0's ``-8 sum(xq)``.
    ``fifth``: Q5_K's 32 bytes of 5th bits, bit G of byte 4 j + t weight 4 G + t's; its
    quants (up to 31) sum in int16 four vectors at a time (4 * 2 * 31 * 127 fits, 8 would
    not), the nibbles' eight."""
    qs = [h.b.and_(w, _c(V32I8, 15)) for w in words] + [h.b.lshr(w, _c(V32I8, 4)) for w in words]
    if fifth is not None:  # bit G of each byte to bit 4: the quant's 16
        for g in range(8):
            bit = h.b.shl(fifth, _c(V32I8, 4 - g)) if g < 4 else h.b.lshr(fifth, _c(V32I8, g - 4))
            qs[g] = h.b.or_(qs[g], h.b.and_(bit, _c(V32I8, 16)))
    for c in cols:
        aux = h.load(c.ps, h.b.mul(oi, i64(32)), V8F if has_min else V8I32, 4)
        if DPBUSD and fifth is None:
            isum = _oct_dpbusd(h, c, oi, qs, _c(V8I32, 0) if has_min else aux)
        else:
            p = h.maddubs(qs[0], _oct_x(h, c, oi, 0))
            for g in range(1, 8):
                if fifth is not None and g == 4:
                    part, p = p, h.maddubs(qs[g], _oct_x(h, c, oi, g))
                    continue
                p = h.b.add(p, h.maddubs(qs[g], _oct_x(h, c, oi, g)))
            isum = h.maddwd(p, _ONES16)
            if fifth is not None:
                isum = h.madd_acc(isum, part, _ONES16)
            if not has_min:
                isum = h.b.add(isum, aux)
        _oct_acc(h, c, isum, d8, oi)
        if has_min:
            _acc_fma(h, c.acc, m8, aux, 0)


def _oct_dpbusd(h, c, oi, qs, start):
    """Column ``c``'s 8 products with the quants ``qs`` of a transposed octet, summed into
    int32 by vpdpbusd (`DPBUSD`) in two chains of four, the first from ``start`` (Q4_0's
    ``-8 sum(xq)``): one instruction a vector and column where vpmaddubsw takes two and a
    widening (Zen 4, 2 threads, 4 rows of x: Q4_1 and Q4_0 3072 x 576 0.87-0.94x the time,
    576 x 1536 0.95-1.01x; one row the same)."""
    chains = [start, _c(V8I32, 0)]
    for g in range(8):
        x = h.b.bitcast(_oct_x(h, c, oi, g), V8I32)
        chains[g & 1] = _dpbusd(h, chains[g & 1], qs[g], x)
    return h.b.add(chains[0], chains[1])


def _dpbusd(h, acc, u, s):  # acc (8 x i32) + u8 x i8 products, each 4 consecutive summed
    i32s = [h.b.bitcast(v, V8I32) for v in (u, s)]
    return h.call("llvm.x86.avx512.vpdpbusd.256", V8I32, [acc, *i32s])


def _oct_packed(h, pr, o, has_min):
    """A full octet of Q4 blocks at byte ``o`` of a row stored transposed (`avx2.pack_octets`:
    the 8 scales, Q4_1's 8 mins, then 4 x 32 bytes of quants, vector g lane j block j's
    bytes 4 g .. 4 g + 3): ``(d8, m8, words)`` as `_oct_scales` and `_oct_words` give them
    from the file's layout, in 2-3 loads and 4 instead of a gather and 12 shuffles."""
    b = h.b
    d8 = b.fpext(h.load(pr, o, _vt(f16, 8)), V8F)
    m8 = b.fpext(h.load(pr, b.add(o, i64(16)), _vt(f16, 8)), V8F) if has_min else None
    q0 = b.add(o, i64(32 if has_min else 16))
    return d8, m8, [h.load(pr, b.add(q0, i64(32 * g)), V32I8) for g in range(4)]


def _int8_q4_pair16(h, pr, cols, b0, has_min):
    # Blocks b0, b0 + 1 of an octet's tail, transposed by 16 bytes: lanes 0-3 the first,
    # 4-7 the second; vector 0 their low nibbles (values 0-15), vector 1 the high ones.
    # Q4_0's -8 * sum(xq) and Q4_1's mins as the octets take them (`avx2.step_inputs`),
    # one lane a block.
    size, skip = (20, 4) if has_min else (18, 2)
    o0 = h.b.mul(b0, i64(size))
    o1 = h.b.add(o0, i64(size))
    dm = _pair_scales(h, pr, o0, o1)  # (d0, m0, d1, m1)
    zero = _c(_vt(f32, 4), 0.0)
    d8 = h.shuf(dm, dm, [0] * 4 + [2] * 4)
    m8 = h.shuf(dm, zero, [1, 3] + [4] * 6)
    q = h.cat(h.load(pr, h.b.add(o0, i64(skip)), V16I8), h.load(pr, h.b.add(o1, i64(skip)), V16I8))
    lo, hi = h.b.and_(q, _c(V32I8, 15)), h.b.lshr(q, _c(V32I8, 4))
    xo, so = h.b.mul(b0, i64(32)), h.b.mul(b0, i64(4))
    for c in cols:
        p = h.b.add(
            h.maddubs(lo, h.load(c.pq, xo, V32I8)),
            h.maddubs(hi, h.load(c.pq, h.b.add(xo, i64(32)), V32I8)),
        )
        isum = h.maddwd(p, _ONES16)
        if not has_min:
            off = h.load(c.ps, so, _vt(i32, 2), 4)
            isum = h.b.add(isum, h.shuf(off, _c(_vt(i32, 2), 0), [0, 2, 2, 2, 1, 2, 2, 2]))
        dx2 = h.load(c.pd, so, V2F, 4)
        sc = h.b.fmul(d8, h.shuf(dx2, dx2, [0] * 4 + [1] * 4))
        _acc_fma(h, c.acc, h.tofloat(isum), sc, 1)
        if has_min:
            xs2 = h.load(c.ps, so, V2F, 4)
            _corr_fma(h, c.acc, m8, h.shuf(xs2, _c(V2F, 0.0), [0, 1] + [2] * 6))


def _float_q4(h, pr, px, ps, acc, b, k, has_min):
    o, d, qo = _q4_block(h, pr, b, has_min)
    vals = _q4_quants(h, pr, qo, True)
    x0 = h.b.mul(b, i64(32))
    xv = [_xv(h, px, h.b.add(x0, i64(8 * k))) for k in range(4)]
    _acc_fma(h, acc, _dot4(h, [h.tofloat(v) for v in vals], xv), h.splat(d), k)
    xsb = h.load(ps, h.b.mul(b, i64(4)), f32, 4)
    if has_min:
        _corr_scalar(h, acc, h.b.fmul(_q4_min(h, pr, o), xsb))
    else:
        _corr_scalar(h, acc, h.b.fmul(h.b.fmul(d, ir.Constant(f32, -8.0)), xsb))


def _decode_q4(h, pr, py, b, has_min):
    o, d, qo = _q4_block(h, pr, b, has_min)
    d = h.splat(d)
    m = h.splat(_q4_min(h, pr, o)) if has_min else h.b.fmul(d, _c(V8F, -8.0))
    y0 = h.b.mul(b, i64(32))
    for k, v in enumerate(_q4_quants(h, pr, qo, True)):
        _store(h, py, h.b.add(y0, i64(8 * k)), h.fma(h.tofloat(v), d, m))


# ---------------------------------------------------------------------------------------------
# Q8_0 (34 bytes: f16 d, 32 int8 quants): d * q.


def _q8_block(h, pr, b):
    """Block ``b``: ``(d, byte offset of its 32 quants)``."""
    o = h.b.mul(b, i64(34))
    return h.f16(pr, o), h.b.add(o, i64(2))


def _q8_quants(h, pr, qo, wide):
    """The 32 quants (signed): 32 x i8, or (``wide``) four 8 x i32 (an iterator)."""
    if not wide:
        return h.load(pr, qo, V32I8)
    return (_s8x8(h, pr, h.b.add(qo, i64(8 * k))) for k in range(4))


def _int8_q8_0(h, pr, cols, b, k):
    d, qo = _q8_block(h, pr, b)
    q = _q8_quants(h, pr, qo, False)
    # |q| (u8) x sign(q)*x (i8): the signed product through vpmaddubsw, as llama.cpp does.
    aq = h.call("llvm.abs.v32i8", V32I8, [q, ir.Constant(i1, 0)])
    xo = h.b.mul(b, i64(32))
    for c in cols:
        sx = h.call("llvm.x86.avx2.psign.b", V32I8, [h.load(c.pq, xo, V32I8), q])
        s = h.b.fmul(d, _dx(h, c, b))
        _acc_fma(h, c.acc, h.tofloat(h.maddwd(h.maddubs(aq, sx), _ONES16)), h.splat(s), k)


def _int8_q8_0_pair(h, pr, cols, b, d16):
    # q + 128 as unsigned bytes (vpdpbusd has no saturation); the 128 comes off in the
    # integer dot (`_pair_acc`).
    qo0 = h.b.add(h.b.mul(b, i64(34)), i64(2))
    q = h.cat(h.load(pr, qo0, V32I8), h.load(pr, h.b.add(qo0, i64(34)), V32I8))
    u = h.b.xor(q, _c(V64I8, -128))
    _pair_acc(h, cols, u, d16, False, b)


def _int8_q8_0_quad(h, pr, cols, blks, qi, full):
    # Four blocks a step, transposed by 8 bytes (lanes 2 j, 2 j + 1 block j's even and odd
    # 4-byte groups).  With `DPBUSD`: q + 128 as unsigned bytes, one vpdpbusd a vector and
    # column (unsaturated int32 sums), each lane started from -128 times the sum of its
    # groups' xq (`avx2.step_inputs`), so that it ends with the same integer as without.
    # Else the signed weights through vpmaddubsw as the one-block body takes them (|q| x
    # sign(q) * x), pair sums (up to 2 * 128 * 127) widened to int32 at once: three more
    # vector instructions a vector and column.
    del full  # (no partial quads: `_steps`)
    offs = [h.b.mul(bk, i64(34)) for bk in blks]
    v = ir.Constant(_vt(i16, 4), ir.Undefined)
    for j, o in enumerate(offs):
        v = h.b.insert_element(v, h.load(pr, o, i16), i32(j))
    d4 = h.b.fpext(h.b.bitcast(v, _vt(f16, 4)), _vt(f32, 4))
    spread = [0, 0, 1, 1, 2, 2, 3, 3]
    d8 = h.shuf(d4, d4, spread)
    ys = [h.load(pr, h.b.add(o, i64(2)), _vt(i64, 4)) for o in offs]
    t0, t1 = h.shuf(ys[0], ys[1], [0, 4, 2, 6]), h.shuf(ys[0], ys[1], [1, 5, 3, 7])
    t2, t3 = h.shuf(ys[2], ys[3], [0, 4, 2, 6]), h.shuf(ys[2], ys[3], [1, 5, 3, 7])
    qs = [h.shuf(t0, t2, [0, 1, 4, 5]), h.shuf(t1, t3, [0, 1, 4, 5])]
    qs += [h.shuf(t0, t2, [2, 3, 6, 7]), h.shuf(t1, t3, [2, 3, 6, 7])]
    qs = [h.b.bitcast(q, V32I8) for q in qs]  # vector g: bytes 8 g .. 8 g + 7 of each block
    aqs = [h.call("llvm.abs.v32i8", V32I8, [q, ir.Constant(i1, 0)]) for q in qs]
    us = [h.b.xor(q, _c(V32I8, -128)) for q in qs]
    for c in cols:
        isum = None
        if DPBUSD:
            sums = h.b.sext(h.load(c.ps, h.b.mul(qi, i64(16)), _vt(i16, 8), 4), V8I32)
            isum = h.b.mul(sums, _c(V8I32, 128))
        for g, (q, aq, u) in enumerate(zip(qs, aqs, us, strict=True)):
            x = h.load(c.pq, h.b.add(h.b.mul(qi, i64(128)), i64(32 * g)), V32I8)
            if DPBUSD:
                isum = _dpbusd(h, isum, u, x)
                continue
            sx = h.call("llvm.x86.avx2.psign.b", V32I8, [x, q])
            t = h.maddwd(h.maddubs(aq, sx), _ONES16)
            isum = t if isum is None else h.b.add(isum, t)
        dx4 = h.load(c.pd, h.b.mul(qi, i64(16)), _vt(f32, 4), 4)
        sc = h.b.fmul(d8, h.shuf(dx4, dx4, spread))
        _acc_fma(h, c.acc, h.tofloat(isum), sc, 0)


def _float_q8_0(h, pr, px, ps, acc, b, k):
    d, qo = _q8_block(h, pr, b)
    vals = [h.tofloat(v) for v in _q8_quants(h, pr, qo, True)]
    x0 = h.b.mul(b, i64(32))
    xv = [_xv(h, px, h.b.add(x0, i64(8 * k))) for k in range(4)]
    _acc_fma(h, acc, _dot4(h, vals, xv), h.splat(d), k)


def _decode_q8_0(h, pr, py, b):
    d, qo = _q8_block(h, pr, b)
    d = h.splat(d)
    y0 = h.b.mul(b, i64(32))
    for k, v in enumerate(_q8_quants(h, pr, qo, True)):
        _store(h, py, h.b.add(y0, i64(8 * k)), h.b.fmul(h.tofloat(v), d))


# ---------------------------------------------------------------------------------------------
# Q4_K (144 bytes) / Q5_K (176 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit scales and
# mins, (Q5_K: 32 bytes of 5th bits), 128 bytes of nibbles.  Sub-block j (32 weights) is
# nibble j & 1 of bytes 32 (j >> 1) .. + 31, its 5th bit bit j of the qh bytes;
# weight = d * sc_j * q - dmin * m_j.


def _qk_block(h, pr, b, five):
    """Block ``b``: ``(o, d, dmin, scales, mins, sc)``, o its byte offset, the 8 six-bit
    scales and mins as float vectors, and the scales as 8 x i8 too."""
    o = h.b.mul(b, i64(176 if five else 144))
    d, dm = h.f16(pr, o), h.f16(pr, h.b.add(o, i64(2)))
    raw = h.load(pr, h.b.add(o, i64(4)), V16I8)  # 12 scale bytes (+4 of the block's data)
    s1 = h.shuf(raw, raw, [0, 1, 2, 3, 8, 9, 10, 11])
    s2 = h.shuf(raw, raw, [0, 1, 2, 3, 0, 1, 2, 3])
    m1 = h.shuf(raw, raw, [4, 5, 6, 7, 8, 9, 10, 11])
    m2 = h.shuf(raw, raw, [4, 5, 6, 7, 4, 5, 6, 7])
    lo_mask = _c(V8I8, [63, 63, 63, 63, 15, 15, 15, 15])
    hi_mask = _c(V8I8, [0, 0, 0, 0, 48, 48, 48, 48])
    bb = h.b
    hi_s = bb.and_(bb.shl(bb.lshr(s2, _c(V8I8, 6)), _c(V8I8, 4)), hi_mask)
    sc = bb.or_(bb.and_(s1, lo_mask), hi_s)
    hi_m = bb.and_(bb.shl(bb.lshr(m2, _c(V8I8, 6)), _c(V8I8, 4)), hi_mask)
    mn = bb.or_(bb.and_(bb.lshr(m1, _c(V8I8, [0, 0, 0, 0, 4, 4, 4, 4])), lo_mask), hi_m)
    return o, d, dm, bb.uitofp(sc, V8F), bb.uitofp(mn, V8F), sc


def _qk_quants(h, pr, o, five, wide):
    """Yield ``(j, quants of sub-block j)`` for j = 0..7, the quants (0..15, Q5_K 0..31) as
    32 x i8, or (``wide``) four 8 x i32."""
    b = h.b
    qo = b.add(o, i64(48 if five else 16))
    if not wide:
        qh = h.load(pr, b.add(o, i64(16)), V32I8) if five else None
        for pair in range(4):
            q = h.load(pr, b.add(qo, i64(32 * pair)), V32I8)
            nib = [b.and_(q, _c(V32I8, 15)), b.lshr(q, _c(V32I8, 4))]
            for half in range(2):
                j = 2 * pair + half
                v = nib[half]
                if five:
                    bit = b.and_(qh, _c(V32I8, 1 << j))
                    hi = b.icmp_unsigned("!=", bit, _c(V32I8, 0))
                    v = b.or_(v, b.select(hi, _c(V32I8, 16), _c(V32I8, 0)))
                yield j, v
        return
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    qh = [_u8x8(h, pr, b.add(o, i64(16 + 8 * k))) for k in range(4)] if five else None
    for pair in range(4):
        z = [_u8x8(h, pr, b.add(qo, i64(32 * pair + 8 * k))) for k in range(4)]
        for half in range(2):
            j = 2 * pair + half
            vals = []
            for k in range(4):
                v = b.and_(z[k], m15) if half == 0 else b.lshr(z[k], s4)
                if five:  # bit j of qh[k] -> bit 4
                    bit = b.and_(qh[k], _c(V8I32, 1 << j))
                    if j < 4:
                        bit = b.shl(bit, _c(V8I32, 4 - j))
                    elif j > 4:
                        bit = b.lshr(bit, _c(V8I32, j - 4))
                    v = b.or_(v, bit)
                vals.append(v)
            yield j, vals


def _block_isums(h, cols, xo, quants, scales, sub=None):
    """Each column's integer dot with a 256-weight block, as lanes of i32 whose sum it is
    (exact, so any order gives the same sums): ``quants[g]`` the 32 unsigned quants of
    group g (32 x i8), ``scales[g]`` its integer scales (16 x i16, a pair per i32 lane),
    ``sub`` a value taken off every quant (32 x i8) or None; ``xo`` the block's offset in
    the columns' ``x``.  With AVX-512BW two groups at a time on 512-bit vectors (16 lanes),
    else one on 256 (8 lanes)."""
    b = h.b
    wide = AVX512
    acc_ty = V16I32 if wide else V8I32
    isum = [h.var(_c(acc_ty, 0)) for _ in cols]
    step = 2 if wide else 1
    for g in range(0, 8, step):
        if wide:
            q, sc = h.cat(quants[g], quants[g + 1]), h.cat(scales[g], scales[g + 1])
            sub_v = None if sub is None else h.cat(sub, sub)
        else:
            q, sc, sub_v = quants[g], scales[g], sub
        for c, t in zip(cols, isum, strict=True):
            xv = h.load(c.pq, b.add(xo, i64(32 * g)), q.type)
            if wide:
                p = h.maddubs512(q, xv)
                p = p if sub_v is None else b.sub(p, h.maddubs512(sub_v, xv))
                b.store(h.madd_acc512(b.load(t), p, sc), t)
            else:
                p = h.maddubs(q, xv)
                p = p if sub_v is None else b.sub(p, h.maddubs(sub_v, xv))
                b.store(h.madd_acc(b.load(t), p, sc), t)
    return [b.load(t) for t in isum]


def _block_scaled(h, cols, isums, d, g, k):
    """Each column's integer block sum (``isums``, `_block_isums`'s) times ``d * dx`` into
    its accumulator: 16 lanes into `_Acc.w` as they come (no folding per block), or 8 into
    the alternating pair (k); ``g`` the byte offset of the block's ``dx`` (one per 256,
    stored per 32).  The 16 lanes take ``(isum * d) * dx``: ``dx`` broadcast from memory
    inside the fma, where ``d * dx`` first was a scalar multiply and a broadcast per column
    (one vector instruction more)."""
    if isums[0].type.count == 16:
        d16 = h.splat(d, 16)
        for c, t in zip(cols, isums, strict=True):
            dx16 = h.splat(h.load(c.pd, g, f32, 4), 16)
            scaled = h.b.fmul(h.b.sitofp(t, V16F), d16)
            w = c.acc.w
            h.b.store(h.call("llvm.fma.v16f32", V16F, [scaled, dx16, h.b.load(w)]), w)
        return
    for c, t in zip(cols, isums, strict=True):
        s = h.b.fmul(d, h.load(c.pd, g, f32, 4))
        _acc_fma(h, c.acc, h.tofloat(t), h.splat(s), k)


def _int8_qk(h, pr, cols, b, k, five):
    # x has one scale per 256 here (`IRType.x_scale`), so a block's eight sub-block dots sum
    # in integers, each times its 6-bit scale (vpmaddwd), converted to float once per block.
    o, d, dm, _, mnf, sc = _qk_block(h, pr, b, five)
    sc16 = h.b.zext(sc, _vt(i16, 8))
    quants = [v for _, v in _qk_quants(h, pr, o, five, False)]  # j = 0 .. 7 in order
    scales = [h.shuf(sc16, sc16, [j] * 16) for j in range(8)]
    isums = _block_isums(h, cols, h.b.mul(b, i64(256)), quants, scales)
    mnd = h.b.fmul(mnf, h.splat(_neg(h, dm)))
    g = h.b.mul(b, i64(32))  # byte offset of this block's 8 group floats
    _block_scaled(h, cols, isums, d, g, k)
    for c in cols:
        _corr_fma(h, c.acc, mnd, h.load(c.ps, g, V8F, 4))  # corr -= dmin m_j xs_j


def _int8_qk_octet(h, pr, cols, blks, oi, full, five):  # noqa: ARG001 - a step is one block
    # A Q4_K / Q5_K block repacked at load (`avx2.pack_octets`): its header (and Q5_K's 32
    # bytes of 5th bits) where the file has it, its eight sub-blocks' quants transposed as
    # a Q4 octet's (lane j sub-block j; Q5_K's 5th bits likewise), so that the octet's
    # integer dots (`_oct_cols`) serve it: d * sc_j and -dmin * m_j are its 8 scales and
    # mins, against x's scale (one per 256) and its sums per 32.
    o, d, dm, scf, mnf, _ = _qk_block(h, pr, blks[0], five)
    d8 = h.b.fmul(scf, h.splat(d))
    m8 = h.b.fmul(mnf, h.splat(_neg(h, dm)))
    qo = 48 if five else 16
    words = [h.load(pr, h.b.add(o, i64(qo + 32 * g)), V32I8) for g in range(4)]
    fifth = h.load(pr, h.b.add(o, i64(16)), V32I8) if five else None
    _oct_cols(h, cols, oi, words, d8, m8, True, fifth)


def _float_qk(h, pr, px, ps, acc, b, k, five):
    o, d, dm, scf, mnf, _ = _qk_block(h, pr, b, five)
    sv = h.b.fmul(scf, h.splat(d))  # d * sc_j
    xs8 = h.load(ps, h.b.mul(b, i64(32)), V8F, 4)
    _corr_fma(h, acc, h.b.fmul(mnf, h.splat(_neg(h, dm))), xs8)
    x0 = h.b.mul(b, i64(256))
    for j, vals in _qk_quants(h, pr, o, five, True):
        xb = h.b.add(x0, i64(32 * j))
        xv = [_xv(h, px, h.b.add(xb, i64(8 * k))) for k in range(4)]
        _acc_fma(h, acc, _dot4(h, [h.tofloat(v) for v in vals], xv), h.lane(sv, j), j)


def _decode_qk(h, pr, py, b, five):
    o, d, dm, scf, mnf, _ = _qk_block(h, pr, b, five)
    sv = h.b.fmul(scf, h.splat(d))
    mv = h.b.fmul(mnf, h.splat(_neg(h, dm)))
    y0 = h.b.mul(b, i64(256))
    for j, vals in _qk_quants(h, pr, o, five, True):
        s, m = h.lane(sv, j), h.lane(mv, j)
        for k, v in enumerate(vals):
            _store(h, py, h.b.add(y0, i64(32 * j + 8 * k)), h.fma(h.tofloat(v), s, m))


# ---------------------------------------------------------------------------------------------
# Q6_K (210 bytes): 128 bytes of low nibbles (ql), 64 of 2-bit pairs (qh), 16 int8 scales, f16
# d.  Group g = 4 hh + k (32 weights, hh = 0..1, k = 0..3): nibble k >> 1 of ql bytes
# 64 hh + 32 (k & 1) .., bits 2k..2k+1 of qh bytes 32 hh ..; scales 2g, 2g + 1 (16 weights
# each); weight = d * sc * (q - 32).


def _q6k_block(h, pr, b, wide):
    """Block ``b``: ``(o, d, scales)``, o its byte offset; the 16 scales as 16 x i16, or
    (``wide``) as 16 floats already times d."""
    o = h.b.mul(b, i64(210))
    d = h.f16(pr, h.b.add(o, i64(208)))
    raw = h.load(pr, h.b.add(o, i64(192)), V16I8)
    if not wide:
        return o, d, h.b.sext(raw, V16I16)
    sc = h.b.sitofp(h.b.sext(raw, _vt(i32, 16)), _vt(f32, 16))
    return o, d, h.b.fmul(sc, h.splat(d, 16))


def _q6k_quants(h, pr, o, wide):
    """Yield ``(g, quants of group g)`` (0..63, unsigned) for the 8 groups of 32 weights:
    32 x i8, or (``wide``) four 8 x i32 (an iterator: the IR is emitted as it is consumed)."""
    b = h.b
    if not wide:
        for hh in range(2):
            qh = h.load(pr, b.add(o, i64(128 + 32 * hh)), V32I8)
            for half in range(2):
                ql = h.load(pr, b.add(o, i64(64 * hh + 32 * half)), V32I8)
                for nib in range(2):
                    k = half + 2 * nib
                    low = b.and_(ql, _c(V32I8, 15)) if nib == 0 else b.lshr(ql, _c(V32I8, 4))
                    top = b.and_(b.shl(b.lshr(qh, _c(V32I8, 2 * k)), _c(V32I8, 4)), _c(V32I8, 48))
                    yield 4 * hh + k, b.or_(low, top)
        return
    for hh in range(2):
        qh = [_u8x8(h, pr, b.add(o, i64(128 + 32 * hh + 8 * k))) for k in range(4)]
        for half in range(2):
            ql = [_u8x8(h, pr, b.add(o, i64(64 * hh + 32 * half + 8 * k))) for k in range(4)]
            for nib in range(2):
                k = half + 2 * nib
                yield 4 * hh + k, _q6k_words(h, ql, qh, nib, k)


def _q6k_words(h, ql, qh, nib, k):  # the four 8 x i32 of `_q6k_quants`, one at a time
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    for lo, hi in zip(ql, qh, strict=True):
        low = h.b.and_(lo, m15) if nib == 0 else h.b.lshr(lo, s4)
        top = h.b.and_(h.b.lshr(hi, _c(V8I32, 2 * k)), _c(V8I32, 3))
        yield h.b.or_(low, h.b.shl(top, s4))


def _int8_q6_k(h, pr, cols, b, k):
    # x has one scale per 256 (`IRType.x_scale`): the block's dots sum in integers.
    o, d, sc16 = _q6k_block(h, pr, b, False)
    quants = dict(_q6k_quants(h, pr, o, False))  # yielded in the order 0, 2, 1, 3, 4, ...
    scales = [h.shuf(sc16, sc16, [2 * g] * 8 + [2 * g + 1] * 8) for g in range(8)]
    xo, g = h.b.mul(b, i64(256)), h.b.mul(b, i64(32))
    quants = [quants[j] for j in range(8)]
    # The 32 comes off once a block: -32 sc_j times x's sum over sc_j's 16 values
    # (`IRType.int8_sums16`), one vpmaddwd where a subtraction per group (a vpmaddubsw of
    # 32 and a vpsubw) was 16 instructions on AVX2.  The sums are integers either way.
    isums = _block_isums(h, cols, xo, quants, scales)
    neg = h.b.mul(sc16, _c(V16I16, -32))
    if not AVX512:
        isums = [
            h.madd_acc(t, h.load(c.ps, g, V16I16, 4), neg) for c, t in zip(cols, isums, strict=True)
        ]
    else:
        neg = h.cat(neg, _c(V16I16, 0))
        isums = [
            h.madd_acc512(t, h.cat(h.load(c.ps, g, V16I16, 4), _c(V16I16, 0)), neg)
            for c, t in zip(cols, isums, strict=True)
        ]
    _block_scaled(h, cols, isums, d, g, k)


def _int8_q6_k_octet(h, pr, cols, blks, oi, full):  # noqa: ARG001 - a step is one block
    # A Q6_K block repacked at load (`avx2.pack_octets`): its sub-blocks' low 4 bits as a
    # Q4 octet's quants (lane j sub-block j), their high 2 bits in two vectors (bits 2 s,
    # 2 s + 1 of byte 4 j + t: quant 4 G + t, G = s, then G = 4 + s), scales and d where the
    # file has them.  Quants reach 63, so the products sum in int16 two vectors at a time,
    # each pair widened by vpmaddwd against its 16 weights' scale (sc_2j for quants 0-15,
    # sc_2j+1 for 16-31); the 32 comes off against x's sums per 16, as `_int8_q6_k` does.
    b = h.b
    o = b.mul(blks[0], i64(210))
    d = h.f16(pr, b.add(o, i64(208)))
    sc16 = b.sext(h.load(pr, b.add(o, i64(192)), V16I8), V16I16)
    sc_lo = h.shuf(sc16, sc16, [2 * (i // 2) for i in range(16)])  # lane j: sc_2j twice
    sc_hi = h.shuf(sc16, sc16, [2 * (i // 2) + 1 for i in range(16)])
    neg = b.mul(sc16, _c(V16I16, -32))
    words = [h.load(pr, b.add(o, i64(32 * g)), V32I8) for g in range(4)]
    highs = [h.load(pr, b.add(o, i64(128 + 32 * i)), V32I8) for i in range(2)]
    qs = []
    for g in range(8):
        low = b.and_(words[g], _c(V32I8, 15)) if g < 4 else b.lshr(words[g - 4], _c(V32I8, 4))
        hv, s2 = highs[g // 4], 2 * (g % 4)  # bits s2, s2 + 1 to bits 4, 5
        top = b.shl(hv, _c(V32I8, 4 - s2)) if s2 <= 4 else b.lshr(hv, _c(V32I8, s2 - 4))
        qs.append(b.or_(low, b.and_(top, _c(V32I8, 48))))
    d8 = h.splat(d)
    for c in cols:
        isum = None
        for pair in range(4):
            p = b.add(
                h.maddubs(qs[2 * pair], _oct_x(h, c, oi, 2 * pair)),
                h.maddubs(qs[2 * pair + 1], _oct_x(h, c, oi, 2 * pair + 1)),
            )
            sc = sc_lo if pair < 2 else sc_hi
            isum = h.maddwd(p, sc) if isum is None else h.madd_acc(isum, p, sc)
        isum = h.madd_acc(isum, h.load(c.ps, b.mul(oi, i64(32)), V16I16, 4), neg)
        _oct_acc(h, c, isum, d8, oi)


def _float_q6_k(h, pr, px, ps, acc, b, k):  # ps: sums of x per 16
    o, d, sc = _q6k_block(h, pr, b, True)  # d * sc_j, j = 0..15
    xs16 = h.load(ps, h.b.mul(b, i64(64)), _vt(f32, 16), 4)
    # corr -= 32 * sum_j d sc_j xs_j
    p = h.b.fmul(sc, xs16)
    p8 = h.b.fadd(h.shuf(p, p, range(8)), h.shuf(p, p, range(8, 16)))
    _corr_fma(h, acc, p8, _c(V8F, -32.0))
    x0 = h.b.mul(b, i64(256))
    for g, q in _q6k_quants(h, pr, o, True):
        vals = [h.tofloat(v) for v in q]
        xb = h.b.add(x0, i64(32 * g))
        xv = [_xv(h, px, h.b.add(xb, i64(8 * k))) for k in range(4)]
        t0 = h.fma(vals[1], xv[1], h.b.fmul(vals[0], xv[0]))
        t1 = h.fma(vals[3], xv[3], h.b.fmul(vals[2], xv[2]))
        _acc_fma(h, acc, t0, h.lane(sc, 2 * g), 0)
        _acc_fma(h, acc, t1, h.lane(sc, 2 * g + 1), 1)


def _decode_q6_k(h, pr, py, b):
    o, d, sc = _q6k_block(h, pr, b, True)
    y0 = h.b.mul(b, i64(256))
    c32 = _c(V8I32, 32)
    for g, q in _q6k_quants(h, pr, o, True):
        for k, v in enumerate(q):
            v = h.b.fmul(h.tofloat(h.b.sub(v, c32)), h.lane(sc, 2 * g + k // 2))
            _store(h, py, h.b.add(y0, i64(32 * g + 8 * k)), v)


# ---------------------------------------------------------------------------------------------
# F16 / BF16: no blocks; the loops take 32 values at a time.


def _float8(h, pr, i, bf16):  # 8 F16 / BF16 values starting at element index i -> 8 x float
    off = h.b.mul(i, i64(2))
    if not bf16:
        return h.b.fpext(h.load(pr, off, _vt(f16, 8)), V8F)
    w = h.b.zext(h.load(pr, off, _vt(i16, 8)), V8I32)
    return h.b.bitcast(h.b.shl(w, _c(V8I32, 16)), V8F)


def _float_half(h, pr, px, ps, acc, b, k, bf16):  # b: a run of 32 values
    x0 = h.b.mul(b, i64(32))
    idx = [h.b.add(x0, i64(8 * j)) for j in range(4)]
    vals = [_float8(h, pr, i, bf16) for i in idx]
    xv = [_xv(h, px, i) for i in idx]
    p = acc.v[k & 1]
    h.b.store(h.b.fadd(h.b.load(p), _dot4(h, vals, xv)), p)


def _decode_half(h, pr, py, b, bf16):
    y0 = h.b.mul(b, i64(32))
    for j in range(4):
        i = h.b.add(y0, i64(8 * j))
        _store(h, py, i, _float8(h, pr, i, bf16))


# ---------------------------------------------------------------------------------------------
# The table and the three intrinsics.


@dataclass(frozen=True)
class IRType:
    """One type's block bodies.  ``block``: weights per loop step (``nb`` counts these);
    ``x_group``: `dot_float` takes the sums of ``x`` per this many values (0: none);
    ``int8_body`` is None where the type has no int8 dot; ``x_scale``: the int8 ``x`` shares
    one scale per this many values (32, as Q8_0; 256 for the K-quants, as llama.cpp's Q8_K:
    their sub-block dots then sum in integers), stored once per 32 all the same;
    ``int8_sums16``: the int8 bodies take, as ``xs``, the sums of ``xq`` per 16 as int16
    (in a float32 array's bytes: `avx2.sums16`) instead of ``dx * sum(xq)`` per 32 (Q6_K:
    its offset 32 comes off once a block against them, as llama.cpp's Q8_K ``bsums``
    do); ``pair_bytes``: a block's size, for `_pairs` to gather the paired
    bodies' headers, ``pair_min`` whether they hold a min after the scale (Q4_1);
    ``int8_step``: a transposed body of ``step_blocks`` blocks a step (`_steps`; 8, Q8_0
    4), taken instead of ``int8_body`` where there is no paired one, with ``x`` in its
    form (`avx2.step_inputs`: the integer offset ``step_offset`` taken off in the dots,
    Q4_0's 8); ``step_pair``: two blocks of an octet's tail, transposed by 16 bytes;
    ``block_bytes``: a block's size where the one-block and the transposed int8 loops
    prefetch ahead (`PREFETCH_AHEAD`), else 0."""

    block: int
    x_group: int
    float_body: Callable | None  # (None: `PACKED_TYPES`)
    decode_body: Callable | None
    int8_body: Callable | None = None
    x_scale: int = 32
    int8_pair: Callable | None = None
    x_offset: int = 0
    int8_sums16: bool = False
    pair_bytes: int = 0
    pair_min: bool = False
    int8_step: Callable | None = None
    step_offset: int = 0
    step_blocks: int = 8
    step_pair: Callable | None = None
    block_bytes: int = 0

    @property
    def dx_step(self) -> int:
        """Bytes between the int8 scales of consecutive 32-blocks in ``dx`` as the int8
        bodies take it (`_Col.dstep`): 4, or 32 where the paired bodies spread them."""
        return 32 if self.int8_pair is not None else 4

    @property
    def wide_acc(self) -> bool:
        """Whether the int8 bodies sum into 16-lane accumulators (`_Acc.w`): the paired
        ones, and the K-quants' with AVX-512 (`_block_isums` on 512-bit vectors)."""
        return self.int8_pair is not None or (
            AVX512 and self.x_scale == 256 and self.int8_body is not None
        )


def _ir(
    block,
    x_group,
    float_body,
    decode_body,
    int8_body=None,
    pair=None,
    x_offset=0,
    sums16=False,
    pair_bytes=0,
    step=None,
    step_blocks=8,
    step_pair=None,
    block_bytes=0,
    **variant,
) -> IRType:
    """An `IRType` with the layout ``variant`` (keyword arguments of the bodies) bound."""
    bind = functools.partial
    return IRType(
        block,
        x_group,
        bind(float_body, **variant),
        bind(decode_body, **variant),
        None if int8_body is None else bind(int8_body, **variant),
        x_scale=256 if block == 256 else 32,
        int8_pair=None if pair is None else bind(pair, **variant),
        x_offset=x_offset if pair is not None else 0,
        int8_sums16=sums16,
        pair_bytes=pair_bytes,
        pair_min=variant.get("has_min", False),
        int8_step=None if step is None or pair is not None else bind(step, **variant),
        # (the transposed bodies take Q4_0's 8 off in the dots, and Q8_0's 128 with DPBUSD)
        step_offset=x_offset
        if step is not None and pair is None and (x_offset == 8 or DPBUSD)
        else 0,
        step_blocks=step_blocks,
        step_pair=None if step_pair is None or pair is not None else bind(step_pair, **variant),
        block_bytes=block_bytes,
    )


# Two blocks of 32 per step on 512-bit vectors: with AVX-512BW (Q8_0's unsigned offset
# needs vpdpbusd's unsaturated sums: AVX-512 VNNI).
_Q4_PAIR = _int8_q4_pair if AVX512 else None
_Q8_PAIR = _int8_q8_0_pair if VNNI512 else None


# The types of the IR engine, by GGMLType value.
TYPES: dict[int, IRType] = {
    GGMLType.Q4_0: _ir(32, 32, _float_q4, _decode_q4, _int8_q4, _Q4_PAIR, 8, pair_bytes=18,
                       step=_int8_q4_octet, step_pair=_int8_q4_pair16, block_bytes=18,
                       has_min=False),
    GGMLType.Q4_1: _ir(32, 32, _float_q4, _decode_q4, _int8_q4, _Q4_PAIR, pair_bytes=20,
                       step=_int8_q4_octet, step_pair=_int8_q4_pair16, block_bytes=20,
                       has_min=True),
    GGMLType.Q8_0: _ir(32, 32, _float_q8_0, _decode_q8_0, _int8_q8_0, _Q8_PAIR, 128,
                       pair_bytes=34, step=_int8_q8_0_quad, step_blocks=4, block_bytes=34),
    GGMLType.Q4_K: _ir(256, 32, _float_qk, _decode_qk, _int8_qk, block_bytes=144, five=False),
    GGMLType.Q5_K: _ir(256, 32, _float_qk, _decode_qk, _int8_qk, block_bytes=176, five=True),
    GGMLType.Q6_K: _ir(256, 16, _float_q6_k, _decode_q6_k, _int8_q6_k, sums16=True,
                       block_bytes=210),
    GGMLType.F16: _ir(32, 0, _float_half, _decode_half, bf16=False),
    GGMLType.BF16: _ir(32, 0, _float_half, _decode_half, bf16=True),
}  # fmt: skip


# Q4_0 and Q4_1 rows with each full octet of blocks stored as the transposed bodies read it
# (`avx2.pack_octets`), by the code ``OCTETS + `` their GGMLType value: int8 bodies only (the
# float dot and the decoder read the file's layout).  Only where the transposed bodies run
# (no AVX-512).  On a 2-core Zen 3 (SmolLM2's Q4_1 shapes, one thread), the products took
# 0.72-0.83x the time for 4 rows of ``x`` and 0.54-0.71x for one.  The K-quants' rows
# likewise, one block a step (`_int8_qk_octet`, `_int8_q6_k_octet`; 3072 columns, 2
# threads: Q4_K 0.69-0.75x for 4 rows, 0.83-0.88x for one; Q5_K 0.73-0.79x and
# 0.85-0.96x; Q6_K 0.74-0.75x and 0.72-0.96x).
OCTETS = 1024
PACKED_TYPES: dict[int, IRType] = {
    OCTETS + q: dataclasses.replace(
        TYPES[q],
        float_body=None,
        decode_body=None,
        int8_step=functools.partial(_int8_q4_octet, has_min=q == GGMLType.Q4_1, packed=True),
    )
    for q in (GGMLType.Q4_0, GGMLType.Q4_1)
    if TYPES[q].int8_step is not None
}
if not AVX512:  # the K-quants, one block (8 sub-blocks of 32) a step
    for _q, _step in (
        (GGMLType.Q4_K, functools.partial(_int8_qk_octet, five=False)),
        (GGMLType.Q5_K, functools.partial(_int8_qk_octet, five=True)),
        (GGMLType.Q6_K, _int8_q6_k_octet),
    ):
        PACKED_TYPES[OCTETS + _q] = dataclasses.replace(
            TYPES[_q], float_body=None, decode_body=None, int8_step=_step, step_blocks=1
        )


def spec(code: int) -> IRType:
    """The `IRType` of a type code (a GGMLType value, or a `PACKED_TYPES` code)."""
    return TYPES[code] if code in TYPES else PACKED_TYPES[code]


def _type(code, task):
    """The `IRType` of a literal type code that has ``task``; a typing error otherwise."""
    if not isinstance(code, types.IntegerLiteral):
        raise errors.TypingError("the type code must be a compile-time constant")
    spec = TYPES.get(code.literal_value) or PACKED_TYPES.get(code.literal_value)
    if spec is None or getattr(spec, task) is None:
        raise errors.TypingError(f"no {task} for type code {code.literal_value}")
    return spec


class _Col(NamedTuple):
    """One int8 activation vector of a product: pointers to its quants, scales and sums
    (`dot_int8`'s ``xq``, ``dx``, ``xs``), and its accumulators; ``dstep``: bytes between
    the scales of consecutive 32-blocks (4; 32 where the paired bodies spread them)."""

    pq: ir.Value
    pd: ir.Value
    ps: ir.Value
    acc: _Acc
    dstep: int


def _int8_loop(h, spec, pr, cols, nb):
    """The int8 dot's loop over a row's ``nb`` blocks for the columns ``cols``: two blocks a
    step where the type has a paired body, several where it has a transposed one
    (`_steps`), else one (unrolled by two)."""
    if spec.int8_pair is not None:
        _pairs(h, spec, pr, cols, nb)
    elif spec.int8_step is not None:
        _steps(h, spec, pr, cols, nb)
    else:
        _blocks(h, nb, lambda blk, k: _prefetched(h, spec, pr, cols, blk, k))


# How far ahead of the block being multiplied the int8 loops prefetch their row (the
# K-quants' one-block loops and the transposed steps of Q4_0 / Q4_1 / Q8_0; past the row's
# end, the next row's start).  The hardware prefetcher alone left
# one thread streaming a Phi-3-mini matrix at 7.5-7.8 GB/s where it can read 14 (AVX2
# AMD EPYC VM, Q4_K / Q5_K / Q6_K matvecs over all 32 layers, A/B in one process): with
# 1536 bytes ahead 0.81-0.82x the time on 1 thread and 0.83-0.85x on 2; 768: 0.89-0.90x;
# 3072: 0.83x; 6144: 0.81-0.87x.
PREFETCH_AHEAD = 3072


def _prefetched(h, spec, pr, cols, blk, k):
    """``spec.int8_body`` of block ``blk``, after `_prefetch` of its bytes (types with
    `IRType.block_bytes`)."""
    if spec.block_bytes:
        _prefetch(h, pr, blk, spec.block_bytes, spec.block_bytes)
    spec.int8_body(h, pr, cols, blk, k)


def _prefetch(h, pr, blk, size, n):
    """Prefetch the cache lines of ``n`` bytes `PREFETCH_AHEAD` bytes past block ``blk`` of
    ``size`` bytes of the row at ``pr`` (past the row's end: the next row's start; a
    prefetch never faults, so past the matrix's end it costs nothing)."""
    base = h.b.add(h.b.mul(blk, i64(size)), i64(PREFETCH_AHEAD))
    for line in range(-(-n // 64)):  # read, keep in all levels, data
        h.call(_PF, ir.VoidType(), [h.at(pr, h.b.add(base, i64(64 * line))), *_PF_ARGS])


_PF, _PF_ARGS = "llvm.prefetch.p0i8", (i32(0), i32(3), i32(1))


@intrinsic(prefer_literal=True)
def dot_int8(typingctx, code, w, r, xq, dx, xs, nb):
    """Row ``r`` of ``w`` (u8[:, :]) times ``x_hat``: ``xq`` i8[:], ``dx`` f32[:] (one scale
    per 32), ``xs`` f32[:] (``dx * sum(xq)`` per 32), over ``nb`` blocks -> float32.  Where
    the type has a paired body, ``dx`` and ``xs`` come in its form (`_pair_acc`;
    `avx2.pair_inputs` makes it); where a transposed one, ``xq``, ``dx`` and ``xs`` in
    theirs (`_steps`; `avx2.step_inputs`)."""
    spec = _type(code, "int8_body")
    sig = types.float32(code, w, types.intp, xq, dx, xs, nb)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        pr = h.row(a[1], args[1], args[2])
        pq, pd, ps = h.data(a[3], args[3]), h.data(a[4], args[4]), h.data(a[5], args[5])
        cols = [_Col(pq, pd, ps, _Acc(h, spec.wide_acc), spec.dx_step)]
        _int8_loop(h, spec, pr, cols, args[6])
        return cols[0].acc.total(h)

    return sig, codegen


def _row3(h, a, args, r):
    """Pointer to row ``r`` of the rows of ``w1; w2; w3`` (``a``, ``args``: their types and
    values) stacked: the matrices' rows are never copied together."""
    b = h.b
    n1 = b.extract_value(h.ctx.make_array(a[0])(h.ctx, b, args[0]).shape, 0)
    n2 = b.add(n1, b.extract_value(h.ctx.make_array(a[1])(h.ctx, b, args[1]).shape, 0))
    p1, p2, p3 = (h.row(a[i], args[i], b.sub(r, o)) for i, o in enumerate((i64(0), n1, n2)))
    return b.select(b.icmp_signed("<", r, n1), p1, b.select(b.icmp_signed("<", r, n2), p2, p3))


@intrinsic(prefer_literal=True)
def gemm_int8(typingctx, code, w1, w2, w3, r, xq, dx, xs, c, nc, out, nb):
    """Row ``r`` of ``[w1; w2; w3]`` (u8[:, :] each, rows stacked) times the ``nc`` int8
    activation rows ``c .. c + nc - 1`` of ``xq`` (i8[:, :]; ``dx``, ``xs`` f32[:, :] as in
    `dot_int8`), each weight block read and unpacked once for all of them, into
    ``out[c + i, r]`` (f32[:, :]).  ``nc`` is a compile-time constant (the register tile);
    each sum runs exactly as `dot_int8`'s, so a product equals the matvec's bit for bit."""
    spec = _type(code, "int8_body")
    if not isinstance(nc, types.IntegerLiteral):
        raise errors.TypingError("the column count must be a compile-time constant")
    n = nc.literal_value
    sig = types.none(code, w1, w2, w3, types.intp, xq, dx, xs, types.intp, nc, out, nb)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        pr = _row3(h, a[1:4], args[1:4], args[4])
        cs = [builder.add(args[8], i64(i)) for i in range(n)]
        cols = [  # xq, dx, xs rows
            _Col(
                *(h.row(a[i], args[i], ci) for i in (5, 6, 7)), _Acc(h, spec.wide_acc), spec.dx_step
            )
            for ci in cs
        ]
        _int8_loop(h, spec, pr, cols, args[11])
        r4 = builder.mul(args[4], i64(4))
        for ci, col in zip(cs, cols, strict=True):
            dst = h.at(h.row(a[10], args[10], ci), r4)
            builder.store(col.acc.total(h), builder.bitcast(dst, f32.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Eight rows interleaved (Q4_0, Q4_1; `avx2.pack_rows8`): lane r of every vector belongs to
# row r of a group of 8, so that one block's integer dots of the 8 rows come out of 8
# products per column with no sum across lanes, ``x``'s 4 bytes broadcast to the 8 rows,
# and its float work (conversion, scale, fma) once per block and column for all 8 rows.  A
# row's end costs nothing either (the per-row sums across lanes and an octet's tail blocks
# are what the transposed bodies pay per row): on the narrow rows of a small model (576
# columns: 18 blocks) that was 40% of a row's time at 4 columns.  ``x`` is `quantize_int8`'s
# own (natural order, a scale and ``dx * sum(xq)`` per 32).


def _rows8_block(h, pg, cols, b, code):
    """Block ``b`` of the group at ``pg`` (`avx2.pack_rows8`: per block the 8 rows' f16
    scales, Q4_1's 8 mins, then 4 x 32 bytes of quants, vector g lane r row r's quant
    bytes 4 g .. 4 g + 3) times each column, into its accumulator (8 lanes, the rows)."""
    bb = h.b
    has_min, size = code == GGMLType.Q4_1, 8 * ROWS8_TYPES[code]
    o = bb.mul(b, i64(size))
    _prefetch(h, pg, b, size, size)
    d8 = bb.fpext(h.load(pg, o, _vt(f16, 8)), V8F)
    m8 = bb.fpext(h.load(pg, bb.add(o, i64(16)), _vt(f16, 8)), V8F) if has_min else None
    q0 = bb.add(o, i64(32 if has_min else 16))
    qv = [h.load(pg, bb.add(q0, i64(32 * g)), V32I8) for g in range(4)]
    lo = [bb.and_(q, _c(V32I8, 15)) for q in qv]  # weights 4 g .. 4 g + 3 of each row
    hi = [bb.lshr(q, _c(V32I8, 4)) for q in qv]  # weights 16 + 4 g ..
    xo, so = bb.mul(b, i64(32)), bb.mul(b, i64(4))
    for c in cols:
        xs = [h.splat(h.load(c.pq, bb.add(xo, i64(4 * k)), i32), 8) for k in range(8)]
        if DPBUSD:  # two chains of four
            chains = [_c(V8I32, 0), _c(V8I32, 0)]
            for g in range(4):
                chains[0] = _dpbusd(h, chains[0], lo[g], xs[g])
                chains[1] = _dpbusd(h, chains[1], hi[g], xs[4 + g])
            isum = bb.add(chains[0], chains[1])
        else:  # pair sums of at most 2 * 15 * 127, eight of them fit int16
            p = None
            for g in range(4):
                for q, x in ((lo[g], xs[g]), (hi[g], xs[4 + g])):
                    t = h.maddubs(q, bb.bitcast(x, V32I8))
                    p = t if p is None else bb.add(p, t)
            isum = h.maddwd(p, _ONES16)
        dx, xsum = h.load(c.pd, so, f32, 4), h.load(c.ps, so, f32, 4)
        acc = c.acc.v[0]
        y = h.fma(h.tofloat(isum), bb.fmul(d8, h.splat(dx)), bb.load(acc))
        if has_min:
            y = h.fma(m8, h.splat(xsum), y)
        else:  # Q4_0's q - 8: -8 d times dx * sum(xq)
            y = h.fma(bb.fmul(d8, _c(V8F, -8.0)), h.splat(xsum), y)
        bb.store(y, acc)


@intrinsic(prefer_literal=True)
def gemm_rows8(typingctx, code, w1, w2, w3, g, xq, dx, xs, c, nc, out, nb):
    """Rows ``8 g .. 8 g + 7`` of ``[w1; w2; w3]`` (u8[:, :] each in `avx2.pack_rows8`'s
    layout, rows a multiple of 8, stacked) times the ``nc`` int8 activation rows ``c .. c +
    nc - 1`` of ``xq`` (i8[:, :]; ``dx``, ``xs`` f32[:, :]: `quantize_int8`'s scales and
    ``dx * sum(xq)`` per 32), into ``out[c + i, 8 g .. 8 g + 7]`` (f32[:, :]); ``code`` the
    GGMLType value (Q4_0 or Q4_1), ``nc`` a compile-time constant.  Each column's sums run
    alone, so a row's result is the same for any ``nc`` and ``c``, bit for bit."""
    if not isinstance(code, types.IntegerLiteral) or code.literal_value not in ROWS8_TYPES:
        raise errors.TypingError("gemm_rows8 takes the literal code of Q4_0 or Q4_1")
    if not isinstance(nc, types.IntegerLiteral):
        raise errors.TypingError("the column count must be a compile-time constant")
    kind, n = code.literal_value, nc.literal_value
    sig = types.none(code, w1, w2, w3, types.intp, xq, dx, xs, types.intp, nc, out, nb)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        pg = _row3(h, a[1:4], args[1:4], builder.mul(args[4], i64(8)))
        cs = [builder.add(args[8], i64(i)) for i in range(n)]
        cols = [_Col(*(h.row(a[i], args[i], ci) for i in (5, 6, 7)), _Acc(h), 4) for ci in cs]
        _blocks(h, args[11], lambda blk, k: _rows8_block(h, pg, cols, blk, kind))
        g32 = builder.mul(args[4], i64(32))
        for ci, col in zip(cs, cols, strict=True):
            dst = h.at(h.row(a[10], args[10], ci), g32)
            builder.store(
                builder.load(col.acc.v[0]), builder.bitcast(dst, V8F.as_pointer()), align=4
            )
        return context.get_dummy_value()

    return sig, codegen


# The types `gemm_rows8` takes, by GGMLType value: their block's bytes.
ROWS8_TYPES = {int(GGMLType.Q4_0): 18, int(GGMLType.Q4_1): 20}


@intrinsic(prefer_literal=True)
def dot_float(typingctx, code, w, r, x, xs, nb):
    """Row ``r`` of ``w`` (u8[:, :]) times ``x`` (f32[:]), ``xs`` the sums of ``x`` per
    `IRType.x_group`, over ``nb`` blocks -> float32."""
    body = _type(code, "float_body").float_body
    sig = types.float32(code, w, types.intp, x, xs, nb)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        pr = h.row(a[1], args[1], args[2])
        px, ps = h.data(a[3], args[3]), h.data(a[4], args[4])
        acc = _Acc(h)
        _blocks(h, args[5], lambda blk, k: body(h, pr, px, ps, acc, blk, k))
        return acc.total(h)

    return sig, codegen


@intrinsic(prefer_literal=True)
def decode_row(typingctx, code, w, r, y, i, nb):
    """Row ``r`` of ``w`` (u8[:, :], ``nb`` blocks) as float32 into row ``i`` of ``y``."""
    body = _type(code, "decode_body").decode_body
    sig = types.none(code, w, types.intp, y, types.intp, nb)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        pr, py = h.row(a[1], args[1], args[2]), h.row(a[3], args[3], args[4])
        with cgutils.for_range(builder, args[5]) as loop:
            body(h, pr, py, loop.index)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def abs_max(typingctx, x, i0, n):
    """The largest ``|x[i]|`` for i in ``i0 .. i0 + n - 1`` (f32[:], n a multiple of 16),
    on 16-lane vectors (a maximum is exact in any order: the scalar loop's result)."""
    sig = types.float32(x, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        px = h.at(h.data(signature.args[0], args[0]), builder.mul(args[1], i64(4)))
        best = h.var(_c(V16F, 0.0))
        with cgutils.for_range(builder, builder.sdiv(args[2], i64(16))) as loop:
            v = h.load(px, builder.mul(loop.index, i64(64)), V16F, 4)
            a = h.call("llvm.fabs.v16f32", V16F, [v])
            builder.store(h.call("llvm.maxnum.v16f32", V16F, [a, builder.load(best)]), best)
        return h.call("llvm.vector.reduce.fmax.v16f32", f32, [builder.load(best)])

    return sig, codegen


@intrinsic
def round32(typingctx, x, i0, inv, xq):
    """``xq[i] = rint(x[i] * inv)`` (int8) for the 32 values from ``i0``, and their sum
    (int32), on 16-lane vectors: the scalar loop's arithmetic, value for value."""
    sig = types.int32(x, types.intp, types.float32, xq)

    def codegen(context, builder, signature, args):
        h = _B(context, builder)
        a = signature.args
        px = h.at(h.data(a[0], args[0]), builder.mul(args[1], i64(4)))
        pq = h.at(h.data(a[3], args[3]), args[1])
        inv = h.splat(args[2], 16)
        total = _c(V16I32, 0)
        for k in range(2):
            v = builder.fmul(h.load(px, i64(64 * k), V16F, 4), inv)
            q = builder.fptosi(h.call("llvm.rint.v16f32", V16F, [v]), V16I32)
            builder.store(
                builder.trunc(q, _vt(i8, 16)),
                builder.bitcast(h.at(pq, i64(16 * k)), _vt(i8, 16).as_pointer()),
            )
            total = builder.add(total, q)
        return h.call("llvm.vector.reduce.add.v16i32", i32, [total])

    return sig, codegen
