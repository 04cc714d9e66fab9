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


def load(  # noqa: ANN201
    mf: ModelFile,
    config: ModelConfig,
    *,
    threads: int | None = None,
    int8_activations: bool | None = None,
):
    """Load ``mf`` for CPU inference (see `phimlx.backends`); weights stay memory-mapped.

    ``int8_activations``: None (default) decodes with int8 activations where a kernel
    exists, as llama.cpp does, unless ``PHIMLX_INT8_ACTIVATIONS=0``; False keeps float32
    activations (exact to float32 rounding, slower); True forces int8 where available."""
    from .model import NumpyModel

    return NumpyModel(mf, config, threads=threads, int8_activations=int8_activations)
