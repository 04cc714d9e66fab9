"""The NumPy backend's matrix kernels against gguf.quants.dequantize(W) @ x, numba vs NumPy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_quants import FLOAT_TYPES, GGUF_QUANTIZABLE, QUANT_TYPES, random_raw, reference

import fallback.kernels as kernels
from fallback.kernels import QuantMatrix, numba_available, set_threads
from phimlx.errors import UnsupportedModelError
from phimlx.gguf import TYPE_SIZES, GGMLType

HAVE_NUMBA = numba_available()
NEEDS_NUMBA = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not available")
PATHS = [pytest.param(True, id="numba", marks=NEEDS_NUMBA), pytest.param(False, id="numpy")]
# (rows, blocks per row): one row; K = one block; rows not a multiple of the thread count.
SHAPES = [(1, 1), (3, 1), (37, 2), (67, 3)]
U32 = np.finfo(np.float32).eps / 2  # float32 unit roundoff


def matrix_case(name: str, rows: int, n_blocks: int, seed: int = 0):
    rng = np.random.default_rng(seed + rows * 131 + n_blocks + len(name))
    block = TYPE_SIZES[GGMLType[name]][0]
    cols = n_blocks * block if block > 1 else n_blocks * 32
    raw = random_raw(name, rows, cols // block, rng)
    w = reference(raw, name).reshape(rows, cols).astype(np.float64)
    return raw, w, cols, rng


def dot_tolerance(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Error bound for float32 dot products of length K against a float64 reference.

    Summing K float32 products errs by at most ~K*u times the sum of |terms| (u = 2^-24);
    the kernels split off zero points (Q4_0's 8, the K-quant mins), so their partial sums are
    up to ~4x the magnitude of |w|*|x|.  4*K*u*(|W| @ |x|) covers both; observed errors are
    100x smaller, and an indexing mistake (a wrong nibble, scale or bit) is far larger."""
    k = w.shape[-1]
    return 4 * k * U32 * (np.abs(w) @ np.abs(x).T) + 1e-30


@pytest.mark.parametrize("use_numba", PATHS)
@pytest.mark.parametrize("rows,n_blocks", SHAPES)
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_matvec_matmul_take_rows(name: str, rows: int, n_blocks: int, use_numba: bool) -> None:
    raw, w, cols, rng = matrix_case(name, rows, n_blocks)
    m = QuantMatrix(raw, GGMLType[name], (rows, cols), use_numba=use_numba)
    assert (m.rows, m.cols, m.qtype, m.nbytes) == (rows, cols, GGMLType[name], raw.nbytes)

    x = rng.standard_normal(cols, dtype=np.float32)
    y = m.matvec(x)
    assert y.dtype == np.float32 and y.shape == (rows,)
    assert np.all(np.abs(y - w @ x) <= dot_tolerance(w, x))

    xs = rng.standard_normal((5, cols), dtype=np.float32)
    ys = m.matmul(xs)
    assert ys.dtype == np.float32 and ys.shape == (5, rows)
    assert np.all(np.abs(ys - xs @ w.T) <= dot_tolerance(w, xs).T)
    one = m.matmul(xs[:1])
    assert one.shape == (1, rows)
    assert np.all(np.abs(one - xs[:1] @ w.T) <= dot_tolerance(w, xs[:1]).T)

    ids = np.array([rows - 1, 0, rows // 2, rows - 1])
    got = m.take_rows(ids)
    assert got.dtype == np.float32 and got.shape == (4, cols)
    np.testing.assert_allclose(got, w[ids], rtol=1e-6, atol=1e-6 * np.abs(w).max())


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_numba_and_numpy_paths_agree(name: str) -> None:
    raw, w, cols, rng = matrix_case(name, 45, 4, seed=1)
    fast = QuantMatrix(raw, GGMLType[name], (45, cols), use_numba=True)
    slow = QuantMatrix(raw, GGMLType[name], (45, cols), use_numba=False)
    x = rng.standard_normal(cols, dtype=np.float32)
    assert np.all(np.abs(fast.matvec(x) - slow.matvec(x)) <= 2 * dot_tolerance(w, x))
    xs = rng.standard_normal((3, cols), dtype=np.float32)
    assert np.all(np.abs(fast.matmul(xs) - slow.matmul(xs)) <= 2 * dot_tolerance(w, xs).T)
    ids = np.arange(45)[::-2]
    np.testing.assert_allclose(fast.take_rows(ids), slow.take_rows(ids), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("use_numba", PATHS)
@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_blocks_made_by_gguf_quantize(name: str, use_numba: bool) -> None:
    rng = np.random.default_rng(11)
    weights = rng.standard_normal((19, 128), dtype=np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[name])
    w = reference(raw, name).reshape(weights.shape).astype(np.float64)
    m = QuantMatrix(np.ascontiguousarray(raw), GGMLType[name], weights.shape, use_numba=use_numba)
    x = rng.standard_normal(128, dtype=np.float32)
    assert np.all(np.abs(m.matvec(x) - w @ x) <= dot_tolerance(w, x))


@pytest.mark.parametrize("use_numba", PATHS)
def test_matmul_crosses_tiles(use_numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny tile budget: 7 rows per tile, 50 rows -> 8 tiles, the last one partial.
    monkeypatch.setattr(kernels, "TILE_BYTES", 7 * 256 * 4)
    raw, w, cols, rng = matrix_case("Q4_K", 50, 1, seed=2)
    m = QuantMatrix(raw, GGMLType.Q4_K, (50, cols), use_numba=use_numba)
    xs = rng.standard_normal((4, cols), dtype=np.float32)
    assert np.all(np.abs(m.matmul(xs) - xs @ w.T) <= dot_tolerance(w, xs).T)
    x = xs[0]
    assert np.all(np.abs(m.matvec(x) - w @ x) <= dot_tolerance(w, x))
    ids = np.arange(50)[::-1]
    np.testing.assert_allclose(m.take_rows(ids), w[ids], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("use_numba", PATHS)
def test_memmap_view_is_used_in_place(use_numba: bool, tmp_path) -> None:
    raw, w, cols, rng = matrix_case("Q6_K", 21, 2, seed=3)
    path = tmp_path / "w.bin"
    pad = np.zeros(64, np.uint8)  # the tensor sits at an offset, as in a GGUF file
    np.concatenate([pad, raw.reshape(-1)]).tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    view = mm[64 : 64 + raw.nbytes].reshape(raw.shape)
    m = QuantMatrix(view, GGMLType.Q6_K, (21, cols), use_numba=use_numba)
    assert np.shares_memory(m.raw, mm)
    x = rng.standard_normal(cols, dtype=np.float32)
    assert np.all(np.abs(m.matvec(x) - w @ x) <= dot_tolerance(w, x))


def test_errors() -> None:
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        QuantMatrix(np.zeros((2, 66), np.uint8), GGMLType.IQ2_XXS, (2, 256))
    with pytest.raises(ValueError, match="raw of shape"):
        QuantMatrix(np.zeros((2, 17), np.uint8), GGMLType.Q4_0, (2, 32))
    m = QuantMatrix(np.zeros((2, 18), np.uint8), GGMLType.Q4_0, (2, 32))
    with pytest.raises(IndexError, match="row id 2"):
        m.take_rows(np.array([0, 2]))
    with pytest.raises(ValueError, match="matmul expects"):
        m.matmul(np.zeros((3, 31), np.float32))


def test_set_threads() -> None:
    assert set_threads(1) == 1
    n = set_threads(None)
    assert n >= 1
    if HAVE_NUMBA:
        import numba

        assert numba.get_num_threads() == n


def test_env_var_forces_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIMLX_NO_NUMBA", "1")
    assert not numba_available()
    m = QuantMatrix(np.zeros((2, 18), np.uint8), GGMLType.Q4_0, (2, 32))
    assert not m.use_numba
    if HAVE_NUMBA:
        with pytest.raises(ValueError, match="unavailable"):
            QuantMatrix(np.zeros((2, 18), np.uint8), GGMLType.Q4_0, (2, 32), use_numba=True)
