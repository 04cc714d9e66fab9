"""phimlx: Phi-3 (and llama-family) GGUF inference for Python.

MLX on Apple Silicon, a NumPy CPU backend everywhere else, one streaming interface::

    import phimlx
    model = phimlx.load("microsoft/Phi-3-mini-4k-instruct-gguf",
                        filename="Phi-3-mini-4k-instruct-q4.gguf")
    for chunk in model.stream("Write a haiku about ice hockey", max_tokens=100, seed=42):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from .chat import ChatTemplateError
from .config import ModelConfig
from .errors import (
    BackendUnavailableError,
    ConstraintError,
    ContextLengthError,
    GGUFError,
    ModelNotFoundError,
    PhimlxError,
    PromptCacheError,
    UnsupportedModelError,
)
from .formats import Checkpoint, CheckpointError, UnsupportedCheckpointError, open_checkpoint
from .generate import Chunk, Logprobs, Result, Stats, TokenLogprob
from .gguf import ModelFile, TensorInfo, open_gguf
from .model import Model, Session, load

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ChatTemplateError",
    "Checkpoint",
    "CheckpointError",
    "Chunk",
    "ConstraintError",
    "ContextLengthError",
    "GGUFError",
    "Logprobs",
    "Model",
    "ModelConfig",
    "ModelFile",
    "ModelNotFoundError",
    "PhimlxError",
    "PromptCacheError",
    "Result",
    "Session",
    "Stats",
    "TensorInfo",
    "TokenLogprob",
    "UnsupportedCheckpointError",
    "UnsupportedModelError",
    "load",
    "open_checkpoint",
    "open_gguf",
]
