"""Prompt caches on disk (`phimlx.cache_file`): round trips, and every bad file refused.

A round trip is checked against the session that was saved: after loading into a freshly
loaded model, the next step and prefill give that session's logits.  A bad file must be a
`PromptCacheError`, never another exception and never a session that computes garbage.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import phimlx
from phimlx import cache_file
from phimlx.errors import PromptCacheError

HAVE_MLX = all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))
BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(not HAVE_MLX, reason="no mlx"))]
TINY = dict(n_layers=2, hidden=64, ffn=128, n_heads=4, mix="F32")  # the tiny_phi3 fixture's
PROMPT = np.random.default_rng(7).integers(3, 32000, size=23).tolist()


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(path, framework="numpy") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def tiny(tiny_phi3):
    with phimlx.load(tiny_phi3, backend="numpy") as m:
        yield m


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory) -> Path:
    """A valid cache of ``PROMPT`` made by ``tiny`` (NumPy)."""
    path = tmp_path_factory.mktemp("cache") / "good.safetensors"
    s = tiny.new_session(64)
    s.prefill(PROMPT)
    cache_file.save(path, s, tiny)
    return path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["tiny_phi3", "smollm2"])
def test_round_trip_continues_like_the_saved_session(request, tmp_path, backend, which):
    model_path = request.getfixturevalue("tiny_phi3" if which == "tiny_phi3" else "smollm2_path")
    path = tmp_path / "prompt.safetensors"
    with phimlx.load(model_path, backend=backend) as model:
        vocab = model.config.vocab_size
        ids = [i % vocab for i in PROMPT]
        s = model.new_session(96)
        s.prefill(ids)
        cache_file.save(path, s, model)
        # what the saved session does next: the reference for the loaded one
        ref_step = s.step(ids[5])
        ref_prefill = s.prefill(ids[:4])
        ref_k, _ = s._inner.kv_state()

    tensors, meta = _read(path)
    assert sorted(tensors) == ["k", "tokens", "v"]
    assert tensors["tokens"].dtype == np.int32 and tensors["tokens"].tolist() == ids
    c = model.config
    assert tensors["k"].shape == (c.n_layers, c.n_kv_heads, len(ids), c.head_dim)
    assert tensors["v"].shape == tensors["k"].shape and tensors["k"].dtype == np.float32
    assert meta["positions"] == str(len(ids)) and meta["max_context"] == "96"
    assert (meta["backend"], meta["kv_dtype"], meta["format"]) == (
        backend,
        "float32",  # both backends cache float32 on the CPU
        "phimlx.prompt_cache",
    )
    # K as cached: the saved session's (a prefix of its later state), after rope
    np.testing.assert_array_equal(tensors["k"], ref_k[:, :, : len(ids)])

    with phimlx.load(model_path, backend=backend) as fresh:  # a new model object
        loaded = cache_file.load(path, fresh)
        assert loaded.tokens == tuple(ids) and loaded.position == len(ids)
        assert loaded.max_context == 96
        step = loaded.step(ids[5])
        np.testing.assert_allclose(step, ref_step, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(loaded.prefill(ids[:4]), ref_prefill, rtol=1e-6, atol=1e-6)
        assert loaded.tokens == (*ids, ids[5], *ids[:4])


def test_round_trip_is_the_prompt_and_not_another(tiny, good):
    """The loaded cache holds this prompt: its next logits are those of a fresh prefill of
    the prompt (float rounding apart), and differ from another prompt's."""
    loaded = cache_file.load(good, tiny)
    nxt = loaded.prefill([PROMPT[0]])
    fresh = tiny.new_session().prefill([*PROMPT, PROMPT[0]])
    np.testing.assert_allclose(nxt, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
    other = tiny.new_session().prefill([*PROMPT[1:], PROMPT[0], PROMPT[0]])
    assert np.abs(other - fresh).max() > 1e-2


def test_a_renamed_model_file_still_matches(tiny_phi3, good, tmp_path):
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(tiny_phi3, copy)
    with phimlx.load(copy, backend="numpy") as m:
        assert cache_file.load(good, m).tokens == tuple(PROMPT)


@pytest.mark.skipif(not HAVE_MLX, reason="no mlx")
def test_sliding_window_mlx_cache(make_model, tmp_path):
    """Before the window is passed, and after one prefill longer than the window (held
    whole), a sliding-window cache round-trips; once it has wrapped, save refuses it."""
    path = make_model(**TINY, sliding_window=8)
    with phimlx.load(path, backend="mlx") as m, phimlx.load(path, backend="mlx") as fresh:
        for n in (6, 20):
            s = m.new_session(64)
            s.prefill(PROMPT[:n])
            cache_file.save(tmp_path / "w.safetensors", s, m)
            ref = [s.step(t) for t in PROMPT[n : n + 3]]  # steps past the window: it rotates
            loaded = cache_file.load(tmp_path / "w.safetensors", fresh)
            for t, r in zip(PROMPT[n : n + 3], ref, strict=True):
                np.testing.assert_allclose(loaded.step(t), r, rtol=1e-6, atol=1e-6)
        s = m.new_session(64)
        s.prefill(PROMPT[:6])
        for t in PROMPT[6:10]:
            s.step(t)  # the 9th and 10th positions overwrite the first two
        with pytest.raises(PromptCacheError, match="wrapped"):
            cache_file.save(tmp_path / "wrapped.safetensors", s, m)
        assert not (tmp_path / "wrapped.safetensors").exists()


# ----------------------------------------------------------------------------- saving


def test_save_replaces_atomically(tiny, good, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    shutil.copyfile(good, path)
    before = path.read_bytes()
    s = tiny.new_session(64)
    s.prefill(PROMPT[:5])

    def crash(tensors, filename, metadata=None):  # dies after writing half of the file
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cache_file.save(path, s, tiny)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left behind


def test_save_refuses_an_empty_session_and_a_foreign_one(tiny, tiny_phi3, tmp_path):
    with pytest.raises(PromptCacheError, match="no tokens"):
        cache_file.save(tmp_path / "e.safetensors", tiny.new_session(), tiny)
    with phimlx.load(tiny_phi3, backend="numpy") as other:
        s = other.new_session()
        s.prefill(PROMPT[:3])
        with pytest.raises(PromptCacheError, match="not made by this model"):
            cache_file.save(tmp_path / "f.safetensors", s, tiny)


# ------------------------------------------------------------------------------ bad files


def _refused(path: Path, model, match: str | None = None) -> PromptCacheError:
    with pytest.raises(PromptCacheError, match=match) as e:
        cache_file.load(path, model)
    return e.value


def test_missing_file_and_a_folder(tiny, tmp_path):
    _refused(tmp_path / "nope.safetensors", tiny, "does not exist")
    _refused(tmp_path, tiny, "not a file")


def test_truncated_empty_and_garbage_files(tiny, good, tmp_path, tiny_phi3):
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    for n in (0, 1, 7, 8, 9, 100, header_end - 1, header_end, header_end + 1, len(data) // 2):
        bad.write_bytes(data[:n])
        _refused(bad, tiny, "not a readable prompt cache")
    bad.write_bytes(data[:-1])
    _refused(bad, tiny, "not a readable")
    bad.write_bytes(data + b"\0" * 8)  # trailing bytes the header does not account for
    _refused(bad, tiny)
    rng = np.random.default_rng(0)
    for size in (16, 1000, 100_000):
        bad.write_bytes(rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
        _refused(bad, tiny, "not a readable")
    bad.write_bytes((2**63).to_bytes(8, "little") + b"{}")  # a header length beyond the file
    _refused(bad, tiny, "not a readable")
    _refused(tiny_phi3, tiny, "not a readable")  # a GGUF is not a cache


def test_a_cache_of_another_model(tiny, good, make_model, tmp_path):
    other_shape = make_model(**{**TINY, "n_heads": 2})  # head_dim 32 instead of 16
    other_weights = make_model(**TINY, seed=1)
    with phimlx.load(other_weights, backend="numpy") as m:
        # the same header byte for byte: only the weights tell the two files apart
        assert m._file.data_offset == tiny._file.data_offset
        with open(other_weights, "rb") as a, open(tiny.path, "rb") as b:
            assert a.read(m._file.data_offset) == b.read(m._file.data_offset)
        err = _refused(good, m, "made for another model")
        assert "other weights" in str(err) and "rebuild" in str(err)
    with phimlx.load(other_shape, backend="numpy") as m:
        s = m.new_session(64)
        s.prefill(PROMPT)
        cache_file.save(tmp_path / "o.safetensors", s, m)
    err = _refused(tmp_path / "o.safetensors", tiny, "made for another model")
    assert "head_dim" in str(err) and other_shape.name in str(err)


def test_another_model_is_refused_from_the_header_alone(tiny, make_model, tmp_path, monkeypatch):
    with phimlx.load(make_model(**TINY, seed=1), backend="numpy") as m:
        s = m.new_session(64)
        s.prefill(PROMPT)
        cache_file.save(tmp_path / "o.safetensors", s, m)
    calls = []
    real = cache_file._read
    monkeypatch.setattr(cache_file, "_read", lambda p, **kw: calls.append(kw) or real(p, **kw))
    _refused(tmp_path / "o.safetensors", tiny, "another model")
    assert calls == [{}]  # the header only: no tensor was read


@pytest.mark.skipif(not HAVE_MLX, reason="no mlx")
def test_a_cache_of_another_backend(tiny, tiny_phi3, tmp_path):
    with phimlx.load(tiny_phi3, backend="mlx") as m:
        s = m.new_session(64)
        s.prefill(PROMPT)
        cache_file.save(tmp_path / "mlx.safetensors", s, m)
    err = _refused(tmp_path / "mlx.safetensors", tiny, "'mlx' backend")
    assert "backend='mlx'" in str(err)


def _edited(good: Path, tmp_path: Path, tensors=None, **meta: str | None) -> Path:
    """``good`` written again with some tensors replaced and metadata changed (None:
    removed), with safetensors itself: a well-formed file with wrong contents."""
    t, m = _read(good)
    t.update(tensors or {})
    t = {k: v for k, v in t.items() if v is not None}
    m.update(meta)
    path = tmp_path / "edited.safetensors"
    save_file(t, path, metadata={k: v for k, v in m.items() if v is not None})
    return path


@pytest.mark.parametrize(
    "meta, match",
    [
        (dict(format="mlx_lm"), "not a phimlx prompt cache"),
        (dict(format=None), "not a phimlx prompt cache"),
        (dict(format_version="2"), "version 2"),
        (dict(format_version="one"), "not an integer"),
        (dict(model_fingerprint="0" * 64), "another model"),
        (dict(model_file_size="1"), "another model"),
        (dict(n_layers="3"), "n_layers"),
        (dict(backend="cuda"), "'cuda' backend"),
        (dict(kv_dtype="float16"), "float16 KV cache"),
        (dict(kv_dtype="int4"), "unknown KV dtype"),
        (dict(positions="22"), "tensor 'tokens'"),  # 23 ids in the file
        (dict(positions="24"), "tensor 'tokens'"),
        (dict(positions="0"), "positions"),
        (dict(positions=None), "'positions' is missing"),
        (dict(max_context="22"), "positions <= max_context"),
        (dict(max_context="4097"), "context length 4096"),
        (dict(max_context="-1"), "max_context"),
    ],
)
def test_edited_metadata(tiny, good, tmp_path, meta, match):
    _refused(_edited(good, tmp_path, **meta), tiny, match)


def _bad_tensors() -> dict[str, tuple[dict[str, np.ndarray | None], str]]:
    n = len(PROMPT)
    k = np.zeros((2, 4, n, 16), np.float32)
    ids = np.asarray(PROMPT, np.int32)
    return {
        "id-at-vocab": (dict(tokens=np.where(np.arange(n) == 3, 32064, ids)), "token id 32064"),
        "id-negative": (dict(tokens=np.where(np.arange(n) == 0, -1, ids)), "token id -1"),
        "tokens-int64": (dict(tokens=ids.astype(np.int64)), "'tokens' is I64"),
        "tokens-2d": (dict(tokens=ids[:, None]), "'tokens'"),
        "k-float64": (dict(k=k.astype(np.float64)), "'k' is F64"),
        "v-float16": (dict(v=k.astype(np.float16)), "'v' is F16"),
        "k-one-layer": (dict(k=k[:1]), r"'k' is F32 \(1, 4"),
        "v-transposed": (dict(v=k.transpose(0, 2, 1, 3).copy()), "'v'"),
        "v-fewer-positions": (dict(v=k[:, :, :-1]), "'v'"),
        "k-missing": (dict(k=None), "holds tensors"),
        "extra": (dict(extra=ids), "holds tensors"),
        "k-nan": (dict(k=np.where(np.arange(16) == 5, np.nan, k).astype(np.float32)), "NaN"),
        "v-inf": (dict(v=np.full_like(k, np.inf)), "infinite"),
    }


@pytest.mark.parametrize("case", list(_bad_tensors()))
def test_bad_tensors(tiny, good, tmp_path, case):
    tensors, match = _bad_tensors()[case]
    _refused(_edited(good, tmp_path, tensors), tiny, match)


def test_the_good_file_still_loads_after_all_that(tiny, good):
    """The edits above were made to copies: the file they started from is valid (so each
    refusal was the edit's doing)."""
    s = cache_file.load(good, tiny)
    assert s.tokens == tuple(PROMPT)
