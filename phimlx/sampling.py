"""Sampling as small pure functions over a logits vector, composed by `Sampler`.

Order (as Candle's Phi-3 example and transformers do it): repeat penalty -> temperature -> top-k ->
top-p -> min-p -> draw.  Temperature 0 means argmax (after the repeat penalty).  Filters
set excluded logits to -inf and never remove the most likely token.

The repeat penalty follows Candle's Phi-3 example: over the last ``repeat_last_n``
*generated* tokens, each distinct token's positive logit is divided by the penalty and a
negative one multiplied (llama.cpp's rule too; llama.cpp also counts prompt tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings; ``None`` turns a filter off.  Invalid values raise `ValueError`."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: object, rule: str) -> ValueError:
            return ValueError(f"{name}={value!r} is invalid: {rule}")

        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", t, "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", self.top_k, "must be an integer >= 1, or None for no limit")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1], or None to disable")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise bad("min_p", self.min_p, "must be in [0, 1], or None to disable")
        rp = self.repeat_penalty
        if not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise bad("repeat_penalty", rp, "must be a finite number > 0 (1 = off)")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise bad("repeat_last_n", self.repeat_last_n, "must be an integer >= 0")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", self.seed, "must be a non-negative integer or None")


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Penalize each distinct token in ``recent``: positive logits / penalty, negative * it."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the boundary are all kept)."""
    if k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    p = np.exp(z)
    return p / p.sum()


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= ``p``."""
    if p >= 1.0:
        return logits
    probs = _softmax(logits)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    # Keep tokens whose preceding mass is < p: the first token is always kept.
    keep_sorted = (cum - probs[order]) < p
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max) >= min_p  <=>  l_i >= l_max + ln(min_p)
    threshold = np.max(logits) + math.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf)


class Sampler:
    """Draws the next token from logits with `SamplingParams`; seeded, so reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, generated: Sequence[int] = ()) -> int:
        """Pick a token id given the logits and the tokens generated so far."""
        p = self.params
        x = np.asarray(logits, dtype=np.float32)
        if p.repeat_last_n and p.repeat_penalty != 1.0:
            x = apply_repeat_penalty(x, generated[-p.repeat_last_n :], p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(x))
        x = x / np.float32(p.temperature)
        if p.top_k is not None:
            x = apply_top_k(x, p.top_k)
        if p.top_p is not None:
            x = apply_top_p(x, p.top_p)
        if p.min_p is not None:
            x = apply_min_p(x, p.min_p)
        cdf = np.cumsum(_softmax(x))
        return int(
            min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), cdf.size - 1)
        )
