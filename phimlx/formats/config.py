"""``config.json`` (Hugging Face / mlx-lm) -> `ModelConfig`, and its ``quantization`` entry.

The keys are transformers' (``Phi3Config``, ``LlamaConfig``), in both of its spellings: the
older top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``, and
transformers 5's ``rope_parameters`` dict.  Rope scaling becomes per-pair divisors of the
rotary frequencies, which is what `ModelConfig` (and llama.cpp's ``rope_freqs``) holds:

- ``longrope`` (``su``; Phi-3 128k): the short and long factors as given; the attention
  factor as given, else ``sqrt(1 + ln s / ln original)`` with ``s`` the ``factor`` or
  ``max_position_embeddings / original_max_position_embeddings`` (transformers' rule);
- ``linear``: every divisor is ``factor``;
- ``llama3``: transformers' ``_compute_llama3_parameters`` written as divisors.

Hugging Face checkpoints store Q and K unpermuted: their rope rotates half-dimensions
("neox" style) for llama too; only an mlx-lm folder that says ``rope_traditional`` (phimlx
converts llama GGUFs so) pairs adjacent dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import _LIMITS, ARCHITECTURES, ModelConfig
from .errors import CheckpointError, UnsupportedCheckpointError

# mlx's affine quantization: the widths and group sizes `mx.quantize` accepts
AFFINE_BITS = frozenset({2, 3, 4, 5, 6, 8})
AFFINE_GROUPS = frozenset({32, 64, 128})


@dataclass(frozen=True)
class Quantization:
    """mlx-lm's ``quantization`` entry: defaults and per-module overrides (a module path,
    e.g. ``model.layers.0.mlp.down_proj``, mapped to ``(bits, group_size)`` or None for a
    module left in floats)."""

    bits: int
    group_size: int
    overrides: dict[str, tuple[int, int] | None]

    def of(self, module: str) -> tuple[int, int] | None:
        """``(bits, group_size)`` of ``module``'s weight, or None if it is not quantized."""
        return self.overrides.get(module, (self.bits, self.group_size))


def quantization(cfg: dict[str, Any], source: str) -> Quantization | None:
    """The checkpoint's affine quantization, or None for a float checkpoint.

    Raises:
        UnsupportedCheckpointError: a quantization other than mlx's affine (GPTQ, AWQ,
            bitsandbytes, fp8, mxfp4 ...), or widths/groups mlx does not have.
        CheckpointError: a malformed entry.
    """
    q = cfg.get("quantization")
    if q is None:
        hf = cfg.get("quantization_config")
        if isinstance(hf, dict) and ("quant_method" in hf or "bits" not in hf):
            method = hf.get("quant_method", "unknown")
            raise UnsupportedCheckpointError(
                f"{source}: quantization method '{method}' is not supported; phimlx runs "
                "float16/bfloat16/float32 checkpoints and mlx-lm's affine quantization "
                "(convert with `mlx_lm.convert -q`, or use a GGUF)"
            )
        q = hf
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: config.json 'quantization' is {q!r}, not an object")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise UnsupportedCheckpointError(
            f"{source}: quantization mode '{mode}' is not supported (only mlx's 'affine'); "
            "convert the model with mlx_lm.convert -q --q-mode affine, or use a GGUF"
        )
    bits, group = _bits_group(q, "quantization", source)
    overrides: dict[str, tuple[int, int] | None] = {}
    for key, v in q.items():
        if key in ("bits", "group_size", "mode"):
            continue
        if v is False:
            overrides[key] = None
        elif isinstance(v, dict):
            if v.get("mode", "affine") != "affine":
                raise UnsupportedCheckpointError(
                    f"{source}: module '{key}' uses quantization mode '{v.get('mode')}'; "
                    "only mlx's 'affine' is supported"
                )
            overrides[key] = _bits_group({"bits": bits, "group_size": group, **v}, key, source)
        elif v is not True:
            raise CheckpointError(
                f"{source}: config.json quantization['{key}'] is {v!r}; expected an object "
                "with bits and group_size, or false"
            )
    return Quantization(bits, group, overrides)


def _bits_group(q: dict[str, Any], what: str, source: str) -> tuple[int, int]:
    bits, group = q.get("bits"), q.get("group_size")
    if bits not in AFFINE_BITS or isinstance(bits, bool):
        raise UnsupportedCheckpointError(
            f"{source}: {what} has bits={bits!r}; mlx's affine quantization has "
            f"{', '.join(map(str, sorted(AFFINE_BITS)))} bits"
        )
    if group not in AFFINE_GROUPS or isinstance(group, bool):
        raise UnsupportedCheckpointError(
            f"{source}: {what} has group_size={group!r}; expected one of "
            f"{', '.join(map(str, sorted(AFFINE_GROUPS)))}"
        )
    return int(bits), int(group)


def model_config(cfg: dict[str, Any], tensor_names: Collection[str], source: str) -> ModelConfig:
    """Build and validate the `ModelConfig` of a checkpoint from its ``config.json``.

    Args:
        cfg: the parsed config.json.
        tensor_names: the checkpoint's tensor names (fused projections and an absent
            ``lm_head`` are read from them, as for GGUF files).
        source: how messages name the folder.

    Raises:
        UnsupportedCheckpointError: a model type, activation, bias or rope scaling that
            phimlx does not run.
        CheckpointError: a required key is missing, or a value is out of range.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: config.json is not a JSON object")
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"{source}: model_type {mt!r} is not supported; phimlx runs "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )

    def integer(key: str, default: int | None = None, limit_key: str | None = None) -> int:
        v = cfg.get(key, default)
        if v is None:
            raise CheckpointError(f"{source}: config.json lacks the required key '{key}'")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(
                f"{source}: config.json '{key}' is {v!r}; expected a positive integer"
            )
        limit = _LIMITS.get(limit_key or "")
        if limit is not None and v > limit:
            raise CheckpointError(
                f"{source}: config.json '{key}' is {v}, beyond any real model (limit {limit})"
            )
        return v

    def number(v: Any, what: str, lo: float = 0.0, hi: float = math.inf) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo < v < hi:
            raise CheckpointError(
                f"{source}: config.json {what} is {v!r}; expected a number in ({lo}, {hi})"
            )
        return float(v)

    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedCheckpointError(f"{source}: hidden_act '{act}' is not supported (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UnsupportedCheckpointError(
                f"{source}: config.json sets {key}; phimlx runs models without biases"
            )
    n_layers = integer("num_hidden_layers", limit_key="block_count")
    hidden = integer("hidden_size", limit_key="embedding_length")
    ffn = integer("intermediate_size", limit_key="feed_forward_length")
    n_heads = integer("num_attention_heads", limit_key="attention.head_count")
    n_kv = integer("num_key_value_heads", n_heads, "attention.head_count")
    vocab = integer("vocab_size")
    ctx = integer("max_position_embeddings", limit_key="context_length")
    eps = number(cfg.get("rms_norm_eps"), "'rms_norm_eps'", 0.0, 1.0)
    if n_heads % n_kv:
        raise CheckpointError(
            f"{source}: {n_heads} attention heads cannot be shared by {n_kv} key/value heads"
        )
    if cfg.get("head_dim") is not None:
        head_dim = integer("head_dim")
    elif hidden % n_heads:
        raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible by {n_heads} heads")
    else:
        head_dim = hidden // n_heads

    rp = cfg.get("rope_parameters")
    rp = rp if isinstance(rp, dict) else {}
    rs = cfg.get("rope_scaling")
    if rs is not None and not isinstance(rs, dict):
        raise CheckpointError(f"{source}: config.json 'rope_scaling' is {rs!r}, not an object")
    scaling = {**rp, **(rs or {})}
    base = number(scaling.get("rope_theta", cfg.get("rope_theta", 10000.0)), "'rope_theta'", 1.0)
    partial = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(head_dim * number(partial, "'partial_rotary_factor'", 0.0, 1.0 + 1e-9))
    if rope_dim <= 0 or rope_dim % 2:
        raise CheckpointError(
            f"{source}: the rotary dimension {rope_dim} (head_dim {head_dim} x "
            f"partial_rotary_factor {partial}) must be even and positive"
        )
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    orig_key = "original_max_position_embeddings"
    orig = scaling.get(orig_key, cfg.get(orig_key))
    long_f = short_f = None
    attn_factor = 1.0
    rope_orig: int | None = None
    half = rope_dim // 2
    if kind in ("longrope", "su"):
        if not (isinstance(orig, int) and not isinstance(orig, bool) and orig > 1):
            raise CheckpointError(
                f"{source}: LongRoPE scaling needs 'original_max_position_embeddings' (the "
                f"training context, > 1); it is {orig!r}"
            )
        long_f = _factors(scaling.get("long_factor"), half, "long_factor", source)
        short_f = _factors(scaling.get("short_factor", scaling.get("long_factor")), half,
                           "short_factor", source)  # fmt: skip
        rope_orig = orig
        factor = scaling.get("factor") or ctx / orig
        given = scaling.get("attention_factor")
        if given is not None:
            attn_factor = number(given, "rope 'attention_factor'")
        elif factor > 1:
            attn_factor = math.sqrt(1 + math.log(factor) / math.log(orig))
    elif kind == "linear":
        f = number(scaling.get("factor"), "rope 'factor'")
        long_f = short_f = (f,) * half
    elif kind == "llama3":
        long_f = short_f = _llama3_divisors(scaling, base, rope_dim, source)
    elif kind != "default":
        raise UnsupportedCheckpointError(
            f"{source}: rope scaling '{kind}' is not supported (default, linear, llama3, longrope)"
        )

    window = cfg.get("sliding_window")
    if window is not None and (type(window) is not int or window < 0):
        raise CheckpointError(f"{source}: config.json 'sliding_window' is {window!r}")
    names = set(tensor_names)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = "lm_head.weight" not in names
    arch = ARCHITECTURES[mt]
    return ModelConfig(
        architecture=mt,
        n_layers=n_layers,
        hidden_size=hidden,
        ffn_size=ffn,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=ctx,
        norm_eps=eps,
        rope_dim=rope_dim,
        rope_base=base,
        # unpermuted Q/K rotate halves; mlx-lm's rope_traditional pairs adjacent dims
        rope_style="normal" if cfg.get("rope_traditional") else "neox",
        rope_original_context=rope_orig,
        rope_attn_factor=attn_factor,
        rope_long_factors=long_f,
        rope_short_factors=short_f,
        sliding_window=window or None,
        tied_embeddings=bool(tied),
        fused_qkv="model.layers.0.self_attn.qkv_proj.weight" in names,
        fused_gate_up="model.layers.0.mlp.gate_up_proj.weight" in names,
        name=str(cfg.get("_name_or_path") or arch.name),
    )


def _factors(v: Any, n: int, what: str, source: str) -> tuple[float, ...]:
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != (n,) or not (np.isfinite(a).all() and (a > 0).all()):
        raise CheckpointError(
            f"{source}: rope '{what}' must be {n} positive numbers (rotary dimension / 2)"
        )
    return tuple(a.tolist())


def _llama3_divisors(s: dict[str, Any], base: float, dim: int, source: str) -> tuple[float, ...]:
    try:
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks or mangles {e}") from None
    if not (factor > 0 and 0 < low < high and old > 0):
        raise CheckpointError(f"{source}: llama3 rope scaling values are out of range")
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    mid = ~(wavelen < old / high) & ~(wavelen > old / low)
    scaled = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return tuple((inv / scaled).tolist())
