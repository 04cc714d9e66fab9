"""Threads of the NumPy backend: one count for the numba kernels and for BLAS.

A decode step runs only numba's threads (its matvecs and its attention:
`fallback.ops.attend_rows`), in ~200 parallel regions a step, with a little Python between
two; BLAS's work in prefill chunks.  How numba's idle threads wait between two regions
decides the speed more than the kernels do whenever waking a sleeping thread is slow (a
VM whose idle virtual CPUs halt, a laptop's deep sleep states) or the cores are shared.

**Intel TBB first.**  numba prefers its TBB threading layer where ``libtbb`` loads.  TBB's
idle workers spin a short while, then yield the core (``sched_yield``) for a while, then
sleep: a thread woken for the next region is still awake, and another program that needs
the core gets it.  pip installs TBB (the ``tbb`` package, a dependency of phimlx on Linux
x86-64) into the environment's ``lib/``, which is not on the loader's path in a virtual
environment, so importing this package loads ``libtbb.so.12`` from there (`_load_tbb`)
before numba looks for it.  ``NUMBA_THREADING_LAYER=omp`` (numba's own setting) keeps
OpenMP.

Measured on SmolLM2-135M Q4_1, 2 threads on a 2-core Xeon VM, tok/s median (min..max) of
6 runs of 128 decode steps, engines alternating by process (``python bench/busy.py
--engines numpy:tbb,numpy:omp,llama.cpp -r 6``): alone; while a second phimlx process (on
TBB) decodes; while llama-cpp-python decodes:

    TBB                  87.8 (75.5..96.2)   50.0 (46.7..54.6)   37.2 (24.0..51.3)
    OpenMP, 1000 spins   90.7 (78.1..105)    41.3 (34.1..57.9)   34.5 (28.5..35.3)
    llama-cpp-python     88.3 (79.1..94.8)   36.0 (0.3..40.8)     9.7 (0.6..29.2)

In a phase of the same VM where waking a sleeping thread took 40-80 us rather than ~9 (a C
condition-variable ping-pong), ``phimlx bench smollm2-135m-instruct -b numpy --tg 64``
decoded at 31.5 tok/s on OpenMP with 1000 spins, 100-120 on TBB, 100 on OpenMP with
``OMP_WAIT_POLICY=ACTIVE``; llama.cpp, whose threads spin, ran at 147.  A 512-token prefill
is the same on both layers (651 and 625 tok/s, medians of 5 alternating runs).

**OpenMP otherwise** (no TBB: Linux aarch64, Windows, or by choice).  libgomp's idle
threads spin before they sleep: 300,000 spins by default, which on a machine whose cores
are shared turns every parallel region into a wait for a descheduled spinner.  So
importing this package sets ``GOMP_SPINCOUNT=1000`` (unless the environment sets it, or
``OMP_WAIT_POLICY``): libgomp reads it when numba first loads it, which is after this
import unless something else in the process loaded libgomp first.  Measured (session 8,
same machine, 5 runs of 48 steps at 512 cached positions, tok/s median / minimum; same
three columns):

    libgomp default (300k)   69-86 / 68-78   20.7 / 18.9    0.7 / 0.7
    GOMP_SPINCOUNT=100000    68 / 66         29.0 / 4.5    30.8 / 10.0
    GOMP_SPINCOUNT=10000     68-81 / 64-75    8.8 / 8.3     8.9 / 8.4
    GOMP_SPINCOUNT=1000      64-75 / 58-72   25.3 / 25.2   27.2 / 24.6
    OMP_WAIT_POLICY=PASSIVE  53-62 / 50-60   33.6 / 32.1   32.7 / 31.7
    NUMBA_THREADING_LAYER=workqueue  30 / 29  27.0 / 24.8   21.6 / 19.5

1000 spins keep most of PASSIVE's behaviour when the cores are shared (PASSIVE costs
10-25% alone); set ``OMP_WAIT_POLICY=ACTIVE`` (or a larger ``GOMP_SPINCOUNT``) on a
machine reserved for one model.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import site
import sys
from collections.abc import Iterator

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"  # before numba loads libgomp: see above

import threadpoolctl

from phimlx.backends import check_threads

from .kernels import numba_available

log = logging.getLogger(__name__)

# numba's own names for the choices that may pick TBB (unset means "default")
_TBB_CHOICES = ("", "default", "tbb", "safe", "threadsafe", "forksafe")


def _load_tbb() -> str | None:
    """Load pip's ``libtbb.so.12`` (in the environment's or the user's ``lib/``) so that
    numba's TBB layer, which asks the loader for it by name, finds it; the library's path,
    or None (not Linux, TBB not wanted or not there, or it did not load: numba then
    chooses OpenMP itself)."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("NUMBA_THREADING_LAYER", "").lower() not in _TBB_CHOICES:
        return None
    for base in (sys.prefix, site.getuserbase()):
        path = os.path.join(base, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:  # global, so the loader resolves numba's tbbpool against it
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                log.debug("TBB at %s did not load (%s): numba uses OpenMP", path, e)
                return None
            return path
    return None


_TBB_PATH = _load_tbb()


def tbb_loaded() -> bool:
    """Whether this import loaded TBB, so numba will run its threads on it (unless
    something else in the process loaded another layer first)."""
    return _TBB_PATH is not None


def threading_layer() -> str | None:
    """numba's threading layer in this process ("tbb", "omp" or "workqueue"), starting its
    threads if they are not yet; None without numba."""
    if not numba_available():
        return None
    import numba
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    return str(numba.threading_layer())


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


def use_threads(n: int) -> None:
    """Run numba's parallel kernels on ``n`` threads from the calling thread on.

    numba keeps this count per thread: a new thread starts at ``NUMBA_NUM_THREADS`` (every
    logical CPU) whatever `set_threads` set in the thread that loaded the model.  A model
    run from another thread (the server's engine thread, a worker pool) calls this at the
    start of each forward pass, or its kernels would take every logical CPU whatever its
    ``threads`` (measured: a server started with ``--threads 1`` kept both cores of a
    2-core VM busy).  Costs ~5 us where the count is already ``n``."""
    if numba_available():
        import numba

        if numba.get_num_threads() != n:
            numba.set_num_threads(n)


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
        use_threads(want)
    _set_blas_threads(want)
    return want
