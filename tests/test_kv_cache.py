"""KV cache types of the NumPy backend (``kv_cache_type``: f16, the default; f32; q8_0).

Each type against the float32 cache, with float activations (the int8 default quantizes
activations, which turns small differences into rounding flips): logits teacher-forced
along the f32 greedy continuation within a stated bound, and greedy decoding agreeing.
"""

from __future__ import annotations

import numpy as np
import pytest

import fallback
import phimlx
from fallback import ops
from phimlx.backends import KV_CACHE_TYPES
from phimlx.config import ModelConfig
from phimlx.errors import PromptCacheError
from phimlx.gguf import open_gguf

# max |logits - f32 logits| / max |f32 logits| over every position (measured: SmolLM2 f16
# 4e-4, q8_0 1.4e-2; tiny Phi-3 f16 2e-4, q8_0 4e-3)
BOUND = {"f16": 2e-3, "q8_0": 5e-2}
SMOLLM2_IDS = [1, 504, 3458, 5135, 282, 260, 1789, 30, 378, 1122, 314, 28, 1340, 17]
STEPS = 32


def _model(path, kv: str):
    mf = open_gguf(path)
    return fallback.load(
        mf, ModelConfig.from_gguf(mf), int8_activations=False, warmup=False, kv_cache_type=kv
    )


def _greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of ``ids`` for STEPS tokens; (tokens, logits (STEPS + 1, vocab))."""
    s = model.new_session(256)
    logits = [s.prefill(ids)]
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(s.step(tokens[-1]))
    return tokens, np.stack(logits)


def _forced(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits along a given continuation (teacher forcing): (len(tokens) + 1, vocab)."""
    s = model.new_session(256)
    return np.stack([s.prefill(ids)] + [s.step(t) for t in tokens])


def _compare(path, ids: list[int], kv: str, *, greedy: bool) -> None:
    ref_tokens, ref = _greedy(_model(path, "f32"), ids)
    model = _model(path, kv)
    got = _forced(model, ids, ref_tokens)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < BOUND[kv], err
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4 * BOUND[kv] * np.abs(ref).max()
    assert (got.argmax(-1)[clear] == ref.argmax(-1)[clear]).all()
    if greedy:
        assert _greedy(model, ids)[0] == ref_tokens


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_smollm2_kv_types_against_f32(smollm2_path, kv):
    _compare(smollm2_path, SMOLLM2_IDS, kv, greedy=True)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_tiny_phi3_kv_types_against_f32(tiny_phi3, kv):
    """Random weights leave near-ties, so greedy text is compared where margins are clear
    (teacher-forced argmax), and in full for f16."""
    _compare(tiny_phi3, list(range(100, 114)), kv, greedy=kv == "f16")


def test_f16_is_the_default(tiny_phi3):
    mf = open_gguf(tiny_phi3)
    model = fallback.load(mf, ModelConfig.from_gguf(mf), warmup=False)
    assert model.kv_cache_type == "f16"
    s = model.new_session(16)
    assert s.kv_cache_type == "f16" and s._k[0].dtype == np.uint16


@pytest.mark.parametrize("bad", ["q4_0", "F16", "", 16])
def test_bad_kv_cache_type_names_the_allowed_values(tiny_phi3, bad):
    mf = open_gguf(tiny_phi3)
    with pytest.raises(ValueError, match="'f16', 'f32', 'q8_0'"):
        fallback.load(mf, ModelConfig.from_gguf(mf), warmup=False, kv_cache_type=bad)
    with pytest.raises(ValueError, match="kv_cache_type"):
        phimlx.load(tiny_phi3, backend="numpy", kv_cache_type=bad)


@pytest.mark.parametrize("kv", KV_CACHE_TYPES)
def test_kv_state_is_float32_and_round_trips(tiny_phi3, kv):
    """`kv_state` gives float32 whatever the storage; loading it back stores the same
    values (they are already rounded to the type), and decoding continues identically."""
    model = _model(tiny_phi3, kv)
    s = model.new_session(64)
    s.prefill(list(range(200, 230)))
    k, v = s.kv_state()
    assert k.dtype == v.dtype == np.float32 and k.shape[2] == 30
    t = model.new_session(64)
    t.load_kv_state(k, v)
    k2, v2 = t.kv_state()
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(t.step(5), s.step(5))


def test_q8_0_rows_not_a_multiple_of_32_use_one_block_per_row():
    c = ops.new_cache("q8_0", 2, 4, 40)
    assert c[1].shape == (2, 4, 1)
    x = np.random.default_rng(0).standard_normal((2, 3, 40)).astype(np.float32)
    ops.cache_write(c, 1, x)
    got = ops.cache_rows(c, 4)[:, 1:]
    step = np.abs(x).max(axis=-1, keepdims=True) / 127
    assert (np.abs(got - x) <= step / 2 * (1 + 1e-5)).all()


def test_prompt_cache_of_another_kv_type_is_a_clear_error(tiny_phi3, tmp_path):
    """A prompt cache records its KV cache type; loading it into another is an error that
    names both (continuing an f16 cache in f32 would not be what an f32 prefill gives)."""
    path = tmp_path / "p.safetensors"
    with phimlx.load(tiny_phi3, backend="numpy", kv_cache_type="f16") as model:
        model.save_prompt_cache(path, "A system prompt that is worth keeping", chat=False)
        assert model.load_prompt_cache(path) > 0  # the same type loads
    with (
        phimlx.load(tiny_phi3, backend="numpy", kv_cache_type="f32") as other,
        pytest.raises(PromptCacheError, match=r"'f16'.*'f32'.*kv_cache_type='f16'"),
    ):
        other.load_prompt_cache(path)


def test_q8_0_rows_loaded_back_keep_their_codes_and_scales():
    """q8_0 values written again with ``exact`` keep the codes and scales they came from,
    whether numpy's ``max / 127`` or a compiled kernel's ``max x (1 / 127)`` made the
    scale: plain ``max / 127`` of the values misses some of the kernel's by an ulp."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 300, 64)).astype(np.float32)
    first = ops.new_cache("q8_0", 4, 300, 64)
    ops.cache_write(first, 0, x)
    q, d = first
    amax = np.abs(x.reshape(4, 300, 2, 32)).max(axis=-1)
    kernel_scales = amax * (np.float32(1.0) / np.float32(127.0))
    for scales, kernel in ((d.copy(), False), (kernel_scales, True)):
        d[...] = scales
        vals = ops.cache_rows(first, 300)
        again = ops.new_cache("q8_0", 4, 300, 64)
        ops.cache_write(again, 0, vals, exact=True)
        np.testing.assert_array_equal(again[1], scales)
        np.testing.assert_array_equal(again[0], q)
        np.testing.assert_array_equal(ops.cache_rows(again, 300), vals)
        plain = ops.new_cache("q8_0", 4, 300, 64)
        ops.cache_write(plain, 0, vals)
        assert np.array_equal(plain[1], scales) is not kernel  # what `exact` is for
