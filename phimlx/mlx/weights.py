"""GGUF tensor names -> mlx-lm module paths, and the mlx-lm config that goes with them.

The model code is mlx-lm's (`mlx_lm.models.phi3` for files with fused qkv and gate-up
projections, `mlx_lm.models.llama` otherwise).  Both the in-process backend and
`convert.py` use this one mapping, so a converted folder and a loaded model hold the same
tensors under the same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..formats import Checkpoint
from ..formats.safetensors import to_float32
from ..gguf import GGMLType, ModelFile
from .quant import FLOAT_TYPES, MLX_BITS, Quantized, convert_rows


def mlx_lm_module_name(config: ModelConfig) -> str:
    """The mlx-lm architecture module that fits this file's tensors: ``phi3`` needs fused
    qkv and gate-up and ``head_dim * n_heads == hidden`` (its attention assumes it);
    everything else runs as ``llama``, with fused tensors split by rows (exact: MLX
    quantizes per row)."""
    if (
        config.fused_qkv
        and config.fused_gate_up
        and config.head_dim * config.n_heads == config.hidden_size
    ):
        return "phi3"
    return "llama"


@dataclass(frozen=True)
class Target:
    """Where rows ``start:stop`` of a GGUF tensor go (an mlx-lm parameter prefix)."""

    path: str
    start: int | None = None
    stop: int | None = None


def tensor_map(config: ModelConfig) -> dict[str, list[Target]]:
    """GGUF tensor name -> the mlx-lm module paths that receive it."""
    c, kind = config, mlx_lm_module_name(config)
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    m: dict[str, list[Target]] = {
        "token_embd.weight": [Target("model.embed_tokens")],
        "output_norm.weight": [Target("model.norm")],
    }
    if not c.tied_embeddings:
        m["output.weight"] = [Target("lm_head")]
    for i in range(c.n_layers):
        g, p = f"blk.{i}.", f"model.layers.{i}."
        a, f = p + "self_attn.", p + "mlp."
        m[g + "attn_norm.weight"] = [Target(p + "input_layernorm")]
        m[g + "ffn_norm.weight"] = [Target(p + "post_attention_layernorm")]
        m[g + "attn_output.weight"] = [Target(a + "o_proj")]
        m[g + "ffn_down.weight"] = [Target(f + "down_proj")]
        if kind == "phi3":
            m[g + "attn_qkv.weight"] = [Target(a + "qkv_proj")]
            m[g + "ffn_up.weight"] = [Target(f + "gate_up_proj")]
            continue
        if c.fused_qkv:
            m[g + "attn_qkv.weight"] = [
                Target(a + "q_proj", 0, q_rows),
                Target(a + "k_proj", q_rows, q_rows + kv_rows),
                Target(a + "v_proj", q_rows + kv_rows, q_rows + 2 * kv_rows),
            ]
        else:
            for n in "qkv":
                m[f"{g}attn_{n}.weight"] = [Target(f"{a}{n}_proj")]
        if c.fused_gate_up:  # gate rows first (llama.cpp's phi3 layout)
            m[g + "ffn_up.weight"] = [
                Target(f + "gate_proj", 0, c.ffn_size),
                Target(f + "up_proj", c.ffn_size, 2 * c.ffn_size),
            ]
        else:
            m[g + "ffn_gate.weight"] = [Target(f + "gate_proj")]
            m[g + "ffn_up.weight"] = [Target(f + "up_proj")]
    return m


def mlx_lm_config(config: ModelConfig, mf: ModelFile | None = None) -> dict[str, Any]:
    """The ``config.json`` dict mlx-lm builds this model from (without quantization)."""
    c = config
    kind = mlx_lm_module_name(c)
    d: dict[str, Any] = {
        "model_type": kind,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.n_layers,
        "intermediate_size": c.ffn_size,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_base,
        # llama.cpp stores llama Q/K rows permuted for interleaved rope: MLX's "traditional".
        "rope_traditional": c.rope_style == "normal",
        "partial_rotary_factor": c.rope_dim / c.head_dim,
        "max_position_embeddings": c.context_length,
        "tie_word_embeddings": c.tied_embeddings,
    }
    if c.rope_long_factors is not None:
        # mlx-lm always applies the long factors (our backend picks per session context).
        d["rope_scaling"] = {
            "type": "longrope",
            "long_factor": list(c.rope_long_factors),
            "short_factor": list(c.rope_short_factors or c.rope_long_factors),
        }
        d["original_max_position_embeddings"] = c.rope_original_context
    if c.sliding_window:
        d["sliding_window"] = c.sliding_window
    if mf is not None:
        md = mf.metadata
        for key, out in (
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ):
            if isinstance(md.get(key), int):
                d[out] = md[key]
        tokens = md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and c.arch.stop_tokens:
            ids = {tokens.index(t) for t in c.arch.stop_tokens if t in tokens}
            if "eos_token_id" in d:
                ids.add(d["eos_token_id"])
            d["eos_token_id"] = sorted(ids)
    return d


def convert_tensor(
    mf: ModelFile | Checkpoint, name: str, scale_dtype: type
) -> Quantized | np.ndarray:
    """One GGUF tensor in MLX form: `Quantized` for block types, a float array otherwise
    (BF16 as ``uint16`` bits; the caller views it as bfloat16).  A checkpoint's tensors are
    in MLX form already: its quantized weights are handed over as stored (scales and
    biases widened to float32 when they are bfloat16, exactly)."""
    if isinstance(mf, Checkpoint):
        return _checkpoint_tensor(mf, name)
    t = mf.info(name)
    if t.type in FLOAT_TYPES:
        return np.asarray(mf.array(name))
    if t.type not in MLX_BITS:
        raise UnsupportedModelError(
            f"{mf.path}: tensor '{name}' has type {t.type.name}, which the MLX backend cannot use"
        )
    raw = mf.raw(name)
    return convert_rows(raw.reshape(-1, raw.shape[-1]), t.type, scale_dtype)


def _checkpoint_tensor(ckpt: Checkpoint, name: str) -> Quantized | np.ndarray:
    w = ckpt.weight(name)
    if not w.quantized:
        return np.asarray(ckpt.float_weight(name))
    assert w.bits is not None and w.group_size is not None
    codes, scales, biases = ckpt.affine_parts(name)
    return Quantized(
        np.asarray(codes),
        to_float32(scales, w.dtype) if w.dtype == "BF16" else np.asarray(scales),
        to_float32(biases, w.dtype) if w.dtype == "BF16" else np.asarray(biases),
        w.bits,
        w.group_size,
    )


_CHECKPOINT_TYPES = {"F16": GGMLType.F16, "BF16": GGMLType.BF16, "F32": GGMLType.F32}


def _source_type(mf: ModelFile | Checkpoint, name: str) -> GGMLType:
    """The GGUF type of tensor ``name``; for a checkpoint, of its floats (or scales)."""
    if isinstance(mf, Checkpoint):
        w = mf.weight(name)
        return GGMLType.F32 if w.quantized else _CHECKPOINT_TYPES[w.dtype]
    return mf.info(name).type


def iter_weights(
    mf: ModelFile | Checkpoint, config: ModelConfig, scale_dtype: type
) -> Iterator[tuple[str, GGMLType, Quantized | np.ndarray]]:
    """(mlx-lm module path, GGUF type, converted tensor), one GGUF tensor at a time, so the
    caller can hand each to MLX and drop the NumPy copy before the next is converted."""
    for name, targets in tensor_map(config).items():
        value = convert_tensor(mf, name, scale_dtype)
        gtype = _source_type(mf, name)
        for tg in targets:
            if tg.start is None:
                yield tg.path, gtype, value
            elif isinstance(value, Quantized):
                yield tg.path, gtype, value.rows(tg.start, tg.stop)
            else:
                yield tg.path, gtype, value[tg.start : tg.stop]
