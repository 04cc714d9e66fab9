"""The machine a result was measured on: CPU, cores, RAM, OS, Python, library versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

LIBRARIES = (
    "phimlx",
    "numpy",
    "numba",
    "tbb",  # numba's threading layer where installed (fallback.threads)
    "gguf",
    "llama-cpp-python",
    "mlx",
    "mlx-lm",
    "transformers",
    "torch",
)


def cpu_model() -> str:
    """The CPU's marketing name, as the OS reports it."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith(("model name", "hardware", "cpu model")):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Physical cores: the NumPy backend's default thread count (hyperthreads not counted)."""
    from fallback.threads import physical_cores as cores

    return cores()


def total_ram() -> int | None:
    """Installed RAM in bytes (None where unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_flags() -> list[str]:
    """The SIMD features that matter to the kernels (x86: AVX2, AVX-512, ...)."""
    want = (
        "avx2",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "amx_bf16",
        "fma",
        "f16c",
        "neon",
        "asimd",
        "sve",
        "dotprod",
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def phimlx_version() -> str:
    """phimlx's version: the installed distribution's, else (a source checkout run without
    installing) the package's own ``__version__``."""
    try:
        return metadata.version("phimlx")
    except metadata.PackageNotFoundError:
        from phimlx import __version__

        return __version__


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries the benchmark touches (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in LIBRARIES:
        if dist == "phimlx":
            out[dist] = phimlx_version()
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (a busy machine makes slow, noisy numbers)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to know where a result comes from."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cpu_flags": cpu_flags(),
        "ram_bytes": total_ram(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "versions": versions(),
        "load_average": load_average(),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for humans: ``AMD EPYC, 2 cores, 24 GiB RAM, Linux-..., Python 3.11.7``."""
    ram = info.get("ram_bytes")
    ram_s = f"{ram / 2**30:.0f} GiB RAM" if ram else "RAM unknown"
    cores = info.get("physical_cores") or info.get("logical_cpus")
    flags = "+".join(info.get("cpu_flags") or [])
    return (
        f"{info['cpu']} ({info['machine']}{', ' + flags if flags else ''}), {cores} cores, "
        f"{ram_s}, {info['os']}, Python {info['python']}"
    )
