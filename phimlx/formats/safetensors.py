"""A validating safetensors reader: the header checked before anything is trusted.

The format (huggingface/safetensors, ``docs/source/index.mdx``)::

    header size N: u64 little-endian | N bytes of UTF-8 JSON | data

The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data), plus an optional ``"__metadata__"`` of string
pairs.  Every number in it comes from a stranger: the header size is bounded (100 MB, the
reference library's limit) and by the file; each tensor's byte count must equal its shape
times its dtype's size, lie inside the data and apart from the others; duplicate names,
unknown dtypes and non-integer shapes are refused.  Arrays are views of a copy-on-write
memory map (the file is never modified, nothing is read until asked for); ``BF16``, which
NumPy lacks, comes back as its raw ``uint16`` bits (`bf16_to_f32` widens it, exactly).

The ``safetensors`` library itself is not used to read: its NumPy loader cannot return
bfloat16, and its errors do not say which tensor is wrong.  The tests check this reader
against it on the files it can read.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
MAX_DIMS = 8

# safetensors dtype -> NumPy dtype of the stored bits (BF16: uint16; F8 types: uint8)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class SafetensorsFile:
    """A validated safetensors file.  Obtain one with `open_safetensors`."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int
    data_offset: int
    _map: np.memmap | None = field(default=None, repr=False)

    def _memmap(self) -> np.memmap:
        if self._map is None:
            # copy-on-write: writable views (numba compiles one signature for them) of a
            # file that can never be modified
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c", shape=(self.file_size,))
        return self._map

    def entry(self, name: str) -> TensorEntry:
        """The directory entry of ``name`` (a `CheckpointError` names a missing one)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in the file") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: ``uint8`` shaped ``(*shape[:-1], row_bytes)`` (a plain view
        of the memory map; a 0-d tensor is one row)."""
        t = self.entry(name)
        flat = self._memmap()[t.offset : t.offset + t.nbytes].view(np.ndarray)
        itemsize = DTYPES[t.dtype].itemsize
        if not t.shape:
            return flat.reshape(1, itemsize)
        return flat.reshape(*t.shape[:-1], t.shape[-1] * itemsize)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a typed view (BF16 as ``uint16`` bits, F8 as ``uint8``)."""
        t = self.entry(name)
        flat = self._memmap()[t.offset : t.offset + t.nbytes].view(np.ndarray)
        return flat.view(DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        """Drop this object's memory map (views handed out keep it alive until collected)."""
        self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (``uint16``) -> float32 values (exact: bfloat16 is float32's top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A stored float tensor (``dtype`` its safetensors name) as float32."""
    if dtype == "BF16":
        return bf16_to_f32(a)
    return np.asarray(a, dtype=np.float32)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key '{k}' appears twice")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Open and validate a safetensors file (its header only; no tensor data is read).

    Raises:
        CheckpointError: the file is truncated, its header is too large, not JSON, or
            describes tensors with unknown dtypes, shapes that disagree with their byte
            ranges, or byte ranges outside the file or overlapping (the message names the
            tensor and the numbers).
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    size = path.stat().st_size
    hint = "the file is truncated or corrupt; download it again"
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header; {hint}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header size {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit of "
                f"the format; this is not a safetensors file, or it is corrupt"
            )
        if n > size - 8:
            raise CheckpointError(
                f"{path}: the header claims {n} bytes but the file has {size - 8} after "
                f"the size field; {hint}"
            )
        head = f.read(n)
    try:
        header = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the header is not valid JSON ({e}); {hint}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object; {hint}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings")
    data_offset, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        tensors[name] = _entry(path, name, spec, data_offset, data_size)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors '{a}' and '{b}' overlap; the file is corrupt")
    return SafetensorsFile(path, tensors, dict(meta), size, data_offset)


def _entry(path: Path, name: str, spec: Any, data_offset: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: its header entry is not a JSON object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{where}: dtype {dtype!r} is not a safetensors dtype ({', '.join(DTYPES)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise CheckpointError(
            f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: bytes {begin}..{end} lie outside the {data_size} bytes of tensor data; "
            "the file is truncated or corrupt, download it again"
        )
    count = 1
    for d in shape:
        count *= d  # Python integers: no overflow
    if count * DTYPES[dtype].itemsize != end - begin:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype} needs {count * DTYPES[dtype].itemsize} bytes "
            f"but its data_offsets span {end - begin}; the file is corrupt"
        )
    return TensorEntry(name, dtype, tuple(shape), data_offset + begin, end - begin)
