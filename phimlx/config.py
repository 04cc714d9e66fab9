"""ModelConfig: everything about a model's shape, built from GGUF metadata.

Each supported architecture's quirks live in its `Architecture` entry below and nowhere
else: the backends read `ModelConfig` fields (rope style, fused projections, longrope
factors, sliding window), never the architecture name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chat import PHI3_CHAT_TEMPLATE
from .errors import GGUFError, UnsupportedModelError
from .gguf import GGMLType, ModelFile, check_supported


@dataclass(frozen=True)
class Architecture:
    """What differs between the architectures phimlx runs."""

    name: str
    # "neox": rotate-half pairs (i, i + d/2); "normal": adjacent pairs (2i, 2i+1).  llama.cpp's
    # converter permutes llama Q/K rows so that "normal" applies to llama GGUFs.
    rope_style: str
    # Tokens after which llama.cpp's tokenizer strips whitespace (Phi-3's rstrip rule).
    strip_space_after_special: bool = False
    # llama.cpp also applies that rule to a file of another architecture whose general.name
    # contains one of these (lower case): Phi-3 converted as "llama" keeps its tokenizer.
    name_markers: tuple[str, ...] = ()
    # Extra end-of-generation tokens by text, beyond the file's eos id.
    stop_tokens: tuple[str, ...] = ()
    # The chat template used when the file has none (None: the prompt is sent raw).
    chat_template: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "phi3": Architecture(
        "phi3",
        rope_style="neox",
        strip_space_after_special=True,
        name_markers=("phi3", "phi-3"),
        stop_tokens=("<|end|>", "<|endoftext|>"),
        chat_template=PHI3_CHAT_TEMPLATE,
    ),
    "llama": Architecture("llama", rope_style="normal"),
}


def strips_space_after_special(architecture: str | None, model_name: str) -> bool:
    """Whether the tokenizer strips whitespace after special tokens (Phi-3's rule), by the
    file's architecture or, as llama.cpp decides it, by markers in its ``general.name``."""
    arch = ARCHITECTURES.get(architecture or "")
    if arch is not None and arch.strip_space_after_special:
        return True
    name = model_name.lower()
    return any(m in name for a in ARCHITECTURES.values() for m in a.name_markers)


# Bounds that no real model of these families comes near; they stop a crafted file from
# making us allocate absurd caches before any other check fails.
_LIMITS = {
    "block_count": 1024,
    "embedding_length": 1 << 17,
    "feed_forward_length": 1 << 20,
    "attention.head_count": 1024,
    "context_length": 1 << 24,
}

# Vectors (norm weights) are stored unquantized; a quantized one is corruption, and the MLX
# backend's quantizer would choke on it.
_VECTOR_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a transformer, as read from a GGUF file.

    Attributes follow llama.cpp's metadata; ``head_dim`` and ``rope_dim`` are derived when
    the file does not set them.  ``rope_long_factors`` / ``rope_short_factors`` hold the
    LongRoPE per-pair divisors of Phi-3 128k models (None otherwise).
    """

    architecture: str
    n_layers: int
    hidden_size: int
    ffn_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_dim: int
    rope_base: float = 10000.0
    rope_style: str = "neox"
    rope_original_context: int | None = None
    rope_attn_factor: float = 1.0
    rope_long_factors: tuple[float, ...] | None = field(default=None, repr=False)
    rope_short_factors: tuple[float, ...] | None = field(default=None, repr=False)
    sliding_window: int | None = None
    tied_embeddings: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    name: str = ""

    @property
    def arch(self) -> Architecture:
        """This model's entry in `ARCHITECTURES` (its quirks)."""
        return ARCHITECTURES[self.architecture]

    def rope_factors(self, context: int) -> np.ndarray | None:
        """LongRoPE divisors for a session of ``context`` tokens, as llama.cpp picks them:
        long factors when the context in use exceeds the original training context."""
        if self.rope_long_factors is None:
            return None
        orig = self.rope_original_context or self.context_length
        chosen = self.rope_long_factors if context > orig else self.rope_short_factors
        if chosen is None:
            chosen = self.rope_long_factors
        return np.asarray(chosen, dtype=np.float32)

    def rope_inv_freq(self, context: int) -> np.ndarray:
        """Angle per position for each rotated pair: ``1 / (factor_i * base^(2i/d))``."""
        d = self.rope_dim
        inv = 1.0 / (self.rope_base ** (np.arange(0, d, 2, dtype=np.float64) / d))
        factors = self.rope_factors(context)
        if factors is not None:
            inv = inv / factors
        return inv.astype(np.float32)

    @classmethod
    def from_gguf(cls, mf: ModelFile) -> ModelConfig:
        """Build and validate the config of a GGUF model.

        Raises:
            UnsupportedModelError: the architecture or a tensor type is not supported.
            GGUFError: a required key is missing, a value is out of range, or a tensor's shape
                disagrees with the config (the message names both numbers).
        """
        arch_name = mf.architecture
        if arch_name not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{mf.path}: architecture '{arch_name}' is not supported; phimlx runs "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        arch = ARCHITECTURES[arch_name]
        md = mf.metadata

        def key(suffix: str) -> str:
            return f"{arch_name}.{suffix}"

        def required_int(suffix: str) -> int:
            k = key(suffix)
            if k not in md:
                raise GGUFError(f"{mf.path}: required metadata key '{k}' is missing")
            v = md[k]
            if isinstance(v, list) and v and all(x == v[0] for x in v):
                v = v[0]  # per-layer arrays with one value (some converters write these)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise GGUFError(f"{mf.path}: metadata '{k}' is {v!r}; expected a positive integer")
            limit = _LIMITS.get(suffix)
            if limit is not None and v > limit:
                raise GGUFError(
                    f"{mf.path}: metadata '{k}' is {v}, beyond any real model "
                    f"(limit {limit}); the file is corrupt"
                )
            return v

        def optional_num(suffix: str, default: Any) -> Any:
            v = md.get(key(suffix), default)
            if v is not default and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise GGUFError(f"{mf.path}: metadata '{key(suffix)}' is {v!r}; expected a number")
            return v

        def optional_int(suffix: str) -> int | None:
            """A positive integer, or None when the key is absent (or 0, "not set")."""
            v = md.get(key(suffix))
            if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
                return None
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise GGUFError(
                    f"{mf.path}: metadata '{key(suffix)}' is {v!r}; expected a positive integer"
                )
            return v

        n_layers = required_int("block_count")
        hidden = required_int("embedding_length")
        ffn = required_int("feed_forward_length")
        n_heads = required_int("attention.head_count")
        n_kv = (
            required_int("attention.head_count_kv")
            if key("attention.head_count_kv") in md
            else n_heads
        )
        ctx = required_int("context_length")
        eps = optional_num("attention.layer_norm_rms_epsilon", None)
        if eps is None or not (0 < eps < 1):
            raise GGUFError(
                f"{mf.path}: metadata '{key('attention.layer_norm_rms_epsilon')}' "
                f"is {eps!r}; expected a small positive number"
            )
        if n_heads % n_kv:
            raise GGUFError(
                f"{mf.path}: {n_heads} attention heads cannot be shared by "
                f"{n_kv} key/value heads (not a divisor)"
            )
        head_dim = optional_int("attention.key_length")
        if head_dim is None:
            if hidden % n_heads:
                raise GGUFError(
                    f"{mf.path}: embedding length {hidden} is not divisible by {n_heads} heads"
                )
            head_dim = hidden // n_heads
        rope_dim = optional_int("rope.dimension_count") or head_dim
        if not (0 < rope_dim <= head_dim) or rope_dim % 2:
            raise GGUFError(
                f"{mf.path}: rope dimension count {rope_dim} must be even and at "
                f"most the head size {head_dim}"
            )
        rope_base = float(optional_num("rope.freq_base", 10000.0))
        if not (rope_base > 1.0 and math.isfinite(rope_base)):
            raise GGUFError(f"{mf.path}: rope.freq_base {rope_base} must be a finite number > 1")
        window = optional_int("attention.sliding_window")

        if "token_embd.weight" not in mf.tensors:
            raise GGUFError(f"{mf.path}: tensor 'token_embd.weight' is missing")
        emb_shape = mf.tensors["token_embd.weight"].shape
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = (
            optional_int("vocab_size")
            or (len(tokens) if isinstance(tokens, list) else 0)
            or emb_shape[0]
        )

        # LongRoPE (Phi-3 128k): per-pair factors are tensors; the attention factor is a key,
        # or derived as llama.cpp's converter does when absent.
        long_f = short_f = None
        orig = optional_int("rope.scaling.original_context_length")
        attn_factor = 1.0
        if "rope_factors_long.weight" in mf.tensors:
            long_f = _factors(mf, "rope_factors_long.weight", rope_dim)
            if "rope_factors_short.weight" in mf.tensors:
                short_f = _factors(mf, "rope_factors_short.weight", rope_dim)
            if orig is None or orig < 2:
                raise GGUFError(
                    f"{mf.path}: LongRoPE factors are present but "
                    f"'{key('rope.scaling.original_context_length')}' is "
                    f"{'missing' if orig is None else orig} (expected the training context, > 1)"
                )
            attn_factor = optional_num("rope.scaling.attn_factor", None)
            if attn_factor is None:
                s = ctx / orig
                attn_factor = math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0
            elif not (attn_factor > 0 and math.isfinite(attn_factor)):
                raise GGUFError(
                    f"{mf.path}: metadata '{key('rope.scaling.attn_factor')}' is "
                    f"{attn_factor!r}; expected a finite positive number"
                )

        cfg = cls(
            architecture=arch_name,
            n_layers=n_layers,
            hidden_size=hidden,
            ffn_size=ffn,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=int(head_dim),
            vocab_size=int(vocab),
            context_length=ctx,
            norm_eps=float(eps),
            rope_dim=int(rope_dim),
            rope_base=rope_base,
            rope_style=arch.rope_style,
            rope_original_context=orig,
            rope_attn_factor=float(attn_factor),
            rope_long_factors=long_f,
            rope_short_factors=short_f,
            sliding_window=int(window) if window else None,
            tied_embeddings="output.weight" not in mf.tensors,
            fused_qkv="blk.0.attn_qkv.weight" in mf.tensors,
            fused_gate_up="blk.0.ffn_gate.weight" not in mf.tensors,
            name=str(md.get("general.name", "")),
        )
        cfg.check_tensors(mf)
        return cfg

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, with its NumPy-order shape."""
        h, hd = self.hidden_size, self.head_dim
        q_rows, kv_rows = self.n_heads * hd, self.n_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, h),
            "output_norm.weight": (h,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, h)
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes[b + "attn_norm.weight"] = (h,)
            shapes[b + "ffn_norm.weight"] = (h,)
            if self.fused_qkv:
                shapes[b + "attn_qkv.weight"] = (q_rows + 2 * kv_rows, h)
            else:
                shapes[b + "attn_q.weight"] = (q_rows, h)
                shapes[b + "attn_k.weight"] = (kv_rows, h)
                shapes[b + "attn_v.weight"] = (kv_rows, h)
            shapes[b + "attn_output.weight"] = (h, q_rows)
            if self.fused_gate_up:
                shapes[b + "ffn_up.weight"] = (2 * self.ffn_size, h)
            else:
                shapes[b + "ffn_gate.weight"] = (self.ffn_size, h)
                shapes[b + "ffn_up.weight"] = (self.ffn_size, h)
            shapes[b + "ffn_down.weight"] = (h, self.ffn_size)
        return shapes

    def check_tensors(self, mf: ModelFile) -> None:
        """Every tensor the model needs is present, of a supported type and the right shape."""
        for name, shape in self.expected_tensors().items():
            t = mf.tensors.get(name)
            if t is None:
                raise GGUFError(
                    f"{mf.path}: tensor '{name}' is missing (expected shape "
                    f"{shape} for this {self.architecture} model)"
                )
            if t.shape != shape:
                raise GGUFError(
                    f"{mf.path}: tensor '{name}' has shape {t.shape} but the config implies "
                    f"{shape} (vocab {self.vocab_size}, hidden {self.hidden_size}, ffn "
                    f"{self.ffn_size}, heads {self.n_heads}/{self.n_kv_heads} x {self.head_dim})"
                )
            check_supported(t, mf.path)
            if len(shape) == 1 and t.type not in _VECTOR_TYPES:
                raise GGUFError(
                    f"{mf.path}: tensor '{name}' is a vector stored as {t.type.name}; norm "
                    "weights are F32, F16 or BF16 in every real model, the file is corrupt"
                )
        # Every norm (small vectors; the forward pass decodes them all anyway): a NaN here
        # would silently turn every output into NaN.
        norms = [n for n in self.expected_tensors() if n.endswith("norm.weight")]
        for name in norms:
            w = mf.dequantize(name)
            if not np.isfinite(w).all():
                raise GGUFError(
                    f"{mf.path}: tensor '{name}' contains NaN or Inf; the file is corrupt"
                )


def _factors(mf: ModelFile, name: str, rope_dim: int) -> tuple[float, ...]:
    t = mf.tensors[name]
    if t.shape != (rope_dim // 2,):
        raise GGUFError(
            f"{mf.path}: tensor '{name}' has shape {t.shape}; expected "
            f"({rope_dim // 2},) for rope dimension {rope_dim}"
        )
    values = mf.dequantize(name).astype(np.float64)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise GGUFError(f"{mf.path}: tensor '{name}' holds non-positive or non-finite factors")
    return tuple(values.tolist())
