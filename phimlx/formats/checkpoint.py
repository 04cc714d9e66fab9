"""A safetensors checkpoint folder (mlx-lm or Hugging Face), seen under GGUF tensor names.

The backends are written against GGUF names (``blk.0.attn_qkv.weight``); a `Checkpoint`
maps each onto the Hugging Face module that holds it (``model.layers.0.self_attn.qkv_proj``,
the names mlx-lm keeps), so both backends take either source.  The mapping is one to one:
Phi-3's fused ``qkv_proj`` (Q|K|V rows) and ``gate_up_proj`` (gate rows first) are laid out
as llama.cpp's ``attn_qkv`` and fused ``ffn_up``; llama's separate projections are GGUF's
separate ones.  (Hugging Face llama Q/K are *not* permuted as llama.cpp's converter permutes
them: the config says ``rope_style="neox"`` for them, see `formats.config`.)

Each weight is a `Weight`: a float matrix (F16, BF16, F32) or an mlx affine-quantized one
(``weight`` uint32 codes, ``scales`` and ``biases`` per group).  Everything is checked at
open time against the config -- presence, dtype and shape of every tensor the model needs,
quantization widths and groups, finite norms -- so that a bad folder fails here with a
`CheckpointError` naming the tensor, not later inside a kernel.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from .config import Quantization, model_config, quantization
from .errors import CheckpointError
from .safetensors import FLOAT_DTYPES, SafetensorsFile, open_safetensors, to_float32

log = logging.getLogger(__name__)

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20  # config.json, the index: far below this in any real model


@dataclass(frozen=True)
class Weight:
    """One tensor the model reads, under its GGUF name.

    ``shape`` is the logical NumPy-order shape (``(rows, cols)`` of a matrix, ``(n,)`` of a
    norm).  ``dtype`` is the safetensors dtype of a float weight, or of the ``scales`` and
    ``biases`` of a quantized one (``bits`` and ``group_size`` set).
    """

    name: str
    module: str  # the Hugging Face / mlx-lm module path, without ".weight"
    shape: tuple[int, ...]
    dtype: str
    bits: int | None = None
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def hf_module_names(config: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face module path holding it (for this config's
    fused / split projections and tied embeddings)."""
    m = {"token_embd.weight": "model.embed_tokens", "output_norm.weight": "model.norm"}
    if not config.tied_embeddings:
        m["output.weight"] = "lm_head"
    for i in range(config.n_layers):
        g, p = f"blk.{i}.", f"model.layers.{i}."
        m[g + "attn_norm.weight"] = p + "input_layernorm"
        m[g + "ffn_norm.weight"] = p + "post_attention_layernorm"
        if config.fused_qkv:
            m[g + "attn_qkv.weight"] = p + "self_attn.qkv_proj"
        else:
            for n in "qkv":
                m[f"{g}attn_{n}.weight"] = f"{p}self_attn.{n}_proj"
        m[g + "attn_output.weight"] = p + "self_attn.o_proj"
        if config.fused_gate_up:
            m[g + "ffn_up.weight"] = p + "mlp.gate_up_proj"
        else:
            m[g + "ffn_gate.weight"] = p + "mlp.gate_proj"
            m[g + "ffn_up.weight"] = p + "mlp.up_proj"
        m[g + "ffn_down.weight"] = p + "mlp.down_proj"
    return m


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a config.json and safetensors weights."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONFIG).is_file()
        and ((p / INDEX).is_file() or any(p.glob("*.safetensors")))
    )


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {what} is missing ({path.name})") from None
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config, its weights under GGUF names, and lazy
    memory-mapped views of their tensors.  Obtain one with `open_checkpoint`.

    Attributes:
        path: the folder.
        config: the model's `ModelConfig`.
        metadata: GGUF-style keys for the rest of phimlx (``general.name``,
            ``general.architecture``, ``tokenizer.chat_template`` when the folder has one).
        weights: GGUF name -> `Weight`.
        quantization: the affine quantization, or None (a float checkpoint).
    """

    path: Path
    config: ModelConfig
    config_json: dict[str, Any]
    metadata: dict[str, Any]
    weights: dict[str, Weight]
    quantization: Quantization | None
    files: list[SafetensorsFile] = field(repr=False)
    _where: dict[str, SafetensorsFile] = field(repr=False)

    @property
    def file_size(self) -> int:
        """Bytes of all the safetensors files."""
        return sum(f.file_size for f in self.files)

    @property
    def format(self) -> str:
        """``"mlx"`` (affine-quantized, as mlx-lm writes them) or ``"safetensors"``."""
        return "mlx" if self.quantization is not None else "safetensors"

    def weight(self, name: str) -> Weight:
        """The `Weight` under GGUF name ``name`` (a `CheckpointError` names a missing one)."""
        try:
            return self.weights[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: the model has no tensor '{name}'") from None

    def tensor(self, hf_name: str) -> np.ndarray:
        """A stored tensor by its own name, as a typed memory-mapped view (BF16 as uint16)."""
        return self._where[hf_name].array(hf_name)

    def raw(self, hf_name: str) -> np.ndarray:
        """A stored tensor's bytes, ``uint8 (*shape[:-1], row_bytes)``."""
        return self._where[hf_name].raw(hf_name)

    def float_weight(self, name: str) -> np.ndarray:
        """A float weight as stored (F16, F32; BF16 as uint16 bits), memory-mapped."""
        w = self.weight(name)
        if w.quantized:
            raise CheckpointError(f"{self.path}: '{w.module}' is quantized, not a float tensor")
        return self.tensor(w.module + ".weight")

    def affine_parts(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A quantized weight's ``(codes uint32 (rows, cols * bits / 32), scales, biases)``,
        the scales and biases as stored (``(rows, cols / group_size)``; BF16 as uint16)."""
        w = self.weight(name)
        if not w.quantized:
            raise CheckpointError(f"{self.path}: '{w.module}' is not quantized")
        m = w.module
        return self.tensor(m + ".weight"), self.tensor(m + ".scales"), self.tensor(m + ".biases")

    def dequantize(self, name: str) -> np.ndarray:
        """The whole weight as float32 (norms, and small tensors in tests; the backends
        never do this to weight matrices)."""
        w = self.weight(name)
        if not w.quantized:
            return to_float32(self.float_weight(name), w.dtype).reshape(w.shape)
        from .affine import dequantize_rows

        q, s, b = self.affine_parts(name)
        return dequantize_rows(q, s, b, w, 0, w.shape[0])

    def close(self) -> None:
        """Drop the memory maps (views handed out keep them alive until collected)."""
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's, or ``model*.safetensors`` (or
    every ``*.safetensors`` where none is so named)."""
    index_path = folder / INDEX
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index_path}: no 'weight_map' of tensor name -> file name")
        names = sorted(set(wmap.values()))
        for n in names:
            p = Path(n)
            if p.is_absolute() or ".." in p.parts or p.suffix != ".safetensors":
                raise CheckpointError(
                    f"{index_path}: '{n}' is not a safetensors file in the folder"
                )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index lists {', '.join(missing)}, which is not in the folder; "
                "the download is incomplete, fetch the model again"
            )
        return [folder / n for n in names]
    # as mlx-lm: model*.safetensors where there are such files (other safetensors in the
    # folder, e.g. a consolidated copy, would repeat the tensors)
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file and no {INDEX}")
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and validate a checkpoint folder (headers only; no weight data is read except
    the norm vectors, checked for NaN/Inf).

    Args:
        path: a folder with ``config.json`` and ``model*.safetensors`` (sharded with
            ``model.safetensors.index.json`` or not).

    Returns:
        A `Checkpoint`.

    Raises:
        CheckpointError: config.json or a safetensors file is missing, malformed or
            truncated; a tensor is missing, or its dtype or shape disagrees with the config.
        UnsupportedCheckpointError: a model type, quantization or rope scaling phimlx does
            not run (also an `UnsupportedModelError`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    cfg = _read_json(folder / CONFIG, "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / CONFIG}: not a JSON object")
    files: list[SafetensorsFile] = []
    where: dict[str, SafetensorsFile] = {}
    for p in _shard_files(folder):
        st = open_safetensors(p)
        files.append(st)
        for name in st.tensors:
            if name in where:
                raise CheckpointError(
                    f"{folder}: tensor '{name}' is in both {where[name].path.name} and {p.name}"
                )
            where[name] = st
    source = str(folder)
    config = model_config(cfg, where.keys(), source)
    quant = quantization(cfg, source)
    weights = {
        g: _check_weight(g, module, shape, where, quant, source)
        for g, (module, shape) in _expected(config).items()
    }
    ckpt = Checkpoint(folder, config, cfg, {}, weights, quant, files, where)
    for name, w in weights.items():
        if len(w.shape) == 1:
            v = ckpt.dequantize(name)
            if not np.isfinite(v).all():
                raise CheckpointError(f"{folder}: '{w.module}.weight' holds NaN or Inf")
    ckpt.metadata = _metadata(folder, cfg, config)
    log.info(
        "%s: %s checkpoint, %d file(s), %s",
        folder.name,
        config.architecture,
        len(files),
        f"affine {quant.bits}-bit groups of {quant.group_size}" if quant else "float",
    )
    return ckpt


def _expected(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    shapes = config.expected_tensors()
    return {g: (m, shapes[g]) for g, m in hf_module_names(config).items()}


def _check_weight(
    gname: str,
    module: str,
    shape: tuple[int, ...],
    where: dict[str, SafetensorsFile],
    quant: Quantization | None,
    source: str,
) -> Weight:
    def entry(suffix: str) -> Any:
        st = where.get(module + suffix)
        if st is None:
            raise CheckpointError(
                f"{source}: tensor '{module}{suffix}' is missing (it holds {gname}, expected "
                f"shape {shape}); the checkpoint is incomplete or of another layout"
            )
        return st.tensors[module + suffix]

    w = entry(".weight")
    if module + ".scales" not in where:
        if w.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{source}: tensor '{w.name}' is {w.dtype} without scales; expected F16, BF16 "
                "or F32 (or an mlx quantized weight with .scales and .biases)"
            )
        if w.shape != shape:
            raise CheckpointError(
                f"{source}: tensor '{w.name}' has shape {w.shape} but config.json implies {shape}"
            )
        return Weight(gname, module, shape, w.dtype)
    if quant is None:
        raise CheckpointError(
            f"{source}: '{module}' has quantization scales but config.json has no "
            "'quantization' entry (bits, group_size)"
        )
    spec = quant.of(module)
    if spec is None or len(shape) != 2:
        raise CheckpointError(
            f"{source}: '{module}' is stored quantized but config.json's quantization says "
            "it is not"
        )
    bits, group = spec
    rows, cols = shape
    s, b = entry(".scales"), entry(".biases")
    if cols % group or (cols * bits) % 32:
        raise CheckpointError(
            f"{source}: '{module}' has {cols} columns, not whole groups of {group} x {bits} bits"
        )
    want = {
        w.name: ("U32", (rows, cols * bits // 32)),
        s.name: (s.dtype, (rows, cols // group)),
        b.name: (s.dtype, (rows, cols // group)),
    }
    for t in (w, s, b):
        dtype, tshape = want[t.name]
        if t.dtype != dtype or t.shape != tshape:
            raise CheckpointError(
                f"{source}: tensor '{t.name}' is {t.dtype} {list(t.shape)} but a {rows}x{cols} "
                f"weight quantized to {bits} bits in groups of {group} needs {dtype} "
                f"{list(tshape)}; config.json and the weights disagree"
            )
    if s.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{source}: '{s.name}' is {s.dtype}; scales and biases are F16, BF16 or F32"
        )
    return Weight(gname, module, shape, s.dtype, bits, group)


def _metadata(folder: Path, cfg: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """GGUF-style keys the rest of phimlx reads from a model file."""
    from ..tokenizer.folder import read_chat_template

    md: dict[str, Any] = {
        "general.architecture": config.architecture,
        "general.name": config.name if config.name != config.architecture else folder.name,
    }
    template = read_chat_template(folder)
    if template is not None:
        md["tokenizer.chat_template"] = template
    return md


def describe(path: str | os.PathLike[str]) -> list[str]:
    """Lines for ``phimlx info`` about a checkpoint folder (as it prints a GGUF's)."""
    folder = Path(path)
    try:
        ck = open_checkpoint(folder)
    except CheckpointError as e:
        return [f"folder:        {folder}", f"config:        NOT RUNNABLE: {e}"]
    c, q = ck.config, ck.quantization
    n_params = sum(int(np.prod(w.shape)) for w in ck.weights.values())
    dtypes = sorted({w.dtype for w in ck.weights.values()})
    if q is None:
        kind = f"float ({', '.join(dtypes)})"
    else:
        widths = sorted({(w.bits, w.group_size) for w in ck.weights.values() if w.quantized})
        floats = sum(1 for w in ck.weights.values() if len(w.shape) == 2 and not w.quantized)
        kind = (
            "mlx affine "
            + ", ".join(f"{b}-bit g{g}" for b, g in widths)
            + (f" ({floats} float matrices)" if floats else "")
        )
    ck.close()
    return [
        f"folder:        {folder} ({ck.file_size / 2**30:.2f} GiB in {len(ck.files)} "
        "safetensors file(s))",
        f"name:          {ck.metadata.get('general.name', '?')}",
        f"architecture:  {c.architecture}",
        f"parameters:    {n_params / 1e9:.2f} B",
        f"weights:       {kind}",
        f"layers:        {c.n_layers}, hidden {c.hidden_size}, ffn {c.ffn_size}, "
        f"heads {c.n_heads}/{c.n_kv_heads} x {c.head_dim}",
        f"context:       {c.context_length}"
        + (f" (LongRoPE from {c.rope_original_context})" if c.rope_original_context else "")
        + (f", sliding window {c.sliding_window}" if c.sliding_window else ""),
        f"vocab:         {c.vocab_size}",
        f"tokenizer:     {'tokenizer.json' if (folder / 'tokenizer.json').is_file() else 'none'}",
        f"chat template: {'yes' if 'tokenizer.chat_template' in ck.metadata else 'no'}",
    ]
