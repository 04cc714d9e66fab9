"""Conversations that remember: trim, prefix reuse across calls, reply ids, context overflow."""

from __future__ import annotations

import os

import numpy as np
import pytest

import phimlx
from phimlx.prompt_cache import PromptCache, ReplyIds, common_prefix

GREEDY = dict(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with phimlx.load(smollm2_path, backend="numpy") as m:
        yield m


@pytest.fixture(scope="module")
def smol_float(smollm2_path):
    """SmolLM2 with float activations: decode and prefill then agree to float rounding, so
    continuing a cached session must give what a fresh prefill gives."""
    saved = os.environ.get("PHIMLX_INT8_ACTIVATIONS")
    os.environ["PHIMLX_INT8_ACTIVATIONS"] = "0"
    try:
        model = phimlx.load(smollm2_path, backend="numpy")
    finally:
        if saved is None:
            del os.environ["PHIMLX_INT8_ACTIVATIONS"]
        else:
            os.environ["PHIMLX_INT8_ACTIVATIONS"] = saved
    with model:
        yield model


@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as m:
        yield m


# ----------------------------------------------------------------------------- trim


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_trim_then_continue_equals_a_fresh_prefill(tiny_phi3, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    with phimlx.load(tiny_phi3, backend=backend) as model:
        ids = np.random.default_rng(1).integers(3, 32000, size=40).tolist()
        fresh = model.new_session().prefill(ids)
        s = model.new_session()
        s.prefill(ids[:25] + [5, 6, 7])  # a different continuation, then rolled back
        assert s.trim(25) == 25 and s.position == 25 and s.tokens == tuple(ids[:25])
        again = s.prefill(ids[25:])
        np.testing.assert_allclose(again, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
        assert s.tokens == tuple(ids)
        # stepping after a trim continues the same way as stepping a fresh session
        s.trim(39)
        np.testing.assert_allclose(s.step(ids[39]), fresh, atol=1e-4 * np.abs(fresh).max())


def test_trim_refuses_positions_it_does_not_hold(phi3):
    s = phi3.new_session()
    s.prefill([1, 2, 3])
    for bad in (-1, 4, 1.5, True):
        with pytest.raises(ValueError, match="cannot trim"):
            s.trim(bad)
    assert s.trim(0) == 0 and s.tokens == ()


def test_an_interrupted_prefill_keeps_tokens_and_cache_in_step(phi3, monkeypatch):
    import fallback.model as fm

    monkeypatch.setattr(fm, "PREFILL_CHUNK", 8)
    real = fm.NumpySession._forward
    calls = {"n": 0}

    def flaky(self, ids, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, ids, **kw)

    monkeypatch.setattr(fm.NumpySession, "_forward", flaky)
    s = phi3.new_session()
    ids = list(range(100, 130))
    with pytest.raises(KeyboardInterrupt):
        s.prefill(ids)
    assert s.position == 16 and s.tokens == tuple(ids[:16])  # two chunks of 8 made it


# ------------------------------------------------------------------- the session pool


class FakeSession:
    def __init__(self, tokens, max_context=100):
        self._t = list(tokens)
        self.max_context = max_context

    @property
    def tokens(self):
        return tuple(self._t)

    @property
    def position(self):
        return len(self._t)


def test_pool_lends_the_longest_common_prefix_and_evicts_least_recent():
    pool = PromptCache(bytes_per_token=10, max_bytes=100, max_sessions=3)
    a, b = FakeSession([1, 2, 3]), FakeSession([1, 2, 9, 9])
    pool.put(a)
    pool.put(b)
    got, n = pool.take([1, 2, 9, 5], max_context=100)
    assert got is b and n == 3 and len(pool) == 1  # lent out until put back
    assert pool.take([7], max_context=100) == (None, 0)
    assert pool.take([1, 2, 3], max_context=50) == (None, 0)  # another context size
    pool.put(b)
    pool.put(FakeSession([4] * 5))  # 3 + 4 + 5 positions = 120 bytes > 100: `a` goes
    assert pool.take([1, 2, 3], max_context=100) == (b, 2)  # b now, a would share 3
    pool.put(FakeSession([5] * 50))  # alone over budget: kept, it is the newest
    assert len(pool) == 1 and pool.take([5, 5], 100)[1] == 2


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_reply_ids_are_bounded():
    r = ReplyIds(capacity=2)
    r.remember("a", [1])
    r.remember("b", [2])
    r.get("a")  # now the most recent
    r.remember("c", [3])
    assert r.get("b") is None and r.get("a") == (1,) and r.get("c") == (3,)


# ------------------------------------------------------------- reuse across calls


def _chat(model, turns, *, cache, **kw):
    """A conversation fed back turn by turn; the results of every turn."""
    messages, results = [], []
    for user in turns:
        messages.append({"role": "user", "content": user})
        r = model.chat(messages, max_tokens=12, cache=cache, **GREEDY, **kw)
        results.append(r)
        messages.append({"role": "assistant", "content": r.text})
    return results


def _check_chat_reuse(model, turns):
    model.clear_cache()
    plain = _chat(model, turns, cache=False)
    model.clear_cache()
    cached = _chat(model, turns, cache=True)
    assert [r.tokens for r in cached] == [r.tokens for r in plain]
    assert all(r.stats.cached_tokens == 0 for r in plain)
    assert cached[0].stats.cached_tokens == 0
    for prev, r in zip(cached, cached[1:], strict=False):
        # everything up to the end of the previous reply came from the cache
        assert r.stats.cached_tokens >= prev.stats.prompt_tokens + len(prev.tokens) - 1
        assert r.stats.cached_tokens < r.stats.prompt_tokens


def test_greedy_chat_with_the_cache_equals_without(smol_float):
    _check_chat_reuse(smol_float, ["Name a fruit.", "And a colour?", "Now a number.", "Thanks!"])


def test_greedy_chat_with_the_cache_equals_without_on_mlx(tiny_phi3):
    pytest.importorskip("mlx.core")
    with phimlx.load(tiny_phi3, backend="mlx") as model:
        _check_chat_reuse(model, ["one two", "three", "four five six"])


def test_the_same_call_again_gives_the_same_text(smol):
    """With int8 activations (the default) any recomputation changes the logits at the
    quantization-noise level; the logits after a cached prompt are kept, so repeating a
    sampled call reproduces it exactly, from the cache."""
    kw = dict(max_tokens=24, temperature=0.9, seed=11)
    smol.clear_cache()
    first = smol.generate("Tell me about ice hockey.", **kw)
    again = smol.generate("Tell me about ice hockey.", **kw)
    assert again.tokens == first.tokens and again.text == first.text
    assert again.stats.cached_tokens == again.stats.prompt_tokens


def test_stop_strings_and_interrupted_streams_leave_a_usable_cache(smol):
    prompt = [{"role": "user", "content": "Count from one to ten in words."}]
    smol.clear_cache()
    expected = smol.chat(prompt, max_tokens=20, cache=False, **GREEDY)
    for chunk in smol.stream(prompt, max_tokens=20, **GREEDY):
        if chunk.token is not None:
            break  # the caller walks away after one chunk
    again = smol.chat(prompt, max_tokens=20, **GREEDY)
    assert again.tokens == expected.tokens and again.stats.cached_tokens > 0
    stopped = smol.chat(prompt, max_tokens=20, stop=expected.text[5:9], **GREEDY)
    assert stopped.finish_reason == "stop" and expected.text.startswith(stopped.text)
    assert smol.chat(prompt, max_tokens=20, **GREEDY).tokens == expected.tokens


def test_a_reply_is_fed_back_as_the_ids_it_was_generated_as(phi3):
    """Re-tokenizing a reply can give other ids than the model generated; the conversation
    keeps the generated ones, so the cached session goes on matching."""
    tok = phi3.tokenizer
    # "hello there" one character per token: ids the tokenizer itself would never produce
    pieces = ["\u2581h", *"ello", "\u2581t", *"here"]
    odd = [tok.token_to_id(p) for p in pieces]
    assert None not in odd
    reply = tok.decode(odd, skip_special=True)
    assert reply == "hello there" and tok.encode(reply, add_bos=False) != odd
    phi3._replies.remember(reply, odd)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and?"},
    ]
    ids = phi3.encode_prompt(messages)
    start = next(i for i in range(len(ids)) if ids[i : i + len(odd)] == odd)
    # the ids around the reply are the plain encoding's
    plain = tok.encode_chat(phi3.render(messages))
    reencoded = tok.encode(reply, add_bos=False)
    assert ids[:start] + reencoded + ids[start + len(odd) :] == plain


def test_a_template_that_changes_the_reply_text_is_not_spliced(phi3, monkeypatch):
    reply = "some reply"
    phi3._replies.remember(reply, [5, 6, 7])
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": reply}]
    monkeypatch.setattr(
        phi3,
        "chat_template",
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content | upper }}<|end|>{% endfor %}",
    )
    assert phi3.encode_prompt(messages) == phi3.tokenizer.encode_chat(phi3.render(messages))


# ------------------------------------------------------------------ context overflow


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_message(phi3):
    system = {"role": "system", "content": "be brief"}
    turns = []
    for i in range(30):
        turns += [
            {"role": "user", "content": f"question number {i} about the weather"},
            {"role": "assistant", "content": f"answer number {i} is sunny"},
        ]
    messages = [system, *turns, {"role": "user", "content": "last question"}]
    full = len(phi3.encode_prompt(messages))
    context = full // 2
    r = phi3.chat(messages, max_tokens=4, max_context=context, **GREEDY)
    assert r.stats.dropped_messages > 0 and r.stats.dropped_messages % 2 == 0
    assert r.stats.prompt_tokens + min(4, context // 4) <= context
    kept = [system, *turns[r.stats.dropped_messages :], messages[-1]]
    assert r.stats.prompt_tokens == len(phi3.encode_prompt(kept))
    with pytest.raises(phimlx.ContextLengthError):
        phi3.chat(messages, max_tokens=4, max_context=context, context_overflow="error")
    with pytest.raises(ValueError, match="context_overflow"):
        phi3.chat(messages, context_overflow="truncate")


def test_overflow_with_nothing_left_to_drop_is_a_context_error(phi3):
    long = " ".join(["word"] * 400)  # the last message alone is over the context
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": long}]  # fmt: skip
    with pytest.raises(phimlx.ContextLengthError):
        phi3.chat(messages, max_context=64)


# ------------------------------------------------------------- saved prompt caches


def test_a_saved_prompt_cache_is_continued_by_another_model_object(smollm2_path, tmp_path):
    document = "Ice hockey is played on ice by two teams of six skaters. " * 8
    question = [{"role": "user", "content": document + "How many skaters?"}]
    with phimlx.load(smollm2_path, backend="numpy") as a:
        expected = a.chat(question, max_tokens=10, cache=False, **GREEDY)
        prefix = a.encode_prompt(question)[:-12]  # what later prompts share
        n = a.save_prompt_cache(tmp_path / "doc.safetensors", prefix)
    assert n == len(prefix)
    with phimlx.load(smollm2_path, backend="numpy") as b:
        assert b.load_prompt_cache(tmp_path / "doc.safetensors") == n
        r = b.chat(question, max_tokens=10, **GREEDY)
        assert r.stats.cached_tokens == n
        assert r.tokens == expected.tokens  # the saved prefix was prefilled in float too
        with pytest.raises(phimlx.PhimlxError, match="made for another model|not found|missing"):
            b.load_prompt_cache(tmp_path / "missing.safetensors")
