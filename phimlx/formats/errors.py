"""The typed errors of safetensors checkpoints (mlx-lm and Hugging Face model folders)."""

from __future__ import annotations

from ..errors import PhimlxError, UnsupportedModelError


class CheckpointError(PhimlxError, ValueError):
    """A safetensors checkpoint folder (an mlx-lm or Hugging Face model) is malformed: a bad
    ``config.json``, a truncated or corrupt safetensors file, a missing tensor, or a tensor
    whose shape or dtype disagrees with the config."""


class UnsupportedCheckpointError(CheckpointError, UnsupportedModelError):
    """A valid checkpoint of a model type, quantization or feature phimlx does not run
    (also an `UnsupportedModelError`, as for GGUF files)."""
