"""GGUF blocks -> MLX arrays, checked against ``gguf.quants.dequantize`` on random blocks.

Random bytes with every f16 scale field overwritten by small finite values of both signs.
Exact types must decode (through ``mx.dequantize``) to the reference up to float rounding;
the re-quantized ones within the bound stated in ``phimlx/mlx/quant.py``, expressed in units
of S, the source format's own worst rounding error in the 32-wide group (half its coarsest
step).  Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import gguf.quants  # noqa: E402

from phimlx.errors import UnsupportedModelError  # noqa: E402
from phimlx.gguf import TYPE_SIZES, GGMLType  # noqa: E402
from phimlx.mlx.quant import (  # noqa: E402
    EXACT_TYPES,
    MLX_BITS,
    convert_rows,
    dequantize_rows,
    pack,
)

F16_FIELDS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
ROWS, COLS = 24, 1024


def random_blocks(qtype: GGMLType, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, size = TYPE_SIZES[qtype]
    b = rng.integers(0, 256, (ROWS, COLS // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        v = rng.uniform(1e-3, 0.1, b.shape[:2]) * rng.choice([-1.0, 1.0], b.shape[:2])
        b[..., at : at + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(ROWS, -1)


def mlx_values(raw: np.ndarray, qtype: GGMLType, scale_dtype: type) -> np.ndarray:
    q = convert_rows(raw, qtype, scale_dtype)
    assert q.weight.dtype == np.uint32 and q.weight.shape == (ROWS, COLS * q.bits // 32)
    w = mx.dequantize(
        mx.array(q.weight),
        mx.array(q.scales),
        mx.array(q.biases),
        group_size=q.group_size,
        bits=q.bits,
    )
    return np.array(w.astype(mx.float32))


def reference(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype.value).reshape(ROWS, COLS).astype(np.float32)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float64)


def source_error(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """S per 32-group (ROWS, COLS/32): half the coarsest step of the source's sub-blocks,
    parsed here from the block bytes as ggml's dequantize_row_* reads them."""
    b = raw.reshape(ROWS, -1, TYPE_SIZES[qtype][1])
    if qtype == GGMLType.Q6_K:
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float64)
        step = np.abs(_f16(b, 208)[..., None] * sc)  # (rows, nb, 16 sub-blocks of 16)
    elif qtype == GGMLType.Q3_K:
        aux = np.ascontiguousarray(b[..., 96:108]).view(np.uint32)  # ggml's kmask dance
        k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
        tmp = aux[..., 2]
        out = np.stack(
            [
                (aux[..., 0] & k2) | (((tmp >> 0) & k1) << 4),
                (aux[..., 1] & k2) | (((tmp >> 2) & k1) << 4),
                ((aux[..., 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                ((aux[..., 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4),
            ],
            axis=-1,
        )
        sc = np.ascontiguousarray(out).view(np.int8).astype(np.float64) - 32
        step = np.abs(_f16(b, 108)[..., None] * sc)
    elif qtype == GGMLType.Q2_K:
        sc = (b[..., 0:16] & 0xF).astype(np.float64)
        step = np.maximum(np.abs(_f16(b, 80)[..., None] * sc), np.abs(_f16(b, 82))[..., None])
    else:
        raise AssertionError(qtype)
    pairs = step.reshape(ROWS, -1, 2)  # two 16-wide sub-blocks per MLX group of 32
    return 0.5 * pairs.max(axis=-1)


# Bound on |MLX - reference| in units of S, from the docstring of phimlx/mlx/quant.py
# (0.252, 0.534, 0.58); float16 scales add the rounding of scale, bias and result.
REQUANT_BOUND = {GGMLType.Q6_K: 0.26, GGMLType.Q3_K: 0.54, GGMLType.Q2_K: 0.6}
F16_SLACK = 0.05


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS, key=lambda t: t.value), ids=lambda t: t.name)
def test_our_block_decoders_equal_gguf(qtype: GGMLType):
    raw = random_blocks(qtype, seed=1)
    np.testing.assert_array_equal(dequantize_rows(raw, qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(EXACT_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_exact_types_equal_gguf(qtype: GGMLType):
    raw = random_blocks(qtype)
    ref = reference(raw, qtype)
    got = mlx_values(raw, qtype, np.float32)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * scale)
    # float16 scales (the Metal default): only the rounding of scale, bias and result.
    got16 = mlx_values(raw, qtype, np.float16)
    groups = np.abs(ref).reshape(ROWS, -1, 32).max(axis=-1, keepdims=True)
    err = np.abs(got16 - ref).reshape(ROWS, -1, 32)
    assert (err <= 2.0**-9 * groups + 1e-7).all()
    print(
        f"{qtype.name}: f32 scales max err {np.abs(got - ref).max():.2e}, f16 scales "
        f"{(err / groups).max():.2e} of the group's max |w|"
    )


@pytest.mark.parametrize("qtype", list(REQUANT_BOUND), ids=lambda t: t.name)
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_requantized_types_within_source_error(qtype: GGMLType, scale_dtype: type):
    worst = 0.0
    for seed in range(4):
        raw = random_blocks(qtype, seed)
        ref = reference(raw, qtype)
        got = mlx_values(raw, qtype, scale_dtype)
        s = source_error(raw, qtype)  # (rows, groups)
        err = np.abs(got - ref).reshape(ROWS, -1, 32).max(axis=-1)
        ratio = np.where(s > 0, err / np.where(s > 0, s, 1), 0.0)
        assert (err[s == 0] <= 1e-3 * np.abs(ref).max()).all()
        worst = max(worst, float(ratio.max()))
    print(
        f"{qtype.name} -> {MLX_BITS[qtype]}-bit ({scale_dtype.__name__} scales): max error "
        f"{worst:.3f} x the source's own rounding error"
    )
    assert worst <= REQUANT_BOUND[qtype] + (F16_SLACK if scale_dtype is np.float16 else 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_bit_order(bits: int):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (4, 128)).astype(np.uint8)
    ones = mx.ones((4, 4))
    got = mx.dequantize(
        mx.array(pack(codes, bits)), ones, mx.zeros((4, 4)), group_size=32, bits=bits
    )
    np.testing.assert_array_equal(np.array(got), codes)
    # and MLX's own quantizer packs the same way
    w = mx.array(codes.astype(np.float32))
    wq, _, _ = mx.quantize(w, group_size=32, bits=bits)
    assert wq.shape == pack(codes, bits).shape


def test_unsupported_type_is_a_typed_error():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        convert_rows(np.zeros((1, 66), np.uint8), GGMLType.IQ2_XXS)


def test_float16_overflowing_scale_falls_back_to_float32():
    raw = random_blocks(GGMLType.Q4_K)
    raw = raw.reshape(ROWS, -1, 144).copy()
    raw[0, 0, 0:2] = np.array([60000.0], np.float16).view(np.uint8)  # d*sc overflows f16
    raw = raw.reshape(ROWS, -1)
    q = convert_rows(raw, GGMLType.Q4_K, np.float16)
    assert q.scales.dtype == np.float32 and np.isfinite(q.scales).all()
