"""Threads of the NumPy backend: one count for the numba kernels and for BLAS."""

from __future__ import annotations

import os

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
