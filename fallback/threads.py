"""Threads of the NumPy backend: one count for the numba kernels and for BLAS."""

from __future__ import annotations

import ctypes
import logging
import os

from .kernels import numba_available

log = logging.getLogger(__name__)


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


def _set_blas_threads(n: int) -> bool:
    """Limit the BLAS behind NumPy to ``n`` threads (threadpoolctl, else OpenBLAS via ctypes)."""
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        return True
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return False
    done = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def set_threads(n: int | None = None) -> int:
    """Set the threads used by the numba kernels and by BLAS.

    Args:
        n: thread count; None means the number of physical cores.

    Returns:
        The count in effect (capped by numba's maximum, ``NUMBA_NUM_THREADS``).
    """
    want = physical_cores() if n is None else int(n)
    want = max(1, want)
    if numba_available():
        import numba

        want = min(want, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(want)
    if not _set_blas_threads(want):
        log.debug("could not set BLAS threads (no threadpoolctl, no OpenBLAS found)")
    return want
