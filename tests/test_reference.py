"""`phimlx.reference`, the float64 oracle of both backends: first against an independent
implementation (transformers + torch, which decodes the GGUF with gguf-py and runs its own
modelling code, in float32), then the NumPy backend (float activations) against it.

Rows compared are whole logit vectors; the error is ``max |a - b| / max |b|``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import fallback
from phimlx import reference
from phimlx.config import ModelConfig
from phimlx.gguf import ModelFile, open_gguf

ORACLE_TOL = 1e-5  # float64 vs torch float32: measured at most 3e-6 (K-quant files)
BACKEND_TOL = 1e-4  # float64 vs the NumPy backend's float32 activations: measured <= 3e-6
# No tokenizer: gguf-py parses 32064 vocabulary entries slowly, and no test here needs them.
SMALL = dict(n_layers=2, hidden=64, ffn=128, n_heads=4, tokenizer=False, chat_template=False)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 32000, size=n).tolist()


def load(path: Path) -> tuple[ModelFile, ModelConfig]:
    mf = open_gguf(path)
    return mf, ModelConfig.from_gguf(mf)


# ---------------------------------------------------------------- transformers + torch

_HF_CACHE: dict[tuple, np.ndarray] = {}


def hf_logits(
    path: Path,
    ids: list[int],
    patch: Callable[[object], None] | None = None,
    key: str = "",
    vocab: int | None = 32064,
) -> np.ndarray:
    """transformers' float32 logits for ``ids`` (``patch(model)`` adjusts its config first:
    what transformers' GGUF loader does not read, such as LongRoPE factors or a window;
    ``vocab``: the vocabulary size, which it reads from the tokenizer, absent from synthetic
    files; None for a file that has one)."""
    cache_key = (str(path), tuple(ids), key)
    if cache_key not in _HF_CACHE:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        import gguf

        # transformers rebuilds the same tensor-name map for every submodule (400 times for
        # SmolLM2, most of its load time); the map is a pure function of its arguments.
        cached = functools.lru_cache(gguf.get_tensor_name_map)
        with mock.patch.object(gguf, "get_tensor_name_map", cached):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent),
                gguf_file=path.name,
                dtype=torch.float32,
                **({} if vocab is None else {"vocab_size": vocab}),
            )
        if patch is not None:
            patch(model)
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0].double().numpy()
        _HF_CACHE[cache_key] = out
    return _HF_CACHE[cache_key]


def phi3_rope(cfg: ModelConfig, **rope: object) -> Callable[[object], None]:
    """Rebuild a transformers Phi-3's rotary embedding with ``rope`` parameters (LongRoPE
    factors, a partial rotary factor): its GGUF loader keeps neither."""

    def apply(model) -> None:
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        model.config.rope_parameters = {"rope_theta": cfg.rope_base, **rope}
        if "original_max_position_embeddings" in rope:
            model.config.original_max_position_embeddings = rope["original_max_position_embeddings"]
        model.model.rotary_emb = Phi3RotaryEmbedding(model.config)

    return apply


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 without its tokenizer: the same tensor bytes and model keys.  gguf-py parses
    the 150k tokenizer entries one by one, twice per transformers load (most of this file's
    time otherwise); the reference still reads the real file."""
    import gguf

    mf = open_gguf(smollm2_path)
    path = tmp_path_factory.mktemp("smollm2") / "weights.gguf"
    w = gguf.GGUFWriter(str(path), mf.architecture)
    for key, value in mf.metadata.items():
        if key.startswith(mf.architecture + "."):  # ints and floats only in this file
            kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else None
            w.add_key_value(key, value, kind or gguf.GGUFValueType.UINT32)
    for name, t in mf.tensors.items():
        w.add_tensor(name, mf.raw(name), raw_dtype=gguf.GGMLQuantizationType(t.type.value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_smollm2_matches_transformers(smollm2_path, smollm2_weights):
    """The real model (llama architecture, Q/K stored permuted, tied embeddings, Q4_1)."""
    ids = [1, 504, 3458, 5135, 282, 260, 1789, 30, 378, 1122, 314, 28, 1340, 17, 2]
    mf, cfg = load(smollm2_path)
    ours, ref = reference.logits(mf, cfg, ids), hf_logits(smollm2_weights, ids, vocab=None)
    assert rel_err(ours, ref) < ORACLE_TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


ORACLE_CASES = {
    "phi3-f32-gqa": dict(mix="F32", n_kv_heads=2),
    "phi3-q8_0-mqa": dict(mix="Q8_0", n_kv_heads=1),
    "phi3-q4_k_m-gqa": dict(mix="Q4_K_M", hidden=256, ffn=256, n_kv_heads=2),
    "phi3-q5_1-base": dict(mix="Q5_1", rope_base=500000.0),
    "llama-q8_0-gqa": dict(architecture="llama", mix="Q8_0", hidden=128, ffn=256, n_kv_heads=2),
    "llama-f16": dict(architecture="llama", mix="F16"),
}


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_synthetic_matches_transformers(make_model, name):
    path = make_model(**(SMALL | ORACLE_CASES[name]))
    ids = random_ids(20, 0)
    mf, cfg = load(path)
    assert rel_err(reference.logits(mf, cfg, ids), hf_logits(path, ids)) < ORACLE_TOL


@pytest.mark.parametrize(
    "n_tokens, context", [(80, 1024), (40, 64)], ids=["long-factors", "short-factors"]
)
def test_longrope_matches_transformers(make_model, n_tokens, context):
    """transformers picks long factors when the sequence exceeds the original context, llama.cpp
    (and we) when the session's context does: the cases are where both rules agree."""
    path = make_model(**SMALL, context=1024, original_context=64)
    mf, cfg = load(path)
    rope = phi3_rope(
        cfg,
        rope_type="longrope",
        long_factor=list(cfg.rope_long_factors),
        short_factor=list(cfg.rope_short_factors),
        original_max_position_embeddings=64,
        factor=1024 / 64,
    )
    ids = random_ids(n_tokens, 2)
    ref = hf_logits(path, ids, rope, key="longrope")
    assert rel_err(reference.logits(mf, cfg, ids, context), ref) < ORACLE_TOL
    swapped = dataclasses.replace(  # the other factors for this context: far off
        cfg, rope_long_factors=cfg.rope_short_factors, rope_short_factors=cfg.rope_long_factors
    )
    assert rel_err(reference.logits(mf, swapped, ids, context), ref) > 1e-2


def test_partial_rotary_and_window_match_transformers(make_model):
    """Half the head rotated, a window of 5 over 20 tokens (neither is read from the GGUF by
    transformers: both set on its config and on ours)."""
    path = make_model(**SMALL, mix="Q8_0", n_kv_heads=2)
    mf, cfg = load(path)
    cfg = dataclasses.replace(cfg, rope_dim=cfg.head_dim // 2, sliding_window=5)
    rope = phi3_rope(cfg, rope_type="default", partial_rotary_factor=0.5)

    def patch(model) -> None:
        rope(model)
        model.config.sliding_window = 5

    ids = random_ids(20, 3)
    ref = hf_logits(path, ids, patch, key="partial-window")
    assert rel_err(reference.logits(mf, cfg, ids), ref) < ORACLE_TOL
    for wrong in (dict(sliding_window=None), dict(rope_dim=cfg.head_dim)):
        assert rel_err(reference.logits(mf, dataclasses.replace(cfg, **wrong), ids), ref) > 1e-3


def test_the_comparison_catches_errors(make_model):
    """The oracle comparison is sharp: a weight off by 1% in one matrix, or the other rope
    style, fails it by orders of magnitude."""
    path = make_model(**SMALL, mix="F32", n_kv_heads=2)
    mf, cfg = load(path)
    ids = random_ids(20, 0)
    ref = hf_logits(path, ids)

    def perturbed(name: str) -> np.ndarray:
        w = reference.weight(mf, name)
        return w * 1.01 if name == "blk.1.attn_output.weight" else w

    assert rel_err(reference.logits(mf, cfg, ids, weights=perturbed), ref) > 100 * ORACLE_TOL
    swapped = dataclasses.replace(cfg, rope_style="normal")
    assert rel_err(reference.logits(mf, swapped, ids), ref) > 100 * ORACLE_TOL
    with pytest.raises(ValueError, match="rope style"):
        reference.logits(mf, dataclasses.replace(cfg, rope_style="gptj"), ids)


def test_bad_token_ids_are_refused(make_model):
    mf, cfg = load(make_model(**SMALL))
    for ids, context in (([], None), ([cfg.vocab_size], None), ([-1], None), ([1, 2, 3], 2)):
        with pytest.raises(ValueError):
            reference.logits(mf, cfg, ids, context)


# ---------------------------------------------------------------- the NumPy backend


def backend_logits(mf, cfg: ModelConfig, ids: list[int], n_prefill: int, context: int):
    """Float-activation NumPy backend: one prefill of ``ids[:n_prefill]``, then steps."""
    s = fallback.load(mf, cfg, int8_activations=False, kv_cache_type="f32").new_session(context)
    return np.stack([s.prefill(ids[:n_prefill])] + [s.step(t) for t in ids[n_prefill:]])


K = dict(hidden=256, ffn=256)  # K-quant rows are 256-weight blocks
BACKEND_CASES = {
    "f32": dict(mix="F32"),
    "f16-gqa": dict(mix="F16", n_kv_heads=2),
    "bf16": dict(mix="BF16"),
    "q8_0-mqa": dict(mix="Q8_0", n_kv_heads=1),
    "q4_0": dict(mix="Q4_0"),
    "q4_1": dict(mix="Q4_1", n_heads=2),
    "q5_0": dict(mix="Q5_0"),
    "q5_1": dict(mix="Q5_1"),
    "q2_k": dict(mix="Q2_K", **K),
    "q3_k": dict(mix="Q3_K", **K),
    "q4_k": dict(mix="Q4_K", **K),
    "q5_k": dict(mix="Q5_K", **K),
    "q6_k": dict(mix="Q6_K", **K),
    "q4_k_m-gqa": dict(mix="Q4_K_M", n_layers=3, n_kv_heads=2, **K),
    "llama-q4_k-gqa": dict(architecture="llama", mix="Q4_K", n_kv_heads=2, **K),
    "llama-q8_0": dict(architecture="llama", mix="Q8_0", hidden=128, ffn=256),
    "window": dict(mix="Q4_0", sliding_window=6),  # 6 < the 20-token prefill
}


@pytest.mark.parametrize("name", list(BACKEND_CASES))
def test_numpy_backend_matches_reference(make_model, name):
    mf, cfg = load(make_model(**(SMALL | BACKEND_CASES[name])))
    ids = random_ids(28, 4)
    ours = backend_logits(mf, cfg, ids, 20, 64)
    ref = reference.logits(mf, cfg, ids, 64)[19:]
    assert rel_err(ours, ref) < BACKEND_TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("context", [1024, 64], ids=["long-factors", "short-factors"])
def test_numpy_backend_longrope_matches_reference(make_model, context):
    mf, cfg = load(make_model(**SMALL, context=1024, original_context=64))
    ids = random_ids(40, 5)
    ours = backend_logits(mf, cfg, ids, 32, context)
    ref = reference.logits(mf, cfg, ids, context)[31:]
    assert rel_err(ours, ref) < BACKEND_TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_numpy_backend_partial_rotary_matches_reference(make_model):
    mf, cfg = load(make_model(**SMALL, mix="Q8_0"))
    cfg = dataclasses.replace(cfg, rope_dim=cfg.head_dim // 2)
    ids = random_ids(24, 6)
    ours = backend_logits(mf, cfg, ids, 16, 64)
    assert rel_err(ours, reference.logits(mf, cfg, ids, 64)[15:]) < BACKEND_TOL


def test_backend_comparison_catches_a_wrong_window(make_model):
    """The backend comparison is sharp too: the same file run by the reference without its
    window (or the backend with another rope style) is far off."""
    mf, cfg = load(make_model(**SMALL, mix="Q4_0", sliding_window=6))
    ids = random_ids(28, 4)
    ours = backend_logits(mf, cfg, ids, 20, 64)
    no_window = dataclasses.replace(cfg, sliding_window=None)
    assert rel_err(ours, reference.logits(mf, no_window, ids, 64)[19:]) > 1e-2
    normal = dataclasses.replace(cfg, rope_style="normal")
    wrong = backend_logits(mf, normal, ids, 20, 64)
    assert rel_err(wrong, reference.logits(mf, cfg, ids, 64)[19:]) > 1e-2
