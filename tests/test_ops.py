"""The transformer's small ops against hand-written references (a per-head softmax loop,
float64 norms), on both engines: the NumPy versions (what runs where numba is missing) and
the compiled ones, including the fused single-token attention block."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fallback import ops
from fallback.kernels import numba_available

compiled = pytest.mark.skipif(not numba_available(), reason="numba not installed")
rng = np.random.default_rng(0)


@compiled
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


def _norm_ref(x, w, eps=1e-5):
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(3, 40), (40,)], ids=["rows", "vector"])
@pytest.mark.parametrize("fn", [ops.rms_norm, ops.rms_norm_np], ids=["ops", "np"])
def test_rms_norm(fn, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    got = fn(x, w, 1e-5)
    assert got.shape == shape
    np.testing.assert_allclose(got, _norm_ref(x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 40), (40,)], ids=["rows", "vector"])
@pytest.mark.parametrize("fn", [ops.add_rms_norm, ops.add_rms_norm_np], ids=["ops", "np"])
def test_add_rms_norm_adds_in_place_and_normalizes(fn, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    expected_x = x.astype(np.float64) + y
    out = fn(x, y, w, 1e-5)
    np.testing.assert_allclose(x, expected_x, rtol=1e-6)  # the residual stream is updated
    np.testing.assert_allclose(out, _norm_ref(expected_x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 10), (10,)], ids=["rows", "vector"])
@pytest.mark.parametrize("fn", [ops.silu_mul, ops.silu_mul_np], ids=["ops", "np"])
def test_silu_mul(fn, shape):
    gu = (rng.standard_normal(shape) * 30).astype(np.float32)  # large: exp overflows
    gate, up = gu[..., :5].astype(np.float64), gu[..., 5:]
    ref = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(fn(gu, 5), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("fn", [ops.rope, ops.rope_np], ids=["ops", "np"])
def test_rope(fn, neox):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    ang = rng.uniform(0, 6, (2, 3))  # rope over the first 6 of 8 dims
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    a = x.copy()
    fn(a, cos, sin, neox)
    # hand-computed: pairs (i, i + 3) for neox, (2i, 2i + 1) otherwise, angle ang[t, i]
    for t in range(2):
        for i in range(3):
            ia, ib = (i, i + 3) if neox else (2 * i, 2 * i + 1)
            c, s = cos[t, i], sin[t, i]
            np.testing.assert_allclose(a[t, :, ia], x[t, :, ia] * c - x[t, :, ib] * s, atol=1e-6)
            np.testing.assert_allclose(a[t, :, ib], x[t, :, ib] * c + x[t, :, ia] * s, atol=1e-6)
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
    np.testing.assert_allclose(ops.attention_np(q, kc, vc, p0, window, 0.35), ref, atol=1e-5)


def _block_case(T, neox, window, p0=9):
    """Inputs of an attention block (H=6, KV=2, D=8, rope over 6 dims) and its expected
    output and caches, from hand-written rope + cache write + `reference_attention`."""
    H, KV, D, cap = 6, 2, 8, 16
    qkv = rng.standard_normal((T, (H + 2 * KV) * D)).astype(np.float32)
    kc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    vc = rng.standard_normal((KV, cap, D)).astype(np.float32)
    ang = rng.uniform(0, 6, (T, 3))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x = qkv.astype(np.float64).reshape(T, H + 2 * KV, D)
    rot = x.copy()
    for i in range(3):
        ia, ib = (i, i + 3) if neox else (2 * i, 2 * i + 1)
        c, s = cos[:, None, i], sin[:, None, i]
        rot[:, : H + KV, ia] = x[:, : H + KV, ia] * c - x[:, : H + KV, ib] * s
        rot[:, : H + KV, ib] = x[:, : H + KV, ib] * c + x[:, : H + KV, ia] * s
    k_ref, v_ref = kc.astype(np.float64), vc.astype(np.float64)
    k_ref[:, p0 : p0 + T] = rot[:, H : H + KV].transpose(1, 0, 2)
    v_ref[:, p0 : p0 + T] = rot[:, H + KV :].transpose(1, 0, 2)
    out = reference_attention(rot[:, :H], k_ref, v_ref, p0, window, 0.35)
    args = (cos, sin, neox, p0, window, np.float32(0.35), H)
    return args, (qkv, kc, vc), (out, k_ref[:, : p0 + T], v_ref[:, : p0 + T])


def _check_block(got, kc, vc, expected, p0_T):
    out, k_ref, v_ref = expected
    np.testing.assert_allclose(got, out, atol=1e-5)
    np.testing.assert_allclose(kc[:, :p0_T], k_ref, atol=1e-6)  # the caches hold the tokens
    np.testing.assert_allclose(vc[:, :p0_T], v_ref, atol=1e-6)


@pytest.mark.parametrize("neox, window", [(True, 0), (False, 0), (True, 3)])
@pytest.mark.parametrize("T", [1, 4])
def test_attend_block(T, neox, window):
    """The batched block: rope q and k, write k and v into the caches, attend."""
    args, (qkv, kc, vc), expected = _block_case(T, neox, window)
    got = ops.attend(*args, qkv, kc, vc)
    assert got.shape == (T, 48)
    _check_block(got, kc, vc, expected, 9 + T)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("T, p0, window", [(7, 0, 0), (7, 9, 0), (5, 3, 3), (7, 9, 4)])
def test_attend_block_split_over_threads(monkeypatch, threads, T, p0, window):
    """A block split by query rows over the threads (`row_parts`: each run against the
    positions before its end) is the block: the same reference, any split."""
    monkeypatch.setattr(ops, "SPLIT_ATTENTION_FLOP", 0)
    runs = []
    whole = ops.attention_np
    monkeypatch.setattr(ops, "attention_np", lambda q, *a: runs.append(len(q)) or whole(q, *a))
    args, (qkv, kc, vc), expected = _block_case(T, True, window, p0)
    _check_block(ops.attend(*args, qkv, kc, vc, threads=threads), kc, vc, expected, p0 + T)
    assert len(runs) == threads and sum(runs) == T  # split indeed, every row once


@pytest.mark.parametrize("T", [1, 2, 5, 13])
@pytest.mark.parametrize("p0", [0, 3, 40])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_row_parts_minimizes_the_largest_run(T, p0, n):
    """Against every split by brute force: the runs cover 0..T in order, at most n of
    them, and the largest run costs no more than in the best split."""
    import itertools

    def worst(bounds):
        return max((b - a) * (p0 + b) for a, b in itertools.pairwise(bounds))

    got = ops.row_parts(T, p0, n)
    assert got[0] == 0 and got[-1] == T and all(a < b for a, b in itertools.pairwise(got))
    assert len(got) - 1 <= min(n, T)
    best = min(
        worst([0, *cut, T])
        for k in range(min(n, T))
        for cut in itertools.combinations(range(1, T), k)
    )
    assert worst(got) == best


def test_attend_block_takes_a_vector_for_one_token():
    args, (qkv, kc, vc), expected = _block_case(1, True, 0)
    got = ops.attend(*args, qkv[0], kc, vc)
    assert got.shape == (48,)
    _check_block(got[None], kc, vc, expected, 10)


@compiled
@pytest.mark.parametrize("neox, window", [(True, 0), (False, 0), (True, 3)])
def test_attend_token_is_the_block_for_one_token(neox, window):
    """The fused compiled call: the same rope, cache write and attention, one token."""
    args, (qkv, kc, vc), expected = _block_case(1, neox, window)
    got = ops.attend_token(*args, qkv[0], kc, vc)
    assert got.shape == (48,)
    _check_block(got[None], kc, vc, expected, 10)


# ------------------------------------------------ decode attention over long caches, by type


def _decode_case(H, KV, D, p0, window, kind, kernel):
    """One token at position p0 through ``kernel`` over a cache of ``kind`` filled with
    random rows; returns (got, float64 reference over the cache's own values, and the
    cache's float32 view of the rows the kernel wrote)."""
    r = np.random.default_rng(p0 + window + D)
    cap = p0 + 3
    qkv = r.standard_normal((H + 2 * KV) * D).astype(np.float32)
    ang = r.uniform(0, 6, (1, D // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc, vc = ops.new_cache(kind, KV, cap, D), ops.new_cache(kind, KV, cap, D)
    ops.cache_write(kc, 0, r.standard_normal((KV, cap, D)).astype(np.float32))
    ops.cache_write(vc, 0, 2 * r.standard_normal((KV, cap, D)).astype(np.float32))
    got = kernel(cos, sin, True, p0, window, np.float32(D**-0.5), H, qkv, kc, vc)
    q = qkv[: H * D].astype(np.float64).reshape(1, H, D)  # rotated in place by the kernel
    P = p0 + 1
    k64, v64 = ops.cache_rows(kc, P).astype(np.float64), ops.cache_rows(vc, P).astype(np.float64)
    ref = ops.attention_np(q, k64, v64, p0, window, D**-0.5)[0]
    written = ops.cache_rows(kc, P)[:, p0]
    k_new = qkv[H * D : (H + KV) * D].reshape(KV, D)
    return got, ref, written, k_new


def _kernels():
    yield "one part", ops.attend_token
    for parts in (3, 8):
        yield f"{parts} parts", functools.partial(ops.attend_token, parts=parts)


@compiled
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize(
    "H, KV, D, p0, window",
    [
        (9, 3, 64, 0, 0),  # SmolLM2's heads, one position
        (9, 3, 64, 6, 0),
        (9, 3, 64, 3000, 0),  # past the old switch to BLAS (~2,700)
        (6, 2, 40, 1234, 100),  # sliding window; D not a multiple of 32 (q8_0: row blocks)
        (4, 4, 96, 301, 0),  # Phi-3's head dim, no grouping
        (8, 1, 32, 2801, 2800),  # window just short of the cache
    ],
)
def test_decode_attention_matches_float64_reference(kind, H, KV, D, p0, window):
    """The one-token kernel (1, 3, 8 parts per kv head) against
    `attention_np` in float64 over the same cache values: they read each type exactly, so
    only float32 rounding remains; the new row is stored as the type rounds it."""
    for name, kernel in _kernels():
        got, ref, written, k_new = _decode_case(H, KV, D, p0, window, kind, kernel)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 2e-5, (name, err)
        step = {"f32": 0, "f16": 2.0**-10 * np.abs(k_new), "q8_0": np.abs(k_new).max() / 127}
        assert (np.abs(written - k_new) <= step[kind] * 0.5 + 1e-6).all(), name
        if kind == "f16":  # the compiled store rounds as NumPy's cast (prefill's store)
            np.testing.assert_array_equal(written, k_new.astype(np.float16).astype(np.float32))


vector = pytest.mark.skipif(
    not numba_available() or ops.DOT_ROWS == 0, reason="needs numba on an AVX2 x86 CPU"
)


@vector
@pytest.mark.parametrize("W", [8, 16])  # AVX2's lanes, AVX-512's: both run on this CPU
@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("D", [64, 96])
def test_vector_attention_kernels_against_float64(W, kind, D):
    """The two IR kernels of decode attention, built for W lanes, against float64 over the
    cache's own values: W scores of q against W consecutive K rows (the cross-lane sum
    must put row i's total in lane i), and o[g] += W weights times W V rows."""
    import numba

    dot_rows, pv_rows = ops.vector_kernels(W)

    @numba.njit
    def scores(q, q0, c, kv, r, s, g, j, scale):
        dot_rows(q, q0, c, kv, r, s, g, j, scale)

    @numba.njit
    def weighted(o, g, s, j, c, kv, r):
        pv_rows(o, g, s, j, c, kv, r)

    r = np.random.default_rng(W + D)
    KV, cap, G = 2, 3 * W + 5, 2
    c = ops.new_cache(kind, KV, cap, D)
    ops.cache_write(c, 0, r.standard_normal((KV, cap, D)).astype(np.float32))
    rows = ops.cache_rows(c, cap).astype(np.float64)  # the values as the cache holds them
    q = r.standard_normal(3 * D).astype(np.float32)
    s = np.full((G, 2 * W + 3), -7.0, np.float32)
    scores(q, D, c, 1, W + 3, s, 1, 2, np.float32(0.5))  # q[D : 2D], rows W+3 .., s[1, 2 ..]
    want = 0.5 * rows[1, W + 3 : 2 * W + 3] @ q[D : 2 * D].astype(np.float64)
    np.testing.assert_allclose(s[1, 2 : 2 + W], want, rtol=1e-5, atol=1e-5)
    assert (s[0] == -7).all() and (s[1, :2] == -7).all() and (s[1, 2 + W :] == -7).all()

    o = r.standard_normal((G, D)).astype(np.float32)
    before = o.astype(np.float64)
    weighted(o, 1, s, 2, c, 0, 5)  # o[1] += s[1, 2 : 2 + W] . rows 5 .. 5 + W - 1 of head 0
    want = before[1] + s[1, 2 : 2 + W].astype(np.float64) @ rows[0, 5 : 5 + W]
    np.testing.assert_allclose(o[1], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(o[0], before[0].astype(np.float32))


def test_token_parts_by_size(monkeypatch):
    """One part per kv head for short caches or one thread; over long ones enough parts of
    at least 64 positions that the KV x parts items split evenly across the threads."""
    assert ops.token_parts(10, 9, 3, 64, threads=2) == 1
    assert ops.token_parts(4096, 9, 3, 64, threads=1) == 1
    parts = ops.token_parts(4096, 9, 3, 64, threads=2)
    assert parts > 1 and (3 * parts) % 2 == 0 and 4096 / parts >= 64
    edge = ops.LOOP_ATTENTION_MAX // (9 * 64)  # the most positions one part takes
    assert ops.token_parts(edge, 9, 3, 64, threads=2) == 1
    assert ops.token_parts(edge + 1, 9, 3, 64, threads=2) > 1
    monkeypatch.setattr(ops, "LOOP_ATTENTION_MAX", 1 << 17)
    assert ops.token_parts(300, 9, 3, 64, threads=2) == 4  # ceil(300 / 64) parts at most


@compiled
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("B", [2, 3, 5, 17])
def test_attend_tokens_rows_equal_each_token_alone(kind, B):
    """B tokens in one call (17: more than a batch of sessions usually holds), sessions of their
    own or one cache shared by consecutive positions, sliding window and parts mixed: each
    row and each cache write equals `attend_token` of that token alone, bit for bit."""
    H, KV, D, window = 6, 2, 64, 40
    r = np.random.default_rng(B)
    width = (H + 2 * KV) * D
    qkv = r.standard_normal((B, width)).astype(np.float32)
    ang = r.uniform(0, 6, (B, D // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    p0s = r.integers(0, 90, B)
    p0s[0] = 0  # an empty cache
    parts = r.choice([1, 2, 5], B)

    def cache(cap):
        c = ops.new_cache(kind, KV, cap, D)
        ops.cache_write(c, 0, r.standard_normal((KV, cap, D)).astype(np.float32))
        return c

    kcs = tuple(cache(int(p) + 1 + i) for i, p in enumerate(p0s))
    vcs = tuple(cache(int(p) + 1 + i) for i, p in enumerate(p0s))
    alone_k = [_copy_cache(k) for k in kcs]
    alone_v = [_copy_cache(v) for v in vcs]
    scale = np.float32(0.125)
    got = attend_tokens(parts, cos, sin, True, p0s, window, scale, H, qkv.copy(), kcs, vcs)
    assert got.shape == (B, H * D)
    for b in range(B):
        want = ops.attend_token(
            cos[b : b + 1], sin[b : b + 1], True, int(p0s[b]), window, np.float32(0.125), H,
            qkv[b].copy(), alone_k[b], alone_v[b], parts=int(parts[b]),
        )  # fmt: skip
        np.testing.assert_array_equal(got[b], want)
        for batch_c, alone_c in ((kcs[b], alone_k[b]), (vcs[b], alone_v[b])):
            cap = k_cap(batch_c)
            got_c, want_c = ops.cache_rows(batch_c, cap), ops.cache_rows(alone_c, cap)
            np.testing.assert_array_equal(got_c, want_c)

    # a run of consecutive tokens over one shared cache (speculative verification)
    T, p0 = min(B, 6), 30
    kc, vc = cache(p0 + T), cache(p0 + T)
    kc1, vc1 = _copy_cache(kc), _copy_cache(vc)
    run = attend_tokens(
        np.ones(T, np.int64), cos[:T], sin[:T], False, np.arange(p0, p0 + T), 0,
        np.float32(0.125), H, qkv[:T].copy(), (kc,) * T, (vc,) * T,
    )  # fmt: skip
    for i in range(T):  # one step at a time, each writing its row first
        want = ops.attend_token(
            cos[i : i + 1], sin[i : i + 1], False, p0 + i, 0, np.float32(0.125), H,
            qkv[i].copy(), kc1, vc1,
        )  # fmt: skip
        np.testing.assert_array_equal(run[i], want)


def attend_tokens(parts, cos, sin, neox, p0s, window, scale, n_heads, qkv, kcs, vcs):
    """`ops.attend_rows` of B rows whose caches are given as tuples (B each)."""
    table = ops.cache_table(list(zip(kcs, vcs, strict=True)))
    kernel = ops.attend_kernel(parts, p0s, n_heads, ops.cache_shape(kcs[0])[2])
    args = (parts, cos, sin, neox, p0s, window, scale, n_heads, qkv, table, kcs[0])
    return ops.attend_rows(kernel, *args)


def k_cap(c):
    return ops.cache_shape(c)[1]


def test_attend_kernel_by_rows_and_size():
    """One token stays on the calling thread up to `LOOP_ATTENTION_MAX` multiply-adds in one
    part; several up to `ROWS_ATTENTION_MAX` in all; past that, or in parts, numba's threads."""
    H, D = 9, 64
    one = np.ones(1, np.int64)
    edge = ops.LOOP_ATTENTION_MAX // (H * D)  # positions one token takes on this thread
    assert ops.attend_kernel(one, np.array([edge - 1]), H, D) is ops.attend_batch_serial
    assert ops.attend_kernel(one, np.array([edge]), H, D) is ops.attend_batch
    assert ops.attend_kernel(one * 2, np.array([3]), H, D) is ops.attend_batch
    rows = ops.ROWS_ATTENTION_MAX // (4 * H * D)  # positions each of 4 rows takes there
    four = np.ones(4, np.int64)
    assert ops.attend_kernel(four, np.full(4, rows - 1), H, D) is ops.attend_batch_serial
    assert ops.attend_kernel(four, np.full(4, rows + 1), H, D) is ops.attend_batch


def _parallel_regions(py_func, args, parallel):
    """How many parallel regions (launches of numba's threads) ``py_func`` compiled with
    ``parallel`` makes, after calling it with ``args``."""
    import numba

    probe = numba.njit(parallel=parallel, fastmath=True, error_model="numpy")(py_func)
    probe(*args)
    return len(probe.get_metadata(probe.signatures[0])["parfor_diagnostics"].get_parfors())


@compiled
@pytest.mark.slow  # compiles three kernels afresh (~35 s); the test below checks the options
def test_threaded_kernels_launch_the_threads_once_a_call():
    """The kernels on numba's threads, compiled with their own ``parallel`` option, make one
    parallel region a call (their one ``prange``): the NumPy calls around it (the attention
    kernel's ``np.zeros`` scratch) run on the calling thread.  With numba's plain
    ``parallel=True`` the attention kernel makes four."""
    from fallback.kernels import avx2_kernels
    from phimlx.gguf import GGMLType

    H, KV, D, B = 6, 2, 64, 3
    r = np.random.default_rng(0)
    caches = [(ops.new_cache("f16", KV, 40, D), ops.new_cache("f16", KV, 40, D)) for _ in range(B)]
    ang = r.uniform(0, 6, (B, D // 2))
    args = (
        np.ones(B, np.int64), np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32),
        True, np.array([5, 9, 30]), 0, np.float32(0.125), H,
        r.standard_normal((B, (H + 2 * KV) * D)).astype(np.float32),
        caches[0][0], ops.cache_table(caches),
    )  # fmt: skip
    attend = ops.attend_batch.py_func
    assert _parallel_regions(attend, args, ops.attend_batch.targetoptions["parallel"]) == 1
    assert _parallel_regions(attend, args, True) == 4
    avx2 = avx2_kernels()
    if avx2 is not None:
        w = np.zeros((16, 18 * 20), np.uint8)
        for make, x in ((avx2.matmul_int8, np.ones((4, 576), np.float32)),
                        (avx2.matvec_int8, np.ones(576, np.float32))):  # fmt: skip
            driver = make(GGMLType.Q4_1, parallel=True)
            out = np.zeros((*x.shape[:-1], 16), np.float32)
            opts = driver.targetoptions["parallel"]
            assert _parallel_regions(driver.py_func, (w, w[:0], w[:0], x, out), opts) == 1


@compiled
def test_every_threaded_kernel_takes_the_prange_only_option():
    """Each compiled kernel here that runs on numba's threads (the ones the test above does
    not count too: the numba matvecs and decoders, the MLX-format affine kernels, AMX)
    takes `prange_only`'s options: its ``prange`` and nothing else, not numba's plain
    ``parallel=True`` (nor a dict numba emptied while a first kernel read it)."""
    import importlib

    from numba.core.cpu_options import ParallelOptions
    from numba.core.registry import CPUDispatcher

    names = ["fallback.ops", "fallback.affine_kernels", "fallback.kernels.numba_matvec",
             "fallback.kernels.numba_decode", "fallback.kernels.avx2",
             "fallback.kernels.amx"]  # fmt: skip
    seen = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a CPU without the engine: nothing compiled there
            continue
        for attr, obj in vars(mod).items():
            if not isinstance(obj, CPUDispatcher):
                continue
            opts = obj.targetoptions.get("parallel")
            if opts is None or opts is False:  # (an emptied dict, {}, is not skipped)
                continue
            assert isinstance(opts, ParallelOptions), (name, attr, opts)
            flags = {k: getattr(opts, k) for k in ("enabled", "prange", "numpy", "comprehension",
                     "reduction", "inplace_binop", "setitem", "stencil", "fusion")}  # fmt: skip
            assert flags == {**dict.fromkeys(flags, False), "enabled": True, "prange": True,
                             "fusion": True}, (name, attr, flags)  # fmt: skip
            seen.append(f"{name}.{attr}")
    assert any("numba_matvec" in n for n in seen) and any("affine" in n for n in seen), seen
    assert "fallback.ops.attend_batch" in seen, seen


def _copy_cache(c):
    return tuple(x.copy() for x in c) if isinstance(c, tuple) else c.copy()


def test_f16_cache_rounds_like_numpy():
    """The NumPy writes (prefill) and the compiled ones (decode) store the same float16."""
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32) * 1e3
    c = ops.new_cache("f16", 2, 5, 16)
    ops.cache_write(c, 0, x)
    np.testing.assert_array_equal(ops.cache_rows(c, 5), x.astype(np.float16).astype(np.float32))


def test_f16_cache_reads_every_value_as_numpy():
    """A float16 cache read as float32 (the prefill's attention; compiled where numba is)
    gives NumPy's conversion of every one of the 65,536 bit patterns, subnormals and
    infinities included (NaNs as NaNs), at positions past the ones asked for untouched."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(4, 2048, 8)
    got = ops.cache_rows(bits, 2000)
    want = bits[:, :2000].view(np.float16).astype(np.float32)
    assert got.shape == (4, 2000, 8) and got.dtype == np.float32
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@compiled
def test_software_float16_conversions_are_exact():
    """The integer-only float16 conversions (CPUs without F16C) against NumPy's: every
    float16 bit pattern to float32, and float32 values across the range to float16."""
    import numba

    to32 = numba.njit(ops._f32_from_f16_soft)
    to16 = numba.njit(ops._f16_from_f32_soft)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = np.array([to32(h) for h in halves], np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()
    r = np.random.default_rng(3)
    x = np.concatenate(
        [
            r.standard_normal(20000).astype(np.float32)
            * np.float32(10.0) ** r.integers(-9, 6, 20000),
            np.float32([0.0, -0.0, 65504, 65519.99, 65520, 1e9, np.inf, -np.inf, 2**-24, 2**-25]),
            want[np.isfinite(want)] + want[np.isfinite(want)] * np.float32(2**-11),  # ties
        ]
    ).astype(np.float32)
    got16 = np.array([to16(v) for v in x], np.uint16)
    with np.errstate(over="ignore"):  # to inf, as intended
        want16 = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got16, want16)
