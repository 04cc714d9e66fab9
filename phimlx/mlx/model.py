"""The MLX model: mlx-lm's phi3 / llama modules holding our converted GGUF tensors.

What is ours and why: mlx-lm's rope modules cannot express what GGUF files need per
session -- LongRoPE short *or* long factors chosen by the session's context as llama.cpp
does (mlx-lm always uses long), llama.cpp's attention factor, partial rotary dims and the
interleaved ("normal") style of llama GGUFs -- so each attention's ``rope`` is replaced by
`_Rope`, fed from the session.  Sliding-window attention uses mlx-lm's `RotatingKVCache`,
whose mask keeps key j visible from query i iff ``i - j < window`` (as the NumPy backend).

A batched step (`MLXModel.step_batch`) runs mlx-lm's layers' own modules in our loop: the
B sessions' tokens go through every projection as one (B, 1, hidden) array, and attention
runs per sequence, over that session's own cache with its own rope.  (mlx-lm batches with
left-padded caches instead; ours are one per session, of different lengths, so they stay.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, phi3
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache

from ..backends import check_kv_state, check_trim, checked_batch, checked_tokens
from ..config import ModelConfig
from ..formats import Checkpoint
from ..gguf import GGMLType, ModelFile
from .quant import GROUP, Quantized
from .weights import iter_weights, mlx_lm_config, mlx_lm_module_name

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per forward pass during prefill


class _RopeState:
    """Frequencies of the session currently running (read when the graph is built)."""

    freqs: mx.array | None = None
    scale: float = 1.0


class _Rope(nn.Module):
    def __init__(self, dims: int, traditional: bool, state: _RopeState) -> None:
        super().__init__()
        self.dims, self.traditional, self._state = dims, traditional, state

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        s = self._state
        if s.scale != 1.0:  # llama.cpp scales cos and sin: the rotated dims only
            x = mx.concatenate([x[..., : self.dims] * s.scale, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=s.freqs,
        )


def compute_dtype() -> mx.Dtype:
    """float16 on the GPU (Metal); float32 on MLX's CPU device, where it costs little and
    keeps results comparable with the NumPy backend."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def build_model(
    mf: ModelFile | Checkpoint, config: ModelConfig, dtype: mx.Dtype | None = None
) -> tuple[nn.Module, int]:
    """mlx-lm's module for ``config`` with the file's tensors; returns it and its bytes.

    Tensors are converted one at a time and handed to MLX at once, so peak memory stays near
    the model's final size.
    """
    dtype = dtype or compute_dtype()
    np_scale = np.float32 if dtype == mx.float32 else np.float16
    args_dict = mlx_lm_config(config)
    mod = phi3 if mlx_lm_module_name(config) == "phi3" else llama
    model = mod.Model(mod.ModelArgs.from_dict(args_dict))

    params: dict[str, mx.array] = {}
    quant: dict[str, tuple[int, int]] = {}  # module path -> (bits, group size)
    for path, gtype, value in iter_weights(mf, config, np_scale):
        if isinstance(value, Quantized):
            params[path + ".weight"] = mx.array(value.weight)
            params[path + ".scales"] = mx.array(value.scales).astype(dtype)
            params[path + ".biases"] = mx.array(value.biases).astype(dtype)
            quant[path] = (value.bits, value.group_size)
        else:
            arr = mx.array(value)
            if gtype == GGMLType.BF16:
                arr = arr.view(mx.bfloat16)
            params[path + ".weight"] = arr.astype(dtype)
        mx.eval(params[path + ".weight"])  # materialize now; the NumPy copy goes next loop

    # Swap the quantized layers in before loading (the random init is lazy, never computed).
    nn.quantize(
        model,
        group_size=GROUP,
        bits=4,
        class_predicate=lambda p, m: (
            {"group_size": quant[p][1], "bits": quant[p][0]} if p in quant else False
        ),
    )
    model.load_weights(list(params.items()), strict=True)
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for v in params.values())
    return model, nbytes


def _install_rope(model: nn.Module, config: ModelConfig) -> _RopeState:
    state = _RopeState()
    for layer in model.layers:
        layer.self_attn.rope = _Rope(config.rope_dim, config.rope_style == "normal", state)
    return state


class MLXModel:
    """A model loaded on MLX (implements `phimlx.backends.LoadedModel`)."""

    def __init__(
        self,
        mf: ModelFile | Checkpoint,
        config: ModelConfig,
        *,
        threads: int | None = None,
        kv_cache_type: str | None = None,
    ):
        if threads is not None:
            log.debug("MLX manages its own threads; threads=%s is ignored", threads)
        self.config = config
        self.file = mf
        self.dtype = compute_dtype()
        # MLX caches K and V in its compute dtype: a kv_cache_type that names it is accepted
        own = "f32" if self.dtype == mx.float32 else "f16"
        if kv_cache_type not in (None, own):
            raise ValueError(
                f"kv_cache_type={kv_cache_type!r} is not supported by the MLX backend, which "
                f"caches K and V in its compute dtype ({own!r} on {mx.default_device()}); "
                f"give {own!r} or None, or use backend='numpy'"
            )
        self.kv_cache_type = own
        self.model, self.weight_bytes = build_model(mf, config, self.dtype)
        self._rope = _install_rope(self.model, config)
        self._fused_qkv = mlx_lm_module_name(config) == "phi3"  # qkv_proj, else q/k/v_proj
        log.info(
            "MLX model ready: %s layout, %.1f MB on %s, activations %s",
            mlx_lm_module_name(config),
            self.weight_bytes / 1e6,
            mx.default_device(),
            self.dtype,
        )

    def new_session(self, max_context: int | None = None) -> MLXSession:
        """A fresh KV cache for up to ``max_context`` tokens (default: the model's context)."""
        return MLXSession(self, max_context or self.config.context_length)

    def step_batch(self, sessions: Sequence[MLXSession], token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids[b]`` to ``sessions[b]`` for each b in one forward pass; float32
        logits (B, vocab).  See `phimlx.backends.LoadedModel.step_batch`.

        B = 1 is `MLXSession.step` itself.

        Raises:
            ValueError: see `phimlx.backends.checked_batch`.
            ContextLengthError: a session is full.
        """
        ids = checked_batch(
            sessions,
            token_ids,
            self.config,
            lambda s: isinstance(s, MLXSession) and s._m is self,
        )
        if ids.size == 1:
            return sessions[0].step(int(ids[0]))[None]
        try:
            logits = self._forward_batch(sessions, ids)
        except BaseException:  # interrupted between layers: every session back at its _pos
            for s in sessions:
                s._restore()
            raise
        for s in sessions:
            s._pos += 1
        return np.array(logits, dtype=np.float32)

    def _forward_batch(self, sessions: Sequence[MLXSession], ids: np.ndarray) -> mx.array:
        """One token per session as a (B, 1) batch through the layers; (B, vocab) logits.
        The layer is mlx-lm's ``TransformerBlock`` written out, with the attention split
        at the sequences (`_attention_rows`)."""
        inner = self.model.model
        self._rope.scale = self.config.rope_attn_factor
        x = inner.embed_tokens(mx.array(ids.astype(np.int32))[:, None])  # (B, 1, hidden)
        for i, layer in enumerate(inner.layers):
            caches = [s._cache[i] for s in sessions]
            h = x + self._attention_rows(
                layer.self_attn, layer.input_layernorm(x), sessions, caches
            )
            x = h + layer.mlp(layer.post_attention_layernorm(h))
        out = self._head(inner.norm(x))  # (B, 1, vocab)
        return out.reshape(len(sessions), -1).astype(mx.float32)

    def _attention_rows(
        self, attn: nn.Module, x: mx.array, sessions: Sequence[MLXSession], caches: list[Any]
    ) -> mx.array:
        """mlx-lm's ``Attention`` for x (B, 1, hidden), one token per session: q, k, v and
        the output projection over all B rows; rope, cache and attention per session."""
        B = x.shape[0]
        H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        if self._fused_qkv:
            q, k, v = mx.split(attn.qkv_proj(x), [H * D, (H + KV) * D], axis=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        # (B, 1, heads * D) -> (B, heads, 1, D): one position, so a reshape is the transpose
        q, k, v = q.reshape(B, H, 1, D), k.reshape(B, KV, 1, D), v.reshape(B, KV, 1, D)
        outs = []
        for b, (s, c) in enumerate(zip(sessions, caches, strict=True)):
            self._rope.freqs = s._freqs  # read as the graph is built
            qb = attn.rope(q[b : b + 1], offset=c.offset)
            kb, vb = c.update_and_fetch(attn.rope(k[b : b + 1], offset=c.offset), v[b : b + 1])
            # One query: every key the cache returns is visible (mlx-lm's mask is None too).
            outs.append(
                scaled_dot_product_attention(qb, kb, vb, cache=c, scale=attn.scale, mask=None)
            )  # (1, H, 1, D)
        return attn.o_proj(mx.concatenate(outs, axis=0).reshape(B, 1, H * D))

    def _head(self, h: mx.array) -> mx.array:
        """Output-normed hidden states (..., hidden) -> logits (..., vocab)."""
        if self.config.tied_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def close(self) -> None:
        """Drop the weights and the file mapping."""
        self.model = None  # type: ignore[assignment]
        self.file.close()


class PendingLogits:
    """Logits being computed by `MLXSession.step_async`; `result` waits for them."""

    def __init__(self, logits: mx.array) -> None:
        self._logits = logits

    def result(self) -> np.ndarray:
        """float32 logits ``[vocab]`` (blocks until MLX has computed them)."""
        return np.array(self._logits, dtype=np.float32)


class MLXSession:
    """KV cache and position of one sequence (implements `phimlx.backends.Session`)."""

    def __init__(self, model: MLXModel, max_context: int) -> None:
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        c = model.config
        self._m = model
        self.max_context = max_context
        self.kv_cache_type = model.kv_cache_type
        self._freqs = mx.array(
            1.0 / c.rope_inv_freq(max_context).astype(np.float64), dtype=mx.float32
        )
        self._cache: list[Any] = []
        self._pos = 0
        self.reset()

    @property
    def position(self) -> int:
        return self._pos

    def reset(self) -> None:
        """Empty the cache (position 0)."""
        w = self._m.config.sliding_window
        n = self._m.config.n_layers
        if w and w < self.max_context:
            self._cache = [RotatingKVCache(max_size=w) for _ in range(n)]
        else:
            self._cache = [KVCache() for _ in range(n)]
        self._pos = 0

    def trim(self, n: int) -> int:
        """Forget positions ``n ..`` as mlx-lm trims its caches (the offset moves back); a
        sliding-window cache that has wrapped cannot go back and is emptied instead."""
        n = check_trim(n, self._pos)
        if n == self._pos:
            return n
        if not all(c.is_trimmable() for c in self._cache):
            self.reset()
            return 0
        for c in self._cache:
            c.trim(self._pos - n)
        self._pos = n
        return n

    def kv_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of K (after rope) and V of the positions held: (layers, KV, position, D)
        each, in the model's compute dtype (float32 on the CPU, float16 on Metal).

        Raises:
            ValueError: a sliding-window cache has wrapped (it no longer holds position 0).
        """
        p, c0 = self._pos, self._m.config
        dtype = np.float32 if self._m.dtype == mx.float32 else np.float16
        if p == 0:
            empty = np.zeros((c0.n_layers, c0.n_kv_heads, 0, c0.head_dim), dtype)
            return empty, empty.copy()
        self._check_unwrapped("saved")
        # C order: NumPy keeps the strides of MLX's transposed (KV, P, D) views through
        # np.array and np.stack, and a byte-level consumer (safetensors) would misread them.
        k = np.stack([np.array(c.keys[0, :, :p, :]) for c in self._cache])  # (L, KV, P, D)
        v = np.stack([np.array(c.values[0, :, :p, :]) for c in self._cache])
        return np.ascontiguousarray(k, dtype), np.ascontiguousarray(v, dtype)

    def fork(self, n: int) -> MLXSession:
        """A new session holding positions 0 .. n - 1 of this one (slices of its arrays,
        which MLX never changes in place: each cache's update makes new ones).

        Raises:
            ValueError: ``n`` out of range, or a sliding-window cache has wrapped.
        """
        n = check_trim(n, self._pos, "fork at")
        other = MLXSession(self._m, self.max_context)
        if n == 0:
            return other
        self._check_unwrapped("forked")
        for dst, src in zip(other._cache, self._cache, strict=True):
            dst.keys, dst.values = src.keys[..., :n, :], src.values[..., :n, :]
            dst.offset = n
            if isinstance(dst, RotatingKVCache):
                dst._idx = n
        mx.eval([(c.keys, c.values) for c in other._cache])
        other._pos = n
        return other

    def _check_unwrapped(self, what: str) -> None:
        """Raise unless every cache holds its positions in order from 0.

        Raises:
            ValueError: a sliding-window cache has wrapped.
        """
        for c in self._cache:
            # In temporal order from position 0 until the window is full, or after one
            # prefill longer than the window (kept whole); past that it has overwritten or
            # dropped the first positions.
            rotating = isinstance(c, RotatingKVCache)
            if rotating and c.offset > c.max_size and c.keys.shape[2] != c.offset:
                raise ValueError(
                    f"this session's sliding-window cache has wrapped ({self._pos} positions,"
                    f" window {c.max_size}): it no longer holds the first positions, so it "
                    f"cannot be {what}; do so before it passes the window, or use a "
                    "max_context no larger than the window"
                )

    def load_kv_state(self, k: np.ndarray, v: np.ndarray) -> None:
        """Replace the cache with ``k``, ``v`` ((layers, KV, P, D) in the model's compute
        dtype, as `kv_state` gives them); the position becomes P.

        Raises:
            ValueError: a dtype or shape that does not fit the model or ``max_context``.
        """
        dtype = np.float32 if self._m.dtype == mx.float32 else np.float16
        n = check_kv_state(k, v, self._m.config, self.max_context, np.dtype(dtype))
        self.reset()
        if n == 0:
            return
        # The attributes, not `cache.state`: the layout of that tuple changed between
        # mlx-lm versions, these did not.  The state is the one a single prefill of n
        # tokens leaves (keys exactly n long, next slot n), so a longer-than-window state
        # (saved after such a prefill) continues as it would have.
        for c, kl, vl in zip(self._cache, k, v, strict=True):
            c.keys, c.values = mx.array(kl)[None], mx.array(vl)[None]  # (1, KV, n, D)
            c.offset = n
            if isinstance(c, RotatingKVCache):
                c._idx = n
        mx.eval([(c.keys, c.values) for c in self._cache])
        self._pos = n

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run the prompt in chunks; float32 logits ``[vocab]`` after its last token, or
        with ``all_logits`` ``[T, vocab]`` after each."""
        ids = self._checked(token_ids)
        parts = []
        for start in range(0, ids.size, PREFILL_CHUNK):
            parts.append(self._forward(ids[start : start + PREFILL_CHUNK], all_logits=all_logits))
            if start + PREFILL_CHUNK < ids.size:
                mx.eval([c.state for c in self._cache], parts if all_logits else [])
        logits = mx.concatenate(parts) if all_logits else parts[-1]
        return np.array(logits, dtype=np.float32)

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; float32 logits ``[vocab]`` for the next position."""
        return self.step_async(token_id).result()

    def step_async(self, token_id: int) -> PendingLogits:
        """Append one token and start computing its logits in the background
        (``mx.async_eval``); the caller streams text meanwhile, then calls ``.result()``."""
        logits = self._forward(self._checked([token_id]))
        mx.async_eval(logits)
        return PendingLogits(logits)

    def _checked(self, token_ids: Sequence[int]) -> np.ndarray:
        return checked_tokens(token_ids, self._pos, self.max_context, self._m.config)

    def _forward(self, ids: np.ndarray, *, all_logits: bool = False) -> mx.array:
        """``ids`` (T tokens) through the model into the cache; logits (vocab,) of the last,
        or with ``all_logits`` (T, vocab)."""
        m = self._m
        m._rope.freqs, m._rope.scale = self._freqs, m.config.rope_attn_factor
        try:
            h = m.model.model(mx.array(ids.astype(np.int32))[None], cache=self._cache)  # (1, T, H)
        except BaseException:  # interrupted between layers: put every layer back at _pos
            self._restore()
            raise
        out = m._head(h[0] if all_logits else h[0, -1:])  # (T or 1, vocab)
        self._pos += int(ids.size)
        return (out if all_logits else out.reshape(-1)).astype(mx.float32)

    def _restore(self) -> None:
        """Put every layer's cache back at ``_pos`` after an interrupted forward pass (or
        empty the session where a cache cannot go back)."""
        for c in self._cache:
            if c.offset > self._pos and c.is_trimmable():
                c.trim(c.offset - self._pos)
        if any(c.offset != self._pos for c in self._cache):
            self.reset()
