"""Generation robustness and resource hygiene.

A tiny crafted llama (1 layer, hidden 32, 299-token SPM vocab, context 64) whose output
rows for the special tokens are zero, so greedy decoding never samples EOS and every
generation ends by length or context.  Each test runs on every available backend.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import craft
import numpy as np
import pytest

import phimlx
from phimlx import ContextLengthError

CONTEXT = 64
GREEDY = dict(max_tokens=12, temperature=0.0, chat=False)
SAMPLED = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, chat=False)


def _backends() -> list[str]:
    from phimlx import backends

    return ["numpy"] + (["mlx"] if backends.probe("mlx") is None else [])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = craft.tiny_model("llama", context=CONTEXT, seed=3)
    out = g.tensor("output.weight")
    w = np.frombuffer(out.data, "<f4").reshape(-1, 32).copy()
    w[:3] = 0.0  # <unk> <s> </s> get logit 0: never the argmax among 299 random logits
    out.data = w.tobytes()
    return g.write(tmp_path_factory.mktemp("robust") / "tiny-llama.gguf")


@pytest.fixture(scope="module", params=_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(model_path: Path, backend: str) -> Iterator[phimlx.Model]:
    with phimlx.load(model_path, backend=backend) as m:
        yield m


def fresh(model_path: Path, backend: str, prompt: str, **kw: object) -> phimlx.Result:
    with phimlx.load(model_path, backend=backend) as m:
        return m.generate(prompt, **kw)


# -- context limits -------------------------------------------------------------------------


def test_prompt_over_the_context_limit(model: phimlx.Model) -> None:
    long = "ab " * 40
    assert len(model.encode_prompt(long, chat=False)) > CONTEXT
    with pytest.raises(ContextLengthError, match=f"holds {CONTEXT}"):
        model.generate(long, chat=False)
    with pytest.raises(ContextLengthError):
        next(iter(model.stream("abcdef", chat=False, max_context=3)))
    s = model.new_session(4)
    with pytest.raises(ContextLengthError):
        s.prefill([5] * 5)
    # the model is still fine
    assert model.generate("ab", **GREEDY).finish_reason == "length"


@pytest.mark.parametrize("max_context", [8, None])
def test_generation_reaches_the_context_limit(model: phimlx.Model, max_context: int) -> None:
    r = model.generate("ab", max_tokens=10_000, temperature=0.0, chat=False,
                       max_context=max_context)  # fmt: skip
    limit = max_context or CONTEXT
    assert r.finish_reason == "context"
    # every position is filled, and one more token was sampled from the last logits
    assert r.stats.prompt_tokens + r.stats.generation_tokens == limit + 1


def test_session_step_past_the_end_is_a_context_error(model: phimlx.Model) -> None:
    s = model.new_session(3)
    s.prefill([5, 6])
    s.step(7)
    with pytest.raises(ContextLengthError):
        s.step(8)


# -- odd prompts ----------------------------------------------------------------------------


def test_empty_prompt(model: phimlx.Model) -> None:
    """The file adds BOS: an empty raw prompt is [BOS] and generates; an empty token list
    to a session is a ValueError."""
    r = model.generate("", **GREEDY)
    assert r.stats.prompt_tokens == 1 and r.finish_reason == "length"
    assert r.stats.generation_tokens == GREEDY["max_tokens"]
    assert model.generate([{"role": "user", "content": ""}], max_tokens=3).stats.prompt_tokens
    with pytest.raises(ValueError):
        model.new_session().prefill([])


def test_empty_prompt_without_bos_is_a_clear_error(tmp_path: Path, backend: str) -> None:
    g = craft.tiny_model("llama", context=CONTEXT)
    g.set_kv("tokenizer.ggml.add_bos_token", craft.BOOL, False)
    with phimlx.load(g.write(tmp_path / "nobos.gguf"), backend=backend) as m:
        with pytest.raises(ValueError, match="empty"):
            m.generate("", **GREEDY)
        assert m.generate("ab", **GREEDY).finish_reason == "length"


@pytest.mark.parametrize("prompt", ["a\ud800b", "\udfff", "ab\ud83d"])
def test_lone_surrogates_in_the_prompt(model: phimlx.Model, prompt: str) -> None:
    """Lone surrogates (broken UTF-16) are encoded as U+FFFD, as a decoder shows them."""
    fixed = prompt.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert model.tokenizer.encode(prompt) == model.tokenizer.encode(fixed)
    assert model.generate(prompt, **GREEDY).finish_reason == "length"


def test_result_tokens_are_every_generated_token(model: phimlx.Model) -> None:
    """Tokens whose text is not yet complete (a byte token in the middle of a UTF-8
    sequence) belong to the result too."""
    for seed in range(4):
        r = model.generate("ab", max_tokens=12, temperature=1.5, seed=seed, chat=False)
        assert len(r.tokens) == r.stats.generation_tokens == 12
        assert model.tokenizer.decode(r.tokens, skip_special=True) == r.text


# -- interruption ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_consumer_interrupt_or_break_leaves_the_model_usable(
    model: phimlx.Model, model_path: Path, backend: str, kw: dict
) -> None:
    expected = fresh(model_path, backend, "ab", **kw)
    it = model.stream("ab", **kw)
    with pytest.raises(KeyboardInterrupt):
        for i, _chunk in enumerate(it):
            if i == 2:
                raise KeyboardInterrupt
    assert model.generate("ab", **kw) == _same(expected)
    for i, _chunk in enumerate(model.stream("ab", **kw)):  # break: the generator is dropped
        if i == 1:
            break
    gc.collect()
    it = model.stream("ab", **kw)
    next(it)
    it.close()
    assert model.generate("ab", **kw) == _same(expected)


def test_interrupt_inside_a_forward_pass(
    model: phimlx.Model, model_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the backend computes: the lock is released, the next call is clean."""
    expected = fresh(model_path, backend, "ab", **GREEDY)
    session_type = type(model._backend_model.new_session(4))
    calls = {"n": 0}

    def interrupting(real: object) -> object:
        def forward(self: object, ids: np.ndarray, **kw: object) -> object:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(self, ids, **kw)  # type: ignore[operator]

        return forward

    # both backends' sessions run every token through one `_forward`
    monkeypatch.setattr(session_type, "_forward", interrupting(session_type._forward))
    with pytest.raises(KeyboardInterrupt):
        model.generate("ab", **GREEDY)
    monkeypatch.undo()
    with craft.time_bound(60):  # a lock left held would hang here
        assert model.generate("ab", **GREEDY) == _same(expected)


class _same:
    """Compare a Result by what the user sees (text, tokens, finish), not its timings."""

    def __init__(self, r: phimlx.Result) -> None:
        self.r = r

    def __eq__(self, other: object) -> bool:
        mine = (self.r.text, self.r.tokens, self.r.finish_reason)
        return isinstance(other, phimlx.Result) and (
            other.text, other.tokens, other.finish_reason) == mine  # fmt: skip

    def __repr__(self) -> str:
        return repr(self.r)


# -- concurrency ----------------------------------------------------------------------------


def test_two_threads_stream_from_one_model(model: phimlx.Model) -> None:
    prompts = {"a": dict(SAMPLED, seed=1), "b": dict(SAMPLED, seed=2), "c": GREEDY}
    solo = {p: model.generate(p, **kw) for p, kw in prompts.items()}
    results: dict[tuple[int, str], phimlx.Result] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                for p, kw in prompts.items():
                    results[(i, p)] = model.generate(p, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    with craft.time_bound(120):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for (_, p), r in results.items():
        assert r == _same(solo[p]), p


def test_interleaved_streams_have_independent_caches(model: phimlx.Model) -> None:
    a_solo = "".join(c.text for c in model.stream("ab", **GREEDY))
    b_solo = "".join(c.text for c in model.stream("ba", **GREEDY))
    a_it, b_it = model.stream("ab", **GREEDY), model.stream("ba", **GREEDY)
    a, b = [], []
    for x, y in zip(a_it, b_it, strict=False):
        a.append(x.text)
        b.append(y.text)
    a += [c.text for c in a_it]
    b += [c.text for c in b_it]
    assert ("".join(a), "".join(b)) == (a_solo, b_solo)


# -- resource hygiene -----------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mapped(path: Path) -> int:
    with open("/proc/self/maps") as f:
        return f.read().count(str(path))


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")


@needs_proc
def test_close_releases_file_and_mapping(model_path: Path, backend: str) -> None:
    before = _fds()
    m = phimlx.load(model_path, backend=backend)
    m.generate("ab", max_tokens=2, chat=False)
    m.close()
    gc.collect()
    assert _mapped(model_path) == 0 and _fds() == before
    with pytest.raises(RuntimeError, match="closed"):
        m.generate("ab", max_tokens=2, chat=False)
    m.close()  # twice is fine

    with phimlx.load(model_path, backend=backend) as m2:
        m2.generate("ab", max_tokens=2, chat=False)
        assert _mapped(model_path) > 0
    gc.collect()
    assert _mapped(model_path) == 0 and _fds() == before


@needs_proc
def test_garbage_collected_model_releases_its_mapping(model_path: Path, backend: str) -> None:
    before = _fds()
    m = phimlx.load(model_path, backend=backend)
    m.generate("ab", max_tokens=2, chat=False)
    del m
    gc.collect()
    assert _mapped(model_path) == 0 and _fds() == before


@needs_proc
def test_no_leaks_over_100_load_close_cycles(model_path: Path, backend: str) -> None:
    import tracemalloc

    for _ in range(3):  # warm caches
        with phimlx.load(model_path, backend=backend) as m:
            m.generate("ab", max_tokens=1, chat=False)
    gc.collect()
    fds = _fds()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            m = phimlx.load(model_path, backend=backend)
            if i % 10 == 0:
                m.generate("ab", max_tokens=1, chat=False)
            m.close()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert _fds() == fds
    assert _mapped(model_path) == 0
    # A leaked model (tokenizer tables, metadata) is ~1 MiB of Python objects here.
    assert grown < 2 << 20, f"{grown} bytes still allocated after 100 load/close cycles"
