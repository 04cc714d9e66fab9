"""The transformer's small operations: RMS norm, rotary embedding, attention, SiLU gate.

Each exists twice: a vectorized NumPy version (used where numba is missing, and the
reference in tests) and a loop version that numba compiles into one call.  A decode step of
a small model makes ~10 of these calls per layer; as NumPy expressions they cost dozens of
interpreter round trips each, which is more than the matrix work of a 135M model.

Shapes: T tokens, H query heads, KV key/value heads, D head dim, P cache positions.
"""

from __future__ import annotations

import numpy as np

from .kernels import numba_available

# ---------------------------------------------------------------------------- NumPy versions


def rms_norm_np(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, n) normalized by its root mean square, times w (n,)."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * w


def rope_np(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate x (T, heads, D) in place; cos/sin (T, rd/2) cover the first rd dims."""
    half = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:  # pairs (i, i + rd/2)
        a, b = x[..., :half].copy(), x[..., half : 2 * half].copy()
        x[..., :half] = a * c - b * s
        x[..., half : 2 * half] = b * c + a * s
    else:  # pairs (2i, 2i + 1)
        a, b = x[..., 0 : 2 * half : 2].copy(), x[..., 1 : 2 * half : 2].copy()
        x[..., 0 : 2 * half : 2] = a * c - b * s
        x[..., 1 : 2 * half : 2] = b * c + a * s


def attention_np(
    q: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int, window: int, scale: float
) -> np.ndarray:
    """Causal attention of q (T, H, D) at positions p0.. over the cache kc/vc (KV, cap, D),
    which already holds these tokens; window > 0 limits keys to i - j < window.
    Returns (T, H * D)."""
    T, H, D = q.shape
    KV = kc.shape[0]
    G = H // KV
    P = p0 + T
    qg = q.reshape(T, KV, G, D).transpose(1, 2, 0, 3).reshape(KV, G * T, D)
    scores = (qg @ kc[:, :P].transpose(0, 2, 1)).reshape(KV, G, T, P) * np.float32(scale)
    qpos = np.arange(p0, P)[:, None]
    kpos = np.arange(P)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= qpos - kpos < window
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores.reshape(KV, G * T, P) @ vc[:, :P]  # (KV, G*T, D)
    return out.reshape(KV, G, T, D).transpose(2, 0, 1, 3).reshape(T, H * D)


def silu_mul_np(gu: np.ndarray, ffn: int) -> np.ndarray:
    """SiLU(gate) * up for gu = [gate | up] (T, 2 * ffn)."""
    gate, up = gu[:, :ffn], gu[:, ffn:]
    with np.errstate(over="ignore"):  # exp overflow -> inf -> SiLU = -0, as intended
        return gate / (1.0 + np.exp(-gate)) * up


# ---------------------------------------------------------------------------- loop versions

_exp = np.exp  # replaced by `_exp_f32` where numba compiles the loops


def _exp_f32(x):  # noqa: ANN001, ANN202
    """exp(x) in float32 from arithmetic LLVM can vectorize (libm's expf is a scalar call,
    most of a SiLU or a softmax): Cephes' range reduction x = k ln2 + r, |r| <= ln2 / 2, a
    degree-7 polynomial for e^r, 2^k from the exponent bits.  Relative error < 2e-7; 0 below
    -86.5 (float32 turns denormal at -87.3), inf above ~88.72, like expf."""
    lo = np.float32(-86.5)
    xc = min(max(x, lo), np.float32(88.72284))
    k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    # 2^k as 2 * 2^(k-1): k reaches 128 just below the overflow bound
    y = p * _f32_from_bits((np.int32(k) + np.int32(126)) << np.int32(23)) * np.float32(2.0)
    return np.float32(0.0) if x < lo else y


def _rms_norm_loop(x, w, eps):  # noqa: ANN001, ANN202
    T, n = x.shape
    out = np.empty_like(x)
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        r = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * r * w[i]
    return out


def _rope_loop(x, cos, sin, neox):  # noqa: ANN001, ANN202
    T, heads, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        for h in range(heads):
            for i in range(half):
                if neox:
                    ia, ib = i, i + half
                else:
                    ia, ib = 2 * i, 2 * i + 1
                a, b = x[t, h, ia], x[t, h, ib]
                c, s = cos[t, i], sin[t, i]
                x[t, h, ia] = a * c - b * s
                x[t, h, ib] = b * c + a * s


def _attend_row(q, q0, kc, vc, kv, start, n, scale, out, o0, s):  # noqa: ANN001, ANN202
    """out[o0:o0+D] += softmax(scale * K @ q[q0:q0+D]) @ V over cache rows start..start+n-1
    of kv head ``kv``: one query head's attention, shared by both loop versions; ``s`` is
    scratch space for >= n scores.  Four cache rows per iteration (four dot products share
    the loads of q, four V rows one load/store of ``out``): ~20% faster than one."""
    D = kc.shape[2]
    j = 0
    while j + 4 <= n:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        r = start + j
        for d in range(D):
            qd = q[q0 + d]
            a0 += qd * kc[kv, r, d]
            a1 += qd * kc[kv, r + 1, d]
            a2 += qd * kc[kv, r + 2, d]
            a3 += qd * kc[kv, r + 3, d]
        s[j], s[j + 1], s[j + 2], s[j + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        j += 4
    for i in range(j, n):  # the rest, one row at a time
        acc = np.float32(0.0)
        for d in range(D):
            acc += q[q0 + d] * kc[kv, start + i, d]
        s[i] = acc * scale
    m = np.float32(-np.inf)
    for j in range(n):
        m = max(m, s[j])
    total = np.float32(0.0)
    for j in range(n):
        s[j] = _exp(s[j] - m)
        total += s[j]
    inv = np.float32(1.0) / total
    j = 0
    while j + 4 <= n:
        p0, p1, p2, p3 = s[j] * inv, s[j + 1] * inv, s[j + 2] * inv, s[j + 3] * inv
        r = start + j
        for d in range(D):
            out[o0 + d] += (p0 * vc[kv, r, d] + p1 * vc[kv, r + 1, d]) + (
                p2 * vc[kv, r + 2, d] + p3 * vc[kv, r + 3, d]
            )
        j += 4
    for i in range(j, n):
        p = s[i] * inv
        for d in range(D):
            out[o0 + d] += p * vc[kv, start + i, d]


def _attention_loop(q, kc, vc, p0, window, scale):  # noqa: ANN001, ANN202
    T, H, D = q.shape
    G = H // kc.shape[0]
    out = np.zeros((T, H * D), dtype=np.float32)
    s = np.empty(p0 + T, dtype=np.float32)
    for h in range(H):
        kv = h // G
        for t in range(T):
            pos = p0 + t
            start = max(0, pos - window + 1) if window > 0 else 0
            _attend_row(q[t, h], 0, kc, vc, kv, start, pos + 1 - start, scale, out[t], h * D, s)
    return out


def _silu_mul_loop(gu, ffn):  # noqa: ANN001, ANN202
    T = gu.shape[0]
    out = np.empty((T, ffn), dtype=np.float32)
    for t in range(T):
        for i in range(ffn):
            g = gu[t, i]
            out[t, i] = g / (np.float32(1.0) + _exp(-g)) * gu[t, ffn + i]
    return out


def _add_rms_norm_loop(x, y, w, eps):  # noqa: ANN001, ANN202
    """x (n,) += y (the residual add), then return rms_norm(x) * w: one call per junction."""
    n = x.shape[0]
    ss = np.float32(0.0)
    for i in range(n):
        x[i] += y[i]
        ss += x[i] * x[i]
    r = np.float32(1.0 / np.sqrt(ss / n + eps))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = x[i] * r * w[i]
    return out


def _attend_token_loop(qkv, cos, sin, neox, kc, vc, p0, window, scale, n_heads):  # noqa: ANN001, ANN202
    """One token at position p0: rope the q and k parts of qkv [(H + 2 KV) * D] in place,
    store k and v in the caches kc/vc (KV, cap, D), attend; returns (H * D,).  The same
    arithmetic as `rope` + the cache write + `attention` for T = 1, in one call."""
    KV, _, D = kc.shape
    G = n_heads // KV
    half = cos.shape[1]
    for h in range(n_heads + KV):  # q heads, then k heads
        base = h * D
        for i in range(half):
            if neox:
                ia, ib = base + i, base + i + half
            else:
                ia, ib = base + 2 * i, base + 2 * i + 1
            a, b = qkv[ia], qkv[ib]
            qkv[ia] = a * cos[0, i] - b * sin[0, i]
            qkv[ib] = b * cos[0, i] + a * sin[0, i]
    koff, voff = n_heads * D, (n_heads + KV) * D
    for kv in range(KV):
        for d in range(D):
            kc[kv, p0, d] = qkv[koff + kv * D + d]
            vc[kv, p0, d] = qkv[voff + kv * D + d]
    start = max(0, p0 - window + 1) if window > 0 else 0
    n = p0 + 1 - start
    out = np.zeros(n_heads * D, dtype=np.float32)
    s = np.empty(n, dtype=np.float32)
    for h in range(n_heads):
        _attend_row(qkv, h * D, kc, vc, h // G, start, n, scale, out, h * D, s)
    return out


# Above this many multiply-adds per decode step, BLAS's threads beat one compiled loop.
LOOP_ATTENTION_MAX = 1 << 20

if numba_available():
    import numba

    # error_model="numpy": a zero norm gives inf/nan like NumPy, never ZeroDivisionError.
    from llvmlite import ir
    from numba.extending import intrinsic

    _jit = numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy")

    @intrinsic
    def _f32_from_bits(typingctx, i):  # noqa: ANN001, ANN202, ARG001
        """The float32 whose bit pattern is the int32 ``i`` (a register bitcast)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.FloatType())

        return numba.types.float32(numba.types.int32), codegen

    _exp = numba.njit(inline="always", fastmath=True, error_model="numpy")(_exp_f32)
    # inlined into the two attention loops that call it (a real call per head costs 3x)
    _attend_row = numba.njit(inline="always", fastmath=True, error_model="numpy")(_attend_row)
    rms_norm = _jit(_rms_norm_loop)
    rope = _jit(_rope_loop)
    silu_mul = _jit(_silu_mul_loop)
    _attention_decode = _jit(_attention_loop)
    add_rms_norm = _jit(_add_rms_norm_loop)
    attend_token = _jit(_attend_token_loop)
    FUSED_DECODE = True  # the forward pass may use add_rms_norm / attend_token

    def attention(
        q: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int, window: int, scale: float
    ) -> np.ndarray:
        """`attention_np`, compiled for decoding over short caches; prefill and long caches
        keep NumPy's batched BLAS matmuls (multi-threaded)."""
        if q.shape[0] == 1 and (p0 + 1) * q.shape[1] * q.shape[2] <= LOOP_ATTENTION_MAX:
            return _attention_decode(q, kc, vc, p0, window, np.float32(scale))
        return attention_np(q, kc, vc, p0, window, scale)
else:  # pragma: no cover - exercised where numba is missing
    rms_norm, rope, silu_mul, attention = rms_norm_np, rope_np, silu_mul_np, attention_np
    add_rms_norm = attend_token = None
    FUSED_DECODE = False
