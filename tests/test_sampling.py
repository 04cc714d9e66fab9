"""Samplers on hand-made distributions."""

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
)

# Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 as logits.
PROBS = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
LOGITS = np.log(PROBS).astype(np.float32)


def kept(x: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.isfinite(x))]


def test_top_k_keeps_k_largest():
    assert kept(apply_top_k(LOGITS, 2)) == [0, 1]
    assert kept(apply_top_k(LOGITS, 10)) == [0, 1, 2, 3, 4]
    # ties at the boundary are kept together
    assert kept(apply_top_k(LOGITS, 4)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "p, expected",
    [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.76, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])],
)
def test_top_p_smallest_set_reaching_p(p, expected):
    assert kept(apply_top_p(LOGITS, p)) == expected


def test_top_p_always_keeps_the_top_token():
    x = np.array([10.0, 0.0, 0.0], np.float32)
    assert kept(apply_top_p(x, 0.01)) == [0]


def test_min_p_relative_to_top_probability():
    # 0.25 / 0.5 = 0.5 >= 0.5 is kept; 0.125 / 0.5 = 0.25 < 0.5 is dropped
    assert kept(apply_min_p(LOGITS, 0.5)) == [0, 1]
    assert kept(apply_min_p(LOGITS, 0.125)) == [0, 1, 2, 3, 4]


def test_repeat_penalty_divides_positive_multiplies_negative():
    x = np.array([2.0, -2.0, 1.0, -1.0], np.float32)
    out = apply_repeat_penalty(x, [0, 1, 1, 1], 2.0)  # repeats count once
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, -1.0])
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, -1.0])  # input untouched


def test_greedy_is_argmax_after_penalty():
    x = np.array([3.0, 2.9, 0.0], np.float32)
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))(x, [0]) == 0
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.1, repeat_last_n=1))
    assert s(x, [0]) == 1  # 3.0 / 1.1 < 2.9
    assert s(x, [0, 2]) == 0  # only the last token counts


def test_sampling_follows_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=1.0, seed=0))
    draws = np.bincount([s(LOGITS) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(draws, PROBS, atol=0.015)


def test_temperature_sharpens():
    s = Sampler(SamplingParams(temperature=0.25, repeat_penalty=1.0, seed=1))
    draws = np.bincount([s(LOGITS) for _ in range(5000)], minlength=5) / 5000
    p = PROBS**4 / (PROBS**4).sum()  # softmax(log p / 0.25)
    np.testing.assert_allclose(draws, p, atol=0.02)


def test_filters_combined_then_renormalized():
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, repeat_penalty=1.0, seed=2))
    draws = np.bincount([s(LOGITS) for _ in range(10000)], minlength=5) / 10000
    # top_k 3 -> {0,1,2}; top_p 0.7 over the full softmax keeps {0,1}: 2/3, 1/3
    np.testing.assert_allclose(draws, [2 / 3, 1 / 3, 0, 0, 0], atol=0.02)


def test_same_seed_same_draws_and_different_seed_differs():
    a = Sampler(SamplingParams(temperature=1.0, seed=42))
    b = Sampler(SamplingParams(temperature=1.0, seed=42))
    c = Sampler(SamplingParams(temperature=1.0, seed=43))
    x = np.zeros(1000, np.float32)
    da, db, dc = ([s(x) for _ in range(50)] for s in (a, b, c))
    assert da == db
    assert da != dc


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(repeat_last_n=-1), "repeat_last_n"),
        (dict(seed=-5), "seed"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
