"""The MLX backend: GGUF blocks as MLX quantized arrays, in mlx-lm's phi3 / llama modules.

Tensors come from phimlx's own validated GGUF reader (never ``mx.load`` on a GGUF) and
become MLX affine-quantized arrays by bit manipulation where the formats map exactly
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K); Q6_K, Q3_K and Q2_K are re-quantized at the
nearest MLX width whose error stays below the source's own (see `quant`).

Implements the backend protocol of `phimlx.backends`: ``probe()`` and
``load(mf, config, *, threads) -> MLXModel``; sessions return NumPy float32 logits.

Fast path for the generation loop: ``MLXSession.step_async(token_id)`` appends the token,
starts computing the next logits with ``mx.async_eval`` and returns at once a handle whose
``.result()`` waits for them (float32 NumPy ``[vocab]``).  The loop can stream the text of
the token just sampled while the device works::

    pending = session.step_async(token)
    yield chunk_for(token)            # Python streams meanwhile
    logits = pending.result()

``step(token_id)`` is ``step_async(token_id).result()``.  Calls on one session must stay
in order (each handle's result before the next call is not required, but the token for the
next call usually depends on it).

On Linux MLX runs on its CPU device (``pip install "mlx[cpu]"``): correct, slow, and how CI
tests this backend; ``auto`` keeps choosing NumPy there.
"""

from __future__ import annotations

import logging
import sys

from ..config import ModelConfig
from ..formats import Checkpoint
from ..gguf import ModelFile

log = logging.getLogger(__name__)


def probe() -> str | None:
    """None when MLX and mlx-lm import (and, on macOS, Metal is available); else why not."""
    try:
        import mlx.core as mx
    except ImportError as e:
        return f"mlx is not installed ({e})"
    try:
        import mlx_lm.models.phi3  # noqa: F401
    except ImportError as e:
        return f"mlx-lm is not installed ({e})"
    if sys.platform == "darwin":
        if not mx.metal.is_available():
            return "MLX is installed but Metal is not available on this Mac"
    else:
        log.info("MLX on %s runs on its CPU device (no Metal): correct but slow", sys.platform)
    return None


def load(  # noqa: ANN201
    mf: ModelFile | Checkpoint,
    config: ModelConfig,
    *,
    threads: int | None = None,
    kv_cache_type: str | None = None,
):
    """Load ``mf`` (a GGUF file, or a safetensors checkpoint folder whose mlx affine
    weights stay quantized as mlx-lm loads them) onto MLX's default device (see
    `phimlx.backends`).

    ``kv_cache_type``: None, or the one MLX uses: its compute dtype (``"f32"`` on the CPU,
    ``"f16"`` on Metal).

    Raises:
        UnsupportedModelError: a tensor type has no MLX mapping.
        ValueError: another ``kv_cache_type``.
    """
    from .model import MLXModel

    return MLXModel(mf, config, threads=threads, kv_cache_type=kv_cache_type)


__all__ = ["load", "probe"]
