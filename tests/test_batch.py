"""Batched decoding, each part checked against independent per-session computations:
`step_batch` (B sessions, one forward pass) against twin sessions stepped one by one,
`prefill(all_logits=True)` against separate prefills of every prefix, and
`Model.batch_generate` against `Model.generate` per prompt.

The NumPy comparisons that must hold to float rounding load the model with float
activations (``PHIMLX_INT8_ACTIVATIONS=0``): a batch multiplies its rows with
`QuantMatrix.matmul`, a step with the decode matvecs, and only float activations make those
agree to rounding whatever the kernels.  One test per part runs the default settings.
"""

from __future__ import annotations

import numpy as np
import pytest

import fallback
import phimlx
from fallback import ops
from phimlx.config import ModelConfig
from phimlx.errors import ContextLengthError
from phimlx.generate import StepBatch
from phimlx.gguf import open_gguf
from phimlx.tokenizer import Tokenizer

RTOL = 1e-4  # float activations: batched rows vs matvecs differ by float32 rounding
GREEDY = dict(temperature=0, repeat_penalty=1.0)
TINY = dict(n_layers=2, hidden=64, ffn=128, n_heads=4, tokenizer=False)
PROMPT_LENGTHS = (1, 4, 9, 17, 30)  # five sessions at five positions


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def load_numpy(path, *, float_activations: bool):
    """The NumPy backend's model of ``path``; ``PHIMLX_INT8_ACTIVATIONS`` is read at load."""
    with pytest.MonkeyPatch.context() as mp:
        if float_activations:
            mp.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
        else:
            mp.delenv("PHIMLX_INT8_ACTIVATIONS", raising=False)
        mf = open_gguf(path)
        # a float32 KV cache: the f16 default rounds K and V, which turns the rows' float32
        # rounding differences into float16 ones
        model = fallback.load(mf, ModelConfig.from_gguf(mf), warmup=False, kv_cache_type="f32")
    if float_activations:
        assert not any(m.int8_activations for m in model._matrices())
    return model


def load_mlx(path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from phimlx.mlx import load

    mf = open_gguf(path)
    return load(mf, ModelConfig.from_gguf(mf))


def prompts_for(model, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, model.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def twin_sessions(model, prompts, contexts):
    """Two independent sets of sessions holding the same prompts (the twin gets a copy of
    the prefilled cache: one prefill per prompt)."""
    pairs = []
    for p, c in zip(prompts, contexts, strict=True):
        a, b = model.new_session(c), model.new_session(c)
        a.prefill(p)
        b.load_kv_state(*a.kv_state())
        pairs.append((a, b))
    return [a for a, _ in pairs], [b for _, b in pairs]


def batched_vs_steps(model, contexts=(64,) * 5, sizes=(1, 3, 5), rounds=2, seed=0):
    """Step random subsets (in random order) of five sessions with `step_batch` and their
    twins one by one with `step`; returns (B, batched logits, stepped logits) per call."""
    rng = np.random.default_rng(seed)
    batched, twins = twin_sessions(model, prompts_for(model, seed), contexts)
    out = []
    for B in sizes:
        for _ in range(rounds):
            pick = rng.choice(len(batched), size=B, replace=False)
            toks = rng.integers(3, model.config.vocab_size, size=B)
            got = model.step_batch([batched[i] for i in pick], toks.tolist())
            want = np.stack([twins[i].step(int(t)) for i, t in zip(pick, toks, strict=True)])
            assert got.dtype == np.float32 and got.shape == (B, model.config.vocab_size)
            out.append((B, got, want))
    assert [s.position for s in batched] == [s.position for s in twins]
    return out


def check_rows(results, rtol: float) -> None:
    for B, got, want in results:
        for b in range(B):
            assert rel_err(got[b], want[b]) < rtol, f"B={B} row {b}"
        if B == 1:  # one session is `step` itself
            np.testing.assert_array_equal(got, want)
        else:  # the rows are different sequences' (the comparison above means something)
            assert rel_err(got[0], got[1]) > 1e-2


# ------------------------------------------------------------ step_batch, NumPy backend

NUMPY_CASES = {
    "phi3-f32": dict(mix="F32"),
    "phi3-q4_0-window": dict(mix="Q4_0", sliding_window=8),
    "llama-q4_1-gqa": dict(architecture="llama", mix="Q4_1", n_kv_heads=2),
    "phi3-q8_0": dict(mix="Q8_0", n_kv_heads=1),
}


@pytest.mark.parametrize("attention", ["fused", "blas"])
@pytest.mark.parametrize("case", NUMPY_CASES)
def test_numpy_step_batch_equals_steps(make_model, monkeypatch, case, attention):
    """B = 1, 3, 5 sessions at different positions (past an 8-token window too), with the
    compiled one-token attention or the BLAS one (as over long caches)."""
    if attention == "blas":
        monkeypatch.setattr(ops, "LOOP_ATTENTION_MAX", 0)
    model = load_numpy(make_model(**TINY | NUMPY_CASES[case]), float_activations=True)
    check_rows(batched_vs_steps(model), RTOL)


def test_numpy_step_batch_longrope_sessions_of_different_contexts(make_model):
    """LongRoPE picks short or long factors per session context: each row keeps its own."""
    path = make_model(
        **TINY | dict(hidden=256, ffn=256, mix="Q4_K", context=256, original_context=64)
    )
    model = load_numpy(path, float_activations=True)
    results = batched_vs_steps(model, contexts=(64, 200, 64, 256, 100))
    check_rows(results, RTOL)


def test_numpy_step_batch_smollm2(smollm2_path):
    model = load_numpy(smollm2_path, float_activations=True)
    check_rows(batched_vs_steps(model, contexts=(128,) * 5, rounds=1), RTOL)


def test_numpy_step_batch_default_activations_smollm2(smollm2_path):
    """Default settings (int8 activations where a kernel exists): where every matrix has
    an int8 kernel (AVX2), a batch's rows run the int8 matmul, whose rows equal the step's
    int8 matvec bit for bit, and attention is the step's own: the logits are the step's
    exactly.  Elsewhere: greedy agreement on text the model is sure about, logits within
    the int8 rounding of activations."""
    model = load_numpy(smollm2_path, float_activations=False)
    exact = all(m.int8_activations for m in model._matrices())
    texts = [
        "The capital of France is",
        "One, two, three, four,",
        "def add(a, b):\n    return",
    ]
    tok = Tokenizer.from_gguf(model.file)
    batched, twins, toks = [], [], []
    for text in texts:
        a, b = model.new_session(64), model.new_session(64)
        a.prefill(tok.encode(text))
        toks.append(int(np.argmax(b.prefill(tok.encode(text)))))
        batched.append(a)
        twins.append(b)
    checked = 0
    for _ in range(6):
        got = model.step_batch(batched, toks)
        want = np.stack([s.step(t) for s, t in zip(twins, toks, strict=True)])
        if exact:
            np.testing.assert_array_equal(got, want)
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w) < 0.1
            top2 = np.sort(w)[-2:]
            if top2[1] - top2[0] > 1.0:  # a clear winner: int8 rounding cannot flip it
                assert int(np.argmax(g)) == int(np.argmax(w))
                checked += 1
        toks = [int(t) for t in want.argmax(-1)]
    assert checked >= 6


# ------------------------------------------------------------ step_batch, MLX backend

MLX_CASES = {
    "phi3-q4_0": dict(mix="Q4_0"),
    "llama-q4_1-gqa": dict(architecture="llama", mix="Q4_1", n_kv_heads=2),
    "phi3-window": dict(mix="Q4_0", sliding_window=8),
}


@pytest.mark.parametrize("case", MLX_CASES)
def test_mlx_step_batch_equals_steps(make_model, case):
    model = load_mlx(make_model(**TINY | MLX_CASES[case]))
    check_rows(batched_vs_steps(model, rounds=1), RTOL)


def test_mlx_step_batch_longrope_sessions_of_different_contexts(make_model):
    path = make_model(
        **TINY | dict(hidden=256, ffn=256, mix="Q4_K", context=256, original_context=64)
    )
    model = load_mlx(path)
    check_rows(batched_vs_steps(model, contexts=(64, 200, 64, 256, 100), rounds=1), RTOL)


# ------------------------------------------------------------ validation


@pytest.fixture(scope="module", params=["numpy", "mlx"])
def tiny_backend(request, make_model):
    path = make_model(**TINY | dict(mix="Q4_0"))
    if request.param == "mlx":
        return load_mlx(path)
    return load_numpy(path, float_activations=True)


def bad_batches(model, sessions, other_model_session, full):
    a, b, c = sessions
    v = model.config.vocab_size
    return [
        (ValueError, "outside the vocabulary", [a, b, c], [1, v, 2]),
        (ValueError, "outside the vocabulary", [a, b, c], [1, 2, -1]),
        (ValueError, "appears twice", [a, b, a], [1, 2, 3]),
        (ValueError, "not opened by this model", [a, other_model_session, c], [1, 2, 3]),
        (ValueError, "not opened by this model", [a, "session", c], [1, 2, 3]),
        (ValueError, "one token id per session", [a, b, c], [1, 2]),
        (ValueError, "one token id per session", [a, b, c], [[1], [2], [3]]),
        (ValueError, "no sessions", [], []),
        (ContextLengthError, r"sessions\[2\]: 1 tokens do not fit", [a, b, full], [1, 2, 3]),
    ]


def test_step_batch_errors_leave_every_session_unchanged(tiny_backend, make_model):
    model = tiny_backend
    other = load_numpy(make_model(**TINY | dict(mix="Q4_0")), float_activations=True)
    prompts = prompts_for(model)[1:4]
    sessions, twins = twin_sessions(model, prompts, (64, 64, 64))
    full = model.new_session(len(prompts[2]))
    full.prefill(prompts[2])
    stranger = other.new_session(64)
    stranger.prefill([1, 2])
    cases = bad_batches(model, sessions, stranger, full)
    for error, match, batch, toks in cases:
        before = [getattr(s, "position", None) for s in [*sessions, full, stranger]]
        with pytest.raises(error, match=match):
            model.step_batch(batch, toks)
        assert [getattr(s, "position", None) for s in [*sessions, full, stranger]] == before
    # nothing was written into the caches either: the sessions go on as their twins
    got = model.step_batch(sessions, [5, 6, 7])
    want = np.stack([s.step(t) for s, t in zip(twins, [5, 6, 7], strict=True)])
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < RTOL
    with pytest.raises(ContextLengthError, match="1 tokens do not fit"):
        full.step(1)  # the error a single step gives


# ------------------------------------------------------------ prefill_batch

# Lists of up to 32 tokens (the int8 matmul's reach alone) that make more rows together
# (a pass over all of them with the prefill's own row-count choice would take float tiles),
# one list of 40 (prefilled alone), and one of one token; after prefixes of 0..12 held.
PREFILL_LISTS = (30, 20, 40, 12, 1)
HELD = (0, 3, 12, 5, 7)


def prefill_batch_vs_alone(model, seed: int = 0):
    """`prefill_batch` into sessions holding HELD tokens against twin sessions prefilled
    one by one: the logits, positions and caches must be the same, bit for bit."""
    rng = np.random.default_rng(seed)
    v = model.config.vocab_size
    held = [rng.integers(3, v, n).tolist() for n in HELD]
    lists = [rng.integers(3, v, n).tolist() for n in PREFILL_LISTS]
    batched, twins = [], []
    for h in held:
        a, b = model.new_session(128), model.new_session(128)
        if h:
            a.prefill(h)
            b.prefill(h)
        batched.append(a)
        twins.append(b)
    got = model.prefill_batch(batched, lists)
    want = np.stack([t.prefill(ids) for t, ids in zip(twins, lists, strict=True)])
    assert got.dtype == np.float32 and got.shape == (len(lists), v)
    np.testing.assert_array_equal(got, want)
    assert rel_err(got[0], got[1]) > 1e-2  # different prompts, different logits
    for a, b in zip(batched, twins, strict=True):
        assert a.position == b.position
        for x, y in zip(a.kv_state(), b.kv_state(), strict=True):
            np.testing.assert_array_equal(x, y)
    # and they go on alike
    np.testing.assert_array_equal(batched[1].step(5), twins[1].step(5))


@pytest.mark.parametrize("prompts", ["int8", "float"])
@pytest.mark.parametrize("case", ["llama-q4_1-gqa", "phi3-q8_0", "phi3-q4_0-window"])
def test_numpy_prefill_batch_equals_prefills(make_model, monkeypatch, case, prompts):
    """Default activations (int8 where a kernel exists): the lists the int8 matmul takes
    share one pass (counted) and each gets what its own prefill gives, bit for bit.  With
    prompts on the int8 kernels (``PHIMLX_INT8_PREFILL=1``, the default without AVX-512)
    that is every list; with longer prompts on float tiles (``=0``) the lists of up to 32
    tokens, the 40-token one alone.  A float model prefills each list alone."""
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "1" if prompts == "int8" else "0")
    path = make_model(**TINY | NUMPY_CASES[case])
    model = load_numpy(path, float_activations=False)
    passes = []
    layers = model._layers
    monkeypatch.setattr(model, "_layers", lambda x, *a: passes.append(len(x)) or layers(x, *a))
    prefill_batch_vs_alone(model)
    # (the twins prefill each list alone too: one pass of 40 rows is theirs)
    if not all(m.int8_activations for m in model._matrices()):  # (no AVX2 CPU or numba)
        assert passes.count(40) == 2
    elif prompts == "int8":
        assert sum(PREFILL_LISTS) in passes and passes.count(40) == 1  # one pass for all
    else:
        assert sum(n for n in PREFILL_LISTS if n <= 32) in passes  # the short lists' rows
        assert passes.count(40) == 2  # the long one alone


def test_numpy_prefill_batch_smollm2(smollm2_path):
    prefill_batch_vs_alone(load_numpy(smollm2_path, float_activations=False))


def test_numpy_prefill_batch_float_activations_prefills_each(make_model):
    prefill_batch_vs_alone(
        load_numpy(make_model(**TINY | dict(mix="Q4_0")), float_activations=True)
    )


def test_prefill_batch_errors_leave_every_session_unchanged(make_model):
    model = load_numpy(make_model(**TINY | dict(mix="Q4_0")), float_activations=False)
    a, b = model.new_session(64), model.new_session(8)
    a.prefill([1, 2])
    b.prefill([3, 4, 5])
    v = model.config.vocab_size
    cases = [
        (ValueError, "outside the vocabulary", [a, b], [[1, 2], [3, v]]),
        (ValueError, "no tokens given", [a, b], [[1, 2], []]),
        (ValueError, "appears twice", [a, a], [[1], [2]]),
        (ValueError, "one list of token ids per session", [a, b], [[1]]),
        (ValueError, "no sessions", [], []),
        (ContextLengthError, r"sessions\[1\]: 6 tokens do not fit", [a, b], [[1], [1] * 6]),
    ]
    for error, match, sessions, lists in cases:
        with pytest.raises(error, match=match):
            model.prefill_batch(sessions, lists)
        assert (a.position, b.position) == (2, 3)


def test_public_prefill_batch_tracks_tokens_and_keeps_end_logits(tiny_phi3):
    """`Model.prefill_batch` on each backend (MLX: one prefill after another): the
    sessions' ids, the logits kept for a repeated prompt, and the sessions' checks."""
    backends = ["numpy"] + (["mlx"] if _has_mlx() else [])
    for backend in backends:
        with phimlx.load(tiny_phi3, backend=backend) as model, phimlx.load(tiny_phi3) as other:
            a, b, twin = model.new_session(), model.new_session(), model.new_session()
            a.prefill([1, 2, 3])
            rows = model.prefill_batch([a, b], [[4, 5], [6, 7, 8]])
            assert rows.shape == (2, model.config.vocab_size)
            assert (a.tokens, b.tokens) == ((1, 2, 3, 4, 5), (6, 7, 8))
            np.testing.assert_array_equal(a.logits_at(5), rows[0])
            np.testing.assert_array_equal(b.logits_at(3), rows[1])
            np.testing.assert_allclose(rows[1], twin.prefill([6, 7, 8]), rtol=0, atol=1e-5)
            with pytest.raises(TypeError, match="not a phimlx Session"):
                model.prefill_batch([a, object()], [[1], [2]])
            with pytest.raises(ValueError, match="another model"):
                model.prefill_batch([a, other.new_session()], [[1], [2]])
            with pytest.raises(ValueError, match="outside the vocabulary"):
                model.prefill_batch([a, b], [[1], [model.config.vocab_size]])
            assert (a.tokens, b.tokens) == ((1, 2, 3, 4, 5), (6, 7, 8))


def _has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------ prefill(all_logits=True)


def check_all_logits(model, ids, start: list[int]) -> None:
    """all_logits of ``ids`` after ``start`` already held: row i equals a separate
    session's prefill of start + ids[: i + 1]; the last row the plain prefill's."""
    s = model.new_session(128)
    if start:
        s.prefill(start)
    rows = s.prefill(ids, all_logits=True)
    assert rows.dtype == np.float32 and rows.shape == (len(ids), model.config.vocab_size)
    assert s.position == len(start) + len(ids)
    for i in range(len(ids)):
        ref = model.new_session(128).prefill(start + ids[: i + 1])
        assert rel_err(rows[i], ref) < RTOL, f"row {i}"
    plain = model.new_session(128)
    if start:
        plain.prefill(start)
    np.testing.assert_allclose(rows[-1], plain.prefill(ids), rtol=0, atol=1e-6 * np.abs(rows).max())
    assert rel_err(rows[0], rows[-1]) > 1e-2  # different positions, different logits


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_prefill_all_logits_rows_equal_prefix_prefills(make_model, monkeypatch, backend, chunk):
    path = make_model(**TINY | dict(mix="Q4_0", sliding_window=8))
    model = load_mlx(path) if backend == "mlx" else load_numpy(path, float_activations=True)
    if chunk:  # several prefill chunks
        module = "phimlx.mlx.model" if backend == "mlx" else "fallback.model"
        monkeypatch.setattr(f"{module}.PREFILL_CHUNK", chunk)
    ids = prompts_for(model)[3][:11]
    check_all_logits(model, ids, [])
    check_all_logits(model, ids[:5], [7, 8, 9])


def test_prefill_all_logits_smollm2(smollm2_path):
    model = load_numpy(smollm2_path, float_activations=True)
    check_all_logits(model, [1, 504, 3458, 5135, 282, 260], [])


def test_public_session_prefill_all_logits(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as model:
        s = model.new_session()
        rows = s.prefill([1, 2, 3, 4], all_logits=True)
        assert rows.shape == (4, model.config.vocab_size)
        assert s.tokens == (1, 2, 3, 4)
        np.testing.assert_array_equal(s.logits_at(4), rows[-1])  # kept for reuse


# ------------------------------------------------------------ Model.step_batch


def test_public_step_batch_tracks_tokens_and_checks_sessions(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as model, phimlx.load(tiny_phi3) as other:
        a, b = model.new_session(), model.new_session()
        a.prefill([1, 2, 3])
        b.prefill([4, 5])
        twin = model.new_session()
        twin.prefill([4, 5])
        rows = model.step_batch([a, b], [9, 10])
        assert rows.shape == (2, model.config.vocab_size)
        assert (a.tokens, b.tokens) == ((1, 2, 3, 9), (4, 5, 10))
        np.testing.assert_allclose(rows[1], twin.step(10), rtol=0, atol=1e-4 * np.abs(rows).max())
        with pytest.raises(TypeError, match="not a phimlx Session"):
            model.step_batch([a, object()], [1, 2])
        with pytest.raises(ValueError, match="another model"):
            model.step_batch([a, other.new_session()], [1, 2])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.step_batch([a, b], [1, model.config.vocab_size])
        assert (a.tokens, b.tokens) == ((1, 2, 3, 9), (4, 5, 10))


# ------------------------------------------------------------ Model.batch_generate


@pytest.fixture(scope="module")
def phi3_float(tiny_phi3):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
        model = phimlx.load(tiny_phi3, backend="numpy", kv_cache_type="f32")
    with model:
        yield model


PROMPTS = [
    "Hi",
    "Tell me a long story about a cat and a dog who live in a lighthouse",
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [{"role": "user", "content": "What is two plus two?"}],
    "Hi",
]


def generate_each(model, prompts, **kw):
    out = []
    for p in prompts:
        model.clear_cache()
        out.append(model.generate(p, cache=False, **kw))
    model.clear_cache()
    return out


def same_results(got, want) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.text, g.tokens, g.finish_reason) == (w.text, w.tokens, w.finish_reason), i
        assert g.stats.prompt_tokens == w.stats.prompt_tokens
        assert g.stats.generation_tokens == w.stats.generation_tokens


def stops_hitting(results, picks) -> list[str]:
    """Two-character stop strings cut from results' texts: (index, fraction of the text)."""
    stops = []
    for i, frac in picks:
        text = results[i].text
        at = int(len(text) * frac)
        stops.append(text[at : at + 2])
    return [s for s in stops if len(s.strip()) == 2]


def test_batch_generate_equals_generate_greedy(phi3_float, monkeypatch):
    model = phi3_float
    kw = dict(GREEDY, max_tokens=24)
    plain = generate_each(model, PROMPTS, **kw)
    # stop strings that end three sequences at different steps (the others run to 24)
    stops = stops_hitting(plain, [(0, 0.2), (1, 0.5), (2, 0.8)])
    assert len(stops) == 3
    want = generate_each(model, PROMPTS, stop=stops, **kw)
    assert {r.finish_reason for r in want} == {"stop", "length"}
    assert len({len(r.tokens) for r in want}) >= 3  # sequences finish at different steps

    sizes = []
    inner = model._backend_model.step_batch

    def spy(sessions, ids):
        sizes.append(len(sessions))
        return inner(sessions, ids)

    monkeypatch.setattr(model._backend_model, "step_batch", spy)
    for cache in (False, True):
        sizes.clear()
        got = model.batch_generate(PROMPTS, stop=stops, cache=cache, **kw)
        same_results(got, want)
        # one pass per token over the sequences still going: the batch only shrinks
        assert sizes[0] == len(PROMPTS) and sizes == sorted(sizes, reverse=True)
        # a step after every token but the last (a stop string's step is withdrawn)
        assert sum(sizes) == sum(len(r.tokens) - 1 for r in want)
    model.clear_cache()


def test_batch_generate_finishing_by_context_and_max_tokens(phi3_float):
    """Prompts of different lengths fill a small context at different steps."""
    model = phi3_float
    kw = dict(GREEDY, max_tokens=12, max_context=20)
    prompts = [[5] * 10, [6] * 14, [7] * 18, [8] * 3]
    want = generate_each(model, prompts, **kw)
    assert [r.finish_reason for r in want] == ["context", "context", "context", "length"]
    same_results(model.batch_generate(prompts, cache=False, **kw), want)


def test_batch_generate_seeded_sampling_per_sequence(phi3_float):
    """Each sequence draws from its own generator seeded with ``seed``: it equals
    ``generate(prompt, seed=seed)`` alone, and the batch reproduces itself."""
    model = phi3_float
    kw = dict(temperature=0.9, top_p=0.95, seed=11, max_tokens=10)
    want = generate_each(model, PROMPTS[:4], **kw)
    got = model.batch_generate(PROMPTS[:4], cache=False, **kw)
    same_results(got, want)
    same_results(model.batch_generate(PROMPTS[:4], cache=False, **kw), got)


def test_batch_generate_one_prompt_is_generate_with_default_settings(smollm2_path):
    with phimlx.load(smollm2_path, backend="numpy") as model:
        kw = dict(GREEDY, max_tokens=10, stop=["\n\n"])
        want = generate_each(model, ["What is the capital of France?"], **kw)
        same_results(model.batch_generate(["What is the capital of France?"], **kw), want)


def test_batch_generate_smollm2(smollm2_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
        model = phimlx.load(smollm2_path, backend="numpy")
    with model:
        prompts = ["What is the capital of France?", "Count from one to ten.", "Say hi."]
        kw = dict(GREEDY, max_tokens=12, stop=["Paris", "five"])
        want = generate_each(model, prompts, **kw)
        same_results(model.batch_generate(prompts, **kw), want)


def test_batch_generate_mlx(make_model):
    pytest.importorskip("mlx.core")
    path = make_model(n_layers=2, hidden=64, ffn=128, n_heads=4, mix="Q4_0")
    with phimlx.load(path, backend="mlx") as model:
        kw = dict(GREEDY, max_tokens=6)
        want = generate_each(model, PROMPTS[:3], **kw)
        same_results(model.batch_generate(PROMPTS[:3], cache=False, **kw), want)


def test_batch_generate_checks_every_prompt_first(phi3_float, monkeypatch):
    model = phi3_float
    calls = []
    monkeypatch.setattr(model, "_stream", lambda *a: calls.append(a))
    with pytest.raises(TypeError, match="list of prompts"):
        model.batch_generate("Hi")
    with pytest.raises(TypeError, match="list of prompts"):
        model.batch_generate([1, 2, 3])
    with pytest.raises(TypeError):
        model.batch_generate(["Hi"], max_tokenz=3)
    with pytest.raises(ValueError, match="temperature"):
        model.batch_generate(["Hi"], temperature=-1)
    with pytest.raises(ContextLengthError):
        model.batch_generate(["Hi", "word " * 300], max_context=64)
    assert calls == []  # nothing started
    assert model.batch_generate([]) == []


# ------------------------------------------------------------ StepBatch


class _FakeSession:
    def __init__(self, name: str) -> None:
        self.name = name


def test_step_batch_runs_waiting_steps_once_and_drops_withdrawn_ones():
    calls = []

    def step_batch(sessions, ids):
        calls.append(([s.name for s in sessions], list(ids)))
        return np.arange(len(ids), dtype=np.float32)[:, None] + np.zeros((1, 4), np.float32)

    batch = StepBatch(step_batch)
    a, b, c = _FakeSession("a"), _FakeSession("b"), _FakeSession("c")
    ha, hb, hc = batch.join(a)(1), batch.join(b)(2), batch.join(c)(3)
    batch.leave(b)  # b's loop ended after registering
    assert hc.result()[0] == 1 and ha.result()[0] == 0  # a then c: rows 0 and 1
    assert calls == [(["a", "c"], [1, 3])]
    with pytest.raises(RuntimeError, match="withdrawn"):
        hb.result()
    assert len(calls) == 1
