"""Sampling as small pure functions over a logits vector, composed by `Sampler`.

Order: the logits processors (``logit_bias`` -> repeat penalty -> presence and frequency
penalties -> the caller's ``logits_processors`` -> a grammar's token mask), then temperature ->
top-k -> top-p -> min-p -> draw (the filters in Candle's Phi-3 example's and transformers'
order; llama.cpp's chain also applies the bias and the penalties before the temperature).
Temperature 0 means argmax (after the processors).  Filters set excluded logits to -inf and
never remove the most likely token.

The presence and frequency penalties are OpenAI's: ``logit[j] -= frequency_penalty * c[j] +
presence_penalty * (c[j] > 0)`` with ``c[j]`` the count of token ``j`` among the tokens
generated so far (not the prompt's, as OpenAI and vLLM count them).

The repeat penalty follows Candle's Phi-3 example: over the last ``repeat_last_n``
*generated* tokens, each distinct token's positive logit is divided by the penalty and a
negative one multiplied (llama.cpp's rule too; llama.cpp also counts prompt tokens).

What the filters keep (the definition: `filtered_probs` and the sampler compute exactly this,
and the tests compare it with a full sort):

- ``x`` is the float32 logits after the temperature; probabilities are ``exp(x - max) / sum``
  in float64 over the tokens still in play (after top-k: the top-k set), the sum taken over
  the vocabulary in id order (np.sum);
- top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all kept);
- top-p orders the tokens by logit, highest first, and equal logits by id, lowest first (the
  "top-p order"), and keeps the shortest prefix whose running sum of probabilities (float64,
  added one by one in that order) reaches ``p``: of equal logits at the boundary, the lower
  ids are kept;
- min-p keeps the tokens whose logit is >= ``max + ln(min_p)`` (rounded to float32);
- the draw takes one uniform number ``u`` per token and returns the first kept token at which
  the running sum of the kept probabilities exceeds ``u`` times their total: kept tokens
  taken in top-p order when top-p is on, in id order otherwise.

Nothing sorts the vocabulary's indices (issue 13): top-k is a partition; top-p partitions off
the most likely candidates (as many as four times the distribution's estimated participation
ratio; eight times more while their mass falls short of ``p``) and sorts only those, or, on a
flat distribution, where most of the vocabulary is kept anyway, sorts the logits' values and
finds a drawn token's id from its rank.  Long running sums are taken by blocks of 256; where
one lands within its rounding bound of ``p``, the definition's own sequential sum decides, so
the kept set is the definition's, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A caller's logits processor: (tokens generated so far, logits [vocab]) -> logits [vocab].
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    logits_processors: Sequence[LogitsProcessor] = field(default=())

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, v, "must be a finite number (0 = off; OpenAI allows -2 to 2)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise bad("logit_bias", self.logit_bias, "must be a mapping token id -> bias")
            for k, v in self.logit_bias.items():
                if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                    raise bad("logit_bias", self.logit_bias, f"key {k!r} is not a token id")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                    raise bad("logit_bias", self.logit_bias, f"bias {v!r} is not a number")
                if v == math.inf:
                    raise bad("logit_bias", self.logit_bias, "a bias of +inf; use a large one")
        procs = self.logits_processors
        if not isinstance(procs, Sequence) or not all(callable(f) for f in procs):
            raise bad("logits_processors", procs, "must be a list of f(tokens, logits) -> logits")

    @property
    def processes(self) -> bool:
        """Whether any processor besides the repeat penalty changes the logits."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or self.logits_processors
        )


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Penalize each distinct token in ``recent``: positive logits / penalty, negative * it."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    out[ids] = _penalized(out[ids], penalty)
    return out


def apply_presence_frequency(
    logits: np.ndarray, generated: Sequence[int], presence: float, frequency: float
) -> np.ndarray:
    """OpenAI's penalties: ``logit[j] -= frequency * count[j] + presence * (count[j] > 0)``
    over the tokens in ``generated``; a new array (the input is not changed)."""
    if (presence == 0 and frequency == 0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    out = logits.copy()
    out[ids] -= (frequency * counts + presence).astype(out.dtype)
    return out


def apply_logit_bias(logits: np.ndarray, bias: Mapping[int, float]) -> np.ndarray:
    """Add ``bias[j]`` to ``logit[j]`` (``-inf`` bans a token); a new array.

    Raises:
        ValueError: a token id outside the vocabulary.
    """
    if not bias:
        return logits
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    if ids.min() < 0 or ids.max() >= logits.size:
        bad = int(ids[(ids < 0) | (ids >= logits.size)][0])
        raise ValueError(
            f"logit_bias names token {bad}, outside the vocabulary of {logits.size} tokens"
        )
    out = logits.copy()
    out[ids] += np.fromiter(bias.values(), dtype=np.float64, count=len(bias)).astype(out.dtype)
    return out


def _penalized(vals: np.ndarray, penalty: float) -> np.ndarray:
    return np.where(vals > 0, vals / penalty, vals * penalty)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the boundary are all kept)."""
    if k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= ``p``
    (equal logits at the boundary: lower ids first; see the module docstring)."""
    if p >= 1.0:
        return logits
    x = np.asarray(logits)
    m = x.max()
    keep = np.zeros(x.size, dtype=bool)
    keep[_top_p(x, m, p, lambda: float(_weights(x, m).sum()), None).ids()] = True
    return np.where(keep.reshape(x.shape), logits, -np.inf)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max) >= min_p  <=>  l_i >= l_max + ln(min_p)
    threshold = np.max(logits) + math.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf)


def filtered_probs(
    logits: np.ndarray,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The distribution the sampler draws from: top-k, then top-p, then min-p over ``logits``
    (temperature already applied), renormalised.

    Args:
        logits: float logits [vocab]; computed in float32, as the sampler does.
        top_k, top_p, min_p: as in `SamplingParams` (None = off).

    Returns:
        ``(ids, probs)``: the kept token ids in increasing order (int64) and their float64
        probabilities, summing to 1.

    Raises:
        ValueError: a filter value `SamplingParams` rejects.
    """
    SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)  # validates
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    ids = _select(x, top_k, top_p, min_p, None).ids()
    ids = ids[np.isfinite(x[ids])]
    w = _weights(x[ids], x.max())
    return ids, w / w.sum()


# -- the filters without a full sort ---------------------------------------------------------


_EPS = 2.0**-53  # float64 unit roundoff
_SEQUENTIAL = 2048  # running sums up to this length are one np.cumsum
_BLOCK = 256  # longer ones: block sums first, then one block's running sum
_FIRST = 64  # fewest top-p candidates tried


class _Scratch:
    """Arrays kept from one token to the next: a fresh array of a vocabulary's float64s is
    past malloc's mmap threshold, and its page faults cost about as much as the sampling."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: type) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.size != n or a.dtype != dtype:
            a = self._arrays[name] = np.empty(n, dtype)
        return a


def _buffer(scratch: _Scratch | None, name: str, n: int, dtype: Any) -> np.ndarray | None:
    return None if scratch is None else scratch.get(name, n, dtype)


def _weights(x: np.ndarray, m: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``exp(x - m)`` in float64: unnormalised probabilities (the largest is 1)."""
    out = np.subtract(x, np.float64(m), out=out, dtype=np.float64)
    return np.exp(out, out=out)


class _Kept:
    """The tokens the filters keep: their weights ``exp(x - max)`` in draw order, and ids."""

    def __init__(self, weights: np.ndarray, ids: np.ndarray | None) -> None:
        self.weights = weights  # float64, in draw order
        self._ids = ids  # in draw order; None: every token, in id order

    def id_at(self, r: int) -> int:
        """The id of the ``r``-th kept token in draw order."""
        return r if self._ids is None else int(self._ids[r])

    def ids(self) -> np.ndarray:
        """Every kept id, increasing."""
        return np.arange(self.weights.size) if self._ids is None else np.sort(self._ids)


class _Ranked(_Kept):
    """Top-p's kept tokens: the first ``count`` in top-p order (logits descending, then ids).

    ``neg`` holds minus the logits in that order (ascending); ``ids`` their ids, or None
    where every logit was sorted (values, not indices): an id is then found from its rank.
    """

    def __init__(
        self,
        weights: np.ndarray,
        neg: np.ndarray,
        count: int,
        ids: np.ndarray | None,
        xv: np.ndarray,
    ) -> None:
        super().__init__(weights[:count], ids)
        self.neg, self.count, self.xv = neg, count, xv
        self.base: np.ndarray | None = None  # ids of xv's positions, where xv is a subset

    def trim(self, floor: Any) -> None:
        """Keep only logits >= ``floor`` too (min-p, top-k): a shorter prefix."""
        self.count = min(self.count, int(np.searchsorted(self.neg[: self.count], -floor, "right")))
        self.weights = self.weights[: self.count]

    def _id(self, pos: Any) -> Any:
        return pos if self.base is None else self.base[pos]

    def id_at(self, r: int) -> int:
        if self._ids is not None:
            return int(self._id(self._ids[r]))
        nv = self.neg[r]  # the r-th logit is -nv; ranks of equal logits go by id
        first = int(np.searchsorted(self.neg, nv, "left"))
        return int(self._id(np.flatnonzero(self.xv == -nv)[r - first]))

    def ids(self) -> np.ndarray:
        if self._ids is not None:
            return np.sort(self._id(self._ids[: self.count]))
        nv = self.neg[self.count - 1]
        above = int(np.searchsorted(self.neg, nv, "left"))
        ties = int(np.searchsorted(self.neg, nv, "right")) - above
        if self.count - above == ties:
            return self._id(np.flatnonzero(self.xv >= -nv))
        keep = self.xv > -nv
        keep[np.flatnonzero(self.xv == -nv)[: self.count - above]] = True
        return self._id(np.flatnonzero(keep))


def _select(
    x: np.ndarray,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    scratch: _Scratch | None,
) -> _Kept:
    """Top-k, then top-p, then min-p over float32 logits ``x`` (the module docstring's rules)."""
    n = x.size
    m = x.max()
    lo = m + math.log(min_p) if min_p is not None and min_p > 0 else None  # as apply_min_p
    vk = np.partition(x, n - top_k)[n - top_k] if top_k is not None and top_k < n else None
    floor = max((c for c in (vk, lo) if c is not None), default=None)
    if top_p is None or top_p >= 1.0:
        if floor is None:
            return _Kept(_weights(x, m, _buffer(scratch, "e", n, np.float64)), None)
        ids = np.flatnonzero(x >= floor)
        return _Kept(_weights(x[ids], m), ids)
    if vk is not None and 16 * top_k <= n:
        # A short top-k list: top-p among its tokens, normalised over them.
        base = np.flatnonzero(x >= vk)
        xs = x[base]

        def exact_total() -> float:  # the definition's sum: over the vocabulary, in id order
            full = np.zeros(n)
            full[base] = _weights(xs, m)
            return float(full.sum())

        kept = _top_p(xs, m, top_p, exact_total, None)
        kept.base = base
    else:
        xv = x if vk is None else np.where(x >= vk, x, -np.inf).astype(x.dtype)
        buf = _buffer(scratch, "e", n, np.float64)
        kept = _top_p(xv, m, top_p, lambda: float(_weights(xv, m, buf).sum()), scratch)
    if floor is not None:  # min-p, and top-k where top-p kept weightless tokens past it
        kept.trim(floor)
    return kept


def _spread(x: np.ndarray, m: Any) -> int:
    """Roughly how many tokens carry the probability mass: the participation ratio
    ``sum(e)^2 / sum(e^2)`` of ``e = exp(x - m)``, estimated from every k-th token and the
    top one (only a first guess at how many candidates top-p needs)."""
    step = max(1, x.size // 256)
    e = _weights(x[::step], m)
    # einsum, not np.dot: BLAS can wait milliseconds for its threads on busy cores
    s1, s2 = step * float(e.sum()), step * float(np.einsum("i,i->", e, e))
    return int((1.0 + s1) ** 2 / (1.0 + s2))


def _top_p(
    xv: np.ndarray,
    m: Any,
    p: float,
    exact_total: Callable[[], float],
    scratch: _Scratch | None,
) -> _Ranked:
    """Top-p over logits ``xv`` (``m`` their max): the module docstring's set, exactly.

    ``exact_total()`` is the definition's normaliser, the sum of ``exp(x - m)`` over the
    vocabulary in id order: computed where candidates leave the vocabulary's mass unknown, and
    where a fast running sum lands too close to ``p`` to decide.
    """
    size = xv.size
    c = max(_FIRST, 4 * _spread(xv, m))
    total: float | None = None
    while True:
        full = 4 * c >= size
        if full:  # most of the vocabulary: sort the values (not their indices), all of them
            neg = _buffer(scratch, "neg", size, xv.dtype)
            neg = np.negative(xv, out=neg)
            neg.sort()  # (size,) minus the logits, ascending: top-p order
            ids = None
            tot = None
        else:  # the c most likely, in top-p order
            if total is None:
                total = exact_total()
            cand = np.argpartition(xv, size - c)[size - c :]
            neg = -xv[cand]
            order = np.lexsort((cand, neg))
            ids, neg = cand[order], neg[order]  # (c,)
            tot = total
        # exp(x - m) computed as exp(-m - (-x)): the same float64 operation, so the same bits
        s = _buffer(scratch, "s", size, np.float64) if full else None
        s = np.exp(np.subtract(np.float64(-m), neg, out=s, dtype=np.float64), out=s)
        j, before, at, whole, tot = _crossing(s, p, tot)
        need = p * tot
        # The fast sums here and the definition's sequential sum of probabilities are each
        # within ~size roundings of the exact sum: closer to p than this, the latter decides.
        tol = (6 * size + 64) * _EPS * tot
        if not full and whole < need + tol:
            c *= 8  # the candidates' mass may fall short of p: widen
            continue
        if j == s.size or at - need <= tol or need - before <= tol:
            if total is None:
                total = exact_total()
            cum = np.cumsum(s / total)
            j = int(np.searchsorted(cum, p, "left"))
            if j == s.size:
                if not full:
                    c *= 8
                    continue
                j = s.size - 1  # the vocabulary's sum falls short of p by rounding: keep all
        break
    if ids is not None and neg[j] == neg[-1]:
        # The boundary logit may have equals outside the candidates: of all of them, the
        # lowest ids are kept.
        above = int(np.searchsorted(neg, neg[j], "left"))
        ties = np.flatnonzero(xv == -neg[j])[: j + 1 - above]
        ids = np.concatenate([ids[:above], ties])
    return _Ranked(s, neg, j + 1, ids, xv)


def _crossing(
    s: np.ndarray, p: float, total: float | None
) -> tuple[int, float, float, float, float]:
    """Where the running sum of weights ``s`` first reaches ``p * total`` (``total``: the sum
    of ``s`` where None): ``(j, sum before j, sum through j, sum of s, total)``, ``j = s.size``
    where it never does.  Long arrays are summed by blocks, within ``2 * s.size`` roundings
    of the sequential sum."""
    size = s.size
    if size <= _SEQUENTIAL:
        cum = np.cumsum(s)
        tot = float(cum[-1]) if total is None else total
        j = int(np.searchsorted(cum, p * tot, "left"))
        if j == size:
            return size, cum[-1], cum[-1], cum[-1], tot
        return j, (cum[j - 1] if j else 0.0), cum[j], cum[-1], tot
    blocks = np.cumsum(np.add.reduceat(s, np.arange(0, size, _BLOCK)))
    tot = float(blocks[-1]) if total is None else total
    b = int(np.searchsorted(blocks, p * tot, "left"))
    if b == blocks.size:
        return size, blocks[-1], blocks[-1], blocks[-1], tot
    before = blocks[b - 1] if b else 0.0
    cum = before + np.cumsum(s[b * _BLOCK : (b + 1) * _BLOCK])
    i = min(int(np.searchsorted(cum, p * tot, "left")), cum.size - 1)
    return b * _BLOCK + i, (cum[i - 1] if i else before), cum[i], blocks[-1], tot


def _draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF: the first index where the running sum of weights ``w`` exceeds ``u``
    times their sum (``0 <= u < 1``); never an index of weight 0."""
    size = w.size
    if size <= _SEQUENTIAL:
        cdf = np.cumsum(w)
        i = int(np.searchsorted(cdf, u * cdf[-1], "right"))
    else:
        blocks = np.cumsum(np.add.reduceat(w, np.arange(0, size, _BLOCK)))
        t = u * blocks[-1]
        b = min(int(np.searchsorted(blocks, t, "right")), blocks.size - 1)
        cdf = (blocks[b - 1] if b else 0.0) + np.cumsum(w[b * _BLOCK : (b + 1) * _BLOCK])
        i = b * _BLOCK + int(np.searchsorted(cdf, t, "right"))
    if i >= size or not w[i] > 0:  # rounding at the very end: the nearest token with weight
        nz = np.flatnonzero(w > 0)
        i = int(nz[min(int(np.searchsorted(nz, i)), nz.size - 1)])
    return i


class Sampler:
    """Draws the next token from logits with `SamplingParams`; seeded, so reproducible.

    ``mask``: called with the processed logits (a float32 array the sampler owns) to set
    the tokens a grammar forbids to -inf, in place (`phimlx.constrain`)."""

    def __init__(
        self, params: SamplingParams, mask: Callable[[np.ndarray], None] | None = None
    ) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._mask = mask
        self._scratch = _Scratch()

    def process(self, logits: np.ndarray, generated: Sequence[int] = ()) -> np.ndarray:
        """The logits processors of the module docstring, in order, before the temperature
        (a new float32 array; ``logits`` is not changed)."""
        p = self.params
        x = np.array(logits, dtype=np.float32)  # a copy
        if p.logit_bias:
            x = apply_logit_bias(x, p.logit_bias)
        if p.repeat_last_n and p.repeat_penalty != 1.0:
            x = apply_repeat_penalty(x, generated[-p.repeat_last_n :], p.repeat_penalty)
        x = apply_presence_frequency(x, generated, p.presence_penalty, p.frequency_penalty)
        for f in p.logits_processors:
            y = np.asarray(f(list(generated), x), dtype=np.float32)
            if y.shape != x.shape:
                raise ValueError(f"logits processor {f!r} returned shape {y.shape}, not {x.shape}")
            x = np.array(y, dtype=np.float32)
        if self._mask is not None:
            self._mask(x)
        return x

    def __call__(self, logits: np.ndarray, generated: Sequence[int] = ()) -> int:
        """Pick a token id given the logits and the tokens generated so far."""
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # see _pick
            return self._pick(logits, generated)

    def _pick(self, logits: np.ndarray, generated: Sequence[int]) -> int:
        p = self.params
        if p.processes or self._mask is not None:
            x = self.process(logits, generated)
            if not np.isfinite(x.max()):
                raise ValueError(
                    "every token is excluded (a logit_bias of -inf or a logits processor "
                    "removed them all, or a grammar allows no token)"
                )
            if p.temperature == 0:
                return int(np.argmax(x))
            greedy = int(np.argmax(x))
            out = np.divide(x, np.float32(p.temperature), out=x)
        else:  # the repeat penalty alone: fused with the temperature, no copy of the logits
            x = np.asarray(logits, dtype=np.float32)
            recent = (
                generated[-p.repeat_last_n :] if p.repeat_last_n and p.repeat_penalty != 1.0 else ()
            )
            if p.temperature == 0:
                if len(recent):
                    x = apply_repeat_penalty(x, recent, p.repeat_penalty)
                return int(np.argmax(x))
            t = np.float32(p.temperature)
            out = np.divide(x, t, out=self._scratch.get("x", x.size, np.float32))
            if len(recent):  # apply_repeat_penalty then the temperature, without copying
                ids = np.unique(np.asarray(recent, dtype=np.int64))
                out[ids] = _penalized(x[ids], p.repeat_penalty) / t
            greedy = -1
        if not np.isfinite(out.max()):  # a temperature (or penalty) so small that the logits
            # overflowed float32: the distribution is the limit, all mass on the argmax
            if greedy < 0:
                recent = generated[-p.repeat_last_n :] if p.repeat_last_n else ()
                greedy = int(np.argmax(apply_repeat_penalty(x, recent, p.repeat_penalty)))
            return greedy
        kept = _select(out, p.top_k, p.top_p, p.min_p, self._scratch)
        return kept.id_at(_draw(kept.weights, self.rng.random()))


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Log-probabilities under the model's own distribution (``log_softmax(logits)`` in
    float64, before any processor, temperature or filter, as OpenAI and vLLM report them).

    Returns:
        ``(logprob of token, top ids, their logprobs)``: the ``k`` most likely ids, most
        likely first (equal logits: lower id first).
    """
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    lse = m + math.log(float(np.exp(x - m).sum()))
    k = min(k, x.size)
    if k <= 0:
        top = np.empty(0, np.int64)
    else:
        part = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        top = part[np.lexsort((part, -x[part]))]
    return float(x[token] - lse), top, x[top] - lse
