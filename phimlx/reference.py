"""A compact float64 forward pass of every architecture phimlx runs: the oracle of the tests.

Both backends (`phimlx.mlx`, `fallback`) are tested against this module, and it is itself
tested against transformers + torch reading the same GGUF (``tests/test_reference.py``).  It is
written to be read, not to be fast: each weight decoded whole to float64 with
`phimlx.gguf.dequantize`, the whole sequence recomputed with full causal attention, no cache.
What differs between architectures is read from `ModelConfig` fields (filled from the
`phimlx.config.ARCHITECTURES` table), never from the architecture's name.

    mf = open_gguf(path)
    out = reference.logits(mf, ModelConfig.from_gguf(mf), [1, 2, 3])  # (3, vocab) float64
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .config import ModelConfig
from .gguf import ModelFile, dequantize

Weights = Callable[[str], np.ndarray]
"""Tensor name -> its values as float64, in NumPy order (``(out, in)`` for a matrix)."""

ROPE_STYLES = ("neox", "normal")


def weight(mf: ModelFile, name: str) -> np.ndarray:
    """Tensor ``name`` of ``mf`` decoded whole to float64 (F32, F16, BF16 or any quant type
    `phimlx.gguf.dequantize` decodes).

    Args:
        mf: the model file.
        name: the tensor's GGUF name, e.g. ``"blk.0.attn_qkv.weight"``.

    Returns:
        A new float64 array of the tensor's NumPy-order shape.

    Raises:
        GGUFError: the tensor is missing or its bytes do not match its shape.
        UnsupportedModelError: its type is not one phimlx decodes.
    """
    t = mf.info(name)
    return dequantize(mf.raw(name), t.type, t.shape).astype(np.float64)


def rope_tables(
    config: ModelConfig, n_positions: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` of shape ``(n_positions, rope_dim // 2)`` for positions ``0..n-1``.

    Args:
        config: the model (rope dimension, base, LongRoPE factors and attention factor).
        n_positions: how many positions.
        context: the session's context length; LongRoPE's factors depend on it.

    Returns:
        The two tables, float64, already scaled by ``config.rope_attn_factor``.
    """
    d = config.rope_dim
    inv_freq = config.rope_base ** (-np.arange(0, d, 2) / d)  # (d/2,)
    factors = config.rope_factors(context)  # LongRoPE: long or short divisors, as llama.cpp picks
    if factors is not None:
        inv_freq = inv_freq / factors.astype(np.float64)
    angle = np.arange(n_positions)[:, None] * inv_freq[None, :]  # (T, d/2)
    # LongRoPE's attention factor scales cos and sin (the rotated dims only), as llama.cpp does.
    scale = config.rope_attn_factor
    return np.cos(angle) * scale, np.sin(angle) * scale


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate the first ``2 * cos.shape[1]`` dims of each head by its position.

    Args:
        x: queries or keys, ``(T, heads, D)``.
        cos, sin: `rope_tables` for the ``T`` positions.
        style: ``"neox"`` or ``"normal"`` (`ModelConfig.rope_style`): which dims pair up.

    Returns:
        A new array like ``x``.

    Raises:
        ValueError: ``style`` is not one of `ROPE_STYLES`.
    """
    half = cos.shape[-1]
    i = np.arange(half)
    if style == "neox":  # rotate-half: pairs (i, i + d/2)
        lo, hi = i, i + half
    elif style == "normal":  # adjacent pairs (2i, 2i+1); llama GGUFs store Q/K permuted for it
        lo, hi = 2 * i, 2 * i + 1
    else:
        raise ValueError(f"unknown rope style {style!r}; expected one of {ROPE_STYLES}")
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, d/2): the same for every head
    a, b = x[..., lo], x[..., hi]  # (T, heads, d/2) each
    out = x.copy()  # dims beyond rope_dim pass through unrotated (partial rotary)
    out[..., lo], out[..., hi] = a * cos - b * sin, b * cos + a * sin
    return out


def logits(
    mf: ModelFile,
    config: ModelConfig,
    ids: Sequence[int],
    context: int | None = None,
    *,
    weights: Weights | None = None,
) -> np.ndarray:
    """Float64 logits after each token of ``ids``, the whole sequence at once.

    Args:
        mf: the model file (`phimlx.gguf.open_gguf`).
        config: its config (`ModelConfig.from_gguf`).
        ids: token ids, the first at position 0.
        context: the session's context length (default: the model's); only LongRoPE's choice of
            factors depends on it.
        weights: tensor name -> float64 values, to run other weights than the file's (e.g.
            those a backend actually holds); default: `weight` of ``mf``.

    Returns:
        ``(len(ids), vocab_size)`` float64; row ``t`` predicts the token after ``ids[t]``.

    Raises:
        ValueError: ``ids`` is empty, longer than ``context``, or holds an id outside the
            vocabulary; or the config's rope style is unknown.
    """
    c = config
    context = c.context_length if context is None else context
    tok = np.asarray(ids, dtype=np.int64)
    if tok.ndim != 1 or not 0 < len(tok) <= context:
        raise ValueError(f"expected 1 to {context} token ids, got {len(tok)}")
    if tok.min() < 0 or tok.max() >= c.vocab_size:
        raise ValueError(f"token ids must be in [0, {c.vocab_size}): got {tok.min()}..{tok.max()}")
    w = weights or (lambda name: weight(mf, name))
    T, H, KV, D = len(tok), c.n_heads, c.n_kv_heads, c.head_dim
    cos, sin = rope_tables(c, T, context)
    pos = np.arange(T)
    allowed = pos[None, :] <= pos[:, None]  # (T, T): query t sees keys s <= t
    if c.sliding_window:  # ... and only the last `sliding_window` of them, itself included
        allowed &= pos[:, None] - pos[None, :] < c.sliding_window

    def norm(x: np.ndarray, name: str) -> np.ndarray:  # RMS norm, then a learned gain
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * w(name)

    x = w("token_embd.weight")[tok]  # (T, hidden)
    for layer in range(c.n_layers):
        b = f"blk.{layer}."
        h = norm(x, b + "attn_norm.weight")
        if c.fused_qkv:  # one matrix whose rows are q | k | v
            q, k, v = np.split(h @ w(b + "attn_qkv.weight").T, [H * D, (H + KV) * D], axis=-1)
        else:
            q, k, v = (h @ w(f"{b}attn_{n}.weight").T for n in "qkv")
        q = apply_rope(q.reshape(T, H, D), cos, sin, c.rope_style)  # (T, H, D)
        k = apply_rope(k.reshape(T, KV, D), cos, sin, c.rope_style)  # (T, KV, D)
        v = v.reshape(T, KV, D)  # (T, KV, D)
        # GQA: query head j reads key/value head j // (H / KV)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # (T, H, D)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)  # (H, T, T)
        scores = np.where(allowed[None], scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)  # softmax over keys
        att = np.einsum("hts,shd->thd", p, v).reshape(T, H * D)  # (T, H * D)
        x = x + att @ w(b + "attn_output.weight").T
        h = norm(x, b + "ffn_norm.weight")
        if c.fused_gate_up:  # ffn_up holds the gate rows, then the up rows
            gate, up = np.split(h @ w(b + "ffn_up.weight").T, 2, axis=-1)  # (T, ffn) each
        else:
            gate, up = h @ w(b + "ffn_gate.weight").T, h @ w(b + "ffn_up.weight").T
        silu = gate * (1 + np.tanh(gate / 2)) / 2  # gate * sigmoid(gate), no exp overflow
        x = x + (silu * up) @ w(b + "ffn_down.weight").T
    # Tied embeddings: the embedding table doubles as the output head.
    head = w("token_embd.weight" if c.tied_embeddings else "output.weight")  # (vocab, hidden)
    return norm(x, "output_norm.weight") @ head.T  # (T, vocab)
