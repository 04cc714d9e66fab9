"""The compiled small ops equal their NumPy versions; attention equals a hand-written
per-head softmax; the NumPy versions are what runs where numba is missing."""

from __future__ import annotations

import numpy as np
import pytest

from fallback import ops
from fallback.kernels import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba not installed")
rng = np.random.default_rng(0)


def test_compiled_exp_matches_float64_exp():
    """The vectorizable exp of the compiled softmax and SiLU: relative error < 3e-7 over
    float32's range, 0 below -86.5, inf past the overflow bound."""
    x = np.concatenate([np.linspace(-86.5, 88.72, 100_001), rng.uniform(-20, 20, 1000)])
    x = x.astype(np.float32)
    got = np.array([ops._exp(v) for v in x[::7]] + [ops._exp(v) for v in x[-1000:]])
    ref = np.exp(np.concatenate([x[::7], x[-1000:]]).astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 3e-7
    assert ops._exp(np.float32(-86.6)) == 0.0 and ops._exp(np.float32(-1e30)) == 0.0
    assert ops._exp(np.float32(88.8)) == np.inf and ops._exp(np.float32(np.inf)) == np.inf
    assert ops._exp(np.float32(0.0)) == 1.0


def test_rms_norm():
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.rms_norm_np(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [True, False])
def test_rope(neox):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    ang = rng.uniform(0, 6, (2, 3))  # rope over the first 6 of 8 dims
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    a, b = x.copy(), x.copy()
    ops.rope(a, cos, sin, neox)
    ops.rope_np(b, cos, sin, neox)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # hand-computed: pair (0, 3) for neox, (0, 1) for normal, angle ang[t, 0]
    j = 3 if neox else 1
    c, s = cos[1, 0], sin[1, 0]
    assert a[1, 2, 0] == pytest.approx(x[1, 2, 0] * c - x[1, 2, j] * s, abs=1e-6)
    assert a[1, 2, j] == pytest.approx(x[1, 2, j] * c + x[1, 2, 0] * s, abs=1e-6)
    np.testing.assert_array_equal(a[..., 6:], x[..., 6:])  # beyond rope_dim untouched


def reference_attention(q, kc, vc, p0, window, scale):
    T, H, D = q.shape
    G = H // kc.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        for h in range(H):
            pos = p0 + t
            js = [j for j in range(pos + 1) if not window or pos - j < window]
            s = np.array([q[t, h] @ kc[h // G, j] for j in js]) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vc[h // G, js]
    return out.reshape(T, H * D)


@pytest.mark.parametrize("T, p0, window", [(1, 9, 0), (1, 9, 4), (5, 3, 0), (5, 3, 3)])
def test_attention_gqa(T, p0, window):
    H, KV, D, cap = 6, 2, 8, 16
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    kc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    vc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    ref = reference_attention(q, kc, vc, p0, window, 0.35)
    np.testing.assert_allclose(ops.attention(q, kc, vc, p0, window, 0.35), ref, atol=1e-5)
    np.testing.assert_allclose(ops.attention_np(q, kc, vc, p0, window, 0.35), ref, atol=1e-5)


def test_silu_mul():
    gu = (rng.standard_normal((2, 10)) * 30).astype(np.float32)  # large: exp overflows
    ref = gu[:, :5] / (1 + np.exp(-gu[:, :5].astype(np.float64))) * gu[:, 5:]
    np.testing.assert_allclose(ops.silu_mul(gu, 5), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.silu_mul_np(gu, 5), ref, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_adds_in_place_and_normalizes():
    x = rng.standard_normal(40).astype(np.float32)
    y = rng.standard_normal(40).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    expected_x = x + y
    out = ops.add_rms_norm(x, y, w, 1e-5)
    np.testing.assert_allclose(x, expected_x, rtol=1e-6)  # the residual stream is updated
    np.testing.assert_allclose(
        out, ops.rms_norm_np(expected_x[None], w, 1e-5)[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("neox, window", [(True, 0), (False, 0), (True, 3)])
def test_attend_token_equals_rope_cache_write_and_attention(neox, window):
    """The fused single-token call = rope (NumPy) + cache write + reference attention."""
    H, KV, D, cap, p0 = 6, 2, 8, 16, 9
    qkv = rng.standard_normal((H + 2 * KV) * D).astype(np.float32)
    kc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    vc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    ang = rng.uniform(0, 6, (1, 3))  # rope over the first 6 of 8 dims
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    q = qkv[: H * D].reshape(1, H, D).copy()
    k = qkv[H * D : (H + KV) * D].reshape(1, KV, D).copy()
    v = qkv[(H + KV) * D :].reshape(KV, D)
    ops.rope_np(q, cos, sin, neox)
    ops.rope_np(k, cos, sin, neox)
    kc2, vc2 = kc.copy(), vc.copy()
    kc2[:, p0], vc2[:, p0] = k[0], v
    ref = reference_attention(q, kc2, vc2, p0, window, 0.35)[0]
    out = ops.attend_token(qkv, cos, sin, neox, kc, vc, p0, window, np.float32(0.35), H)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(kc[:, p0], k[0], atol=1e-6)  # the caches now hold this token
    np.testing.assert_array_equal(vc[:, p0], v)
