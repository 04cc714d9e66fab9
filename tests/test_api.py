"""The public API end to end on the NumPy backend: load, stream, generate, chat, sessions."""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest
from conftest import require

import phimlx


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with phimlx.load(smollm2_path, backend="numpy") as model:
        yield model


@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as model:
        yield model


def test_model_attributes(smol):
    assert smol.backend == "numpy"
    assert smol.config.architecture == "llama"
    assert isinstance(smol.config, phimlx.ModelConfig)
    assert "numpy" in smol.backend_reason or "not Apple Silicon" in smol.backend_reason


def test_greedy_generate_equals_argmax_of_session_logits(smol):
    """generate(temperature=0) is exactly the argmax chain of the public session."""
    result = smol.generate("What is 2+2?", max_tokens=12, temperature=0, repeat_penalty=1.0)
    ids = smol.encode_prompt("What is 2+2?")
    s = smol.new_session()
    logits = s.prefill(ids)
    expected = []
    for _ in range(len(result.tokens)):
        expected.append(int(np.argmax(logits)))
        logits = s.step(expected[-1])
    assert result.tokens == expected
    assert result.text == smol.tokenizer.decode(expected, skip_special=True)
    assert result.stats.prompt_tokens == len(ids)
    assert result.stats.generation_tokens == len(result.tokens)


def test_stream_chunks_join_to_generate_text(smol):
    kw = dict(max_tokens=20, temperature=0.9, seed=7)
    chunks = list(smol.stream("Tell me about ice hockey.", **kw))
    assert "".join(c.text for c in chunks) == smol.generate("Tell me about ice hockey.", **kw).text
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.stats is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert last.stats.peak_memory and last.stats.time_to_first_token > 0


def test_same_seed_same_text_and_seeds_differ(phi3):
    kw = dict(max_tokens=16, temperature=1.0, repeat_penalty=1.0)
    a = phi3.generate("hi", seed=1, **kw)
    b = phi3.generate("hi", seed=1, **kw)
    c = phi3.generate("hi", seed=2, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_chat_template_is_applied_once_with_one_bos(phi3):
    ids = phi3.encode_prompt([{"role": "user", "content": "hi"}])
    tok = phi3.tokenizer
    assert ids.count(tok.bos_id) <= 1
    assert tok.token_to_id("<|user|>") in ids and tok.token_to_id("<|assistant|>") in ids
    assert ids == phi3.encode_prompt("hi")  # a string prompt is one user message


def test_phi3_stops_at_end_token(phi3):
    assert phi3.tokenizer.token_to_id("<|end|>") in phi3.tokenizer.stop_ids
    assert phi3.tokenizer.token_to_id("<|endoftext|>") in phi3.tokenizer.stop_ids


def test_prompt_longer_than_context_raises(phi3):
    with pytest.raises(phimlx.ContextLengthError, match="context"):
        list(phi3.stream("word " * 300, max_context=64, max_tokens=4))


def test_generation_reaching_the_context_limit_finishes_with_context(phi3):
    n = len(phi3.encode_prompt("hi"))
    r = phi3.generate("hi", max_context=n + 3, max_tokens=50, temperature=0, repeat_penalty=1.0)
    assert r.finish_reason == "context"
    assert len(r.tokens) == 4  # 3 steps fit after the prompt, plus the last sample


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=-1)])
def test_invalid_sampling_raises_value_error(phi3, kwargs):
    with pytest.raises(ValueError):
        phi3.generate("hi", **kwargs)


def test_sessions_are_independent(phi3):
    """Interleaving another session changes nothing: same path, bit-identical logits."""
    a, b = phi3.new_session(), phi3.new_session()
    la = a.prefill([1, 2, 3])
    b.prefill([7, 8, 9, 10])
    fresh = phi3.new_session()
    fresh.prefill([1, 2, 3])
    np.testing.assert_array_equal(a.step(4), fresh.step(4))
    assert la.dtype == np.float32 and la.shape == (phi3.config.vocab_size,)
    assert (a.position, b.position) == (4, 4)


def test_unknown_backend_is_a_clear_error(tiny_phi3):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        phimlx.load(tiny_phi3, backend="cuda")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises((phimlx.ModelNotFoundError, FileNotFoundError)):
        phimlx.load(tmp_path / "nope.gguf", local_files_only=True)


def test_cli_info_describes_the_file(smollm2_path):
    out = subprocess.run(
        [sys.executable, "-m", "phimlx", "info", str(smollm2_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "architecture:  llama" in out.stdout
    assert "Q4_1 x210" in out.stdout and "chat template: yes" in out.stdout


def test_cli_generate_streams_and_reports(tiny_phi3):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "phimlx",
            "generate",
            "--model",
            str(tiny_phi3),
            "--prompt",
            "hi",
            "--max-tokens",
            "5",
            "--backend",
            "numpy",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "tok/s" in out.stderr


def test_cli_reports_bad_files_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"<html>404</html>" + bytes(64))
    out = subprocess.run(
        [sys.executable, "-m", "phimlx", "generate", "--model", str(bad), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "HTML" in out.stderr and "Traceback" not in out.stderr


def test_mlx_backend_through_the_public_api_matches_numpy(smollm2_path, monkeypatch):
    """The same loop drives MLX (with its asynchronous step) and gives the greedy text of
    NumPy's float activations (both float32; the int8 default may break near-ties)."""
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        require("mlx", 'pip install "mlx[cpu]" mlx-lm')
    kw = dict(max_tokens=16, temperature=0, repeat_penalty=1.0)
    with phimlx.load(smollm2_path, backend="mlx") as m:
        assert m.backend == "mlx"
        ours = m.generate("What is the capital of France?", **kw)
    monkeypatch.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
    with phimlx.load(smollm2_path, backend="numpy") as m:
        ref = m.generate("What is the capital of France?", **kw)
    assert ours.tokens == ref.tokens and "Paris" in ours.text


def test_cli_bench_takes_its_own_options():
    out = subprocess.run(
        [sys.executable, "-m", "phimlx", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout and "--backends" in out.stdout


WARM_CHECK = r"""
import sys

import numpy as np
from numba.core import dispatcher

loads = []  # (phase, kernel): a signature loaded from numba's cache or compiled
orig = dispatcher.Dispatcher.compile


def compile(self, sig):
    if sig not in self.overloads:
        loads.append((phase, self.py_func.__name__))
    return orig(self, sig)


dispatcher.Dispatcher.compile = compile
import phimlx

phase = "load"
model = phimlx.load(sys.argv[1], backend="numpy")
phase = "warm-up"
if sys.argv[2] == "warm":
    model.warm_up()
    assert model.tokenizer._backend_obj is not None  # the tokenizer, built on first use
phase = "requests"
# what a server's first requests run: a chat prompt alone, then three short turns after
# kept prefixes in one pass, then steps of one and of four sessions
ids = model.encode_prompt("Write a story about a lighthouse keeper, please.")
first = model.new_session()
first.prefill(ids)
first.step(0)
more = [model.new_session() for _ in range(3)]
for s in more:
    s.prefill(ids[:8])
model.prefill_batch(more, [ids[8 : 8 + k] for k in (5, 7, 9)])
model.step_batch([first, *more], [1, 2, 3, 4])
# and steps of four sessions long enough to attend on numba's threads
from fallback import ops

c = model.config
n = ops.ROWS_ATTENTION_MAX // (4 * c.n_heads * c.head_dim) + 1
four = [model.new_session() for _ in range(4)]
for s in four:
    s.prefill(ids[:1] * n)
assert ops.attend_kernel(np.ones(4, np.int64), np.full(4, n), c.n_heads, c.head_dim) is (
    ops.attend_batch
)
model.step_batch(four, [1, 2, 3, 4])
print(sorted({k for p, k in loads if p == "requests"}))
print(sorted({k for p, k in loads if p == "warm-up"}))
"""


@pytest.fixture(scope="module")
def kernels_on_disk(smollm2_path):
    """numba's disk cache holding SmolLM2's kernels: a process that finds it empty compiles
    them all while loading (`fallback.load` warms up then), which leaves a later warm-up
    nothing to load."""
    script = "import sys, phimlx; phimlx.load(sys.argv[1], backend='numpy')"
    done = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_path)], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_warm_up_readies_every_kernel_the_first_requests_run(smollm2_path, kernels_on_disk, how):
    """After `Model.warm_up`, a server's first requests (a prompt, a batched prefill after
    kept prefixes, a step, a batched step, one whose attention runs on numba's threads)
    load no compiled kernel: each was loaded from numba's cache by the warm-up, which built
    the tokenizer too.  Without it they load several."""
    out = subprocess.run(
        [sys.executable, "-c", WARM_CHECK, str(smollm2_path), how],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()[-2:]
    in_requests, in_warm_up = (ast.literal_eval(line) for line in lines)
    if how == "warm":
        assert in_requests == [] and len(in_warm_up) >= 5, (in_requests, in_warm_up)
    else:
        assert len(in_requests) >= 5 and in_warm_up == []


def test_warm_up_leaves_the_model_as_it_was(smol):
    """The warm-up's sessions are its own: the kept sessions and what generation gives
    are as before."""
    kw = dict(max_tokens=8, temperature=0, repeat_penalty=1.0)
    before = smol.generate("Name three colours.", **kw)
    kept = [(s.position, list(s.tokens)) for s in smol._prompt_cache._sessions]
    seconds = smol.warm_up()
    assert seconds > 0
    assert [(s.position, list(s.tokens)) for s in smol._prompt_cache._sessions] == kept
    after = smol.generate("Name three colours.", **kw)
    assert (after.tokens, after.text) == (before.tokens, before.text)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_warm_up_on_either_backend(make_model, backend):
    """`Model.warm_up` runs on MLX too (its batched prefill is prefills in turn) and on a
    model whose context (16) is shorter than its prompts would be; greedy text is the same
    after it."""
    if backend == "mlx":
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            require("mlx", 'pip install "mlx[cpu]" mlx-lm')
    path = make_model(n_layers=2, hidden=64, ffn=128, n_heads=4, mix="Q8_0", context=16)
    kw = dict(max_tokens=6, temperature=0, repeat_penalty=1.0, chat=False)
    with phimlx.load(path, backend=backend) as m:
        assert m.config.context_length == 16
        before = m.generate("Hi there", **kw)
        m.clear_cache()
        assert m.warm_up() > 0
        assert m.generate("Hi there", **kw).tokens == before.tokens
