"""phimlx: Phi-3 (and llama-family) GGUF inference for Python.

MLX on Apple Silicon, a NumPy CPU backend everywhere else, one streaming interface::

    import phimlx
    model = phimlx.load("microsoft/Phi-3-mini-4k-instruct-gguf",
                        filename="Phi-3-mini-4k-instruct-q4.gguf")
    for chunk in model.stream("Write a haiku about ice hockey", max_tokens=100, seed=42):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import (
    BackendUnavailableError,
    ContextLengthError,
    GGUFError,
    ModelNotFoundError,
    PhimlxError,
    UnsupportedModelError,
)
from .generate import Chunk, Result, Stats
from .gguf import ModelFile, TensorInfo, open_gguf

if TYPE_CHECKING:
    from .model import Model, Session

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Chunk",
    "ContextLengthError",
    "GGUFError",
    "Model",
    "ModelConfig",
    "ModelFile",
    "ModelNotFoundError",
    "PhimlxError",
    "Result",
    "Session",
    "Stats",
    "TensorInfo",
    "UnsupportedModelError",
    "load",
    "open_gguf",
]


def __getattr__(name: str) -> Any:
    # `Model` pulls in the tokenizer and jinja2: import it on first use, not with phimlx.
    if name in ("Model", "Session"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'phimlx' has no attribute {name!r}")


def load(
    model: str | os.PathLike[str],
    *,
    filename: str | None = None,
    revision: str | None = None,
    backend: str = "auto",
    threads: int | None = None,
    tokenizer_repo: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Model:
    """Load a GGUF model from a local path, a preset name, or a Hugging Face hub repo.

    Args:
        model: a ``.gguf`` path; a preset such as ``"phi-3-mini-4k-instruct"`` or
            ``"smollm2-135m-instruct"``; or a hub repo id such as
            ``"microsoft/Phi-3-mini-4k-instruct-gguf"``.
        filename: the file in a hub repo (a glob such as ``"*q4*.gguf"`` is allowed).
        revision: a hub branch, tag or commit to pin.
        backend: ``"auto"`` (MLX on Apple Silicon, NumPy elsewhere; ``$PHIMLX_BACKEND``
            overrides), ``"mlx"`` or ``"numpy"``.
        threads: CPU threads for the NumPy backend (default: all physical cores).
        tokenizer_repo: use this hub repo's ``tokenizer.json`` instead of the GGUF's own.
        cache_dir: the hub cache directory (default: huggingface_hub's).
        local_files_only: never touch the network (like ``HF_HUB_OFFLINE=1``).

    Returns:
        A `Model`.

    Raises:
        GGUFError: the file is corrupt, truncated, or not a model phimlx can run.
        UnsupportedModelError: unknown architecture or tensor type (a `GGUFError`).
        ModelNotFoundError: the file is not local, not cached, and cannot be downloaded.
        BackendUnavailableError: the requested backend cannot run here.
    """
    from .model import load_model

    return load_model(
        model,
        filename=filename,
        revision=revision,
        backend=backend,
        threads=threads,
        tokenizer_repo=tokenizer_repo,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
