"""ModelConfig from GGUF metadata, and the synthetic maker's faithfulness to real files."""

from __future__ import annotations

from collections import Counter

import pytest

from phimlx.config import ModelConfig
from phimlx.gguf import open_gguf
from phimlx.testing.models import PHI3_MINI, mix_types


def test_smollm2_config(smollm2_path):
    c = ModelConfig.from_gguf(open_gguf(smollm2_path))
    # values as published for SmolLM2-135M (config.json of HuggingFaceTB/SmolLM2-135M-Instruct)
    assert (c.architecture, c.n_layers, c.hidden_size, c.ffn_size) == ("llama", 30, 576, 1536)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.context_length, c.rope_base, c.rope_style) == (8192, 100000.0, "normal")
    assert c.tied_embeddings and not c.fused_qkv and not c.fused_gate_up
    assert c.rope_long_factors is None and c.sliding_window is None


def test_phi3_synthetic_config(make_model):
    path = make_model(
        n_layers=2, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, sliding_window=32, mix="Q8_0"
    )
    c = ModelConfig.from_gguf(open_gguf(path))
    assert (c.architecture, c.rope_style, c.head_dim, c.rope_dim) == ("phi3", "neox", 32, 32)
    assert c.fused_qkv and c.fused_gate_up and not c.tied_embeddings
    assert (c.n_kv_heads, c.sliding_window, c.vocab_size, c.rope_base) == (2, 32, 32064, 1e4)


def test_longrope_config_picks_factors_like_llama_cpp(make_model):
    path = make_model(
        n_layers=1, hidden=64, ffn=128, n_heads=4, context=8192, original_context=1024
    )
    c = ModelConfig.from_gguf(open_gguf(path))
    assert c.rope_original_context == 1024
    # sqrt(1 + ln(8) / ln(1024)) = sqrt(1.3) computed by hand
    assert c.rope_attn_factor == pytest.approx(1.140175425)
    assert list(c.rope_factors(1024)) == pytest.approx(c.rope_short_factors)
    assert list(c.rope_factors(1025)) == pytest.approx(c.rope_long_factors)


def test_q4_k_m_mix_matches_microsofts_file():
    """Microsoft's Phi-3-mini-4k-instruct-q4.gguf (llama.cpp's Q4_K_M): Q4_K x81, Q5_K x32,
    Q6_K x17."""
    spec = ModelConfig(
        architecture="phi3",
        n_layers=PHI3_MINI["n_layers"],
        hidden_size=3072,
        ffn_size=8192,
        n_heads=32,
        n_kv_heads=32,
        head_dim=96,
        vocab_size=32064,
        context_length=4096,
        norm_eps=1e-5,
        rope_dim=96,
        fused_qkv=True,
        fused_gate_up=True,
    )
    pick = mix_types("Q4_K_M", spec.n_layers)
    types = Counter(pick(n).name for n, shape in spec.expected_tensors().items() if len(shape) == 2)
    assert types == {"Q4_K": 81, "Q5_K": 32, "Q6_K": 17}
