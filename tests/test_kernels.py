"""The NumPy backend's matrix kernels against gguf.quants.dequantize(W) @ x, numba vs NumPy.

Three matvec paths: the int8-activation kernels (AVX2; ``W @ x_hat`` with ``x_hat`` = ``x``
rounded to 8 bits per 32 values, checked against that ``x_hat``), numba's float kernels and
the NumPy path (``W @ x``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_quants import FLOAT_TYPES, GGUF_QUANTIZABLE, QUANT_TYPES, random_raw, reference

import fallback.kernels as kernels
import fallback.matrix as matrix
from fallback.kernels import kernel_set, numba_available, numpy_engine, quantize_activations
from fallback.matrix import QuantMatrix, matvec_many, matvec_plan
from fallback.threads import set_threads
from phimlx.errors import UnsupportedModelError
from phimlx.gguf import DEQUANTIZABLE, TYPE_SIZES, GGMLType

HAVE_NUMBA = numba_available()
HAVE_INT8 = HAVE_NUMBA and kernels.avx2_kernels() is not None
NEEDS_NUMBA = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not available")
NEEDS_INT8 = pytest.mark.skipif(not HAVE_INT8, reason="no int8 kernels (numba, AVX2)")
HAVE_AMX = HAVE_INT8 and kernels.amx_kernels() is not None
NEEDS_AMX = pytest.mark.skipif(not HAVE_AMX, reason="no AMX tiles here")
INT8_TYPES = [t.name for t, k in kernels.KERNELS.items() if k.avx2_int8]
# QuantMatrix keyword arguments of each path.
PATHS = [
    pytest.param({"use_numba": True, "int8_activations": False}, id="numba", marks=NEEDS_NUMBA),
    pytest.param({"use_numba": True, "int8_activations": True}, id="int8", marks=NEEDS_INT8),
    # numba's float kernels (`numba_matvec`), what runs without AVX2
    pytest.param({"use_numba": True, "portable": True}, id="portable", marks=NEEDS_NUMBA),
    pytest.param({"use_numba": False}, id="numpy"),
]
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


def make_matrix(raw: np.ndarray, name: str, shape, path: dict) -> QuantMatrix:
    kw = dict(path)
    if kw.get("int8_activations") and name not in INT8_TYPES:
        pytest.skip(f"no int8 kernel for {name}")
    if not kw.pop("portable", False):
        return QuantMatrix(raw, GGMLType[name], shape, **kw)
    saved = kernels.avx2_kernels()
    kernels._avx2 = False  # as on a CPU without AVX2
    try:
        m = QuantMatrix(raw, GGMLType[name], shape, **kw)
    finally:
        kernels._avx2 = saved or False
    assert m.kernels.engine == ("numpy" if name == "F32" else "numba")
    return m


def effective_x(m: QuantMatrix, x: np.ndarray) -> np.ndarray:
    """What ``m.matvec(x)`` (``x`` a vector) or ``m.matmul(x)`` (rows, where they take the
    int8 kernel) multiplies with: ``x_hat`` on the int8 path, else ``x``."""
    if not m.int8_activations:
        return x
    if x.ndim == 2:
        return np.stack([check_quantized(row, m.int8_group) for row in x])
    return check_quantized(x, m.int8_group)


def check_quantized(x: np.ndarray, group: int = 32) -> np.ndarray:
    """``x_hat`` is ``x`` rounded to the nearest step of ``max|x| / 127`` per ``group``
    values; returns it (float64)."""
    xq, dx, xs = quantize_activations(x, group)
    xhat = (xq.reshape(-1, 32) * dx.astype(np.float64)[:, None]).reshape(-1)
    g = x.reshape(-1, 32).astype(np.float64)
    amax = np.repeat(np.abs(x.reshape(-1, group)).max(axis=1), group // 32)
    np.testing.assert_allclose(dx, amax / 127, rtol=1e-6)
    assert np.all(np.abs(xq.astype(np.int32)) <= 127)
    step = dx.astype(np.float64)[:, None]
    err = np.abs(xhat.reshape(g.shape) - g)
    assert np.all(err <= step * (0.5 + 1e-5) + 1e-30)
    sums = (xq.reshape(-1, 32).sum(axis=1) * step[:, 0]).astype(np.float32)
    np.testing.assert_allclose(xs, sums, rtol=1e-6)
    return xhat


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,n_blocks", SHAPES)
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_matvec_matmul_take_rows(name: str, rows: int, n_blocks: int, path: dict) -> None:
    raw, w, cols, rng = matrix_case(name, rows, n_blocks)
    m = make_matrix(raw, name, (rows, cols), path)
    assert (m.rows, m.cols, m.qtype, m.nbytes) == (rows, cols, GGMLType[name], raw.nbytes)
    assert m.int8_activations == bool(path.get("int8_activations"))

    x = rng.standard_normal(cols, dtype=np.float32)
    y = m.matvec(x)
    assert y.dtype == np.float32 and y.shape == (rows,)
    xe = effective_x(m, x)
    assert np.all(np.abs(y - w @ xe) <= dot_tolerance(w, xe))
    out = np.full(rows, np.nan, np.float32)
    assert m.matvec(x, out=out) is out
    np.testing.assert_array_equal(out, y)

    xs = rng.standard_normal((5, cols), dtype=np.float32)
    ys = m.matmul(xs)  # a few rows: on the int8 path, the int8 matmul
    assert ys.dtype == np.float32 and ys.shape == (5, rows)
    xse = effective_x(m, xs)
    assert np.all(np.abs(ys - xse @ w.T) <= dot_tolerance(w, xse).T)
    one = m.matmul(xs[:1])
    assert one.shape == (1, rows)
    assert np.all(np.abs(one - xse[:1] @ w.T) <= dot_tolerance(w, xse[:1]).T)

    ids = np.array([rows - 1, 0, rows // 2, rows - 1])
    got = m.take_rows(ids)
    assert got.dtype == np.float32 and got.shape == (4, cols)
    np.testing.assert_allclose(got, w[ids], rtol=1e-6, atol=1e-6 * np.abs(w).max())


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_numba_and_numpy_paths_agree(name: str) -> None:
    raw, w, cols, rng = matrix_case(name, 45, 4, seed=1)
    fast = QuantMatrix(raw, GGMLType[name], (45, cols), use_numba=True, int8_activations=False)
    slow = QuantMatrix(raw, GGMLType[name], (45, cols), use_numba=False)
    x = rng.standard_normal(cols, dtype=np.float32)
    assert np.all(np.abs(fast.matvec(x) - slow.matvec(x)) <= 2 * dot_tolerance(w, x))
    xs = rng.standard_normal((3, cols), dtype=np.float32)
    assert np.all(np.abs(fast.matmul(xs) - slow.matmul(xs)) <= 2 * dot_tolerance(w, xs).T)
    ids = np.arange(45)[::-2]
    np.testing.assert_allclose(fast.take_rows(ids), slow.take_rows(ids), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_blocks_made_by_gguf_quantize(name: str, path: dict) -> None:
    rng = np.random.default_rng(11)
    weights = rng.standard_normal((19, 128), dtype=np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[name])
    w = reference(raw, name).reshape(weights.shape).astype(np.float64)
    m = make_matrix(np.ascontiguousarray(raw), name, weights.shape, path)
    x = rng.standard_normal(128, dtype=np.float32)
    xe = effective_x(m, x)
    assert np.all(np.abs(m.matvec(x) - w @ xe) <= dot_tolerance(w, xe))


@pytest.mark.parametrize("path", PATHS)
def test_matmul_crosses_tiles(path: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny tile budget: 7 rows per tile, 50 rows -> 8 tiles, the last one partial.
    monkeypatch.setattr(matrix, "TILE_BYTES", 7 * 256 * 4)
    monkeypatch.setattr(numpy_engine, "TILE_BYTES", 7 * 256 * 4)  # the NumPy matvec, rows
    monkeypatch.setattr(matrix, "INT8_MATMUL_ROWS", {32: 0, 256: 0})  # float tiles throughout
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "0")
    raw, w, cols, rng = matrix_case("Q4_K", 50, 1, seed=2)
    m = make_matrix(raw, "Q4_K", (50, cols), path)
    xs = rng.standard_normal((4, cols), dtype=np.float32)
    assert np.all(np.abs(m.matmul(xs) - xs @ w.T) <= dot_tolerance(w, xs).T)
    x = effective_x(m, xs[0])
    assert np.all(np.abs(m.matvec(xs[0]) - w @ x) <= dot_tolerance(w, x))
    ids = np.arange(50)[::-1]
    np.testing.assert_allclose(m.take_rows(ids), w[ids], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("path", PATHS)
def test_memmap_view_is_used_in_place(path: dict, tmp_path) -> None:
    # (Q8_0: a type the int8 path never repacks; the K-quants and Q4 are copied on AVX2)
    raw, w, cols, rng = matrix_case("Q8_0", 21, 16, seed=3)
    file = tmp_path / "w.bin"
    pad = np.zeros(64, np.uint8)  # the tensor sits at an offset, as in a GGUF file
    np.concatenate([pad, raw.reshape(-1)]).tofile(file)
    mm = np.memmap(file, dtype=np.uint8, mode="c")
    view = mm[64 : 64 + raw.nbytes].reshape(raw.shape)
    m = make_matrix(view, "Q8_0", (21, cols), path)
    assert np.shares_memory(m.raw, mm)
    x = rng.standard_normal(cols, dtype=np.float32)
    xe = effective_x(m, x)
    assert np.all(np.abs(m.matvec(x) - w @ xe) <= dot_tolerance(w, xe))


def test_kernel_table_matches_the_engines() -> None:
    """`KERNELS` names every type phimlx decodes, and what it says each engine has is what
    the engine modules implement."""
    assert set(kernels.KERNELS) == DEQUANTIZABLE
    if not HAVE_NUMBA:
        return
    from fallback.kernels import numba_matvec

    blocks = {t for t, k in kernels.KERNELS.items() if k.numba == "blocks"}
    assert blocks == numba_matvec.TYPES
    try:
        from fallback.kernels import avx2
    except Exception:  # no x86 LLVM intrinsics on this platform
        return
    assert {t for t, k in kernels.KERNELS.items() if k.avx2} == avx2.FLOAT_TYPES
    assert {t for t, k in kernels.KERNELS.items() if k.avx2_int8} == avx2.INT8_TYPES


def test_kernel_set_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine per type, width and machine; one `KernelSet` object per type and engine."""
    q4k = kernel_set(GGMLType.Q4_K, 256, use_numba=False)
    assert (q4k.engine, q4k.matvec_int8) == ("numpy", None)
    assert kernel_set(GGMLType.F32, 256, use_numba=HAVE_NUMBA).engine == "numpy"
    if not HAVE_NUMBA:
        return
    assert kernel_set(GGMLType.Q5_0, 256, use_numba=True).engine == "numba"
    assert kernel_set(GGMLType.Q4_K, 512, use_numba=True) is kernel_set(
        GGMLType.Q4_K, 256, use_numba=True
    )
    if HAVE_INT8:  # an AVX2 CPU
        q4k = kernel_set(GGMLType.Q4_K, 256, use_numba=True)
        assert q4k.engine == "avx2" and q4k.matvec_int8 is not None
        f16 = kernel_set(GGMLType.F16, 64, use_numba=True)
        assert f16.engine == "avx2" and f16.matvec_int8 is None
        assert kernel_set(GGMLType.F16, 48, use_numba=True).engine == "numba"  # not 32-groups
    monkeypatch.setattr(kernels, "_avx2", False)  # as on a CPU without AVX2
    q4k = kernel_set(GGMLType.Q4_K, 256, use_numba=True)
    assert (q4k.engine, q4k.matvec_int8) == ("numba", None)


_CACHE_SCRIPT = """
import json, sys
import numpy as np
from fallback.kernels import avx2
from phimlx.gguf import TYPE_SIZES, GGMLType

res = {}
for name in ("Q4_0", "Q8_0"):
    t = GGMLType[name]
    block, size = TYPE_SIZES[t]
    rng = np.random.default_rng(5)
    w = rng.integers(0, 256, (3, 2 * size), dtype=np.uint8)
    for o in (0, size):  # finite scales
        w[:, o : o + 2] = np.float16(0.01 * (o + 1)).reshape(1).view(np.uint8)
    x = rng.standard_normal(2 * block).astype(np.float32)
    e, out, tile = w[:0], np.empty(3, np.float32), np.empty((3, 2 * block), np.float32)
    avx2.decode_tile(t)(w, 0, tile)
    avx2.matvec_float(t, parallel=False)(w, e, e, x, out)
    f = out.tolist()
    avx2.matvec_int8(t, parallel=False)(w, e, e, x, out)
    res[name] = {"w": w.tolist(), "x": x.tolist(), "tile": tile.tolist(), "float": f,
                 "int8": out.tolist()}
json.dump(res, sys.stdout)
"""


@NEEDS_INT8
def test_avx2_drivers_load_from_the_cache_per_type(tmp_path: Path) -> None:
    """A driver is a closure over its type's code: numba caches it per type, and a second
    process loads each type's own driver instead of compiling (or of taking another type's)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}
    root = str(Path(__file__).resolve().parents[1])
    runs = [
        subprocess.run(
            [sys.executable, "-c", _CACHE_SCRIPT],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        for _ in range(2)
    ]
    drivers = [f"{task}_{t}" for t in ("q4_0", "q8_0") for task in ("matvec_float", "matvec_int8")]
    drivers = [d + "_serial" for d in drivers] + ["decode_tile_q4_0", "decode_tile_q8_0"]
    log = runs[1].stdout + runs[1].stderr
    assert "data saved" not in log
    loaded = [line for line in log.splitlines() if "data loaded" in line]
    for d in drivers:
        assert any(f"avx2.{d}-" in line for line in loaded), d
    first, second = (json.loads(r.stdout[r.stdout.index("{") :]) for r in runs)
    assert first == second
    for name, r in second.items():  # and the loaded drivers compute their own type
        w = reference(np.array(r["w"], np.uint8), name).reshape(3, -1).astype(np.float64)
        x = np.array(r["x"], np.float64)
        np.testing.assert_allclose(r["tile"], w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
        assert np.all(np.abs(np.array(r["float"]) - w @ x) <= dot_tolerance(w, x))
        xhat = check_quantized(x.astype(np.float32))
        assert np.all(np.abs(np.array(r["int8"]) - w @ xhat) <= dot_tolerance(w, xhat))


_VARIANTS_MODULE = """
import numba
import numpy as np

from fallback.kernels import renamed


def ids(n):
    out = np.zeros(n, np.int64)
    for i in numba.prange(n):
        out[i] = numba.get_thread_id()
    return out


par = numba.njit(parallel=True, cache=True)(renamed(ids, "_parallel"))
ser = numba.njit(cache=True)(renamed(ids, "_serial"))
"""


@pytest.mark.skipif(not numba_available(), reason="needs numba")
def test_serial_and_parallel_variants_cache_apart(tmp_path: Path) -> None:
    """numba keys its cache by a function's name and line, not by ``parallel=``: a serial
    variant compiled from the same function as a parallel one would load the parallel
    code (a thread launch per short attention).  `kernels.renamed` gives each its own
    entry: after a process cached the parallel variant, the serial one still runs every
    iteration on the calling thread; and the kernels compiled both ways cache apart."""
    (tmp_path / "variants_mod.py").write_text(_VARIANTS_MODULE)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
        "NUMBA_NUM_THREADS": "2",
        "NUMBA_DEBUG_CACHE": "1",
        "PYTHONPATH": os.pathsep.join([root, str(tmp_path)]),
        # OpenMP hands every thread its share; TBB lets the calling thread run a loop this
        # short alone before a worker wakes, so "the parallel code ran" would not show
        "NUMBA_THREADING_LAYER": "omp",
    }

    def run(code: str) -> str:
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    run("from variants_mod import par; par(4000)")  # the parallel variant cached first
    out = run("from variants_mod import par, ser; print(ser(4000).max(), par(4000).max())")
    serial_max, parallel_max = map(int, out.split()[-2:])
    assert serial_max == 0 and parallel_max > 0
    log = run(_BOTH_WAYS)
    saved = [line for line in log.splitlines() if "data saved" in line]
    names = ["_attend_batch_loop_parallel-", "_attend_batch_loop_serial-"]
    if HAVE_INT8:
        names += ["_rows_int8_parallel-", "_rows_int8_serial-"]
    for name in names:
        assert any(name in line for line in saved), name


# The kernels compiled both ways: one token's attention over 16 positions in one part (the
# serial kernel) and in four (the parallel one); int8 rounding of rows both ways.
_BOTH_WAYS = """
import numpy as np
from fallback import ops
from fallback.kernels import avx2_kernels
H, KV, D = 4, 2, 32
kc, vc = (np.zeros((KV, 16, D), np.float32) for _ in range(2))
qkv = np.ones((H + 2 * KV) * D, np.float32)
cos, sin = np.ones((1, D // 2), np.float32), np.zeros((1, D // 2), np.float32)
for parts in (1, 4):
    ops.attend_token(cos, sin, False, 15, 0, 0.5, H, qkv.copy(), kc, vc, parts)
a = avx2_kernels()
if a is not None:
    x = np.ones((2, 64), np.float32)
    a.quantized_rows_int8(x, 32), a.quantized_rows_int8_serial(x, 32)
"""


# One int8 product of Q4_0 rows on the given drivers, printed (as a checksum and the
# values' bytes) in the order given.
_SERIAL_FIRST = """
import sys
import numpy as np
from fallback.kernels import avx2
from phimlx.gguf import GGMLType
rng = np.random.default_rng(5)
w = rng.integers(0, 256, (6, 36), dtype=np.uint8)
w[:, 0:2] = w[:, 18:20] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
x, e = rng.standard_normal((3, 64)).astype(np.float32), w[:0]
for parallel in map(int, sys.argv[1:]):
    out = np.zeros((3, 6), np.float32)
    avx2.matmul_int8(GGMLType.Q4_0, parallel=bool(parallel))(w, e, e, x, out)
    print(out.tobytes().hex())
"""


@NEEDS_INT8
def test_serial_matmul_runs_first_from_a_cache(tmp_path: Path) -> None:
    """A serial kernel that calls a parallel one (even in a branch never taken) needs
    numba's thread pool started before it runs.  numba records that need in a cache entry
    only when the parallel callee was compiled in the same process, not loaded from the
    cache: so a process that caches the parallel int8 matmul, then one that compiles the
    serial one, left an entry that crashed (SIGSEGV) the next process to call it first.
    The serial driver now holds no parallel code; its product equals the parallel one's."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": root}

    def run(*drivers: str) -> list[str]:
        r = subprocess.run(
            [sys.executable, "-c", _SERIAL_FIRST, *drivers],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        return r.stdout.split()

    run("1")  # caches the parallel driver and its callees
    run("0")  # compiles the serial driver against the cached callees
    serial, parallel = run("0", "1")  # the serial driver loaded and run first
    assert serial == parallel


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
    with pytest.raises(ValueError, match="x has shape"):
        m.matvec(np.zeros(31, np.float32))


def test_set_threads() -> None:
    assert set_threads(1) == 1
    with pytest.raises(ValueError, match="threads=0 is invalid"):
        set_threads(0)  # not silently 1
    n = set_threads(None)
    assert n >= 1
    if HAVE_NUMBA:
        import numba

        assert numba.get_num_threads() == n


LAYER = "import fallback.threads as t; print(t.threading_layer(), t._TBB_PATH)"


@NEEDS_NUMBA
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="phimlx depends on pip's tbb on Linux x86-64 only",
)
@pytest.mark.parametrize("choice", ["", "omp"])
def test_threading_layer_is_tbb_unless_asked(choice: str) -> None:
    """pip's libtbb sits outside the loader's path in a virtual environment: without
    `fallback.threads` loading it, numba would fall back to OpenMP without a word."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if choice:
        env["NUMBA_THREADING_LAYER"] = choice
    out = subprocess.run(
        [sys.executable, "-c", LAYER], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    layer, path = out.stdout.split()
    if choice:
        assert (layer, path) == ("omp", "None")
    else:
        assert layer == "tbb" and path.endswith("libtbb.so.12")


def test_env_var_forces_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIMLX_NO_NUMBA", "1")
    assert not numba_available()
    m = QuantMatrix(np.zeros((2, 18), np.uint8), GGMLType.Q4_0, (2, 32))
    assert not m.use_numba
    if HAVE_NUMBA:
        with pytest.raises(ValueError, match="unavailable"):
            QuantMatrix(np.zeros((2, 18), np.uint8), GGMLType.Q4_0, (2, 32), use_numba=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K", "Q5_0", "F16"])
@pytest.mark.parametrize("parts", [[7], [5, 3], [37, 4, 9], [2, 3, 4, 5]])
def test_matvec_many(name: str, parts: list[int], path: dict, monkeypatch) -> None:
    """Several matrices sharing x, one call, outputs concatenated: the same as one by one."""
    monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1000)  # the parallel and serial drivers
    rng = np.random.default_rng(sum(parts))
    cases = [matrix_case(name, rows, 2, seed=i) for i, rows in enumerate(parts)]
    cols = cases[0][2]
    mats = [make_matrix(c[0], name, (c[1].shape[0], cols), path) for c in cases]
    w = np.concatenate([c[1] for c in cases])
    x = rng.standard_normal(cols, dtype=np.float32)
    xe = effective_x(mats[0], x)
    y = matvec_many(mats, x)
    assert y.dtype == np.float32 and y.shape == (sum(parts),)
    assert np.all(np.abs(y - w @ xe) <= dot_tolerance(w, xe))
    one_by_one = np.concatenate([m.matvec(x) for m in mats])
    np.testing.assert_allclose(y, one_by_one, rtol=1e-6, atol=1e-6 * np.abs(y).max())
    plan = matvec_plan(mats)  # the decode step's form: the same product, checks done once
    np.testing.assert_array_equal(plan(x), y)
    assert plan(x) is not plan(x)  # a fresh array per call: callers keep their results
    out = np.empty(sum(parts), np.float32)
    assert matvec_many(mats, x, out=out) is out
    np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6 * np.abs(y).max())
    with pytest.raises(ValueError, match="out must be"):
        matvec_many(mats, x, out=np.empty(sum(parts) + 1, np.float32))


@NEEDS_INT8
def test_quantize_rounds_ties_to_even() -> None:
    """With max |x| = 127 the step is 1, so x itself is rounded: halves to the even
    neighbour (``rint``, as the int8 kernels have always rounded), hand-computed values."""
    x = np.zeros(64, np.float32)
    x[:8] = [127, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, 2.4999998]
    x[32:36] = [-127, 126.5, 0.49999997, -0.5]
    xq, dx, xs = quantize_activations(x)
    np.testing.assert_array_equal(xq[:8], [127, 2, 4, -2, -4, 0, 2, 2])
    np.testing.assert_array_equal(xq[32:36], [-127, 126, 0, 0])
    np.testing.assert_array_equal(dx, [1, 1])
    np.testing.assert_array_equal(xs, [131, -1])


@pytest.mark.parametrize("n,group", [(64, 32), (96, 32), (3072, 32), (512, 256), (3072, 256)])
def test_quantize_vector(n: int, group: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(3)
    x[:group] = 0  # an all-zero group: scale 0, values 0
    x[-group + 8] = 1e6  # one outlier rules its group's scale
    check_quantized(x, group)
    xq, dx, _ = quantize_activations(x, group)
    assert not dx[: group // 32].any() and not xq[:group].any()
    tail = np.delete(xq[-group:], 8)  # the outlier is 127; its group's others round to 0
    assert xq[-group + 8] == 127 and np.all(np.abs(tail) <= 1)
    with pytest.raises(ValueError, match="whole groups of 32"):
        quantize_activations(x[:31])
    with pytest.raises(ValueError, match="whole groups of 256"):
        quantize_activations(x[:224], 256)
    rows = np.stack([x, -x, 0 * x])
    xq2, dx2, xs2 = kernels.quantize_rows(rows, group)  # each row as if alone
    for i, row in enumerate(rows):
        for got, want in zip(
            (xq2[i], dx2[i], xs2[i]), quantize_activations(row, group), strict=True
        ):
            np.testing.assert_array_equal(got, want)


@NEEDS_INT8
@pytest.mark.parametrize("name", INT8_TYPES)
@pytest.mark.parametrize("rows", [1, 9, 37])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 13, 17, 40])
def test_int8_matmul(name: str, rows: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 matmul (n activation rows, each weight block unpacked once per few rows)
    against gguf's dequantization times the int8-rounded rows, and equal bit for bit to the
    int8 matvec of each row: a batch gives each sequence what it would get alone.  n covers
    the register tile (8), its remainder steps (4, then 1-3) and rows not a multiple of a
    parallel task's; ``PHIMLX_INT8_PREFILL=1`` keeps the 40 rows on the int8 kernel."""
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "1")
    monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1000)  # the parallel driver too
    raw, w, cols, rng = matrix_case(name, rows, 3, seed=n)  # a block pair and one alone
    m = make_matrix(raw, name, (rows, cols), {"use_numba": True, "int8_activations": True})
    x = rng.standard_normal((n, cols), dtype=np.float32)
    y = m.matmul(x)
    assert y.dtype == np.float32 and y.shape == (n, rows)
    xe = effective_x(m, x)
    assert np.all(np.abs(y - xe @ w.T) <= dot_tolerance(w, xe).T)
    np.testing.assert_array_equal(y, np.stack([m.matvec(row) for row in x]))


@NEEDS_INT8
@pytest.mark.parametrize("name", INT8_TYPES)
@pytest.mark.parametrize("n_blocks", [4, 12, 16, 18, 35])
@pytest.mark.parametrize("n", [1, 5, 12])
def test_int8_long_rows(name: str, n_blocks: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of many blocks, where the paired bodies (Q4_0, Q4_1, Q8_0 with AVX-512) read
    the headers of 16 blocks at once (`avx2_ir._pairs`): 16 (one such group), 18 (a group
    and a pair after it: SmolLM2's 576 columns), 35 (two groups, a pair, a block alone);
    and the transposed bodies on AVX2 (`avx2_ir._steps`) take 8 blocks a step (Q4_0, Q4_1)
    or 4 (Q8_0): 4 (a partial octet alone; a quad), 12 (an octet and a partial one; quads),
    16, 18 (octets or quads, and a tail of one-block bodies), 35.  Against gguf's
    dequantization, and the matmul equal to the matvec bit for bit."""
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "1")
    monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1000)  # the parallel driver too
    raw, w, cols, rng = matrix_case(name, 21, n_blocks, seed=n)
    m = make_matrix(raw, name, (21, cols), {"use_numba": True, "int8_activations": True})
    x = rng.standard_normal((n, cols), dtype=np.float32)
    y = m.matmul(x)
    xe = effective_x(m, x)
    assert np.all(np.abs(y - xe @ w.T) <= dot_tolerance(w, xe).T)
    np.testing.assert_array_equal(y, np.stack([m.matvec(row) for row in x]))


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int8_q4_largest_sums(name: str, sign: float) -> None:
    """Every nibble 15 against x rounded to +-127 everywhere: the octet bodies sum 16 of
    these products (15 * 127 each) in int16, 30480, just under its limit; 32 of them would
    wrap.  The dot is hand-computed: per block, d * dx * (15 - k) * 127 * 32 (k = 8 for
    Q4_0), plus Q4_1's m * dx * 127 * 32."""
    n_blocks, rows = 35, 3
    size = TYPE_SIZES[GGMLType[name]][1]
    raw = np.zeros((rows, n_blocks, size), np.uint8)
    d = np.float16(0.25)
    m = np.float16(-0.5)
    raw[:, :, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    if name == "Q4_1":
        raw[:, :, 2:4] = np.frombuffer(m.tobytes(), np.uint8)
    raw[:, :, size - 16 :] = 0xFF
    raw = raw.reshape(rows, -1)
    mat = make_matrix(raw, name, (rows, 32 * n_blocks), {"int8_activations": True})
    x = np.full(32 * n_blocks, sign, np.float32)  # -> xq = +-127, dx = 1/127
    q = 15 - (8 if name == "Q4_0" else 0)
    per_block = float(d) * q * 32 * sign + (float(m) * 32 * sign if name == "Q4_1" else 0.0)
    want = np.full(rows, per_block * n_blocks)
    np.testing.assert_allclose(mat.matvec(x), want, rtol=1e-5)
    np.testing.assert_allclose(mat.matmul(np.stack([x, -x])), np.stack([want, -want]), rtol=1e-5)


@NEEDS_INT8
@pytest.mark.parametrize("q", [-128, 127])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int8_q8_0_largest_sums(q: int, sign: float) -> None:
    """Every Q8_0 quant at an end of its range against x rounded to +-127 everywhere: with
    vpdpbusd the quads take q + 128 (0 or 255) and start each lane from -128 times its x
    sum (-128 * 16 * 127); without, vpmaddubsw pairs |q| x sign(q) * x (2 * 128 * 127, just
    under int16's limit).  35 blocks: 8 quads and a tail of 3 one-block bodies.  The dot
    is hand-computed: d * dx * q * 127 * 32 per block, dx = 1/127."""
    n_blocks, rows = 35, 3
    raw = np.zeros((rows, n_blocks, 34), np.uint8)
    d = np.float16(0.25)
    raw[:, :, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    raw[:, :, 2:] = np.uint8(q & 0xFF)
    raw = raw.reshape(rows, -1)
    mat = make_matrix(raw, "Q8_0", (rows, 32 * n_blocks), {"int8_activations": True})
    x = np.full(32 * n_blocks, sign, np.float32)
    want = np.full(rows, float(d) * q * 32 * sign * n_blocks)
    np.testing.assert_allclose(mat.matvec(x), want, rtol=1e-5)
    for n in (2, 4, 5):
        xs = np.stack([x if i % 2 == 0 else -x for i in range(n)])
        wants = np.stack([want if i % 2 == 0 else -want for i in range(n)])
        np.testing.assert_allclose(mat.matmul(xs), wants, rtol=1e-5)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int8_k_quant_largest_sums(name: str, sign: float) -> None:
    """Q4_K and Q5_K as their repacked octets sum them: every quant at its largest (15;
    Q5_K 31, every 5th bit set) against x rounded to +-127, in int16 16 products a lane
    (Q4_K: 30480) or 8 (Q5_K: 31496) before they widen.  Every sub-block's 6-bit scale is
    9 and its min 5 (the 12 scale bytes written by hand: bytes 0-3 the scales of
    sub-blocks 0-3, 4-7 their mins, 8-11 the low bits of sub-blocks 4-7's scale and min,
    6-bit values under 16 needing no high bits); the dot per block is 8 * 32 * (d * 9 * q
    - dmin * 5), times the sign."""
    n_blocks, rows = 3, 2
    size, q = (176, 31) if name == "Q5_K" else (144, 15)
    raw = np.zeros((rows, n_blocks, size), np.uint8)
    d, dmin = np.float16(0.125), np.float16(0.25)
    raw[:, :, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    raw[:, :, 2:4] = np.frombuffer(dmin.tobytes(), np.uint8)
    raw[:, :, 4:8], raw[:, :, 8:12], raw[:, :, 12:16] = 9, 5, 9 | (5 << 4)
    raw[:, :, 16:] = 0xFF  # (Q5_K: the 5th bits too)
    raw = raw.reshape(rows, -1)
    mat = make_matrix(raw, name, (rows, 256 * n_blocks), {"int8_activations": True})
    x = np.full(256 * n_blocks, sign, np.float32)  # -> xq = +-127, dx = 1/127
    per_block = 8 * 32 * (float(d) * 9 * q - float(dmin) * 5) * sign
    want = np.full(rows, per_block * n_blocks)
    np.testing.assert_allclose(mat.matvec(x), want, rtol=1e-5)
    np.testing.assert_allclose(mat.matmul(np.stack([x, -x])), np.stack([want, -want]), rtol=1e-5)


@NEEDS_INT8
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int8_q6_k_largest_sums(sign: float) -> None:
    """Q6_K as its repacked octets sum it: every quant 63 (all ql and qh bits set) against
    x rounded to +-127, two products of 2 * 63 * 127 a lane in int16 (32004) before each
    pair widens against its scale; the scales alternate 9 and -7 (sub-block j's first 16
    quants 9, its last 16 -7), so the dot per block is 8 * 16 * d * (63 - 32) * (9 - 7),
    times the sign."""
    n_blocks, rows = 3, 2
    raw = np.zeros((rows, n_blocks, 210), np.uint8)
    d = np.float16(0.125)
    raw[:, :, :192] = 0xFF
    raw[:, :, 192:208] = np.tile(np.array([9, -7], np.int8).view(np.uint8), 8)
    raw[:, :, 208:210] = np.frombuffer(d.tobytes(), np.uint8)
    raw = raw.reshape(rows, -1)
    mat = make_matrix(raw, "Q6_K", (rows, 256 * n_blocks), {"int8_activations": True})
    x = np.full(256 * n_blocks, sign, np.float32)  # -> xq = +-127, dx = 1/127
    per_block = 8 * 16 * float(d) * 31 * (9 - 7) * sign
    want = np.full(rows, per_block * n_blocks)
    np.testing.assert_allclose(mat.matvec(x), want, rtol=1e-5)
    np.testing.assert_allclose(mat.matmul(np.stack([x, -x])), np.stack([want, -want]), rtol=1e-5)


@NEEDS_INT8
def test_int8_bodies_follow_the_cpu() -> None:
    """Q4_1's int8 bodies: paired where the 512-bit bodies are taken (`avx2_ir._pairs`),
    transposed elsewhere (`avx2_ir._steps`); never the 512-bit ones without AVX-512."""
    from fallback.kernels import avx2_ir

    spec = avx2_ir.TYPES[GGMLType.Q4_1]
    has = all(avx2_ir._feat.get(f, False) for f in ("avx512f", "avx512bw"))
    if not has or os.environ.get("PHIMLX_AVX512") == "0":
        assert not avx2_ir.AVX512
    assert (spec.int8_pair is not None) == avx2_ir.AVX512
    assert (spec.int8_step is not None) == (not avx2_ir.AVX512)


@NEEDS_INT8
@pytest.mark.parametrize(
    ("features", "cpu", "setting", "want"),
    [
        ({"avx512f": True, "avx512bw": True}, "sapphirerapids", "", True),
        ({"avx512f": True, "avx512bw": True}, "icelake-server", "off", False),
        ({"avx512f": True, "avx512bw": True}, "znver4", "", False),
        ({"avx512f": True, "avx512bw": True}, "znver5", " ", False),
        ({"avx512f": True, "avx512bw": True}, "znver4", "1", True),
        ({"avx512f": True, "avx512bw": True}, "znver4", "On", True),
        ({"avx512f": True, "avx512bw": True}, "znver4", "0", False),
        ({"avx512f": True}, "knl", "1", False),  # no AVX-512BW
        ({"avx2": True}, "znver3", "1", False),
        ({"avx2": True}, "alderlake", "", False),
    ],
)
def test_wide_bodies_rule(features: dict, cpu: str, setting: str, want: bool) -> None:
    """Where the 512-bit int8 bodies are taken: on AVX-512 CPUs but AMD's Zen, unless
    ``PHIMLX_AVX512`` says otherwise, and never without AVX-512F and BW."""
    from fallback.kernels import avx2_ir

    assert avx2_ir.wide_bodies(features, cpu, setting) is want


def _packable(name: str) -> None:
    if GGMLType[name] not in kernels.avx2_kernels().PACKED_TYPES:
        pytest.skip(f"no packed layout for {name} here (AVX-512: the paired bodies)")


def _lanes_by_hand(blocks: np.ndarray, head: int) -> np.ndarray:
    """8 Q4_0 / Q4_1 blocks (``(8, size)``, ``head`` bytes of scale and min before the 16
    of quants) as lanes: their 8 scales, Q4_1's 8 mins, then block j's quant bytes
    4 g .. 4 g + 3 at 32 g + 4 j (an octet of one row's blocks, or one block of 8 rows)."""
    want = [blocks[:, 0:2].reshape(-1)]
    if head == 4:
        want.append(blocks[:, 2:4].reshape(-1))
    for g in range(4):
        want += [blocks[j, head + 4 * g : head + 4 * g + 4] for j in range(8)]
    return np.concatenate(want)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_repack_layout(name: str) -> None:
    """`avx2.pack_octets` against the layout written out by hand, for a row of 19 blocks
    (two octets, then three blocks left as they are): in each octet the 8 scales, Q4_1's 8
    mins, then quant word g of block j (its bytes 4 g .. 4 g + 3) at 32 g + 4 j; and
    `unpack_octets` gives the file's blocks back."""
    avx2 = kernels.avx2_kernels()
    qtype = GGMLType[name]
    size = TYPE_SIZES[qtype][1]
    head = size - 16
    raw = np.random.default_rng(7).integers(0, 256, (3, 19 * size), dtype=np.uint8)
    packed = avx2.pack_octets(raw, qtype)
    assert packed.shape == raw.shape and packed.dtype == np.uint8
    for r in range(3):
        for o in range(2):
            blocks = raw[r, 8 * size * o : 8 * size * (o + 1)].reshape(8, size)
            octet = packed[r, 8 * size * o : 8 * size * (o + 1)]
            np.testing.assert_array_equal(octet, _lanes_by_hand(blocks, head))
    np.testing.assert_array_equal(packed[:, 16 * size :], raw[:, 16 * size :])
    np.testing.assert_array_equal(avx2.unpack_octets(packed, qtype), raw)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_repack_layout_k_quants(name: str) -> None:
    """`avx2.pack_octets` of Q4_K / Q5_K against the layout written out by hand: each
    block's 16 header bytes as they are; sub-block j's quant l, which the file keeps in
    nibble j & 1 of quant byte 32 (j >> 1) + l, as a Q4_1 block's byte l (quant l low,
    quant 16 + l high) at 32 g + 4 j + t of the quants for l = 4 g + t; Q5_K's 5th bits
    (the file's bit j of byte l of the 32 bytes after the header) at bit G of byte
    4 j + t there for l = 4 G + t; and `unpack_octets` gives the file's blocks back."""
    _packable(name)
    avx2 = kernels.avx2_kernels()
    size, q0 = (176, 48) if name == "Q5_K" else (144, 16)
    raw = np.random.default_rng(11).integers(0, 256, (3, 2 * size), dtype=np.uint8)
    packed = avx2.pack_octets(raw, GGMLType[name])
    assert packed.shape == raw.shape and packed.dtype == np.uint8
    for r in range(3):
        for b in range(2):
            block, out = raw[r, size * b : size * (b + 1)], packed[r, size * b : size * (b + 1)]
            np.testing.assert_array_equal(out[:16], block[:16])
            for j in range(8):
                q = [(int(block[q0 + 32 * (j // 2) + i]) >> (4 * (j % 2))) & 15 for i in range(32)]
                for i in range(16):
                    assert out[q0 + 32 * (i // 4) + 4 * j + i % 4] == q[i] | (q[16 + i] << 4)
                if name == "Q5_K":
                    for i in range(32):
                        bit = (int(out[16 + 4 * j + i % 4]) >> (i // 4)) & 1
                        assert bit == (int(block[16 + i]) >> j) & 1
    np.testing.assert_array_equal(avx2.unpack_octets(packed, GGMLType[name]), raw)


@NEEDS_INT8
def test_repack_layout_q6_k() -> None:
    """`avx2.pack_octets` of Q6_K against the layout written out by hand: quant
    y = 128 n + 32 m + l (sub-block j = 4 n + m), whose low 4 bits the file keeps in nibble
    m >> 1 of byte 64 n + 32 (m & 1) + l and high 2 in bits 2 m, 2 m + 1 of byte
    128 + 32 n + l, as sub-block j's quant l: its low 4 bits a Q4_1 block's (quants i,
    16 + i as byte 32 (i >> 2) + 4 j + (i & 3)'s low and high nibble), its high 2 bits at
    bits 2 (G & 3) of byte 128 + 32 (G >> 2) + 4 j + t for l = 4 G + t; the 16 scales and
    d where they were; and `unpack_octets` gives the file's blocks back."""
    _packable("Q6_K")
    avx2 = kernels.avx2_kernels()
    raw = np.random.default_rng(13).integers(0, 256, (3, 2 * 210), dtype=np.uint8)
    packed = avx2.pack_octets(raw, GGMLType.Q6_K)
    assert packed.shape == raw.shape and packed.dtype == np.uint8
    for r in range(3):
        for b in range(2):
            block, out = raw[r, 210 * b : 210 * (b + 1)], packed[r, 210 * b : 210 * (b + 1)]
            np.testing.assert_array_equal(out[192:], block[192:])
            for j in range(8):
                n, m = divmod(j, 4)
                for ln in range(32):
                    low = (int(block[64 * n + 32 * (m % 2) + ln]) >> (4 * (m // 2))) & 15
                    high = (int(block[128 + 32 * n + ln]) >> (2 * m)) & 3
                    i, hi_nibble = ln % 16, ln // 16
                    byte = int(out[32 * (i // 4) + 4 * j + i % 4])
                    assert (byte >> (4 * hi_nibble)) & 15 == low
                    G, t = divmod(ln, 4)
                    assert (int(out[128 + 32 * (G // 4) + 4 * j + t]) >> (2 * (G % 4))) & 3 == high
    np.testing.assert_array_equal(avx2.unpack_octets(packed, GGMLType.Q6_K), raw)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n_blocks", [1, 3])
def test_repacked_k_quant_matrix(name: str, n_blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repacked Q4_K / Q5_K / Q6_K matrix sums each sub-block's dot in a lane of its own,
    where the file's layout sums the sub-blocks' scaled dots in integers first: the two
    round differently, each within float32's bound of gguf's dequantization, and the
    repacked matmul (1-13 rows of ``x``, serial and parallel drivers) equals its matvec bit
    for bit; its embedding lookup and prompt tiles decode the file's weights."""
    _packable(name)
    raw, w, cols, rng = matrix_case(name, 21, n_blocks, seed=5)
    shape = (21, cols)
    plain = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=False)
    packed = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    assert packed.repacked and not plain.repacked and not np.array_equal(packed.raw, raw)
    for serial in (True, False):
        monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1 << 30 if serial else 1000)
        for n in (1, 2, 4, 5, 8, 13):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            y, xe = packed.matmul(x), effective_x(packed, x)
            assert np.all(np.abs(y - xe @ w.T) <= dot_tolerance(w, xe).T)
            assert np.all(np.abs(plain.matmul(x) - xe @ w.T) <= dot_tolerance(w, xe).T)
            np.testing.assert_array_equal(y, np.stack([packed.matvec(row) for row in x]))
    ids = np.array([20, 0, 7, 7], np.int64)
    np.testing.assert_allclose(packed.take_rows(ids), w[ids], rtol=0, atol=1e-6)
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "0")
    tiles = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    x = rng.standard_normal((160, cols), dtype=np.float32)  # past the int8 matmul's rows
    assert tiles.repacked and not tiles._int8_matmul(160)
    assert np.all(np.abs(tiles.matmul(x) - x @ w.T) <= dot_tolerance(w, x).T)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n_blocks", [1, 3, 7, 8, 11, 12, 16, 18, 19, 48])
def test_repacked_matrix_equals_the_file_layout(
    name: str, n_blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repacked matrix (`QuantMatrix` ``repack=True``) gives what the same matrix on the
    file's blocks gives, bit for bit: the int8 matvec and matmul (1-13 rows of ``x``, the
    serial and parallel drivers) for rows of whole octets, octets and a tail (1-3 blocks:
    one-block bodies, the 16-byte pair; 4-7: a partial octet), and no octet at all; its
    embedding lookup and prompt tiles (the float path: ``PHIMLX_INT8_PREFILL=0``) decode
    the file's weights (against gguf's dequantization)."""
    _packable(name)
    raw, w, cols, rng = matrix_case(name, 21, n_blocks, seed=3)
    shape = (21, cols)
    plain = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=False)
    packed = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    assert packed.repacked and not plain.repacked
    assert (n_blocks >= 8) == (not np.array_equal(packed.raw, raw))
    for serial in (True, False):
        monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1 << 30 if serial else 1000)
        for n in (1, 2, 4, 5, 8, 13):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            np.testing.assert_array_equal(packed.matmul(x), plain.matmul(x))
        np.testing.assert_array_equal(packed.matvec(x[0]), plain.matvec(x[0]))
    ids = np.array([20, 0, 7, 7], np.int64)
    np.testing.assert_allclose(packed.take_rows(ids), w[ids], rtol=0, atol=1e-6)
    np.testing.assert_allclose(packed.take_rows(ids[:1]), w[ids[:1]], rtol=0, atol=1e-6)
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "0")
    tiles = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    x = rng.standard_normal((64, cols), dtype=np.float32)  # past the int8 matmul's rows
    assert tiles.repacked and not tiles._int8_matmul(64)
    np.testing.assert_allclose(tiles.matmul(x), x @ w.T, rtol=1e-4, atol=1e-3)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_rows8_layout(name: str) -> None:
    """`avx2.pack_rows8` against the layout written out by hand, for 16 rows of 3 blocks:
    group g (rows 8 g .. 8 g + 7, their bytes) holds per block b the 8 rows' scales, Q4_1's
    8 mins, then row r's quant bytes 4 q .. 4 q + 3 at 32 q + 4 r; `unpack_rows8` gives the
    file's blocks back, and `rows8_rows` any rows of them in any order."""
    avx2 = kernels.avx2_kernels()
    qtype = GGMLType[name]
    size = TYPE_SIZES[qtype][1]
    head = size - 16
    raw = np.random.default_rng(17).integers(0, 256, (16, 3 * size), dtype=np.uint8)
    packed = avx2.pack_rows8(raw, qtype)
    assert packed.shape == raw.shape and packed.dtype == np.uint8
    for g in range(2):
        group = packed[8 * g : 8 * g + 8].reshape(-1)
        for b in range(3):
            blocks = raw[8 * g : 8 * g + 8, size * b : size * (b + 1)]  # (8 rows, size)
            np.testing.assert_array_equal(
                group[8 * size * b : 8 * size * (b + 1)], _lanes_by_hand(blocks, head)
            )
    np.testing.assert_array_equal(avx2.unpack_rows8(packed, qtype), raw)
    ids = np.array([13, 0, 7, 7, 8], np.int64)
    np.testing.assert_array_equal(avx2.rows8_rows(packed, ids, qtype), raw[ids])
    with pytest.raises(ValueError, match="interleave by 8"):
        avx2.pack_rows8(raw[:12], qtype)


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n_blocks", [1, 3, 18, 19])
def test_rows8_matrix(name: str, n_blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4_0 / Q4_1 matrix whose rows are a multiple of 8 is repacked with its rows
    interleaved by 8 (`avx2.pack_rows8`): its int8 matvec and matmul (1-13 rows of ``x``,
    the serial and parallel drivers, one matrix or three fused) are within float32's bound
    of gguf's dequantization times ``x_hat``, and the matmul equals the matvec row for row,
    bit for bit, as the batched decode needs; its embedding lookup and prompt tiles decode
    the file's weights.  Where VNNI is turned off (the maddubs bodies) the results are the
    same bits."""
    raw, w, cols, rng = matrix_case(name, 40, n_blocks, seed=9)
    shape = (40, cols)
    packed = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    assert packed.repacked and packed._octets is packed.kernels.rows8
    assert not np.array_equal(packed.raw, raw)
    parts = [QuantMatrix(raw[a:b], GGMLType[name], (b - a, cols), int8_activations=True)
             for a, b in ((0, 16), (16, 24), (24, 40))]  # fmt: skip
    for serial in (True, False):
        monkeypatch.setattr(matrix, "SERIAL_WEIGHTS", 1 << 30 if serial else 1000)
        for n in (1, 2, 3, 4, 5, 8, 13):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            y, xe = packed.matmul(x), effective_x(packed, x)
            assert np.all(np.abs(y - xe @ w.T) <= dot_tolerance(w, xe).T)
            np.testing.assert_array_equal(y, np.stack([packed.matvec(row) for row in x]))
            np.testing.assert_array_equal(matrix.matmul_many(parts, x), y)
        np.testing.assert_array_equal(matrix.matvec_many(parts, x[0]), y[0])
    ids = np.array([39, 0, 7, 7, 8], np.int64)
    np.testing.assert_allclose(packed.take_rows(ids), w[ids], rtol=0, atol=1e-6)
    monkeypatch.setenv("PHIMLX_INT8_PREFILL", "0")
    tiles = QuantMatrix(raw, GGMLType[name], shape, int8_activations=True, repack=True)
    x = rng.standard_normal((160, cols), dtype=np.float32)  # past the int8 matmul's rows
    assert tiles.repacked and not tiles._int8_matmul(160)
    assert np.all(np.abs(tiles.matmul(x) - x @ w.T) <= dot_tolerance(w, x).T)


@NEEDS_INT8
def test_repack_default_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4 matrices on the int8 path are repacked unless ``PHIMLX_REPACK=0``; never on the
    float path, whose kernels read the file's blocks."""
    _packable("Q4_1")
    raw, _, cols, _ = matrix_case("Q4_1", 3, 16)
    assert QuantMatrix(raw, GGMLType.Q4_1, (3, cols), int8_activations=True).repacked
    assert not QuantMatrix(raw, GGMLType.Q4_1, (3, cols), int8_activations=False).repacked
    monkeypatch.setenv("PHIMLX_REPACK", "0")
    assert not QuantMatrix(raw, GGMLType.Q4_1, (3, cols), int8_activations=True).repacked


@NEEDS_INT8
def test_repack_releases_the_file_pages_only(tmp_path: Path) -> None:
    """Repacking a matrix that is a view of a file's memory map hands the map's pages back
    (`matrix._release_file_pages`); the map still reads the file's bytes (another matrix
    over the same blocks, unpacked, gives gguf's weights), and an array in memory is never
    touched."""
    _packable("Q4_0")
    raw, w, cols, rng = matrix_case("Q4_0", 600, 16)  # 600 * 288 bytes: many pages
    file = tmp_path / "w.bin"
    raw.tofile(file)
    mm = np.memmap(file, dtype=np.uint8, mode="c", shape=raw.shape)
    assert matrix._release_file_pages(np.asarray(mm)[10:500])
    before = raw.copy()
    assert not matrix._release_file_pages(raw)
    np.testing.assert_array_equal(raw, before)
    packed = QuantMatrix(mm, GGMLType.Q4_0, (600, cols), int8_activations=True, repack=True)
    plain = QuantMatrix(mm, GGMLType.Q4_0, (600, cols), int8_activations=True, repack=False)
    np.testing.assert_array_equal(np.asarray(mm), raw)
    x = rng.standard_normal(cols, dtype=np.float32)
    xe = effective_x(plain, x)[None]
    for m in (packed, plain):  # (rows interleaved by 8 sum in another order)
        assert np.all(np.abs(m.matvec(x) - (xe @ w.T)[0]) <= dot_tolerance(w, xe).T[:, 0])
    np.testing.assert_allclose(plain.take_rows(np.arange(600)), w, rtol=0, atol=1e-6)


@NEEDS_INT8
def test_other_bodies_on_an_avx512_cpu() -> None:
    """On a CPU with AVX-512, the int8 bodies this process does not take (the transposed
    ones where it takes the 512-bit ones, as on a CPU without AVX-512; the 512-bit ones
    where it does not, as on an Intel CPU): this file's long-row and extreme-sum tests in
    a process with ``PHIMLX_AVX512`` set the other way (numba caches that build apart:
    `avx2.IR_STAMP`).  A CPU without AVX-512 can run only the transposed ones."""
    from fallback.kernels import avx2_ir

    if not all(avx2_ir._feat.get(f, False) for f in ("avx512f", "avx512bw")):
        pytest.skip("no AVX-512 here: the tests above ran the transposed bodies")
    _tests_in_a_process(
        "long_rows or largest_sums or bodies_follow_the_cpu or repack or rows8",
        {"PHIMLX_AVX512": "0" if avx2_ir.AVX512 else "1"},
    )


def _tests_in_a_process(tests: str, env: dict[str, str]) -> None:
    """This file's tests selected by ``-k tests`` in a process with ``env`` added: they
    all pass."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", tests],
        env={**os.environ, **env},
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@NEEDS_INT8
def test_bodies_without_vnni() -> None:
    """On a CPU with VNNI (vpdpbusd on 256-bit vectors: `avx2_ir.DPBUSD`), the bodies of
    CPUs without it: this file's long-row and extreme-sum tests in a process with
    ``PHIMLX_VNNI=0`` (a build numba caches apart: `avx2.IR_STAMP`)."""
    from fallback.kernels import avx2_ir

    if not avx2_ir.DPBUSD:
        pytest.skip("no VNNI here: the tests above ran the bodies without it")
    _tests_in_a_process("long_rows or largest_sums or repack or rows8", {"PHIMLX_VNNI": "0"})


_PRODUCTS = """
import sys
import numpy as np
from fallback.matrix import QuantMatrix
from phimlx.gguf import GGMLType
data = dict(np.load(sys.argv[1]))
out = {}
for key in [k for k in data if k.startswith("raw_")]:
    name, cols = key[4:].rsplit("_", 1)[0], data["x_" + key[4:]].shape[1]
    m = QuantMatrix(data[key], GGMLType[name], (data[key].shape[0], cols), int8_activations=True)
    x = data["x_" + key[4:]]
    out["one_" + key[4:]] = m.matvec(x[0])
    for n in (4, 5, 9):
        out[f"rows{n}_" + key[4:]] = m.matmul(x[:n])
np.savez(sys.argv[2], **out)
"""


@NEEDS_INT8
def test_vnni_bodies_give_the_same_bits(tmp_path: Path) -> None:
    """The vpdpbusd bodies (`avx2_ir.DPBUSD`: Q8_0's quads, Q4_0 / Q4_1's octets) sum the
    same integers in the same lanes as the bodies without VNNI, so every product is the
    same bit for bit: this process against one with ``PHIMLX_VNNI=0``, for rows of 4, 12,
    18 and 35 blocks (quads or octets, partial ones, tails; 24 rows of 18 and 35 blocks:
    Q4's rows interleaved by 8), one and 4, 5, 9 rows of x."""
    from fallback.kernels import avx2_ir

    if not avx2_ir.DPBUSD:
        pytest.skip("no VNNI here")
    rng = np.random.default_rng(11)
    data = {}
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        for n_blocks in (4, 12, 18, 35):
            rows = 24 if n_blocks >= 18 else 19  # (Q4: rows interleaved by 8, or octets)
            raw, _, cols, _ = matrix_case(name, rows, n_blocks, seed=n_blocks)
            data[f"raw_{name}_{n_blocks}"] = raw
            data[f"x_{name}_{n_blocks}"] = rng.standard_normal((9, cols), dtype=np.float32)
    np.savez(tmp_path / "in.npz", **data)
    script = tmp_path / "products.py"
    script.write_text(_PRODUCTS)
    for env, out in (({}, "here.npz"), ({"PHIMLX_VNNI": "0"}, "without.npz")):
        run = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / out)],
            env={**os.environ, **env}, cwd=Path(__file__).parent.parent,
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    here, without = np.load(tmp_path / "here.npz"), np.load(tmp_path / "without.npz")
    assert sorted(here) == sorted(without) and len(here) == 48
    for key in here:
        np.testing.assert_array_equal(here[key], without[key], err_msg=key)


def _steps_by_hand(xq: np.ndarray, dx, xs, k: int, S: int):  # noqa: ANN001, ANN202
    """`avx2.step_inputs` as its docstring and `avx2_ir._steps` lay it out, in NumPy."""
    nb, lane = len(xq) // 32, 32 // S
    blocks = xq.reshape(nb, 32)
    full, rem = nb // S, nb % S
    ns = -(-nb // S)
    xt = np.zeros((ns, S, 32), np.int8)  # step, vector g, 32 bytes
    partial = S == 8 and rem >= 4  # (`avx2_ir.OCTET_TAIL`)
    for b in range(S * full + (rem if partial else 0)):  # lane j of vector g: block S t + j
        t, j = divmod(b, S)
        for g in range(S):
            xt[t, g, lane * j : lane * j + lane] = blocks[b, lane * g : lane * g + lane]
    flat = xt.reshape(-1)
    if not partial:
        tail = list(range(S * full, nb))
        if S == 8 and len(tail) >= 2:  # two blocks by 16 bytes: vector g = 16 bytes of each
            b = tail[0]
            for g in range(2):
                flat[32 * (b + g) : 32 * (b + g) + 16] = blocks[b, 16 * g : 16 * g + 16]
                flat[32 * (b + g) + 16 : 32 * (b + g) + 32] = blocks[b + 1, 16 * g : 16 * g + 16]
            tail = tail[2:]
        for b in tail:  # as they are
            flat[32 * b : 32 * b + 32] = blocks[b]
    dx8 = np.zeros(S * ns, np.float32)
    dx8[:nb] = dx
    aux = np.zeros(S * ns, np.float32)
    if k == 0:
        aux[:nb] = xs
    elif S == 4:  # int16 pairs: -(sums of the even and of the odd 4-byte groups)
        g4 = blocks.reshape(nb, 8, 4).astype(np.int32).sum(axis=2)
        halves = aux.view(np.int16)
        halves[0 : 2 * nb : 2] = -g4[:, 0::2].sum(axis=1)
        halves[1 : 2 * nb : 2] = -g4[:, 1::2].sum(axis=1)
    else:
        aux.view(np.int32)[:nb] = -k * blocks.astype(np.int32).sum(axis=1)
    return flat, dx8, aux


@NEEDS_INT8
@pytest.mark.parametrize("S", [4, 8])
@pytest.mark.parametrize("k", [0, 8, 128])
def test_step_inputs_by_hand(S: int, k: int) -> None:
    """`avx2.step_inputs` (x in the transposed bodies' form) against the layout built by
    hand in NumPy, for 1 to 41 blocks (full steps, partial octets, an octet's tail of a
    pair and a block, a quad's tail), byte for byte."""
    from fallback.kernels import avx2

    rng = np.random.default_rng(S + k)
    for nb in range(1, 42):
        xq = rng.integers(-127, 128, 32 * nb).astype(np.int8)
        dx = rng.random(nb).astype(np.float32)
        xs = rng.standard_normal(nb).astype(np.float32)
        got = avx2.step_inputs(xq, dx, xs, k, S)
        want = _steps_by_hand(xq, dx, xs, k, S)
        for a, b, what in zip(got, want, ("xt", "dx8", "aux"), strict=True):
            np.testing.assert_array_equal(
                a.view(np.uint8), b.view(np.uint8), err_msg=f"{nb} {what}"
            )


@NEEDS_INT8
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_int8_matmul_many_and_the_prefill_choice(name: str, monkeypatch) -> None:
    """matmul_many fuses up to three matrices into one int8 call, equal to one by one; long
    products go to float tiles unless `int8_prefill` says otherwise."""
    cases = [matrix_case(name, r, 1, seed=r) for r in (5, 11, 3, 2)]
    cols = cases[0][2]
    mats = [
        make_matrix(c[0], name, (c[1].shape[0], cols), {"int8_activations": True}) for c in cases
    ]
    x = np.random.default_rng(5).standard_normal((6, cols), dtype=np.float32)
    for group in (mats[:1], mats[:3], mats):  # one kernel call, one, four calls
        np.testing.assert_array_equal(
            matrix.matmul_many(group, x), np.concatenate([m.matmul(x) for m in group], axis=1)
        )
    long = np.repeat(x, 8, axis=0)  # 48 rows: beyond INT8_MATMUL_ROWS
    monkeypatch.setattr(matrix, "INT8_MATMUL_ROWS", {32: 16, 256: 16})
    for flag, exact in (("1", True), ("0", False)):
        monkeypatch.setenv("PHIMLX_INT8_PREFILL", flag)
        m = make_matrix(cases[0][0], name, (5, cols), {"int8_activations": True})
        w = cases[0][1]
        if not exact and HAVE_AMX:  # the AMX tiles: bfloat16 x and weights
            xe, w = bf16(long), bf16(w)
        else:
            xe = effective_x(m, long) if exact else long  # int8 rows, or float (sgemm)
        assert np.all(np.abs(m.matmul(long) - xe @ w.T) <= dot_tolerance(w, xe).T)


def bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (nearest, ties to even), as float64."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def test_bf16_rounding() -> None:
    """The test's bfloat16 rounding, by hand: 1 + 2^-8 is a tie (to even: 1), 1 + 3 * 2^-9
    rounds up to 1 + 2^-7; the top bits pass unchanged; the kernel's rounding agrees."""
    x = np.array([1 + 2**-8, 1 + 3 * 2**-9, -2.5, 1 + 2**-7 + 2**-8], np.float32)
    np.testing.assert_array_equal(bf16(x), [1.0, 1 + 2**-7, -2.5, 1 + 2**-6])
    if HAVE_AMX:
        from fallback.kernels import amx

        pairs = amx.bf16_pairs(x.reshape(1, 4), 32)  # (2, 32, 2): [k, row, i] = x[0, 2k + i]
        got = (pairs[:, 0, :].reshape(-1).astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got, bf16(x))


@NEEDS_AMX
@pytest.mark.parametrize("name", INT8_TYPES)
@pytest.mark.parametrize(("rows", "n"), [(37, 32), (16, 45), (3, 70)])
def test_tiles_matmul(name: str, rows: int, n: int) -> None:
    """The AMX product (prompts from `matrix.TILES_ROWS` rows on the int8 path) against
    float64 ``bf16(x) @ bf16(W).T``, ``W`` gguf's dequantization: weight rows not a multiple
    of the tiles' 16, x rows not a multiple of 32; and fused with two more matrices equal to
    each alone."""
    raw, w, cols, rng = matrix_case(name, rows, 3, seed=n)
    m = make_matrix(raw, name, (rows, cols), {"int8_activations": True})
    assert m._tiles_matmul(n) and not m._tiles_matmul(matrix.TILES_ROWS - 1)
    x = rng.standard_normal((n, cols), dtype=np.float32)
    y = m.matmul(x)
    xe, we = bf16(x), bf16(w)
    assert np.all(np.abs(y - xe @ we.T) <= dot_tolerance(we, xe).T)
    others = [
        make_matrix(raw[: rows // 2 + 1], name, (rows // 2 + 1, cols), {"int8_activations": True}),
        m,
    ]
    np.testing.assert_array_equal(
        matrix.matmul_many([m, *others], x), np.concatenate([y, y[:, : rows // 2 + 1], y], axis=1)
    )


@NEEDS_INT8
def test_int8_path_is_selectable(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = np.zeros((2, 20), np.uint8)
    assert QuantMatrix(raw, GGMLType.Q4_1, (2, 32), int8_activations=True).int8_activations
    with pytest.raises(ValueError, match="no int8-activation kernel"):
        QuantMatrix(np.zeros((2, 22), np.uint8), GGMLType.Q5_0, (2, 32), int8_activations=True)
    with pytest.raises(ValueError, match="no int8-activation kernel"):
        QuantMatrix(raw, GGMLType.Q4_1, (2, 32), use_numba=False, int8_activations=True)
    monkeypatch.delenv("PHIMLX_INT8_ACTIVATIONS", raising=False)
    assert QuantMatrix(raw, GGMLType.Q4_1, (2, 32)).int8_activations  # the default
    assert not QuantMatrix(raw, GGMLType.Q4_1, (2, 32), int8_activations=False).int8_activations
    assert not QuantMatrix(np.zeros((2, 22), np.uint8), GGMLType.Q5_0, (2, 32)).int8_activations
    assert not QuantMatrix(raw, GGMLType.Q4_1, (2, 32), use_numba=False).int8_activations
    for off in ("0", "false", "off"):
        monkeypatch.setenv("PHIMLX_INT8_ACTIVATIONS", off)
        assert not QuantMatrix(raw, GGMLType.Q4_1, (2, 32)).int8_activations
    assert QuantMatrix(raw, GGMLType.Q4_1, (2, 32), int8_activations=True).int8_activations
