"""The NumPy backend against independent implementations reading the same GGUF file:
transformers + torch (which dequantizes with gguf-py and runs its own modelling code) and
llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

import fallback
from fallback.kernels import numba_available
from phimlx.config import ModelConfig
from phimlx.gguf import open_gguf


def our_logits(
    path, ids, n_prefill, max_context=256, int8_activations=False, kv="f32", threads=None
):
    """Logits after each of ids[n_prefill-1:], via one batched prefill and then steps;
    float activations and a float32 KV cache unless asked (the int8 default rounds x, as
    llama.cpp does; the f16 default rounds K and V)."""
    mf = open_gguf(path)
    model = fallback.load(
        mf,
        ModelConfig.from_gguf(mf),
        int8_activations=int8_activations,
        warmup=False,
        kv_cache_type=kv,
        threads=threads,
    )
    s = model.new_session(max_context)
    out = [s.prefill(ids[:n_prefill])]
    out += [s.step(t) for t in ids[n_prefill:]]
    return np.stack(out)


def hf_logits(path, ids, rope=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    if rope is not None:
        rope(model)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_smollm2_matches_transformers(smollm2_path):
    ids = [1, 504, 3458, 5135, 282, 260, 1789, 30, 378, 1122, 314, 28, 1340, 17, 2]
    ours = our_logits(smollm2_path, ids, 9)
    ref = hf_logits(smollm2_path, ids)[8:]
    assert rel_err(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


PHI3_CASES = [
    dict(mix="F32"),
    dict(mix="F16", n_kv_heads=2),
    dict(mix="BF16"),
    dict(mix="Q8_0"),
    dict(mix="Q4_0", n_kv_heads=1),
    dict(mix="Q4_1"),
    dict(mix="Q5_0"),
    dict(mix="Q5_1", n_heads=2),
    dict(mix="Q4_K_M", hidden=256, ffn=512, n_layers=3),
    dict(mix="Q6_K", hidden=256, ffn=256),
    dict(mix="Q2_K", hidden=256, ffn=256),
    dict(mix="Q3_K", hidden=256, ffn=256),
    dict(mix="Q5_K", hidden=256, ffn=256, rope_base=500000.0),
]


@pytest.mark.parametrize("case", PHI3_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_phi3_matches_transformers(make_model, case):
    fields = dict(n_layers=2, hidden=64, ffn=128, n_heads=4) | case
    path = make_model(**fields)
    ids = np.random.default_rng(0).integers(0, 32000, size=24).tolist()
    ours = our_logits(path, ids, 16)
    ref = hf_logits(path, ids)[15:]
    assert rel_err(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_llama_architecture_synthetic_matches_transformers(make_model):
    # A llama GGUF stores Q/K permuted for the interleaved rope; transformers un-permutes them.
    path = make_model(
        architecture="llama", n_layers=2, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, mix="Q8_0"
    )
    ids = np.random.default_rng(1).integers(0, 32000, size=20).tolist()
    ours = our_logits(path, ids, 12)
    ref = hf_logits(path, ids)[11:]
    assert rel_err(ours, ref) < 1e-4


def _longrope(cfg: ModelConfig, max_positions: int):
    def apply(model):
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        c = model.config
        c.rope_parameters = {
            "rope_type": "longrope",
            "rope_theta": cfg.rope_base,
            "long_factor": list(cfg.rope_long_factors),
            "short_factor": list(cfg.rope_short_factors),
            "original_max_position_embeddings": cfg.rope_original_context,
            "factor": max_positions / cfg.rope_original_context,
        }
        c.original_max_position_embeddings = cfg.rope_original_context
        c.max_position_embeddings = max_positions
        model.model.rotary_emb = Phi3RotaryEmbedding(c)

    return apply


@pytest.mark.parametrize(
    "n_tokens, max_context", [(80, 1024), (40, 64)], ids=["long-factors", "short-factors"]
)
def test_longrope_matches_transformers(make_model, n_tokens, max_context):
    """LongRoPE (Phi-3 128k): per-pair factors and the attention factor.  transformers picks
    long factors when the sequence exceeds the original context, llama.cpp (and we) when the
    session's context does: the cases below are where both rules agree."""
    path = make_model(
        n_layers=2, hidden=64, ffn=128, n_heads=4, mix="F32", context=1024, original_context=64
    )
    cfg = ModelConfig.from_gguf(open_gguf(path))
    assert cfg.rope_attn_factor == pytest.approx(np.sqrt(1 + np.log(16) / np.log(64)))
    ids = np.random.default_rng(2).integers(0, 32000, size=n_tokens).tolist()
    ours = our_logits(path, ids, n_tokens, max_context=max_context)
    ref = hf_logits(path, ids, rope=_longrope(cfg, 1024))[-1:]
    assert rel_err(ours, ref) < 1e-4


def test_sliding_window_limits_attention(make_model):
    """With a window of 4, the logits at position p depend only on tokens p-3..p: changing
    the first token changes nothing at position 10 (and does without a window)."""
    windowed = make_model(n_layers=1, hidden=64, ffn=128, n_heads=4, sliding_window=4)
    full = make_model(n_layers=1, hidden=64, ffn=128, n_heads=4)
    ids = np.random.default_rng(3).integers(0, 32000, size=11).tolist()
    other = [ids[0] + 1] + ids[1:]
    for path, same in ((windowed, True), (full, False)):
        a, b = our_logits(path, ids, 11), our_logits(path, other, 11)
        assert np.allclose(a, b, atol=1e-5) == same


def test_prefill_in_chunks_equals_steps(tiny_phi3, monkeypatch):
    import fallback.model as fm

    ids = np.random.default_rng(4).integers(0, 32000, size=30).tolist()
    one_by_one = our_logits(tiny_phi3, ids, 1)[-1]
    monkeypatch.setattr(fm, "PREFILL_CHUNK", 7)
    chunked = our_logits(tiny_phi3, ids, 30)[-1]
    np.testing.assert_allclose(chunked, one_by_one, rtol=1e-4, atol=1e-4)


def test_attention_engine_dispatch(tiny_phi3, monkeypatch):
    """Prefill chunks past `ops.prefill_by_rows`' bounds take the batched block
    (`ops.attend`); single tokens the compiled one (`ops.attend_rows`), in one part per kv
    head over at most ``LOOP_ATTENTION_MAX / (H * D)`` positions and in several above,
    never BLAS.  Across the switch the logits still match transformers."""
    from fallback import ops

    cfg = ModelConfig.from_gguf(open_gguf(tiny_phi3))
    calls: dict[str, int] = {"attend": 0}
    monkeypatch.setattr(ops, "ROWS_PREFILL_SMALL", 0)  # the tiny model's prompt is short
    monkeypatch.setattr(ops, "ROWS_PREFILL_TOKENS", 0)

    def counted(name):
        real = getattr(ops, name)

        def call(*args, **kwargs):
            key = name if name == "attend" else f"attend_token/{int(args[1][0])}"  # parts
            calls[key] = calls.get(key, 0) + 1
            return real(*args, **kwargs)

        return call

    for name in ("attend", "attend_rows"):
        monkeypatch.setattr(ops, name, counted(name))
    # prefill of 100, then steps at positions 100..139: one part up to 120 positions, then
    # split (past 2 x 64 positions there are parts enough for two threads)
    monkeypatch.setattr(ops, "LOOP_ATTENTION_MAX", 120 * cfg.n_heads * cfg.head_dim)
    ids = np.random.default_rng(6).integers(0, 32000, size=140).tolist()
    ours = our_logits(tiny_phi3, ids, 100, threads=2)  # one thread would never split
    L = cfg.n_layers
    if ops.FUSED_DECODE:
        import numba

        one = calls.pop("attend_token/1")
        split = sum(calls.pop(k) for k in list(calls) if k.startswith("attend_token/"))
        if numba.config.NUMBA_NUM_THREADS > 1:
            assert (one, split) == (20 * L, 20 * L)  # positions 101..120 whole, 121..140 split
        else:
            assert (one, split) == (40 * L, 0)
        assert calls == {"attend": L}
    else:
        assert calls == {"attend": L * 41}
    assert rel_err(ours, hf_logits(tiny_phi3, ids)[99:]) < 1e-4


@pytest.mark.skipif(not numba_available(), reason="the compiled attention needs numba")
@pytest.mark.parametrize("kv", ["f32", "q8_0"])
def test_short_prefills_attend_token_by_token(tiny_phi3, monkeypatch, kv):
    """A prefill chunk within `ops.prefill_by_rows`' bounds attends through the compiled
    one-token block, one row a token at its own position (one call a layer, no
    `ops.attend`); a longer one through `ops.attend`.  Both match transformers."""
    from fallback import ops

    cfg = ModelConfig.from_gguf(open_gguf(tiny_phi3))
    H, D, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
    assert ops.prefill_by_rows(8, 40, H, D) and not ops.prefill_by_rows(17, 4096, 32, 96)
    assert ops.prefill_by_rows(100, 100, 9, 64) and not ops.prefill_by_rows(100, 2000, 9, 64)
    assert ops.prefill_by_rows(16, 4000, 9, 64) and not ops.prefill_by_rows(32, 4000, 9, 64)
    calls: dict[str, list[int]] = {"attend": [], "attend_rows": []}

    def counted(name):
        real = getattr(ops, name)

        def call(*args, **kwargs):
            rows = args[7].shape[0] if name == "attend" else args[9].shape[0]  # qkv
            calls[name].append(rows)
            return real(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(ops, name, counted(name))
    ids = np.random.default_rng(8).integers(0, 32000, size=40).tolist()
    ref = hf_logits(tiny_phi3, ids)
    short = our_logits(tiny_phi3, ids, 40, kv=kv)  # a prefill of 40 tokens: token by token
    assert calls == {"attend": [], "attend_rows": [40] * L}
    tol = 1e-4 if kv == "f32" else 1e-2  # q8_0 rounds K and V to 8 bits
    assert rel_err(short, ref[39:]) < tol
    calls["attend_rows"].clear()
    monkeypatch.setattr(ops, "ROWS_PREFILL_SMALL", 0)
    monkeypatch.setattr(ops, "ROWS_PREFILL_TOKENS", 0)
    batched = our_logits(tiny_phi3, ids, 40, kv=kv)
    assert calls == {"attend": [40] * L, "attend_rows": []}
    assert rel_err(batched, ref[39:]) < tol


def test_step_async_is_a_finished_step(tiny_phi3):
    """The NumPy backend computes eagerly: `step_async` appends the token and returns
    `Finished` logits equal to transformers' for that position."""
    from phimlx.backends import Finished, Session

    ids = np.random.default_rng(8).integers(0, 32000, size=6).tolist()
    mf = open_gguf(tiny_phi3)
    model = fallback.load(
        mf, ModelConfig.from_gguf(mf), int8_activations=False, kv_cache_type="f32"
    )
    s = model.new_session(16)
    assert isinstance(s, Session)
    s.prefill(ids[:5])
    handle = s.step_async(ids[5])
    assert isinstance(handle, Finished) and s.position == 6
    assert rel_err(handle.result(), hf_logits(tiny_phi3, ids)[5]) < 1e-4


@pytest.mark.parametrize("int8", [None, False], ids=["default", "float"])
def test_smollm2_teacher_forced_argmax_agrees_with_llama_cpp(smollm2_path, int8):
    """llama.cpp quantizes activations to 8 bits inside its matmuls, so logits differ a
    little; the argmax must agree wherever llama.cpp's top-2 margin exceeds 0.5, with our
    default (int8 activations where the kernels exist) and with float activations."""
    try:
        import llama_cpp
    except ImportError:
        require("llama-cpp-python", "pip install llama-cpp-python")
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, there"]
    checked = 0
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        # greedy continuation by llama.cpp, then both score the whole sequence
        cont = list(ids)
        llm.reset()
        llm.eval(cont)
        for _ in range(24):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            cont.append(nxt)
            llm.eval([nxt])
        ref = np.array(llm.scores[: len(cont)])
        ours = our_logits(smollm2_path, cont, len(ids), int8_activations=int8)
        ref = ref[len(ids) - 1 :]
        top2 = np.sort(ref, axis=-1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) > 0.5
        assert (ours.argmax(-1)[confident] == ref.argmax(-1)[confident]).all()
        checked += int(confident.sum())
    assert checked >= 40


def test_pure_numpy_path_matches_numba_path(tiny_phi3, tmp_path):
    """Where numba is missing (PHIMLX_NO_NUMBA=1 simulates it) the whole backend still runs,
    through the NumPy kernels and ops, and agrees with the compiled path."""
    import os
    import subprocess
    import sys

    ids = np.random.default_rng(5).integers(0, 32000, size=12).tolist()
    script = (
        "import sys, numpy as np, fallback\n"
        "from phimlx.gguf import open_gguf\nfrom phimlx.config import ModelConfig\n"
        "from fallback.kernels import numba_available\n"
        "assert not numba_available()\n"
        f"mf = open_gguf({str(tiny_phi3)!r})\n"
        "s = fallback.load(mf, ModelConfig.from_gguf(mf), kv_cache_type='f32')"
        ".new_session(64)\n"
        f"ids = {ids}\n"
        "out = [s.prefill(ids[:8])] + [s.step(t) for t in ids[8:]]\n"
        f"np.save({str(tmp_path / 'np.npy')!r}, np.stack(out))\n"
    )
    env = {**os.environ, "PHIMLX_NO_NUMBA": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "np.npy"), our_logits(tiny_phi3, ids, 8), rtol=1e-4, atol=1e-4
    )


def test_int8_activations_are_the_default_and_stay_close_to_float(smollm2_path, monkeypatch):
    """Decoding defaults to int8 activations where kernels exist (as llama.cpp computes);
    SmolLM2's logits then stay within 5e-2 of the float path's largest logit (our float path
    and llama.cpp differ by about as much) and every argmax with a top-2 margin above 0.5
    is kept.  ``PHIMLX_INT8_ACTIVATIONS=0`` restores float activations."""
    from fallback.kernels import int8_kernel_available
    from phimlx.gguf import GGMLType

    if not int8_kernel_available(GGMLType.Q4_1, 576):
        pytest.skip("no int8-activation kernels on this CPU (they need numba and AVX2)")
    monkeypatch.delenv("PHIMLX_INT8_ACTIVATIONS", raising=False)
    mf = open_gguf(smollm2_path)
    default = fallback.load(mf, ModelConfig.from_gguf(mf))
    mats = default._matrices()
    assert mats and all(m.int8_activations for m in mats)  # Q4_1 blocks, Q8_0 head
    monkeypatch.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
    mf = open_gguf(smollm2_path)
    assert not any(
        m.int8_activations for m in fallback.load(mf, ModelConfig.from_gguf(mf))._matrices()
    )
    ids = [1, 504, 3458, 5135, 282, 260, 1789, 30, 378, 1122, 314, 28, 1340, 17, 2]
    ids += np.random.default_rng(7).integers(100, 40000, size=40).tolist()
    exact = our_logits(smollm2_path, ids, 1, int8_activations=False)
    fast = our_logits(smollm2_path, ids, 1, int8_activations=True)
    assert 1e-4 < rel_err(fast, exact) < 5e-2  # rounded (not the float path), but close
    top2 = np.sort(exact, axis=-1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > 0.5
    assert confident.sum() >= 20
    assert (fast.argmax(-1)[confident] == exact.argmax(-1)[confident]).all()
