"""LLVM IR for the AVX2 kernels of `avx2`: one numba ``@intrinsic`` per type and task.

``_dot_*`` (int8 activations), ``_fdot_*`` (float activations) compute one row's dot product
as an IR loop over its blocks; ``_deq_*`` decode one row to float32.  Built with llvmlite's
IR builder: explicit 8-wide vectors, x86 ``pmaddubsw`` / ``pmaddwd`` intrinsics for the int8
products, two alternating accumulators.  Block layouts are in `phimlx.gguf.quants`; the drivers
that call these (and what they compute) are in `avx2`.
"""

from __future__ import annotations

from llvmlite import binding as _llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_feat = _llvm.get_host_cpu_features()
AVAILABLE = all(_feat.get(k, False) for k in ("avx2", "fma", "f16c"))

i1, i8, i16, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f16, f32 = ir.HalfType(), ir.FloatType()


def _vt(t, n):
    return ir.VectorType(t, n)


V16I8, V32I8, V8I8 = _vt(i8, 16), _vt(i8, 32), _vt(i8, 8)
V16I16, V8I32, V8F = _vt(i16, 16), _vt(i32, 8), _vt(f32, 8)


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


class _Acc:
    """A row's accumulators: two float vectors (alternated so that consecutive fma's do not
    wait on each other), a float vector and a scalar for zero-point / min corrections."""

    def __init__(self, h):
        self.v = [h.var(_c(V8F, 0.0)), h.var(_c(V8F, 0.0))]
        self.corr = h.var(_c(V8F, 0.0))
        self.s = h.var(ir.Constant(f32, 0.0))

    def total(self, h):
        b = h.b
        tot = b.fadd(b.fadd(b.load(self.v[0]), b.load(self.v[1])), b.load(self.corr))
        return b.fadd(h.hsum(tot), b.load(self.s))


def _blocks(h, n, body):
    """``body(b, k)`` for b in 0..n-1, unrolled by two: k (0 or 1) picks the accumulator."""
    b = h.b
    with cgutils.for_range(b, b.sdiv(n, i64(2))) as loop:
        i = b.mul(loop.index, i64(2))
        body(i, 0)
        body(b.add(i, i64(1)), 1)
    with b.if_then(b.icmp_signed("!=", b.srem(n, i64(2)), i64(0))):
        body(b.sub(n, i64(1)), 0)


def _row_intrinsic(body):
    """Wrap ``body(h, p_row, p_xq, p_dx, p_xs, acc, blk, k)`` run per block into an
    intrinsic ``(w u8[:, :], r intp, xq i8[:], dx f32[:], xs f32[:], nb intp) -> float32`` for
    row ``r``."""

    @intrinsic
    def dot(typingctx, w, r, xq, dx, xs, nb):
        sig = types.float32(w, types.intp, xq, dx, xs, nb)

        def codegen(context, builder, signature, args):
            h = _B(context, builder)
            a = signature.args
            pr = h.row(a[0], args[0], args[1])
            pq, pd, ps = h.data(a[2], args[2]), h.data(a[3], args[3]), h.data(a[4], args[4])
            n = args[5]
            acc = _Acc(h)
            _blocks(h, n, lambda blk, k: body(h, pr, pq, pd, ps, acc, blk, k))
            return acc.total(h)

        return sig, codegen

    return dot


def _acc_fma(h, acc, v, s, k):  # accumulator k += v * s
    p = acc.v[k & 1]
    h.b.store(h.fma(v, s, h.b.load(p)), p)


def _corr_scalar(h, acc, s):
    h.b.store(h.b.fadd(h.b.load(acc.s), s), acc.s)


def _corr_fma(h, acc, a, c):  # correction vector += a * c
    h.b.store(h.fma(a, c, h.b.load(acc.corr)), acc.corr)


def _nibbles32(h, q16):  # 16 bytes -> 32 values: low nibbles (weights 0..15), then high
    lo = h.b.and_(q16, _c(V16I8, 15))
    hi = h.b.lshr(q16, _c(V16I8, 4))
    return h.shuf(lo, hi, range(32))


def _body_q4_0(h, pr, pq, pd, ps, acc, b, k):
    o = h.b.mul(b, i64(18))
    d = h.f16(pr, o)
    q = _nibbles32(h, h.load(pr, h.b.add(o, i64(2)), V16I8))
    xv = h.load(pq, h.b.mul(b, i64(32)), V32I8)
    p = h.b.sub(h.maddubs(q, xv), h.maddubs(_c(V32I8, 8), xv))  # sum (q - 8) x, pairs
    s = h.b.fmul(d, h.load(pd, h.b.mul(b, i64(4)), f32, 4))
    _acc_fma(h, acc, h.tofloat(h.maddwd(p, _ONES16)), h.splat(s), k)


def _body_q4_1(h, pr, pq, pd, ps, acc, b, k):
    o = h.b.mul(b, i64(20))
    d, m = h.f16(pr, o), h.f16(pr, h.b.add(o, i64(2)))
    q = _nibbles32(h, h.load(pr, h.b.add(o, i64(4)), V16I8))
    xv = h.load(pq, h.b.mul(b, i64(32)), V32I8)
    s = h.b.fmul(d, h.load(pd, h.b.mul(b, i64(4)), f32, 4))
    _acc_fma(h, acc, h.tofloat(h.maddwd(h.maddubs(q, xv), _ONES16)), h.splat(s), k)
    _corr_scalar(h, acc, h.b.fmul(m, h.load(ps, h.b.mul(b, i64(4)), f32, 4)))


def _body_q8_0(h, pr, pq, pd, ps, acc, b, k):
    o = h.b.mul(b, i64(34))
    d = h.f16(pr, o)
    q = h.load(pr, h.b.add(o, i64(2)), V32I8)
    xv = h.load(pq, h.b.mul(b, i64(32)), V32I8)
    # |q| (u8) x sign(q)*x (i8): the signed product through vpmaddubsw, as llama.cpp does.
    aq = h.call("llvm.abs.v32i8", V32I8, [q, ir.Constant(i1, 0)])
    sx = h.call("llvm.x86.avx2.psign.b", V32I8, [xv, q])
    s = h.b.fmul(d, h.load(pd, h.b.mul(b, i64(4)), f32, 4))
    _acc_fma(h, acc, h.tofloat(h.maddwd(h.maddubs(aq, sx), _ONES16)), h.splat(s), k)


def _k_scales_mins(h, pr, o):
    """Q4_K/Q5_K: the 8 six-bit scales and mins of the block at ``o`` as float vectors."""
    raw = h.load(pr, h.b.add(o, i64(4)), V16I8)  # 12 scale bytes (+4 of the block's data)
    z8 = ir.Constant(V8I8, ir.Undefined)
    s1 = h.shuf(raw, raw, [0, 1, 2, 3, 8, 9, 10, 11])
    s2 = h.shuf(raw, raw, [0, 1, 2, 3, 0, 1, 2, 3])
    m1 = h.shuf(raw, raw, [4, 5, 6, 7, 8, 9, 10, 11])
    m2 = h.shuf(raw, raw, [4, 5, 6, 7, 4, 5, 6, 7])
    del z8
    lo_mask = _c(V8I8, [63, 63, 63, 63, 15, 15, 15, 15])
    hi_mask = _c(V8I8, [0, 0, 0, 0, 48, 48, 48, 48])
    b = h.b
    hi_s = b.and_(b.shl(b.lshr(s2, _c(V8I8, 6)), _c(V8I8, 4)), hi_mask)
    sc = b.or_(b.and_(s1, lo_mask), hi_s)
    hi_m = b.and_(b.shl(b.lshr(m2, _c(V8I8, 6)), _c(V8I8, 4)), hi_mask)
    mn = b.or_(b.and_(b.lshr(m1, _c(V8I8, [0, 0, 0, 0, 4, 4, 4, 4])), lo_mask), hi_m)
    return b.uitofp(sc, V8F), b.uitofp(mn, V8F)


def _body_qk(h, pr, pq, pd, ps, acc, b, k, five):
    bs = 176 if five else 144
    o = h.b.mul(b, i64(bs))
    d, dm = h.f16(pr, o), h.f16(pr, h.b.add(o, i64(2)))
    scf, mnf = _k_scales_mins(h, pr, o)
    g = h.b.mul(b, i64(32))  # byte offset of this block's 8 group floats
    dx8 = h.load(pd, g, V8F, 4)
    xs8 = h.load(ps, g, V8F, 4)
    sv = h.b.fmul(h.b.fmul(scf, h.splat(d)), dx8)  # d * sc_j * dx_j
    # corr -= dmin * m_j * xs_j
    _corr_fma(h, acc, h.b.fmul(mnf, h.splat(h.b.fsub(ir.Constant(f32, 0.0), dm))), xs8)
    qo = h.b.add(o, i64(48 if five else 16))
    qh = h.load(pr, h.b.add(o, i64(16)), V32I8) if five else None
    xo = h.b.mul(b, i64(256))
    for pair in range(4):
        q = h.load(pr, h.b.add(qo, i64(32 * pair)), V32I8)
        nib = [h.b.and_(q, _c(V32I8, 15)), h.b.lshr(q, _c(V32I8, 4))]
        for k in range(2):
            j = 2 * pair + k
            v = nib[k]
            if five:
                bit = h.b.and_(qh, _c(V32I8, 1 << j))
                v = h.b.or_(
                    v,
                    h.b.select(
                        h.b.icmp_unsigned("!=", bit, _c(V32I8, 0)), _c(V32I8, 16), _c(V32I8, 0)
                    ),
                )
            xv = h.load(pq, h.b.add(xo, i64(32 * j)), V32I8)
            p = h.tofloat(h.maddwd(h.maddubs(v, xv), _ONES16))
            _acc_fma(h, acc, p, h.lane(sv, j), j)


def _body_q4_k(h, pr, pq, pd, ps, acc, b, k):
    _body_qk(h, pr, pq, pd, ps, acc, b, k, False)


def _body_q5_k(h, pr, pq, pd, ps, acc, b, k):
    _body_qk(h, pr, pq, pd, ps, acc, b, k, True)


def _body_q6_k(h, pr, pq, pd, ps, acc, b, k):
    o = h.b.mul(b, i64(210))
    d = h.f16(pr, h.b.add(o, i64(208)))
    sc16 = h.b.sext(h.load(pr, h.b.add(o, i64(192)), V16I8), V16I16)
    g = h.b.mul(b, i64(32))
    dxd = h.b.fmul(h.load(pd, g, V8F, 4), h.splat(d))  # d * dx_g for the 8 groups
    xo = h.b.mul(b, i64(256))
    c32 = _c(V32I8, 32)
    for hh in range(2):
        qh = h.load(pr, h.b.add(o, i64(128 + 32 * hh)), V32I8)
        for half in range(2):
            ql = h.load(pr, h.b.add(o, i64(64 * hh + 32 * half)), V32I8)
            for nib in range(2):
                k = half + 2 * nib  # group 128hh + 32k
                low = h.b.and_(ql, _c(V32I8, 15)) if nib == 0 else h.b.lshr(ql, _c(V32I8, 4))
                top = h.b.and_(h.b.shl(h.b.lshr(qh, _c(V32I8, 2 * k)), _c(V32I8, 4)), _c(V32I8, 48))
                q = h.b.or_(low, top)
                xv = h.load(pq, h.b.add(xo, i64(128 * hh + 32 * k)), V32I8)
                p = h.b.sub(h.maddubs(q, xv), h.maddubs(c32, xv))  # sum (q - 32) x, pairs
                si = 8 * hh + 2 * k
                scv = h.shuf(sc16, sc16, [si] * 8 + [si + 1] * 8)
                gi = 4 * hh + k
                _acc_fma(h, acc, h.tofloat(h.maddwd(p, scv)), h.lane(dxd, gi), gi)


_dot_q4_0 = _row_intrinsic(_body_q4_0)
_dot_q4_1 = _row_intrinsic(_body_q4_1)
_dot_q8_0 = _row_intrinsic(_body_q8_0)
_dot_q4_k = _row_intrinsic(_body_q4_k)
_dot_q5_k = _row_intrinsic(_body_q5_k)
_dot_q6_k = _row_intrinsic(_body_q6_k)


# ---------------------------------------------------------------------------------------------
# Float activations: the same row loops with x in float32 (exact to float32 rounding, the
# default).  Weights are widened to 8 x i32 (vpmovzxbd), masked, converted to float and
# fma'd with x; each group's partial vector is scaled once.


def _row_intrinsic_f(body):
    """Wrap ``body(h, p_row, p_x, p_xs, acc, blk, k)`` run per block into an intrinsic
    ``(w u8[:, :], r intp, x f32[:], xs f32[:], nb intp) -> float32`` for row ``r``."""

    @intrinsic
    def dot(typingctx, w, r, x, xs, nb):
        sig = types.float32(w, types.intp, x, xs, nb)

        def codegen(context, builder, signature, args):
            h = _B(context, builder)
            a = signature.args
            pr = h.row(a[0], args[0], args[1])
            px, ps = h.data(a[2], args[2]), h.data(a[3], args[3])
            acc = _Acc(h)
            _blocks(h, args[4], lambda blk, k: body(h, pr, px, ps, acc, blk, k))
            return acc.total(h)

        return sig, codegen

    return dot


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


def _f_q4(h, pr, px, ps, acc, b, k, has_min):
    bs = 20 if has_min else 18
    o = h.b.mul(b, i64(bs))
    d = h.f16(pr, o)
    qo = h.b.add(o, i64(4 if has_min else 2))
    z0, z1 = _u8x8(h, pr, qo), _u8x8(h, pr, h.b.add(qo, i64(8)))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    vals = [h.b.and_(z0, m15), h.b.and_(z1, m15), h.b.lshr(z0, s4), h.b.lshr(z1, s4)]
    x0 = h.b.mul(b, i64(32))
    xv = [_xv(h, px, h.b.add(x0, i64(8 * k))) for k in range(4)]
    t = _dot4(h, [h.tofloat(v) for v in vals], xv)
    _acc_fma(h, acc, t, h.splat(d), k)
    xsb = h.load(ps, h.b.mul(b, i64(4)), f32, 4)
    if has_min:
        _corr_scalar(h, acc, h.b.fmul(h.f16(pr, h.b.add(o, i64(2))), xsb))
    else:
        _corr_scalar(h, acc, h.b.fmul(h.b.fmul(d, ir.Constant(f32, -8.0)), xsb))


def _f_q4_0(h, pr, px, ps, acc, b, k):
    _f_q4(h, pr, px, ps, acc, b, k, False)


def _f_q4_1(h, pr, px, ps, acc, b, k):
    _f_q4(h, pr, px, ps, acc, b, k, True)


def _f_q8_0(h, pr, px, ps, acc, b, k):
    o = h.b.mul(b, i64(34))
    d = h.f16(pr, o)
    x0 = h.b.mul(b, i64(32))
    vals = [h.tofloat(_s8x8(h, pr, h.b.add(o, i64(2 + 8 * k)))) for k in range(4)]
    xv = [_xv(h, px, h.b.add(x0, i64(8 * k))) for k in range(4)]
    _acc_fma(h, acc, _dot4(h, vals, xv), h.splat(d), k)


def _f_qk(h, pr, px, ps, acc, b, k, five):
    bs = 176 if five else 144
    o = h.b.mul(b, i64(bs))
    d, dm = h.f16(pr, o), h.f16(pr, h.b.add(o, i64(2)))
    scf, mnf = _k_scales_mins(h, pr, o)
    sv = h.b.fmul(scf, h.splat(d))  # d * sc_j
    xs8 = h.load(ps, h.b.mul(b, i64(32)), V8F, 4)
    _corr_fma(h, acc, h.b.fmul(mnf, h.splat(h.b.fsub(ir.Constant(f32, 0.0), dm))), xs8)
    qo = h.b.add(o, i64(48 if five else 16))
    x0 = h.b.mul(b, i64(256))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    qh = [_u8x8(h, pr, h.b.add(o, i64(16 + 8 * k))) for k in range(4)] if five else None
    for pair in range(4):
        z = [_u8x8(h, pr, h.b.add(qo, i64(32 * pair + 8 * k))) for k in range(4)]
        for half in range(2):
            j = 2 * pair + half
            vals = []
            for k in range(4):
                v = h.b.and_(z[k], m15) if half == 0 else h.b.lshr(z[k], s4)
                if five:  # bit j of qh[l] -> bit 4
                    bit = h.b.and_(qh[k], _c(V8I32, 1 << j))
                    if j < 4:
                        bit = h.b.shl(bit, _c(V8I32, 4 - j))
                    elif j > 4:
                        bit = h.b.lshr(bit, _c(V8I32, j - 4))
                    v = h.b.or_(v, bit)
                vals.append(h.tofloat(v))
            xb = h.b.add(x0, i64(32 * j))
            xv = [_xv(h, px, h.b.add(xb, i64(8 * k))) for k in range(4)]
            _acc_fma(h, acc, _dot4(h, vals, xv), h.lane(sv, j), j)


def _f_q4_k(h, pr, px, ps, acc, b, k):
    _f_qk(h, pr, px, ps, acc, b, k, False)


def _f_q5_k(h, pr, px, ps, acc, b, k):
    _f_qk(h, pr, px, ps, acc, b, k, True)


def _f_q6_k(h, pr, px, ps, acc, b, k):  # ps: sums of x per 16
    o = h.b.mul(b, i64(210))
    d = h.f16(pr, h.b.add(o, i64(208)))
    sc = h.b.sitofp(h.b.sext(h.load(pr, h.b.add(o, i64(192)), V16I8), _vt(i32, 16)), _vt(f32, 16))
    sc = h.b.fmul(sc, h.splat(d, 16))  # d * sc_j, j = 0..15
    xs16 = h.load(ps, h.b.mul(b, i64(64)), _vt(f32, 16), 4)
    # corr -= 32 * sum_j d sc_j xs_j
    p = h.b.fmul(sc, xs16)
    p8 = h.b.fadd(h.shuf(p, p, range(8)), h.shuf(p, p, range(8, 16)))
    _corr_fma(h, acc, p8, _c(V8F, -32.0))
    x0 = h.b.mul(b, i64(256))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    for hh in range(2):
        qh = [_u8x8(h, pr, h.b.add(o, i64(128 + 32 * hh + 8 * k))) for k in range(4)]
        for half in range(2):
            ql = [_u8x8(h, pr, h.b.add(o, i64(64 * hh + 32 * half + 8 * k))) for k in range(4)]
            for nib in range(2):
                k2 = half + 2 * nib  # group 128hh + 32k2: scales 8hh + 2k2 (+1)
                vals = []
                for k in range(4):
                    low = h.b.and_(ql[k], m15) if nib == 0 else h.b.lshr(ql[k], s4)
                    top = h.b.and_(h.b.lshr(qh[k], _c(V8I32, 2 * k2)), _c(V8I32, 3))
                    vals.append(h.tofloat(h.b.or_(low, h.b.shl(top, s4))))
                xb = h.b.add(x0, i64(128 * hh + 32 * k2))
                xv = [_xv(h, px, h.b.add(xb, i64(8 * k))) for k in range(4)]
                si = 8 * hh + 2 * k2
                t0 = h.fma(vals[1], xv[1], h.b.fmul(vals[0], xv[0]))
                t1 = h.fma(vals[3], xv[3], h.b.fmul(vals[2], xv[2]))
                _acc_fma(h, acc, t0, h.lane(sc, si), 0)
                _acc_fma(h, acc, t1, h.lane(sc, si + 1), 1)


def _float8(h, pr, i, bf16):  # 8 F16 / BF16 values starting at element index i -> 8 x float
    off = h.b.mul(i, i64(2))
    if not bf16:
        return h.b.fpext(h.load(pr, off, _vt(f16, 8)), V8F)
    w = h.b.zext(h.load(pr, off, _vt(i16, 8)), V8I32)
    return h.b.bitcast(h.b.shl(w, _c(V8I32, 16)), V8F)


def _f_half(h, pr, px, ps, acc, b, k, bf16):  # b: a block of 32 values
    x0 = h.b.mul(b, i64(32))
    idx = [h.b.add(x0, i64(8 * j)) for j in range(4)]
    vals = [_float8(h, pr, i, bf16) for i in idx]
    xv = [_xv(h, px, i) for i in idx]
    p = acc.v[k & 1]
    h.b.store(h.b.fadd(h.b.load(p), _dot4(h, vals, xv)), p)


def _f_f16(h, pr, px, ps, acc, b, k):
    _f_half(h, pr, px, ps, acc, b, k, False)


def _f_bf16(h, pr, px, ps, acc, b, k):
    _f_half(h, pr, px, ps, acc, b, k, True)


_fdot_f16 = _row_intrinsic_f(_f_f16)
_fdot_bf16 = _row_intrinsic_f(_f_bf16)
_fdot_q4_0 = _row_intrinsic_f(_f_q4_0)
_fdot_q4_1 = _row_intrinsic_f(_f_q4_1)
_fdot_q8_0 = _row_intrinsic_f(_f_q8_0)
_fdot_q4_k = _row_intrinsic_f(_f_q4_k)
_fdot_q5_k = _row_intrinsic_f(_f_q5_k)
_fdot_q6_k = _row_intrinsic_f(_f_q6_k)


# ---------------------------------------------------------------------------------------------
# Row decoders for prefill tiles: the same unpacking, stored as float32 rows for BLAS sgemm.


def _deq_intrinsic(body):
    """Wrap ``body(h, p_row, p_y, blk)`` (writes block ``blk`` of one row to float32 at
    ``p_y``) into an intrinsic ``(w u8[:, :], r intp, y f32[:, :], i intp, nb intp) -> none``
    that decodes row ``r`` of ``w`` into row ``i`` of ``y``."""

    @intrinsic
    def deq(typingctx, w, r, y, i, nb):
        sig = types.none(w, types.intp, y, types.intp, nb)

        def codegen(context, builder, signature, args):
            h = _B(context, builder)
            a = signature.args
            pr, py = h.row(a[0], args[0], args[1]), h.row(a[2], args[2], args[3])
            with cgutils.for_range(builder, args[4]) as loop:
                body(h, pr, py, loop.index)
            return context.get_dummy_value()

        return sig, codegen

    return deq


def _store(h, py, idx, v):  # y[idx : idx + 8] = v, idx an i64 element index
    h.b.store(v, h.b.bitcast(h.at(py, h.b.mul(idx, i64(4))), V8F.as_pointer()), align=4)


def _d_q4(h, pr, py, b, has_min):
    o = h.b.mul(b, i64(20 if has_min else 18))
    d = h.splat(h.f16(pr, o))
    m = h.splat(h.f16(pr, h.b.add(o, i64(2)))) if has_min else h.b.fmul(d, _c(V8F, -8.0))
    qo = h.b.add(o, i64(4 if has_min else 2))
    z0, z1 = _u8x8(h, pr, qo), _u8x8(h, pr, h.b.add(qo, i64(8)))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    vals = [h.b.and_(z0, m15), h.b.and_(z1, m15), h.b.lshr(z0, s4), h.b.lshr(z1, s4)]
    y0 = h.b.mul(b, i64(32))
    for k, v in enumerate(vals):
        _store(h, py, h.b.add(y0, i64(8 * k)), h.fma(h.tofloat(v), d, m))


def _d_q4_0(h, pr, py, b):
    _d_q4(h, pr, py, b, False)


def _d_q4_1(h, pr, py, b):
    _d_q4(h, pr, py, b, True)


def _d_q8_0(h, pr, py, b):
    o = h.b.mul(b, i64(34))
    d = h.splat(h.f16(pr, o))
    y0 = h.b.mul(b, i64(32))
    for k in range(4):
        v = h.tofloat(_s8x8(h, pr, h.b.add(o, i64(2 + 8 * k))))
        _store(h, py, h.b.add(y0, i64(8 * k)), h.b.fmul(v, d))


def _d_qk(h, pr, py, b, five):
    o = h.b.mul(b, i64(176 if five else 144))
    d, dm = h.f16(pr, o), h.f16(pr, h.b.add(o, i64(2)))
    scf, mnf = _k_scales_mins(h, pr, o)
    sv = h.b.fmul(scf, h.splat(d))
    mv = h.b.fmul(mnf, h.splat(h.b.fsub(ir.Constant(f32, 0.0), dm)))
    qo = h.b.add(o, i64(48 if five else 16))
    y0 = h.b.mul(b, i64(256))
    m15, s4 = _c(V8I32, 15), _c(V8I32, 4)
    qh = [_u8x8(h, pr, h.b.add(o, i64(16 + 8 * k))) for k in range(4)] if five else None
    for pair in range(4):
        z = [_u8x8(h, pr, h.b.add(qo, i64(32 * pair + 8 * k))) for k in range(4)]
        for half in range(2):
            j = 2 * pair + half
            s, m = h.lane(sv, j), h.lane(mv, j)
            for k in range(4):
                v = h.b.and_(z[k], m15) if half == 0 else h.b.lshr(z[k], s4)
                if five:
                    bit = h.b.and_(qh[k], _c(V8I32, 1 << j))
                    if j < 4:
                        bit = h.b.shl(bit, _c(V8I32, 4 - j))
                    elif j > 4:
                        bit = h.b.lshr(bit, _c(V8I32, j - 4))
                    v = h.b.or_(v, bit)
                _store(h, py, h.b.add(y0, i64(32 * j + 8 * k)), h.fma(h.tofloat(v), s, m))


def _d_q4_k(h, pr, py, b):
    _d_qk(h, pr, py, b, False)


def _d_q5_k(h, pr, py, b):
    _d_qk(h, pr, py, b, True)


def _d_q6_k(h, pr, py, b):
    o = h.b.mul(b, i64(210))
    d = h.f16(pr, h.b.add(o, i64(208)))
    sc = h.b.sitofp(h.b.sext(h.load(pr, h.b.add(o, i64(192)), V16I8), _vt(i32, 16)), _vt(f32, 16))
    sc = h.b.fmul(sc, h.splat(d, 16))
    y0 = h.b.mul(b, i64(256))
    m15, s4, c32 = _c(V8I32, 15), _c(V8I32, 4), _c(V8I32, 32)
    for hh in range(2):
        qh = [_u8x8(h, pr, h.b.add(o, i64(128 + 32 * hh + 8 * k))) for k in range(4)]
        for half in range(2):
            ql = [_u8x8(h, pr, h.b.add(o, i64(64 * hh + 32 * half + 8 * k))) for k in range(4)]
            for nib in range(2):
                k2 = half + 2 * nib
                si = 8 * hh + 2 * k2
                for k in range(4):
                    low = h.b.and_(ql[k], m15) if nib == 0 else h.b.lshr(ql[k], s4)
                    top = h.b.and_(h.b.lshr(qh[k], _c(V8I32, 2 * k2)), _c(V8I32, 3))
                    q = h.b.sub(h.b.or_(low, h.b.shl(top, s4)), c32)
                    v = h.b.fmul(h.tofloat(q), h.lane(sc, si + k // 2))
                    _store(h, py, h.b.add(y0, i64(128 * hh + 32 * k2 + 8 * k)), v)


def _d_half(h, pr, py, b, bf16):
    y0 = h.b.mul(b, i64(32))
    for j in range(4):
        i = h.b.add(y0, i64(8 * j))
        _store(h, py, i, _float8(h, pr, i, bf16))


def _d_f16(h, pr, py, b):
    _d_half(h, pr, py, b, False)


def _d_bf16(h, pr, py, b):
    _d_half(h, pr, py, b, True)


_deq_f16 = _deq_intrinsic(_d_f16)
_deq_bf16 = _deq_intrinsic(_d_bf16)
_deq_q4_0 = _deq_intrinsic(_d_q4_0)
_deq_q4_1 = _deq_intrinsic(_d_q4_1)
_deq_q8_0 = _deq_intrinsic(_d_q8_0)
_deq_q4_k = _deq_intrinsic(_d_q4_k)
_deq_q5_k = _deq_intrinsic(_d_q5_k)
_deq_q6_k = _deq_intrinsic(_d_q6_k)
