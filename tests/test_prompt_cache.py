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


@pytest.mark.parametrize(
    "backend, kv", [("numpy", "f16"), ("numpy", "f32"), ("numpy", "q8_0"), ("mlx", None)]
)
def test_a_fork_holds_the_prefix_and_both_go_on_alone(tiny_phi3, backend, kv):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    with phimlx.load(tiny_phi3, backend=backend, **({"kv_cache_type": kv} if kv else {})) as m:
        ids = np.random.default_rng(2).integers(3, 32000, size=40).tolist()
        s = m.new_session(128)
        s.prefill(ids)
        f = s.fork(25)
        assert (f.position, s.position, f.max_context) == (25, 40, 128)
        assert f.tokens == tuple(ids[:25]) and s.tokens == tuple(ids)
        k, v = s._inner.kv_state()  # (the backend's own copies, as the cache file saves them)
        fk, fv = f._inner.kv_state()
        np.testing.assert_array_equal(fk, k[:, :, :25])
        np.testing.assert_array_equal(fv, v[:, :, :25])
        # the fork steps as the session cut back to 25 would; the session as before
        cut = m.new_session(128)
        cut.prefill(ids)
        cut.trim(25)
        whole = m.new_session(128)
        whole.prefill(ids)
        for t in (11, 12, 13):
            np.testing.assert_array_equal(f.step(t), cut.step(t))
            np.testing.assert_array_equal(s.step(t + 100), whole.step(t + 100))
        assert f.tokens == (*ids[:25], 11, 12, 13) and s.position == 43
        assert s.fork().tokens == s.tokens and s.fork(0).position == 0
        for bad in (44, -1, 2.5):
            with pytest.raises(ValueError, match="cannot fork at"):
                s.fork(bad)


def test_a_wrapped_sliding_window_cannot_be_forked(make_model):
    pytest.importorskip("mlx.core")
    path = make_model(n_layers=2, hidden=64, ffn=128, n_heads=4, mix="F32", sliding_window=8)
    with phimlx.load(path, backend="mlx") as m:
        s = m.new_session(64)
        s.prefill(list(range(10, 16)))
        assert s.fork(4).tokens == tuple(range(10, 14))  # inside the window: a fork
        for t in range(16, 20):
            s.step(t)  # the 9th and 10th positions overwrite the first two
        with pytest.raises(ValueError, match="wrapped"):
            s.fork(5)


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
    def __init__(self, tokens, max_context=100, forkable=True):
        self._t = list(tokens)
        self.max_context = max_context
        self.forkable = forkable

    @property
    def tokens(self):
        return tuple(self._t)

    @property
    def position(self):
        return len(self._t)

    def fork(self, n):
        if not self.forkable:
            raise ValueError("this session's sliding-window cache has wrapped")
        return FakeSession(self._t[:n], self.max_context)


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
    got, n = pool.take([1, 2, 3], max_context=100)  # a would share 3: b's 2 (a fork)
    assert n == 2 and got.tokens == (1, 2) and len(pool) == 2
    pool.put(FakeSession([5] * 50))  # alone over budget: kept, it is the newest
    assert len(pool) == 1 and pool.take([5, 5, 5], 100)[0].tokens == (5, 5, 5)


def test_pool_forks_a_prefix_that_other_calls_share():
    """A prompt that shares at most half of a kept session gets a fork of the shared part,
    and the session stays for the call that continues it, and for other calls meanwhile;
    a prompt that continues it (or most of it) gets the session itself."""
    pool = PromptCache(bytes_per_token=1, max_bytes=1000, max_sessions=4)
    chat = FakeSession([7, 7, 7, 1, 2, 3, 4, 5, 6, 8])  # system prompt 7 7 7, then a chat
    pool.put(chat)
    first, n1 = pool.take([7, 7, 7, 9, 9], max_context=100)
    second, n2 = pool.take([7, 7, 7, 8], max_context=100)  # at the same time as the first
    assert (n1, n2) == (3, 3) and first.tokens == second.tokens == (7, 7, 7)
    assert first is not chat and second is not chat and len(pool) == 1
    got, n = pool.take([*chat.tokens, 11, 12], max_context=100)  # the chat's next turn
    assert got is chat and n == 10 and len(pool) == 0
    pool.put(chat)
    got, n = pool.take(chat.tokens[:6], max_context=100)  # more than half: a retry
    assert got is chat and n == 6
    pool.put(FakeSession([7, 7, 7, 1], forkable=False))  # a wrapped window: lent whole
    got, n = pool.take([7, 7, 9], max_context=100)
    assert got.tokens == (7, 7, 7, 1) and n == 2


def test_a_session_forked_while_the_pool_is_cleared_stays_out():
    pool = PromptCache(bytes_per_token=1, max_bytes=1000)

    class ClearedMeanwhile(FakeSession):
        def fork(self, n):
            pool.clear()  # another thread, while this one copies
            return super().fork(n)

    pool.put(ClearedMeanwhile([1, 2, 3, 4, 5, 6]))
    got, n = pool.take([1, 2, 9], max_context=100)
    assert got.tokens == (1, 2) and n == 2 and len(pool) == 0


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


def test_a_conversation_keeps_its_cache_while_another_shares_its_system_prompt(smol):
    """A second conversation that starts with the same system prompt gets that prefix
    from the first one's kept session (a fork), without cutting it: the first one's next
    turn still finds its whole history cached."""
    system = {"role": "system", "content": "You answer in one short sentence."}
    a = [system, {"role": "user", "content": "Tell me about the moon and its phases."}]
    b = [system, {"role": "user", "content": "What is two plus two?"}]
    smol.clear_cache()
    ra = smol.chat(a, max_tokens=40, ignore_eos=True, **GREEDY)
    rb = smol.chat(b, max_tokens=8, **GREEDY)
    shared = common_prefix(smol.encode_prompt(a), smol.encode_prompt(b))
    assert 0 < shared < len(smol.encode_prompt(b)) and rb.stats.cached_tokens == shared
    a2 = [*a, {"role": "assistant", "content": ra.text}, {"role": "user", "content": "Why?"}]
    ra2 = smol.chat(a2, max_tokens=8, **GREEDY)
    assert ra2.stats.cached_tokens >= ra.stats.prompt_tokens + len(ra.tokens) - 1


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
