"""Random-weight GGUF models with real shapes and real quant mixes.

Phi-3's weights cannot be downloaded here, and timing and correctness checks do not need
them: speed depends only on shapes and types, and correctness is checked by running two
independent implementations on the same file.  Quantized tensors are random bytes whose
f16 scale fields are overwritten with small finite values, so every weight is finite and
activations keep a sane scale through the layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..gguf import TYPE_SIZES, GGMLType

# Shapes of the real models.
PHI3_MINI = dict(n_layers=32, hidden=3072, ffn=8192, n_heads=32, n_kv_heads=32, context=4096)
PHI3_MINI_128K = dict(PHI3_MINI, context=131072, original_context=4096)
PHI3_VOCAB_SIZE = 32064

# Per quantized type: byte offsets of its f16 scale fields, and how the value spread
# relates to the main scale d (std of the stored integer times the sub-scale), so that we can
# aim for a target weight std.  ("min" fields hold an offset chosen to roughly centre values.)
_SCALES: dict[GGMLType, tuple[tuple[int, ...], float, tuple[int, ...], float]] = {
    # type: (d offsets, spread per unit d, min offsets, min as a multiple of d (sign applied))
    GGMLType.Q4_0: ((0,), 4.6, (), 0.0),
    GGMLType.Q4_1: ((0,), 4.6, (2,), -7.5),
    GGMLType.Q5_0: ((0,), 9.2, (), 0.0),
    GGMLType.Q5_1: ((0,), 9.2, (2,), -15.5),
    GGMLType.Q8_0: ((0,), 74.0, (), 0.0),
    GGMLType.Q2_K: ((80,), 10.0, (82,), 1.5),
    GGMLType.Q3_K: ((108,), 41.0, (), 0.0),
    GGMLType.Q4_K: ((0,), 180.0, (2,), 7.5),
    GGMLType.Q5_K: ((0,), 360.0, (2,), 15.5),
    GGMLType.Q6_K: ((208,), 1370.0, (), 0.0),
}

MIXES = (
    "Q4_K_M",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q6_K",
    "Q2_K",
    "Q3_K",
    "Q5_K",
    "Q4_K",
    "F16",
    "BF16",
    "F32",
)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: which layers' ffn_down get Q6_K in a Q4_K_M file."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_types(mix: str, n_layers: int) -> Callable[[str], GGMLType]:
    """Tensor name -> type for a llama.cpp-style quant mix (weights only; norms are F32)."""
    if mix == "Q4_K_M":

        def pick(name: str) -> GGMLType:
            if name == "output.weight":
                return GGMLType.Q6_K
            if name.endswith("attn_qkv.weight") or name.endswith("attn_v.weight"):
                return GGMLType.Q5_K
            if name.endswith("ffn_down.weight"):
                layer = int(name.split(".")[1])
                return GGMLType.Q6_K if _more_bits(layer, n_layers) else GGMLType.Q4_K
            return GGMLType.Q4_K

        return pick
    try:
        t = GGMLType[mix]
    except KeyError:
        raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}") from None
    return lambda name: t


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines a synthetic model file (the cache key of `ensure_model`)."""

    architecture: str = "phi3"
    n_layers: int = 2
    hidden: int = 256
    ffn: int = 512
    n_heads: int = 4
    n_kv_heads: int | None = None
    context: int = 4096
    original_context: int | None = None  # set for a LongRoPE (128k-style) model
    sliding_window: int | None = None
    rope_base: float | None = None
    mix: str = "F32"
    seed: int = 0
    chat_template: bool = True
    tokenizer: bool = True  # False: no tokenizer metadata (vocab of 32064 random rows)

    def file_name(self) -> str:
        parts = [
            self.architecture,
            f"L{self.n_layers}",
            f"h{self.hidden}",
            f"f{self.ffn}",
            f"H{self.n_heads}",
            f"kv{self.n_kv_heads or self.n_heads}",
            f"c{self.context}",
            self.mix,
            f"s{self.seed}",
        ]
        if self.original_context:
            parts.append(f"o{self.original_context}")
        if self.sliding_window:
            parts.append(f"w{self.sliding_window}")
        if self.rope_base:
            parts.append(f"b{self.rope_base:g}")
        if not self.chat_template:
            parts.append("notmpl")
        if not self.tokenizer:
            parts.append("notok")
        return "-".join(parts) + ".gguf"


def _random_blocks(
    rng: np.random.Generator, qtype: GGMLType, rows: int, cols: int, std: float
) -> np.ndarray:
    block, size = TYPE_SIZES[qtype]
    if cols % block:
        raise ValueError(
            f"{qtype.name} needs rows that are a multiple of {block} elements; "
            f"got {cols}: pick another mix or shape"
        )
    nblocks = rows * cols // block
    data = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    d_offs, spread, m_offs, m_mult = _SCALES[qtype]
    d = np.float16(std / spread)
    jitter = rng.uniform(0.5, 1.5, size=nblocks).astype(np.float32)
    dv = (jitter * np.float32(d)).astype(np.float16)
    for off in d_offs:
        data[:, off : off + 2] = dv.view(np.uint8).reshape(nblocks, 2)
    for off in m_offs:
        mv = (dv.astype(np.float32) * m_mult).astype(np.float16)
        data[:, off : off + 2] = mv.view(np.uint8).reshape(nblocks, 2)
    return data.reshape(rows, cols // block * size)


def _tensor(
    rng: np.random.Generator, qtype: GGMLType, shape: tuple[int, ...], std: float
) -> tuple[np.ndarray, GGMLType]:
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if qtype == GGMLType.F16:
            return w.astype(np.float16), qtype
        if qtype == GGMLType.BF16:
            return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(
                *shape[:-1], shape[-1] * 2
            ), qtype
        return w, qtype
    rows = int(np.prod(shape[:-1]))
    return _random_blocks(rng, qtype, rows, shape[-1], std), qtype


def write_model(
    path: str | os.PathLike[str], spec: SyntheticSpec | None = None, **overrides: object
) -> Path:
    """Write a random-weight model described by ``spec`` (fields overridable by keyword).

    The file carries a Phi-3-like SentencePiece tokenizer (32064 entries with Phi-3's special
    tokens at their real ids), so `phimlx.load` runs it end to end.
    """
    import gguf

    spec = spec or SyntheticSpec()
    if overrides:
        spec = SyntheticSpec(**{**spec.__dict__, **overrides})  # type: ignore[arg-type]
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    arch = spec.architecture
    n_kv = spec.n_kv_heads or spec.n_heads
    hd = spec.hidden // spec.n_heads
    vocab = PHI3_VOCAB_SIZE
    pick = mix_types(spec.mix, spec.n_layers)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"{arch}-synthetic" if arch != "phi3" else "Phi-3 synthetic")
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_block_count(spec.n_layers)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    if spec.rope_base:
        w.add_rope_freq_base(spec.rope_base)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.original_context:
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", spec.original_context)
    if spec.tokenizer:
        from .vocab import add_vocab_to_writer, phi3_like_vocab

        add_vocab_to_writer(w, phi3_like_vocab(vocab), chat_template=spec.chat_template)

    def add(name: str, qtype: GGMLType, shape: tuple[int, ...], std: float) -> None:
        data, t = _tensor(rng, qtype, shape, std)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(t.value))

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(spec.hidden)).astype(np.float32))

    h = spec.hidden
    add("token_embd.weight", pick("token_embd.weight"), (vocab, h), 1.0)
    norm("output_norm.weight")
    add("output.weight", pick("output.weight"), (vocab, h), 1.0 / np.sqrt(h))
    if spec.original_context:
        for kind, lo, hi in (("long", 1.0, 40.0), ("short", 1.0, 3.0)):
            f = np.sort(rng.uniform(lo, hi, size=hd // 2)).astype(np.float32)
            w.add_tensor(f"rope_factors_{kind}.weight", f)
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        norm(b + "ffn_norm.weight")
        s_in = 1.0 / np.sqrt(h)
        if arch == "phi3":
            add(
                b + "attn_qkv.weight",
                pick(b + "attn_qkv.weight"),
                ((spec.n_heads + 2 * n_kv) * hd, h),
                s_in,
            )
            add(b + "ffn_up.weight", pick(b + "ffn_up.weight"), (2 * spec.ffn, h), s_in)
        else:
            add(b + "attn_q.weight", pick(b + "attn_q.weight"), (spec.n_heads * hd, h), s_in)
            add(b + "attn_k.weight", pick(b + "attn_k.weight"), (n_kv * hd, h), s_in)
            add(b + "attn_v.weight", pick(b + "attn_v.weight"), (n_kv * hd, h), s_in)
            add(b + "ffn_gate.weight", pick(b + "ffn_gate.weight"), (spec.ffn, h), s_in)
            add(b + "ffn_up.weight", pick(b + "ffn_up.weight"), (spec.ffn, h), s_in)
        add(
            b + "attn_output.weight",
            pick(b + "attn_output.weight"),
            (h, spec.n_heads * hd),
            1.0 / np.sqrt(spec.n_heads * hd),
        )
        add(
            b + "ffn_down.weight",
            pick(b + "ffn_down.weight"),
            (h, spec.ffn),
            1.0 / np.sqrt(spec.ffn),
        )

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ensure_model(spec: SyntheticSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the model ``spec`` describes, written once into ``cache_dir`` and reused.

    The default cache is ``$PHIMLX_SYNTHETIC_DIR`` or ``~/.cache/phimlx/synthetic``.
    """
    base = Path(
        cache_dir
        or os.environ.get("PHIMLX_SYNTHETIC_DIR")
        or Path.home() / ".cache" / "phimlx" / "synthetic"
    )
    base.mkdir(parents=True, exist_ok=True)
    target = base / spec.file_name()
    if not target.exists():
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        try:
            write_model(tmp, spec)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
