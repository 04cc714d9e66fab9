"""A new user's mistakes through the Python API: each a clear, typed error (or a clear line)."""

from __future__ import annotations

import threading

import pytest
import threadpoolctl

import phimlx
from phimlx.generate import Stats


@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as m:
        yield m


@pytest.mark.parametrize("prompt", [None, 42, b"bytes"])
def test_a_prompt_of_the_wrong_type_is_named(phi3, prompt):
    with pytest.raises(TypeError, match="prompt must be a string or a list"):
        phi3.generate(prompt, max_tokens=2)


def test_an_unknown_chat_role_is_refused(phi3):
    with pytest.raises(ValueError, match="role 'wizard'"):
        phi3.chat([{"role": "wizard", "content": "hi"}], max_tokens=2)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_invalid_thread_counts_are_refused_before_loading(tiny_phi3, threads):
    with pytest.raises(ValueError, match="threads="):
        phimlx.load(tiny_phi3, threads=threads)


def test_threads_limit_blas_through_threadpoolctl(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy", threads=1):
        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert blas and all(i["num_threads"] == 1 for i in blas)


def test_threads_hold_in_the_thread_that_runs_the_model(tiny_phi3):
    """numba keeps its thread count per thread (a new one starts at every CPU): a model
    loaded with threads=1 here runs its kernels on one thread from another thread too, as
    the server's engine thread runs it."""
    numba = pytest.importorskip("numba")
    from fallback.kernels import numba_available

    if not numba_available() or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's kernels on more than one CPU needed")
    seen = []
    with phimlx.load(tiny_phi3, backend="numpy", threads=1) as m:

        def run() -> None:
            seen.append(numba.get_num_threads())  # a new thread: numba's default
            m.generate("hi", max_tokens=2, temperature=0)
            seen.append(numba.get_num_threads())

        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert seen == [numba.config.NUMBA_NUM_THREADS, 1]


def test_chat_template_error_is_exported(phi3, monkeypatch):
    assert issubclass(phimlx.ChatTemplateError, phimlx.PhimlxError)
    monkeypatch.setattr(phi3, "chat_template", "{% for %}")
    with pytest.raises(phimlx.ChatTemplateError, match="does not compile"):
        phi3.chat([{"role": "user", "content": "hi"}])


def test_a_single_token_has_no_speed_to_report(phi3):
    r = phi3.generate("hi", max_tokens=1, temperature=0)
    assert "generation: 1 tokens, n/a tok/s" in r.stats.summary()
    s = Stats(prompt_tokens=10, prompt_seconds=0.5, generation_tokens=3, generation_seconds=1)
    assert "prompt: 10 tokens, 20.0 tok/s" in s.summary()  # hand-computed: 10 / 0.5
    assert "generation: 3 tokens, 2.0 tok/s" in s.summary()  # (3 - 1) / 1


def test_a_prompt_too_long_fails_at_the_call(phi3):
    """stream() checks the prompt against the context when called, before any compute (a
    server answers 400 without starting a generation)."""
    too_long = list(range(5, 5 + 40))
    with pytest.raises(phimlx.ContextLengthError, match="40 tokens do not fit"):
        phi3.stream(too_long, max_context=32)


def test_draft_in_a_batch_is_refused_without_holding_a_session(phi3):
    phi3.clear_cache()
    phi3.generate([5, 6, 7, 8], max_tokens=2, temperature=0)
    kept = len(phi3._prompt_cache)
    with pytest.raises(ValueError, match="batch"):
        phi3.batch_generate([[5, 6, 7, 8], [9, 10]], draft="lookup", max_tokens=2)
    assert len(phi3._prompt_cache) == kept  # nothing taken out and lost
