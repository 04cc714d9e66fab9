"""The NumPy backend's transformer: phi3 and llama from GGUF blocks, with a KV cache.

One forward pass serves both architectures; what differs is in `ModelConfig` (fused or
split projections, rope style, LongRoPE factors, sliding window).  Weight matrices stay in
their GGUF blocks (`QuantMatrix`); only norms are decoded to float32.

Shapes: T = tokens in this call, P = positions in the cache, H = query heads,
KV = key/value heads, G = H // KV (queries per kv head), D = head dim.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phimlx.backends import checked_tokens
from phimlx.config import ModelConfig
from phimlx.gguf import ModelFile

from . import ops
from .kernels import int8_kernel_available
from .matrix import QuantMatrix, matvec_many, matvec_plan
from .threads import set_threads

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # tokens per prefill chunk: bounds the (H, T, P) score matrix
_CACHE_GROW = 256  # KV cache capacity grows in steps of this many positions


def _matrix(mf: ModelFile, name: str, int8: bool | None) -> QuantMatrix:
    t = mf.info(name)
    rows, cols = t.shape[0], t.shape[1]
    if int8:  # where this type has an int8 kernel; float elsewhere
        int8 = int8_kernel_available(t.type, cols)
    return QuantMatrix(mf.raw(name), t.type, (rows, cols), int8_activations=int8)


@dataclass
class _Layer:
    attn_norm: np.ndarray  # (hidden,)
    ffn_norm: np.ndarray  # (hidden,)
    qkv: list[QuantMatrix]  # one fused matrix, or q, k, v
    out: QuantMatrix
    gate_up: list[QuantMatrix]  # one fused matrix (gate rows first), or gate, up
    down: QuantMatrix

    def __post_init__(self) -> None:
        # the decode step's matvecs, kernels chosen once (`matvec_plan`)
        self.qkv_mv = matvec_plan(self.qkv)
        self.out_mv = matvec_plan([self.out])
        self.gate_up_mv = matvec_plan(self.gate_up)
        self.down_mv = matvec_plan([self.down])


def _project(mats: list[QuantMatrix], x: np.ndarray) -> np.ndarray:
    """x (T, in) or (in,) through matrices that share it (q|k|v, gate|up), outputs
    concatenated on the last axis; one kernel launch for a single token."""
    if x.ndim == 1:
        return matvec_many(mats, x)
    outs = [m.matmul(x) for m in mats]
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=-1)


class NumpyModel:
    """A model loaded for the NumPy backend (implements `phimlx.backends.LoadedModel`).

    ``int8_activations``: decode with llama.cpp-style int8 activations where a kernel exists
    (True), exact float32 activations (False), or the default (None: int8 unless
    ``PHIMLX_INT8_ACTIVATIONS=0``); see `fallback.kernels`."""

    def __init__(
        self,
        mf: ModelFile,
        config: ModelConfig,
        *,
        threads: int | None = None,
        int8_activations: bool | None = None,
    ):
        self.config = config
        self.file = mf
        self.threads = set_threads(threads)
        c = config
        i8 = int8_activations
        self.embed = _matrix(mf, "token_embd.weight", i8)
        self.output = self.embed if c.tied_embeddings else _matrix(mf, "output.weight", i8)
        self.output_norm = mf.dequantize("output_norm.weight")
        self.output_mv = matvec_plan([self.output])
        self.layers: list[_Layer] = []
        for i in range(c.n_layers):
            b = f"blk.{i}."
            qkv = ["attn_qkv"] if c.fused_qkv else ["attn_q", "attn_k", "attn_v"]
            gu = ["ffn_up"] if c.fused_gate_up else ["ffn_gate", "ffn_up"]
            self.layers.append(
                _Layer(
                    attn_norm=mf.dequantize(b + "attn_norm.weight"),
                    ffn_norm=mf.dequantize(b + "ffn_norm.weight"),
                    qkv=[_matrix(mf, f"{b}{n}.weight", i8) for n in qkv],
                    out=_matrix(mf, b + "attn_output.weight", i8),
                    gate_up=[_matrix(mf, f"{b}{n}.weight", i8) for n in gu],
                    down=_matrix(mf, b + "ffn_down.weight", i8),
                )
            )
        for i, layer in enumerate(self.layers):
            for name, w in (("attn_norm", layer.attn_norm), ("ffn_norm", layer.ffn_norm)):
                if not np.isfinite(w).all():
                    from phimlx.errors import GGUFError

                    raise GGUFError(
                        f"{mf.path}: tensor 'blk.{i}.{name}.weight' contains NaN "
                        "or Inf; the file is corrupt"
                    )
        self.weight_bytes = sum(m.nbytes for m in self._matrices())
        self.attn_scale = np.float32(1.0 / np.sqrt(c.head_dim))
        # the norm after each layer's residual add: the next layer's, then the output's
        self.next_norms = [layer.attn_norm for layer in self.layers[1:]] + [self.output_norm]

    def _matrices(self) -> list[QuantMatrix]:
        mats = [self.embed] if self.output is self.embed else [self.embed, self.output]
        for layer in self.layers:
            mats += [*layer.qkv, layer.out, *layer.gate_up, layer.down]
        return mats

    def new_session(self, max_context: int | None = None) -> NumpySession:
        """A fresh KV cache for up to ``max_context`` tokens (default: the model's context)."""
        return NumpySession(self, max_context or self.config.context_length)

    def close(self) -> None:
        self.layers = []
        self.file.close()


class NumpySession:
    """KV cache and position of one sequence (implements `phimlx.backends.Session`)."""

    def __init__(self, model: NumpyModel, max_context: int):
        c = model.config
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        self.model = model
        self.max_context = max_context
        self._pos = 0
        self._cap = 0
        # (layers, KV, capacity, D), grown on demand so memory follows the tokens held.
        self._k = np.zeros((c.n_layers, c.n_kv_heads, 0, c.head_dim), np.float32)
        self._v = np.zeros_like(self._k)
        inv_freq = c.rope_inv_freq(max_context).astype(np.float64)
        self._inv_freq = inv_freq  # (rope_dim / 2,)

    @property
    def position(self) -> int:
        return self._pos

    def reset(self) -> None:
        self._pos = 0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = checked_tokens(token_ids, self._pos, self.max_context, self.model.config)
        logits = None
        for start in range(0, ids.size, PREFILL_CHUNK):
            logits = self._forward(ids[start : start + PREFILL_CHUNK])
        return logits

    def step(self, token_id: int) -> np.ndarray:
        ids = checked_tokens([token_id], self._pos, self.max_context, self.model.config)
        c = self.model.config
        if ops.FUSED_DECODE and (self._pos + 1) * c.n_heads * c.head_dim <= ops.LOOP_ATTENTION_MAX:
            return self._forward_token(ids)
        return self._forward(ids)

    def _ensure_capacity(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_context, -(-n // _CACHE_GROW) * _CACHE_GROW)
        shape = (*self._k.shape[:2], cap, self._k.shape[3])
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        k[:, :, : self._pos] = self._k[:, :, : self._pos]
        v[:, :, : self._pos] = self._v[:, :, : self._pos]
        self._k, self._v, self._cap = k, v, cap
        # cos/sin (cap, rope_dim/2) of every position the cache can hold, LongRoPE's
        # attention factor applied; angles in float64 so far positions stay exact
        ang = np.arange(cap, dtype=np.float64)[:, None] * self._inv_freq[None, :]
        f = self.model.config.rope_attn_factor
        self._cos = (np.cos(ang) * f).astype(np.float32)
        self._sin = (np.sin(ang) * f).astype(np.float32)

    def _forward_token(self, ids: np.ndarray) -> np.ndarray:
        """`_forward` for one token over a short cache, as four compiled calls per layer
        around the matrices (a small model's step is otherwise dominated by glue)."""
        m, c = self.model, self.model.config
        p0 = self._pos
        self._ensure_capacity(p0 + 1)
        cos, sin = self._cos[p0 : p0 + 1], self._sin[p0 : p0 + 1]
        neox, window, scale = c.rope_style == "neox", c.sliding_window or 0, m.attn_scale
        heads, eps, ffn = c.n_heads, c.norm_eps, c.ffn_size
        attend, add_norm, silu_mul = ops.attend_token, ops.add_rms_norm, ops.silu_mul
        x = m.embed.take_rows(ids)[0]  # (hidden,), a fresh array: the residual stream
        h = ops.rms_norm(x[None], m.layers[0].attn_norm, eps)[0]
        for layer, kc, vc, nxt in zip(m.layers, self._k, self._v, m.next_norms, strict=True):
            qkv = layer.qkv_mv(h)  # ((H + 2 KV) * D,)
            att = attend(qkv, cos, sin, neox, kc, vc, p0, window, scale, heads)
            h = add_norm(x, layer.out_mv(att), layer.ffn_norm, eps)
            act = silu_mul(layer.gate_up_mv(h)[None], ffn)[0]
            h = add_norm(x, layer.down_mv(act), nxt, eps)  # nxt: next layer's attn_norm
        self._pos = p0 + 1
        return m.output_mv(h)

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        m, c = self.model, self.model.config
        T, p0 = ids.size, self._pos
        P = p0 + T
        H, KV, D = c.n_heads, c.n_kv_heads, c.head_dim
        self._ensure_capacity(P)
        cos, sin = self._cos[p0:P], self._sin[p0:P]
        neox = c.rope_style == "neox"
        window = c.sliding_window or 0
        scale = m.attn_scale
        single = T == 1
        x = m.embed.take_rows(ids)  # (T, hidden)
        for li, layer in enumerate(m.layers):
            h = ops.rms_norm(x, layer.attn_norm, c.norm_eps)
            qkv = _project(layer.qkv, h[0] if single else h).reshape(T, -1)  # (T, (H+2KV)*D)
            q = qkv[:, : H * D].reshape(T, H, D)
            k = qkv[:, H * D : (H + KV) * D].reshape(T, KV, D)
            v = qkv[:, (H + KV) * D :].reshape(T, KV, D)
            ops.rope(q, cos, sin, neox)
            ops.rope(k, cos, sin, neox)
            kc, vc = self._k[li], self._v[li]  # (KV, cap, D)
            kc[:, p0:P] = k.transpose(1, 0, 2)
            vc[:, p0:P] = v.transpose(1, 0, 2)
            att = ops.attention(q, kc, vc, p0, window, scale)  # (T, H*D)
            x += layer.out.matvec(att[0])[None] if single else layer.out.matmul(att)
            h = ops.rms_norm(x, layer.ffn_norm, c.norm_eps)
            gu = _project(layer.gate_up, h[0] if single else h).reshape(T, -1)
            act = ops.silu_mul(gu, c.ffn_size)  # (T, ffn)
            x += layer.down.matvec(act[0])[None] if single else layer.down.matmul(act)
        self._pos = P
        last = ops.rms_norm(x[-1:], m.output_norm, c.norm_eps)[0]
        return m.output.matvec(last).astype(np.float32, copy=False)
