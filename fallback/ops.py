"""The transformer's small operations: RMS norm, SiLU gate, rotary embedding, attention.

Two engines compute them:

- NumPy (the ``*_np`` functions): vectorized expressions, the reference in tests and what
  runs where numba is missing.  `attention_np` is batched matmuls, so BLAS's threads do the
  work: the engine for prefill chunks and for decoding over long caches, where the score
  matrix is large.
- numba: loops compiled into one call each.  A decode step of a small model is dominated
  by interpreter round trips (a NumPy expression costs several, each op a handful), so
  over a short cache the whole attention block of one token (rope q and k, write k and v
  into the cache, attend) is the single call `attend_token`.  It is built from the row
  helpers `_rope_row` and `_attend_row`, which the other loops use too: rope and attention
  are each written once per engine.

The unsuffixed names (`rms_norm`, `add_rms_norm`, `silu_mul`, `rope`) are the compiled
versions where numba is available and the NumPy ones elsewhere.  `attend` is the attention
block of T tokens on the BLAS engine; `attend_token` (numba only, else None) is the same
block for one token, for caches up to `LOOP_ATTENTION_MAX`.  Both take the per-call values
first, so the forward pass binds them once (`functools.partial`) and calls
``attend(qkv, kc, vc)`` per layer.

Activations are ``(T, n)`` for T tokens or ``(n,)`` for one (the decode step, whose matvecs
take and return vectors); the norms and the SiLU gate accept both, C-contiguous.

Shapes: T tokens, H query heads, KV key/value heads, G = H // KV, D head dim, P positions
in the cache (cap: its capacity), rd/2 rotated pairs per head.
"""

from __future__ import annotations

import numpy as np

from .kernels import numba_available

# Above this many multiply-adds per decode step, BLAS's threads beat one compiled loop.
LOOP_ATTENTION_MAX = 1 << 20

# ---------------------------------------------------------------------------- NumPy engine


def rms_norm_np(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (..., n) normalized by its root mean square over the last axis, times w (n,)."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * w


def add_rms_norm_np(x: np.ndarray, y: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x += y (the residual add, in place), then return `rms_norm_np` (x, w)."""
    x += y
    return rms_norm_np(x, w, eps)


def silu_mul_np(gu: np.ndarray, ffn: int) -> np.ndarray:
    """SiLU(gate) * up for gu = [gate | up] (..., 2 * ffn); returns (..., ffn)."""
    gate, up = gu[..., :ffn], gu[..., ffn:]
    with np.errstate(over="ignore"):  # exp overflow -> inf -> SiLU = -0, as intended
        return gate / (1.0 + np.exp(-gate)) * up


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


def attend(
    cos: np.ndarray,
    sin: np.ndarray,
    neox: bool,
    p0: int,
    window: int,
    scale: float,
    n_heads: int,
    qkv: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
) -> np.ndarray:
    """The attention block of T tokens at positions p0 .. p0 + T - 1: rotate the q and k
    parts of qkv in place (`rope`), write k and v into the caches, attend (`attention_np`).

    Args:
        cos, sin: (T, rd/2) rotation of each token's position.
        neox: rotate pairs (i, i + rd/2) rather than (2i, 2i + 1).
        p0: position of the first token; the caches hold the positions before it.
        window: sliding window (0: none).
        scale: the attention scale.
        n_heads: H.
        qkv: (T, (H + 2 KV) * D) projections [q | k | v], or ((H + 2 KV) * D,) for one.
        kc, vc: this layer's caches (KV, cap, D), cap >= p0 + T.

    Returns:
        (T, H * D), or (H * D,) for a one-dimensional qkv.
    """
    KV, _, D = kc.shape
    T, H = cos.shape[0], n_heads
    rows = qkv.reshape(T, -1)  # (T, (H + 2 KV) * D)
    q = rows[:, : H * D].reshape(T, H, D)
    k = rows[:, H * D : (H + KV) * D].reshape(T, KV, D)
    v = rows[:, (H + KV) * D :].reshape(T, KV, D)
    rope(q, cos, sin, neox)
    rope(k, cos, sin, neox)
    kc[:, p0 : p0 + T] = k.transpose(1, 0, 2)
    vc[:, p0 : p0 + T] = v.transpose(1, 0, 2)
    out = attention_np(q, kc, vc, p0, window, scale)  # (T, H * D)
    return out.reshape(*qkv.shape[:-1], H * D)


# ---------------------------------------------------------------------------- numba engine
# Plain Python here; compiled at the bottom of the module where numba is available.

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


def _rows(a, n):  # noqa: ANN001, ANN202
    """A C-contiguous (..., n) array as a (rows, n) view: one loop serves (n,) and (T, n)."""
    return a.reshape(a.size // n, n)


def _rms_norm_loop(x, w, eps):  # noqa: ANN001, ANN202
    n = x.shape[-1]
    out = np.empty_like(x)
    x2, o2 = _rows(x, n), _rows(out, n)
    for t in range(x2.shape[0]):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x2[t, i] * x2[t, i]
        r = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            o2[t, i] = x2[t, i] * r * w[i]
    return out


def _add_rms_norm_loop(x, y, w, eps):  # noqa: ANN001, ANN202
    """x += y (the residual add), then return rms_norm(x) * w: one call per junction."""
    n = x.shape[-1]
    out = np.empty_like(x)
    x2, y2, o2 = _rows(x, n), _rows(y, n), _rows(out, n)
    for t in range(x2.shape[0]):
        ss = np.float32(0.0)
        for i in range(n):
            x2[t, i] += y2[t, i]
            ss += x2[t, i] * x2[t, i]
        r = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            o2[t, i] = x2[t, i] * r * w[i]
    return out


def _silu_mul_loop(gu, ffn):  # noqa: ANN001, ANN202
    out = np.empty(gu.shape[:-1] + (ffn,), dtype=np.float32)
    g2, o2 = _rows(gu, 2 * ffn), _rows(out, ffn)
    for t in range(g2.shape[0]):
        for i in range(ffn):
            g = g2[t, i]
            o2[t, i] = g / (np.float32(1.0) + _exp(-g)) * g2[t, ffn + i]
    return out


def _rope_row(x, o, cos, sin, t, neox):  # noqa: ANN001, ANN202
    """Rotate one head, x[o : o + D], by the angles of row t of cos/sin (T, rd/2)."""
    half = cos.shape[1]
    for i in range(half):
        if neox:
            ia, ib = o + i, o + i + half
        else:
            ia, ib = o + 2 * i, o + 2 * i + 1
        a, b = x[ia], x[ib]
        c, s = cos[t, i], sin[t, i]
        x[ia] = a * c - b * s
        x[ib] = b * c + a * s


def _rope_loop(x, cos, sin, neox):  # noqa: ANN001, ANN202
    """`rope_np`: x (T, heads, D) in place."""
    T, heads, _ = x.shape
    for t in range(T):
        for h in range(heads):
            _rope_row(x[t, h], 0, cos, sin, t, neox)


def _attend_row(q, q0, kc, vc, kv, start, n, scale, out, o0, s):  # noqa: ANN001, ANN202
    """out[o0:o0+D] += softmax(scale * K @ q[q0:q0+D]) @ V over cache rows start..start+n-1
    of kv head ``kv``: one query head's attention; ``s`` is scratch space for >= n scores.
    Four cache rows per iteration (four dot products share the loads of q, four V rows one
    load/store of ``out``): ~20% faster than one."""
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


def _attend_token_loop(cos, sin, neox, p0, window, scale, n_heads, qkv, kc, vc):  # noqa: ANN001, ANN202
    """`attend` for one token at position p0 (qkv a vector), in one call."""
    KV, _, D = kc.shape
    G = n_heads // KV
    for h in range(n_heads + KV):  # q heads, then k heads
        _rope_row(qkv, h * D, cos, sin, 0, neox)
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


if numba_available():
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic

    # error_model="numpy": a zero norm gives inf/nan like NumPy, never ZeroDivisionError.
    _jit = numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
    # helpers inlined into the loops that call them (a real call per head costs 3x)
    _inline = numba.njit(inline="always", fastmath=True, error_model="numpy")

    @intrinsic
    def _f32_from_bits(typingctx, i):  # noqa: ANN001, ANN202, ARG001
        """The float32 whose bit pattern is the int32 ``i`` (a register bitcast)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.FloatType())

        return numba.types.float32(numba.types.int32), codegen

    _exp = _inline(_exp_f32)
    _rows = _inline(_rows)
    _rope_row = _inline(_rope_row)
    _attend_row = _inline(_attend_row)
    rms_norm = _jit(_rms_norm_loop)
    add_rms_norm = _jit(_add_rms_norm_loop)
    silu_mul = _jit(_silu_mul_loop)
    rope = _jit(_rope_loop)
    attend_token = _jit(_attend_token_loop)
    FUSED_DECODE = True  # the forward pass may call attend_token
else:  # pragma: no cover - exercised where numba is missing
    rms_norm, add_rms_norm, silu_mul, rope = rms_norm_np, add_rms_norm_np, silu_mul_np, rope_np
    attend_token = None
    FUSED_DECODE = False
