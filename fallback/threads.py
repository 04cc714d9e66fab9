"""Threads of the NumPy backend: one count for the numba kernels and for BLAS.

A decode step runs only numba's threads (its matvecs and its attention:
`fallback.ops.attend_rows`); BLAS's work in prefill chunks.  numba's threading layer
here is OpenMP (libgomp), whose idle threads spin before they sleep: 300,000 spins by
default, which on a machine whose cores are shared (two processes decoding on two cores)
turns every one of the ~200 parallel regions of a step into a wait for a descheduled
spinner.  So importing this package sets ``GOMP_SPINCOUNT=1000`` (unless the environment
sets it, or ``OMP_WAIT_POLICY``): libgomp reads it when numba first loads it, which is
after this import unless something else in the process loaded libgomp first.

Measured on SmolLM2-135M Q4_1, 2 threads on a 2-core machine, decode at 512 cached
positions, tok/s median / minimum of 5 runs of 48 steps (`phimlx` alone; while a second
phimlx process decodes with the same setting; while llama-cpp-python decodes):

    libgomp default (300k)   69-86 / 68-78   20.7 / 18.9    0.7 / 0.7
    GOMP_SPINCOUNT=100000    68 / 66         29.0 / 4.5    30.8 / 10.0
    GOMP_SPINCOUNT=10000     68-81 / 64-75    8.8 / 8.3     8.9 / 8.4
    GOMP_SPINCOUNT=1000      64-75 / 58-72   25.3 / 25.2   27.2 / 24.6
    OMP_WAIT_POLICY=PASSIVE  53-62 / 50-60   33.6 / 32.1   32.7 / 31.7
    NUMBA_THREADING_LAYER=workqueue  30 / 29  27.0 / 24.8   21.6 / 19.5

1000 spins cost nothing measurable alone and keep most of PASSIVE's behaviour when the
cores are shared (PASSIVE costs 10-25% alone); set ``OMP_WAIT_POLICY=ACTIVE`` (or a larger
``GOMP_SPINCOUNT``) on a machine reserved for one model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"  # before numba loads libgomp: see above

import threadpoolctl

from phimlx.backends import check_threads

from .kernels import numba_available


def physical_cores() -> int:
    """Physical cores (hyperthreads share a core's vector units: more threads do not help)."""
    try:  # optional; knows macOS and Windows too
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    pairs: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    pairs.add((phys, value.strip()))
    except OSError:
        pass
    return len(pairs) or os.cpu_count() or 1


_controller: threadpoolctl.ThreadpoolController | None = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on the calling thread only, for the duration (prefill attention).

    BLAS calls that interleave with numba's parallel kernels fight them: OpenBLAS's threads
    spin after each call while libgomp's wake for the next kernel, and both pools lose.
    Measured on the Phi-3-mini Q4_K_M shapes, 2 threads: a 61-token prefill after 62
    cached tokens took 19.5-25 s with BLAS's two threads in its attention and 8.7-10 s with
    one (8-9 s from an empty cache either way)."""
    global _controller
    if _controller is None:
        _controller = threadpoolctl.ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def _set_blas_threads(n: int) -> None:
    """Limit the BLAS behind NumPy (OpenBLAS, MKL, BLIS, ...) to ``n`` threads, for the
    whole process (threadpoolctl finds and sets whichever library NumPy loaded)."""
    threadpoolctl.threadpool_limits(limits=n, user_api="blas")


def set_threads(n: int | None = None) -> int:
    """Set the threads used by the numba kernels and by BLAS.

    Args:
        n: thread count; None means the number of physical cores.

    Returns:
        The count in effect (capped by numba's maximum, ``NUMBA_NUM_THREADS``).

    Raises:
        ValueError: ``n`` is not a positive integer.
    """
    check_threads(n)
    want = physical_cores() if n is None else n
    if numba_available():
        import numba

        want = min(want, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(want)
    _set_blas_threads(want)
    return want
