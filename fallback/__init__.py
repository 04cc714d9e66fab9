"""The NumPy backend: runs GGUF models on any CPU, straight from the quantized blocks.

This package never imports mlx.  numba compiles its kernels where it is installed; a pure
NumPy path serves everywhere else.
"""

from __future__ import annotations

from phimlx.config import ModelConfig
from phimlx.gguf import ModelFile


def probe() -> str | None:
    """The NumPy backend runs wherever NumPy does."""
    return None


def load(mf: ModelFile, config: ModelConfig, *, threads: int | None = None):  # noqa: ANN201
    """Load ``mf`` for CPU inference (see `phimlx.backends`); weights stay memory-mapped."""
    from .model import NumpyModel

    return NumpyModel(mf, config, threads=threads)
