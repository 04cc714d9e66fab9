"""Our NumPy block decoders against gguf-py's `gguf.quants` (an independent implementation)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from phimlx.errors import GGUFError, UnsupportedModelError
from phimlx.gguf import TYPE_SIZES, GGMLType, dequantize, dequantize_rows

# Byte offsets of the f16 scale fields inside one block of each quantized type.
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
    "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip
QUANT_TYPES = list(F16_FIELDS)
FLOAT_TYPES = ["F32", "F16", "BF16"]
# The types gguf-py can also quantize (K-quants it only decodes).
GGUF_QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"]


def random_raw(name: str, rows: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks, ``uint8 (rows, row_bytes)``, f16 scale fields set to finite small values
    (random bytes there would make NaN/Inf, which compare badly and never occur in models)."""
    qtype = GGMLType[name]
    block, size = TYPE_SIZES[qtype]
    if block == 1:
        vals = rng.standard_normal((rows, n_blocks), dtype=np.float32)
        if qtype == GGMLType.F16:
            return vals.astype(np.float16).view(np.uint8)
        if qtype == GGMLType.BF16:
            return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return vals.view(np.uint8)
    raw = rng.integers(0, 256, (rows, n_blocks * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)  # (rows * n_blocks, size)
    for o in F16_FIELDS[name]:
        scale = rng.uniform(-2.0, 2.0, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, o : o + 2] = scale.view(np.uint8)
    return raw


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    if name == "BF16":  # gguf.quants has BF16 as a class, addressed like the others
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.BF16)
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])


def assert_same_values(ours: np.ndarray, ref: np.ndarray) -> None:
    # Same formula as gguf-py, float32 throughout; only the order of one multiply-add may
    # differ, so values agree to a couple of ulps of the largest term.
    assert ours.dtype == np.float32
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (7, 3), (33, 2)])
def test_random_blocks_match_gguf(name: str, rows: int, n_blocks: int) -> None:
    rng = np.random.default_rng(hash((name, rows, n_blocks)) % 2**32)
    block = TYPE_SIZES[GGMLType[name]][0]
    cols = n_blocks * block if block > 1 else n_blocks * 32
    raw = random_raw(name, rows, cols // block, rng)
    ours = dequantize(raw, GGMLType[name], (rows, cols))
    assert ours.shape == (rows, cols)
    assert_same_values(ours, reference(raw, name).reshape(rows, cols))


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_blocks_made_by_gguf_quantize(name: str) -> None:
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((5, 96), dtype=np.float32)
    weights[0, :32] = 0.0  # an all-zero block: scale 0
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[name])
    ours = dequantize(raw, GGMLType[name], weights.shape)
    assert_same_values(ours, reference(raw, name).reshape(weights.shape))
    # And the decoded values are the weights, to within the format's precision.
    tol = {"Q8_0": 0.02, "BF16": 0.02, "Q5_0": 0.15, "Q5_1": 0.15}.get(name, 0.3)
    assert np.abs(ours - weights).max() < tol * np.abs(weights).max()
    assert np.all(ours[0, :32] == 0.0)


def test_shapes_1d_and_3d() -> None:
    rng = np.random.default_rng(3)
    raw = random_raw("Q4_K", 6, 2, rng)
    ref = reference(raw, "Q4_K").reshape(6, 512)
    assert_same_values(dequantize(raw, GGMLType.Q4_K, (2, 3, 512)), ref.reshape(2, 3, 512))
    assert_same_values(dequantize(raw[0], GGMLType.Q4_K, (512,)), ref[0])


def test_dequantize_rows_of_a_memmap_view(tmp_path) -> None:
    rng = np.random.default_rng(4)
    raw = random_raw("Q6_K", 9, 2, rng)
    path = tmp_path / "blocks.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=raw.shape)
    assert_same_values(dequantize_rows(mm[2:5], GGMLType.Q6_K), reference(raw[2:5], "Q6_K"))


def test_known_values() -> None:
    # One Q4_0 block by hand: d = 0.5, nibbles 0..15 low then high -> 0.5 * (q - 8).
    d = np.array([0.5], dtype=np.float16).view(np.uint8)
    qs = (np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)).astype(
        np.uint8
    )
    raw = np.concatenate([d, qs])[None]
    expected = 0.5 * (np.concatenate([np.arange(16), np.arange(16)[::-1]]) - 8.0)
    np.testing.assert_array_equal(dequantize(raw, GGMLType.Q4_0, (1, 32))[0], expected)


@pytest.mark.parametrize("qtype", [GGMLType.Q8_K, GGMLType.IQ2_XXS, GGMLType.IQ4_NL])
def test_unsupported_type_is_named(qtype: GGMLType) -> None:
    block, size = TYPE_SIZES[qtype]
    with pytest.raises(UnsupportedModelError, match=qtype.name):
        dequantize(np.zeros((1, size), np.uint8), qtype, (1, block))


def test_wrong_byte_count() -> None:
    with pytest.raises(GGUFError, match="needs 36 bytes"):
        dequantize(np.zeros(35, np.uint8), GGMLType.Q4_0, (2, 32))
    with pytest.raises(GGUFError, match="whole"):
        dequantize(np.zeros(18, np.uint8), GGMLType.Q4_0, (1, 31))
