"""The NumPy backend: runs GGUF models on any CPU, straight from the quantized blocks.

This package never imports mlx.  numba compiles its kernels where it is installed; a pure
NumPy path serves everywhere else.  numba compiles on first use, for seconds, and keeps the
result on disk: `load` warms the kernels up so that the first prompt is timed fairly, and
`kernels_cached` tells beforehand whether that will compile anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from phimlx.config import ModelConfig
from phimlx.formats import Checkpoint
from phimlx.gguf import GGMLType, ModelFile

from . import threads as _threads  # noqa: F401 - sets GOMP_SPINCOUNT before numba's OpenMP

log = logging.getLogger(__name__)


def probe() -> str | None:
    """The NumPy backend runs wherever NumPy does."""
    return None


def load(  # noqa: ANN201
    mf: ModelFile | Checkpoint,
    config: ModelConfig,
    *,
    threads: int | None = None,
    int8_activations: bool | None = None,
    warmup: bool | None = None,
    kv_cache_type: str | None = None,
):
    """Load ``mf`` for CPU inference (see `phimlx.backends`); weights stay memory-mapped.

    Args:
        mf: the open GGUF file, or a safetensors checkpoint folder (`phimlx.formats`).
        config: its `ModelConfig`.
        threads: CPU threads (default: the physical cores).
        int8_activations: None (default) decodes with int8 activations where a kernel
            exists, as llama.cpp does, unless ``PHIMLX_INT8_ACTIVATIONS=0``; False keeps
            float32 activations (exact to float32 rounding, slower); True forces int8 where
            available.
        warmup: run `warm_up` before returning, so that numba compiles (or loads from its
            on-disk cache) every kernel a prompt and a decode step call now rather than
            inside the first prompt's timing.  None (default): when something will compile
            (`kernels_cached` is False), which takes seconds; where the kernels are cached
            numba loads each from disk on its first call anyway.

    Returns:
        A `fallback.model.NumpyModel`.
    """
    from .kernels import numba_available
    from .model import NumpyModel

    model = NumpyModel(
        mf,
        config,
        threads=threads,
        int8_activations=int8_activations,
        kv_cache_type=kv_cache_type,
    )
    if warmup is None:
        warmup = not kernels_cached(mf)
    if warmup and numba_available():  # the pure NumPy path has nothing to compile
        warm_up(model)
    return model


def warm_up(model: Any) -> None:
    """A 2-token prefill, one decode step and a batched step of two on throwaway sessions of
    ``model``, and one row through each weight type's tile decoder (and, with AMX, its
    tiles' product over 16 weight rows).

    They call every compiled kernel a generation calls (the prefill's int8 matmuls and
    norms, the tile decoders of long prompts, the step's matvecs, fused attention and
    embedding lookup; a batched step's attention; the threads' attention of long caches and
    of big batches; a long prompt's attention) with the argument types of a real call and
    the model's KV cache type, which is what numba compiles for; the sessions are dropped
    afterwards.  Needs numba.
    """
    session = model.new_session(min(4, model.config.context_length))
    session.prefill([0, 0])
    session.step(0)
    model.step_batch([model.new_session(1), model.new_session(1)], [0, 0])  # short caches
    # the threads' attention (long caches, big batches), on this cache type
    from . import ops

    c, kc, vc = model.config, session._k[0], session._v[0]
    kv, _, d = ops.cache_shape(kc)
    qkv = np.zeros((c.n_heads + 2 * kv) * d, np.float32)
    cos, sin = session._cos[:1], session._sin[:1]
    ops.attend_token(cos, sin, True, 0, 0, model.attn_scale, c.n_heads, qkv, kc, vc, parts=2)
    # a long prompt's attention (`ops.attend`: its rope and BLAS), which the short prefill
    # above does not take (`ops.prefill_by_rows`)
    rows = np.zeros((2, qkv.size), np.float32)
    cos, sin = session._cos[:2], session._sin[:2]
    ops.attend(cos, sin, True, 0, 0, model.attn_scale, c.n_heads, rows, kc, vc)
    seen = set()
    for m in model._matrices():
        if m.use_numba and id(m.kernels) not in seen:
            seen.add(id(m.kernels))
            m.decode_tile(0, np.empty((1, m.cols), np.float32))
            if getattr(m, "_tiles", None) is not None:  # AMX: a prompt's products (16 rows)
                w, x = m.raw[:16], np.zeros((1, m.cols), np.float32)
                m._tiles(w, m._empty, m._empty, x, np.empty((1, w.shape[0]), np.float32))


def _fresh_on_disk(dispatcher: Any) -> bool:
    """True if numba's on-disk cache holds a compiled version of ``dispatcher`` for its
    current source (False when it is missing or stale, or numba's cache cannot be read)."""
    try:
        return bool(dispatcher._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001 - numba internals: when unsure, say it will compile
        return False


def kernels_cached(mf: ModelFile | Checkpoint) -> bool:
    """Whether loading ``mf`` with this backend will find its kernels compiled on disk.

    Checks the kernels every model calls (norms, SiLU, rope, attention), and per weight
    type in ``mf`` the tile decoder, the int8 product and the repacker where they apply:
    numba compiles these on first use, for seconds, and keeps them in its cache
    (``__pycache__`` or ``NUMBA_CACHE_DIR``).  Without numba nothing is compiled: True.
    When the cache cannot be read: False.

    Args:
        mf: the open GGUF file that is about to be loaded.

    Returns:
        True if nothing (or nothing checked) needs compiling.
    """
    from .kernels import avx2_kernels, kernel_set, numba_available, repack_default

    if not numba_available():
        return True
    from . import ops

    dispatchers = [ops.rms_norm, ops.add_rms_norm, ops.silu_mul, ops.rope]
    dispatchers += [ops.attend_batch, ops.attend_batch_serial]
    if isinstance(mf, Checkpoint):  # its float matrices run QuantMatrix kernels too
        from .affine import affine_dispatchers, float_kinds

        kinds = float_kinds(mf)
        dispatchers += affine_dispatchers(mf)
    else:
        kinds = {
            (t.type, t.shape[-1])
            for t in mf.tensors.values()
            if len(t.shape) == 2 and t.type != GGMLType.F32
        }
    for qtype, cols in kinds:
        try:
            ks = kernel_set(qtype, cols, use_numba=True)
        except KeyError:  # a type with no kernel: loading it fails later, and says why
            continue
        tiles = getattr(ks.matmul_tiles, "dispatcher", None)  # (AMX: a prompt's products)
        int8 = ks.matmul_int8
        packed = ks.rows8 or ks.octets  # (rows a multiple of 8, as a real model's are)
        if packed is not None and repack_default():  # (the repacked matrices' kernels)
            int8 = packed.matmul_int8
            dispatchers.append(avx2_kernels().packer(qtype))  # and the packer
        for kernel in (ks.decode_tile, int8 and int8.parallel, tiles):
            if hasattr(kernel, "_cache"):  # the per-type compiled ones (others are shared)
                dispatchers.append(kernel)
    missing = [d for d in dispatchers if not _fresh_on_disk(d)]
    if missing:
        log.debug(
            "not in numba's cache (%s): %s",
            os.environ.get("NUMBA_CACHE_DIR") or "__pycache__",
            ", ".join(getattr(d, "__name__", "?") for d in missing),
        )
    return not missing
