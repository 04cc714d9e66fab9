"""Block layouts of the GGUF quant types and their dequantization to float32.

(Placeholder: float types only; the quantized types are being written in the kernels work.)
"""

from __future__ import annotations

import numpy as np

from .gguf import GGMLType


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ``raw`` bytes (``uint8``, rows last) of type ``qtype`` into float32 ``shape``."""
    flat = np.ascontiguousarray(raw).reshape(-1)
    if qtype == GGMLType.F32:
        return flat.view(np.float32).reshape(shape).copy()
    if qtype == GGMLType.F16:
        return flat.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == GGMLType.BF16:
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    import gguf.quants  # temporary until our own block decoders land

    return gguf.quants.dequantize(flat, qtype.value).reshape(shape).astype(np.float32)
