"""Safetensors checkpoints: mlx-lm folders (affine-quantized) and Hugging Face folders.

- `safetensors`: a validating reader of the file format (memory-mapped views, BF16 as bits);
- `config`: ``config.json`` -> `ModelConfig`, and mlx-lm's ``quantization`` entry;
- `checkpoint`: `Checkpoint`, a folder seen under GGUF tensor names, validated at open;
- `affine`: mlx's affine codes decoded with NumPy.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, Weight, hf_module_names, is_checkpoint_dir, open_checkpoint
from .errors import CheckpointError, UnsupportedCheckpointError
from .safetensors import SafetensorsFile, open_safetensors

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "SafetensorsFile",
    "UnsupportedCheckpointError",
    "Weight",
    "hf_module_names",
    "is_checkpoint_dir",
    "open_checkpoint",
    "open_safetensors",
]
