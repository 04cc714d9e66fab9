"""GGUF: the file format as data (`format`), the validating reader (`reader`), and the quant
block layouts with their reference dequantization (`quants`).

Dependencies run one way: ``format`` <- ``quants`` <- ``reader``.
"""

from __future__ import annotations

from .format import SUPPORTED_TYPES, TYPE_SIZES, GGMLType
from .quants import DEQUANTIZABLE, QK_K, dequantize, dequantize_rows
from .reader import ModelFile, TensorInfo, check_supported, open_gguf

__all__ = [
    "DEQUANTIZABLE",
    "QK_K",
    "SUPPORTED_TYPES",
    "TYPE_SIZES",
    "GGMLType",
    "ModelFile",
    "TensorInfo",
    "check_supported",
    "dequantize",
    "dequantize_rows",
    "open_gguf",
]
