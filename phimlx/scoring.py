"""Scoring a text: per-token log-probabilities, perplexity, and the KL divergence between two
ways of computing the same model (int8 against float activations), as ``llama-perplexity``
reports them.

A text is scored in windows of ``context`` tokens, llama.cpp's way: a text that fits in one
window has every token after the first scored; a longer one is cut into windows of
``context`` tokens, each starting with BOS in place of its first token, and only the second
half of each window is scored (so every scored token sees at least ``context / 2`` tokens
before it).  Each window is one prefill that returns the logits of every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Score:
    """Log-probabilities of a text's tokens under the model.

    Attributes:
        tokens: the scored text's ids (BOS first where the tokenizer adds one).
        positions: the index in ``tokens`` of each scored token.
        logprobs: float64 log-probability of ``tokens[positions[i]]`` given the tokens
            before it (in its window).
    """

    tokens: list[int]
    positions: np.ndarray
    logprobs: np.ndarray

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return float(-self.logprobs.mean()) if self.logprobs.size else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(nll)``."""
        return math.exp(self.nll) if self.logprobs.size else math.nan


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def windows(n: int, context: int, bos: int | None) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, first_scored)`` of each window over ``n`` tokens (module docstring);
    tokens ``start:stop`` are evaluated and those from ``first_scored`` on are scored."""
    if n <= context:
        yield 0, n, 1
        return
    for start in range(0, n - context + 1, context):
        yield start, start + context, start + context // 2


def score_ids(
    ids: Sequence[int],
    all_logits: Callable[[list[int]], np.ndarray],
    *,
    context: int,
    bos: int | None,
    reference: Callable[[list[int]], np.ndarray] | None = None,
) -> tuple[Score, dict[str, float] | None]:
    """Score ``ids``; with ``reference`` (another `all_logits`), also the KL divergence of
    ``all_logits``' distribution from the reference's at each scored position.

    Args:
        ids: the text's ids.
        all_logits: ids -> float32 logits (len(ids), vocab) from a fresh session.
        context: the window length.
        bos: the id put first in each window after the first (None: keep the token).
        reference: the distribution to compare with (e.g. float activations).

    Returns:
        The `Score`, and with ``reference``: ``{"kld_mean", "kld_max", "kld_p99",
        "same_top"}`` (KL(reference || model) in nats; the fraction of positions where both
        put the same token first; ``"reference_ppl"``).
    """
    ids = [int(t) for t in ids]
    positions: list[np.ndarray] = []
    lps: list[np.ndarray] = []
    klds: list[np.ndarray] = []
    same: list[np.ndarray] = []
    ref_lps: list[np.ndarray] = []
    for start, stop, first in windows(len(ids), context, bos):
        window = ids[start:stop]
        if start and bos is not None:
            window[0] = bos
        pred = slice(first - start - 1, stop - start - 1)  # logits predicting first..stop-1
        target = np.asarray(ids[first:stop])
        lp = log_softmax(all_logits(window)[pred])
        positions.append(np.arange(first, stop))
        lps.append(lp[np.arange(target.size), target])
        if reference is not None:
            ref = log_softmax(reference(window)[pred])
            klds.append((np.exp(ref) * (ref - lp)).sum(axis=-1))
            same.append(ref.argmax(axis=-1) == lp.argmax(axis=-1))
            ref_lps.append(ref[np.arange(target.size), target])
    score = Score(ids, np.concatenate(positions), np.concatenate(lps))
    if reference is None:
        return score, None
    kld = np.concatenate(klds)
    return score, {
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "same_top": float(np.concatenate(same).mean()),
        "reference_ppl": math.exp(-float(np.concatenate(ref_lps).mean())),
    }
