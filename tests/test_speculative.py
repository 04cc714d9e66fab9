"""Speculative decoding: the proposers, the adaptive length, and exactness — the output with
drafts is the output without them, token for token, greedy and sampled, on a Markov-chain
session (every rollback path, at context edges) and on the real SmolLM2 (both backends)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import phimlx
from phimlx.backends import Finished
from phimlx.generate import Stats, generate_tokens
from phimlx.sampling import Sampler, SamplingParams
from phimlx.speculative import Drafter, PromptLookup

# -- proposers -------------------------------------------------------------------------------


def test_prompt_lookup_takes_the_most_recent_longest_match():
    look = PromptLookup(max_ngram=3, min_ngram=1)
    #        0  1  2  3  4  5  6  7  8  9 10
    hist = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # the 3-gram (2, 6, 7) never occurred before; the 2-gram (6, 7) did, last at 5..6
    assert look.propose(hist, 3) == [1, 2, 6]
    # (2, 6, 8) and (6, 8) never occurred; 8 alone did, at 3
    assert look.propose([*hist[:-1], 8], 2) == [9, 6]
    assert PromptLookup(3, 2).propose([*hist[:-1], 8], 2) == []
    assert look.propose([1, 2, 3], 4) == []
    assert look.propose([4], 4) == []
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)


class Script:
    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, history, k):
        return self.drafts[:k]

    def close(self):
        pass


def test_drafter_length_maximizes_expected_tokens_per_second():
    d = Drafter(Script(list(range(20))), max_draft=8)
    # nothing measured: rows assumed cheap (1 + 0.1 per extra row), a = 0.5 a priori:
    # k drafts give (2 - 0.5^k) tokens for 1 + 0.1 k: best k = 2 (1.458 against 1.444)
    assert d.acceptance == 0.5 and d.k == 2
    assert d.propose([1], 100) == [0, 1]
    assert d.propose([1], 1) == [0]  # the caller's limit
    # measured: 1 row 10 ms, 2 rows 12 ms, 9 rows 50 ms; nearly every draft right
    for rows, t in ((1, 0.010), (2, 0.012), (9, 0.050)):
        d.observe(rows, t)
    for _ in range(10):
        d.update(8, 8)
    a = d.acceptance
    assert a > 0.95

    def rate(k):
        cost = {1: 0.010, 2: 0.012, 9: 0.050}.get(k + 1)
        if cost is None:
            cost = 0.012 + (k + 1 - 2) / 7 * (0.050 - 0.012)  # linear between 2 and 9
        return sum(a**i for i in range(k + 1)) / cost

    assert d.k == max(range(9), key=rate)
    # drafts are rarely right and rows are dear: no drafting, but a probe every PROBE
    for _ in range(10):
        d.update(0, 4)
    d.observe(2, 0.030)
    assert d.k == 0
    got = [d.propose([1], 100) for _ in range(2 * Drafter.PROBE)]
    assert [len(g) for g in got] == ([0] * (Drafter.PROBE - 1) + [1]) * 2
    with pytest.raises(ValueError):
        Drafter(Script([]), 0)


# -- exactness on a Markov chain -------------------------------------------------------------

V = 6


class MarkovSession:
    """Logits depend on the last token only; K/V "cache" is the token list; every call is
    checked against what the cache must hold."""

    def __init__(self, table: np.ndarray, max_context: int) -> None:
        self.table = table
        self.max_context = max_context
        self.tokens_: list[int] = []
        self.forward_passes = 0

    @property
    def position(self) -> int:
        return len(self.tokens_)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self.tokens_)

    def prefill(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        assert self.position + len(ids) <= self.max_context
        self.forward_passes += 1
        self.tokens_ += list(ids)
        rows = self.table[np.asarray(ids)].astype(np.float32)
        return rows if all_logits else rows[-1]

    def step_async(self, token: int) -> Finished:
        return Finished(self.prefill([token]))

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        return self.prefill(ids, all_logits=True)

    def trim(self, n: int) -> int:
        del self.tokens_[n:]
        return n


def run_chain(seed, drafter, *, params, max_tokens=40, max_context=64, prompt=(1, 2, 3), stop=()):
    table = np.random.default_rng(100).normal(scale=2.0, size=(V, V))
    s = MarkovSession(table, max_context)
    stats = Stats()
    out = list(
        generate_tokens(
            s,
            list(prompt),
            Sampler(SamplingParams(seed=seed, repeat_penalty=1.0, **params)),
            max_tokens=max_tokens,
            stop_ids=frozenset(stop),
            stats=stats,
            drafter=drafter,
        )
    )
    tokens = [t for t, _, _ in out]
    # the cache holds the prompt and the output, but never a draft that was not taken
    assert list(s.tokens)[: len(prompt)] == list(prompt)
    assert s.tokens == tuple([*prompt, *tokens])[: s.position]
    return tokens, out[-1][1], stats, s.forward_passes


class RandomDrafts:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def propose(self, history, k):
        return self.rng.integers(0, V, size=int(self.rng.integers(0, k + 1))).tolist()

    def close(self):
        pass


@pytest.mark.parametrize(
    "params", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.8)]
)
def test_drafts_never_change_the_chain_output(params):
    lengths = set()
    for seed in range(60):
        stop = (0,) if seed % 2 else ()
        plain = run_chain(seed, None, params=params, stop=stop)
        spec = run_chain(seed, Drafter(RandomDrafts(seed), 5), params=params, stop=stop)
        assert spec[:2] == plain[:2]
        lookup = run_chain(seed, Drafter(PromptLookup(3, 1), 4), params=params, stop=stop)
        assert lookup[:2] == plain[:2]
        assert lookup[2].draft_tokens > 0 or len(plain[0]) < 5
        lengths.add(len(plain[0]))
    assert max(lengths) == 40


def test_context_edge_and_every_draft_rejected():
    class Wrong:  # always a token the greedy chain never picks next
        def propose(self, history, k):
            table = np.random.default_rng(100).normal(scale=2.0, size=(V, V))
            return [int(np.argmin(table[history[-1]]))] * k

        def close(self):
            pass

    params = dict(temperature=0)
    for max_context in (4, 5, 9, 17):
        plain = run_chain(0, None, params=params, max_context=max_context)
        spec = run_chain(0, Drafter(RandomDrafts(1), 6), params=params, max_context=max_context)
        assert spec[:2] == plain[:2]
    plain = run_chain(0, None, params=params)
    wrong = run_chain(0, Drafter(Wrong(), 4), params=params)
    assert wrong[:2] == plain[:2] and wrong[2].accepted_tokens == 0
    assert wrong[2].draft_tokens > 0


def test_a_perfect_drafter_saves_forward_passes():
    params = dict(temperature=0)
    plain_tokens, _, _, plain_passes = run_chain(0, None, params=params, max_tokens=30)

    class Oracle:
        def propose(self, history, k):
            n = len(history) - 3
            return plain_tokens[n : n + k]

        def close(self):
            pass

    tokens, _, stats, passes = run_chain(0, Drafter(Oracle(), 8), params=params, max_tokens=30)
    assert tokens == plain_tokens
    assert stats.accepted_tokens == stats.draft_tokens > 0
    assert passes < plain_passes / 3


# -- the real model --------------------------------------------------------------------------

CODE = """def area(shape, size):
    if shape == "square":
        return size * size
    if shape == "circle":
        return 3.14159 * size * size
    raise ValueError(shape)
"""
PROMPTS = [
    "Repeat this code exactly, then stop:\n" + CODE,
    "Write a short poem about the sea.",
    "List the numbers from 1 to 20, separated by commas.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    model = phimlx.load(smollm2_path, backend="numpy")
    yield model
    model.close()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["code", "poem", "count"])
def test_lookup_greedy_equals_plain_on_smollm2(smollm2, prompt):
    kw = dict(temperature=0, max_tokens=80, repeat_penalty=1.0, cache=False)
    plain = smollm2.generate(prompt, **kw)
    spec = smollm2.generate(prompt, draft="lookup", **kw)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason
    if prompt.startswith("Repeat"):
        assert spec.stats.accepted_tokens > 20


def test_lookup_sampled_equals_plain_with_the_same_seed(smollm2):
    kw = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=60, cache=False)
    plain = smollm2.generate(PROMPTS[0], **kw)
    spec = smollm2.generate(PROMPTS[0], draft="lookup", **kw)
    assert spec.tokens == plain.tokens


def test_lookup_with_stop_strings_logprobs_and_the_prompt_cache(smollm2):
    kw = dict(temperature=0, max_tokens=60, repeat_penalty=1.0, logprobs=2, stop=["circle"])
    plain = smollm2.generate(PROMPTS[0], cache=False, **kw)
    smollm2.clear_cache()
    spec = smollm2.generate(PROMPTS[0], draft="lookup", **kw)
    assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
    assert [lp.chosen.token for lp in spec.logprobs] == spec.tokens
    np.testing.assert_allclose(
        [lp.chosen.logprob for lp in spec.logprobs],
        [lp.chosen.logprob for lp in plain.logprobs],
        atol=1e-3,
    )
    # the kept session holds no rejected draft: the same call again, from the cache
    again = smollm2.generate(PROMPTS[0], draft="lookup", **kw)
    assert again.tokens == spec.tokens and again.stats.cached_tokens > 0


def test_draft_model_greedy_equals_plain(smollm2, smollm2_path):
    with phimlx.load(smollm2_path, backend="numpy") as draft:
        kw = dict(temperature=0, max_tokens=40, repeat_penalty=1.0, cache=False)
        plain = smollm2.generate(PROMPTS[1], **kw)
        spec = smollm2.generate(PROMPTS[1], draft=draft, num_draft_tokens=3, **kw)
        assert spec.tokens == plain.tokens
        assert spec.stats.accepted_tokens > spec.stats.draft_tokens / 2  # the same model
    with pytest.raises(ValueError, match="itself"):
        smollm2.generate("x", draft=smollm2)
    with pytest.raises(ValueError, match="draft"):
        smollm2.generate("x", draft="ngram")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        smollm2.generate("x", draft="lookup", num_draft_tokens=0)
    with pytest.raises(ValueError, match="batch"):
        smollm2.batch_generate(["x", "y"], draft="lookup")


def test_draft_model_with_another_vocabulary_is_refused(smollm2, tiny_phi3):
    with (
        phimlx.load(tiny_phi3, backend="numpy") as other,
        pytest.raises(ValueError, match="another vocabulary"),
    ):
        smollm2.generate("x", draft=other)


def test_lookup_on_mlx_equals_plain(smollm2_path):
    pytest.importorskip("mlx.core")
    with phimlx.load(smollm2_path, backend="mlx") as model:  # (MLX on a CPU: a few tok/s)
        kw = dict(temperature=0, max_tokens=16, repeat_penalty=1.0, cache=False)
        plain = model.generate(PROMPTS[0], **kw)
        spec = model.generate(PROMPTS[0], draft="lookup", **kw)
        assert spec.tokens == plain.tokens and spec.stats.accepted_tokens > 0


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_verify_equals_steps_bit_for_bit(smollm2_path, kv, monkeypatch):
    """The check of drafts gives exactly the logits of step after step (int8 activations:
    the int8 matmul's rows equal the matvec, each row attends with the decode kernel); so
    does a prefill this short (`ops.prefill_by_rows`), not one through BLAS's attention."""
    from fallback import ops

    with phimlx.load(smollm2_path, backend="numpy", kv_cache_type=kv) as model:
        ids = model.encode_prompt("The quick brown fox jumps over the lazy dog", chat=False)
        a, b, c = model.new_session(), model.new_session(), model.new_session()
        for s in (a, b, c):
            s.prefill(ids[:4])
        steps = np.stack([a.step(t) for t in ids[4:]])
        np.testing.assert_array_equal(b.verify(ids[4:]), steps)
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(c.prefill(ids[4:], all_logits=True), steps)
        # BLAS's batched attention sums in another order: not equal
        monkeypatch.setattr(ops, "prefill_by_rows", lambda *args: False)
        d = model.new_session()
        d.prefill(ids[:4])
        assert not np.array_equal(d.prefill(ids[4:], all_logits=True), steps)


def test_cli_lookup_and_draft_model_print_what_plain_prints(smollm2_path, capsys):
    from phimlx.cli import main

    base = ["generate", "-m", str(smollm2_path), "-t", "0", "-n", "24", "-p", PROMPTS[2]]
    outs = []
    for extra in (
        [],
        ["--lookup"],
        ["--draft-model", str(smollm2_path), "--num-draft-tokens", "2"],
    ):
        assert main(base + extra) == 0
        captured = capsys.readouterr()
        outs.append(captured.out)
        if extra:
            assert "drafted tokens taken" in captured.err
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()
    with pytest.raises(SystemExit):
        main([*base, "--lookup", "--draft-model", str(smollm2_path)])
