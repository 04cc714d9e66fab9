"""GGUF file -> an mlx-lm model folder (config.json, safetensors, tokenizer files).

The folder holds the same tensors the MLX backend runs (`weights.iter_weights`), in MLX's
quantized layout with a per-layer ``quantization`` entry in config.json, so
``mlx_lm.load(out_dir)`` builds the same phi3 / llama modules.  Differences from our backend
that mlx-lm's config cannot express: LongRoPE models always use the long factors (mlx-lm),
and llama.cpp's sliding window is written as ``sliding_window`` but mlx-lm's phi3 ignores it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import BackendUnavailableError
from ..gguf import GGMLType, open_gguf
from .quant import GROUP, Quantized
from .weights import iter_weights, mlx_lm_config

log = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30  # start a new safetensors file after ~2 GiB
_DTYPES = ("float16", "bfloat16", "float32")


def convert(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    tokenizer: bool = True,
) -> Path:
    """Write an mlx-lm model folder for ``gguf_path`` into ``out_dir``.

    Args:
        gguf_path: a phi3 or llama GGUF file.
        out_dir: the folder to create (or fill); existing files of the same names are replaced.
        dtype: of the scales, biases and float weights: "float16" (default), "bfloat16" or
            "float32" (bit-exact K-quant scales; what the MLX backend uses on the CPU).
        tokenizer: also write tokenizer.json and tokenizer_config.json (the GGUF's own
            tokenizer, written with the ``tokenizers`` library).

    The files are written into a temporary folder beside ``out_dir`` and moved into it
    only when all are complete: an interrupted conversion leaves no half-written folder.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        GGUFError: the file is not a valid GGUF or not a supported model.
        ValueError: ``dtype`` is not one of the three names.
        BackendUnavailableError: MLX is not installed (it writes the safetensors files).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    try:
        import mlx.core as mx
    except ImportError as e:
        raise BackendUnavailableError(
            f"phimlx convert writes MLX's safetensors layout and needs MLX ({e}); install "
            'it with pip install "mlx" (macOS arm64) or "mlx[cpu]" (Linux)'
        ) from e
    mxd = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[dtype]
    np_scale = np.float32 if dtype == "float32" else np.float16
    gguf_path, final = Path(gguf_path), Path(out_dir)
    mf = open_gguf(gguf_path)
    config = ModelConfig.from_gguf(mf)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.phimlx-tmp-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        _write(mf, config, out, mxd, np_scale, tokenizer)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        mf.close()
        raise
    mf.close()
    _move_into_place(out, final)
    log.info("wrote %s", final)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """``tmp``'s files into ``final`` (renamed whole when ``final`` does not exist yet)."""
    if not final.exists():
        tmp.rename(final)
        return
    for f in tmp.iterdir():
        os.replace(f, final / f.name)
    tmp.rmdir()


def _write(
    mf: Any,
    config: ModelConfig,
    out: Path,
    mxd: Any,
    np_scale: type,
    tokenizer: bool,
) -> None:
    import mlx.core as mx

    cfg: dict[str, Any] = mlx_lm_config(config, mf)
    quant: dict[str, Any] = {"group_size": GROUP, "bits": 4}
    shard: dict[str, mx.array] = {}
    shard_bytes, files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard, shard_bytes = {}, 0

    for path, gtype, value in iter_weights(mf, config, np_scale):
        if isinstance(value, Quantized):
            shard[path + ".weight"] = mx.array(value.weight)
            shard[path + ".scales"] = mx.array(value.scales).astype(mxd)
            shard[path + ".biases"] = mx.array(value.biases).astype(mxd)
            quant[path] = {"group_size": value.group_size, "bits": value.bits}
        else:
            arr = mx.array(value)
            if gtype == GGMLType.BF16:
                arr = arr.view(mx.bfloat16)
            shard[path + ".weight"] = arr.astype(mxd)
        mx.eval(list(shard.values()))
        shard_bytes = sum(v.nbytes for v in shard.values())
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()

    cfg["quantization"] = quant
    cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    index["metadata"]["total_size"] = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        _write_tokenizer(mf, config, out)
    log.info("%d safetensors file(s), %s layout", len(files), cfg["model_type"])


def _write_tokenizer(mf: Any, config: ModelConfig, out: Path) -> None:
    # phimlx's own GGUF tokenizer written with the `tokenizers` library (no torch, no
    # transformers): AutoTokenizer (and so mlx-lm) reads the files back with llama.cpp's ids.
    from ..tokenizer import Tokenizer
    from ..tokenizer.export import write_tokenizer_files

    write_tokenizer_files(
        Tokenizer.from_gguf(mf),
        out,
        chat_template=mf.metadata.get("tokenizer.chat_template"),
        model_max_length=config.context_length,
    )
