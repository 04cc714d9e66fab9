"""The partial-selection filters (issue 13) against a full sort written out here: the same
kept set, bit for bit, and the same renormalised probabilities, over many random logit
vectors (ties, -inf, flat and peaked), every filter's edge values; seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phimlx.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repeat_penalty,
    apply_top_k,
    apply_top_p,
    filtered_probs,
)


def reference(
    logits: np.ndarray,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The definition (sampling's module docstring), by sorting the whole vocabulary."""
    x = np.asarray(logits, dtype=np.float32)
    n = x.size
    alive = np.isfinite(x)
    if top_k is not None and top_k < n:
        kth = np.sort(x)[::-1][top_k - 1]
        alive &= x >= kth
    if top_p is not None and top_p < 1.0:
        z = np.where(alive, x, -np.inf).astype(np.float64)
        e = np.exp(z - z.max())
        probs = e / e.sum()
        order = np.lexsort((np.arange(n), -np.where(alive, x, -np.inf)))  # logit desc, id asc
        cum = np.cumsum(probs[order])
        count = min(int(np.searchsorted(cum, top_p, side="left")) + 1, n)
        in_top_p = np.zeros(n, dtype=bool)
        in_top_p[order[:count]] = True
        alive &= in_top_p
    if min_p is not None and min_p > 0:
        alive &= x >= x.max() + math.log(min_p)
    ids = np.flatnonzero(alive)
    w = np.exp(x[ids].astype(np.float64) - float(x.max()))
    return ids, w / w.sum()


def logit_vectors(seed: int = 0):
    """(name, logits): sizes across every code path, flat to peaked, with ties and -inf."""
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 100, 1000, 5000, 33000):
        for scale in (0.05, 1.0, 4.0, 30.0):
            yield f"normal n={n} scale={scale}", (rng.standard_normal(n) * scale).astype(np.float32)
        ties = rng.integers(-3, 3, n).astype(np.float32)  # a few values, each many times
        yield f"ties n={n}", ties
        peaked = rng.standard_normal(n).astype(np.float32)
        peaked[rng.integers(n)] += 12
        yield f"peaked n={n}", peaked
        if n > 2:
            holes = rng.standard_normal(n).astype(np.float32)
            holes[rng.random(n) < 0.3] = -np.inf
            holes[0] = 1.0  # at least one finite
            yield f"-inf n={n}", holes
    yield "uniform 10", np.zeros(10, np.float32)  # running sums 0.1, 0.2, ...: rounding at p
    yield "uniform 33000", np.zeros(33000, np.float32)
    big_ties = np.zeros(20000, np.float32)  # two peaks, then 19998 equal logits
    big_ties[[5000, 15000]] = 4.0
    yield "two peaks on a plateau", big_ties
    halves = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])).astype(np.float32)
    yield "halves", halves


TOP_P = (None, 1e-12, 0.1, 0.5, 0.75, 0.9, 0.95, 0.999999, 1 - 2**-52, 1.0)
TOP_K = (None, 1, 3, 40, 2000)
MIN_P = (None, 0.0, 0.05, 0.5, 1.0)


@pytest.mark.parametrize("name, logits", list(logit_vectors()), ids=lambda v: str(v)[:40])
def test_kept_set_and_probabilities_match_a_full_sort(name: str, logits: np.ndarray) -> None:
    rng = np.random.default_rng(len(name))
    n = logits.size
    settings = [dict(top_p=p) for p in TOP_P]
    settings += [dict(top_k=k) for k in (*TOP_K, n - 1, n, n + 5) if k is None or k >= 1]
    settings += [dict(min_p=m) for m in MIN_P]
    for _ in range(12):  # combinations
        settings.append(
            dict(
                top_k=TOP_K[rng.integers(len(TOP_K))],
                top_p=TOP_P[rng.integers(len(TOP_P))],
                min_p=MIN_P[rng.integers(len(MIN_P))],
            )
        )
    for kw in settings:
        ids, probs = filtered_probs(logits, **kw)
        want_ids, want_probs = reference(logits, **kw)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{name} {kw}")
        np.testing.assert_allclose(probs, want_probs, rtol=1e-12, atol=0, err_msg=f"{name} {kw}")
        assert math.isclose(probs.sum(), 1.0, rel_tol=1e-12)
        assert int(np.argmax(np.where(np.isfinite(logits), logits, -np.inf))) in ids


def test_apply_functions_agree_with_the_reference() -> None:
    rng = np.random.default_rng(3)
    for n in (5, 300, 6000):
        for _ in range(20):
            x = (rng.standard_normal(n) * rng.choice([0.3, 2.0, 8.0])).astype(np.float32)
            p = float(rng.choice([0.05, 0.5, 0.9, 0.99]))
            kept = np.flatnonzero(np.isfinite(apply_top_p(x, p)))
            np.testing.assert_array_equal(kept, reference(x, top_p=p)[0])
            k = int(rng.integers(1, n + 2))
            np.testing.assert_array_equal(
                np.flatnonzero(np.isfinite(apply_top_k(x, k))), reference(x, top_k=k)[0]
            )
            chained = apply_top_p(apply_top_k(x, k), p)  # top-p normalised over the top-k set
            np.testing.assert_array_equal(
                np.flatnonzero(np.isfinite(chained)), reference(x, top_k=k, top_p=p)[0]
            )
            np.testing.assert_array_equal(
                np.flatnonzero(np.isfinite(apply_min_p(x, 0.1))), reference(x, min_p=0.1)[0]
            )


def test_equal_logits_at_the_boundary_keep_the_lower_ids() -> None:
    x = np.zeros(10, np.float32)  # ten tokens of probability 0.1
    assert filtered_probs(x, top_p=0.35)[0].tolist() == [0, 1, 2, 3]
    x = np.zeros(20000, np.float32)  # the boundary in a plateau far wider than the candidates
    x[[7, 19000]] = 5.0
    ids, _ = filtered_probs(x, top_p=0.05)
    assert ids[:3].tolist() == [0, 1, 2] and 7 in ids and 19000 in ids
    assert ids.tolist() == reference(x, top_p=0.05)[0].tolist()


class FixedU:
    """An rng whose draws are given: shows which token a uniform number maps to."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def test_the_draw_order_is_documented() -> None:
    x = np.log(np.array([0.1, 0.6, 0.3])).astype(np.float32)
    plain = Sampler(SamplingParams(temperature=1.0, repeat_penalty=1.0))
    plain.rng = FixedU(0.05)  # type: ignore[assignment]
    assert plain(x) == 0  # id order: token 0 holds [0, 0.1)
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=1 - 1e-9, repeat_penalty=1.0))
    top_p.rng = FixedU(0.05)  # type: ignore[assignment]
    assert top_p(x) == 1  # top-p order: token 1 (0.6) comes first
    top_p.rng = FixedU(0.95)  # type: ignore[assignment]
    assert top_p(x) == 0  # ... and token 0 (0.1) last


@pytest.mark.parametrize(
    "n, kw",
    [
        (50, dict(top_p=0.8)),  # every logit sorted
        (3000, dict(top_p=0.9)),  # flat: sorted values, ids from ranks
        (40000, dict(top_p=0.9)),  # blocked running sums
        (40000, dict()),  # no filter: the whole vocabulary in id order
        (40000, dict(top_k=50, top_p=0.9, min_p=0.02)),
        (40000, dict(min_p=0.2)),
    ],
)
def test_draws_follow_the_kept_distribution(n: int, kw: dict) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    ids, probs = filtered_probs(x, **kw)
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=1.0, seed=5, **kw))
    draws = np.array([s(x) for _ in range(6000)])
    assert np.isin(draws, ids).all()
    # Mass per tenth of the kept ids: drawn frequencies within sampling noise of the probs.
    pos = np.searchsorted(ids, draws)
    edges = np.linspace(0, ids.size, 11).astype(int)
    want = np.add.reduceat(probs, edges[:-1]) if ids.size >= 10 else probs
    got = np.bincount(np.searchsorted(edges[1:], pos, side="right"), minlength=want.size)
    if ids.size < 10:
        got = np.bincount(pos, minlength=ids.size)
    np.testing.assert_allclose(got / draws.size, want, atol=0.03)


def test_seeded_draws_are_reproducible_across_paths_and_sizes() -> None:
    rng = np.random.default_rng(9)
    vectors = [rng.standard_normal(n).astype(np.float32) for n in (32000, 100, 32000, 49152)]
    vectors[2] *= 6  # peaked
    for kw in (dict(top_p=0.9), dict(top_k=40, top_p=0.9, min_p=0.05), dict(min_p=0.1), {}):
        a = Sampler(SamplingParams(temperature=0.8, seed=42, **kw))
        b = Sampler(SamplingParams(temperature=0.8, seed=42, **kw))
        da = [a(v, [1, 2, 3]) for v in vectors * 3]  # sizes change: scratch arrays follow
        db = [b(v, [1, 2, 3]) for v in vectors * 3]
        assert da == db
        c = Sampler(SamplingParams(temperature=0.8, seed=43, **kw))
        assert [c(v, [1, 2, 3]) for v in vectors * 3] != da


def test_logits_are_not_modified() -> None:
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    before = x.copy()
    s = Sampler(SamplingParams(temperature=0.7, top_p=0.9, repeat_penalty=1.3, seed=1))
    for _ in range(3):
        s(x, [1, 2, 3])
    np.testing.assert_array_equal(x, before)


def test_filtered_probs_validates() -> None:
    with pytest.raises(ValueError, match="top_p"):
        filtered_probs(np.zeros(3, np.float32), top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filtered_probs(np.zeros(3, np.float32), top_k=0)


def test_the_repeat_penalty_is_apply_repeat_penalty_then_the_temperature() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(3000) * 3).astype(np.float32)
    gen = [int(i) for i in rng.integers(0, 3000, 200)]
    for kw in (dict(top_p=0.9), {}, dict(top_k=5)):
        fused = Sampler(SamplingParams(temperature=0.7, repeat_penalty=1.3, seed=3, **kw))
        apart = Sampler(SamplingParams(temperature=0.7, repeat_penalty=1.0, seed=3, **kw))
        for step in range(1, 60):
            recent = gen[: step * 3][-64:]
            assert fused(x, gen[: step * 3]) == apart(apply_repeat_penalty(x, recent, 1.3))
    greedy = Sampler(SamplingParams(temperature=0, repeat_penalty=1.3, repeat_last_n=8))
    assert greedy(x, gen) == int(np.argmax(apply_repeat_penalty(x, gen[-8:], 1.3)))
