"""GGUF container reader: validates everything before trusting anything.

The file format, written down as data (gguf-py's ``constants.py`` is the public
description; this is our own reader).  A GGUF file is::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, ne: u64 x n_dims, type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data, each tensor at data_start + offset

Strings are a u64 byte length and UTF-8 bytes; arrays are an element type u32,
a u64 count and the elements.  Every length and count here comes from a
stranger, so each is bounded by the bytes that remain before it is used, and
every tensor must lie aligned, inside the file and apart from the others.
What the spec or llama.cpp forbids is refused too: empty, non-ASCII or over-long
keys, bools other than 0 and 1, and a known key (`format.KEY_TYPES`) stored with a
type llama.cpp would not read.  Invalid UTF-8 in a string *value* is decoded with
U+FFFD (and logged), as llama.cpp passes such bytes through.
Nothing reads tensor data at open time: ``open_gguf`` on a multi-GB file costs
the header only.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GGUFError, UnsupportedModelError
from .format import (
    ARCH_KEY_TYPES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    KEY_TYPES,
    MAX_ARRAY_NESTING,
    MAX_DIMS,
    MAX_KEY_LENGTH,
    MIN_KV_SIZE,
    MIN_TENSOR_INFO_SIZE,
    MIN_VALUE_SIZE,
    SCALAR_DTYPES,
    SCALAR_FORMATS,
    SUPPORTED_TYPES,
    TYPE_SIZES,
    GGMLType,
    ValueType,
)
from .quants import dequantize

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file.

    ``shape`` is in NumPy order (the last axis is contiguous), i.e. GGUF's ``ne``
    reversed: a weight of ``out_features x in_features`` has shape ``(out, in)``.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last axis) in the file's encoding."""
        block, size = TYPE_SIZES[self.type]
        return self.shape[-1] // block * size


@dataclass
class ModelFile:
    """A validated GGUF file: metadata, tensor directory and lazy memory-mapped tensor views.

    Obtain one with :func:`open_gguf`.  Tensor data is never read until asked for, and then
    only through a copy-on-write memory map (the file on disk is never modified).
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    _data: np.memmap | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(
                f"{self.path}: metadata key 'general.architecture' is missing or not a string; "
                "this is not a model file phimlx can use"
            )
        return arch

    def _memmap(self) -> np.memmap:
        if self._data is None:
            # Copy-on-write ('c'): writable arrays for numba (read-only arrays compile a second
            # signature), while the file itself can never be modified.
            self._data = np.memmap(self.path, dtype=np.uint8, mode="c", shape=(self.file_size,))
        return self._data

    def info(self, name: str) -> TensorInfo:
        """The directory entry of tensor ``name`` (a `GGUFError` names a missing one)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor '{name}' is missing from the file") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a ``uint8`` view shaped ``(*shape[:-1], row_bytes)``."""
        t = self.info(name)
        flat = self._memmap()[t.offset : t.offset + t.nbytes]
        return flat.reshape(*t.shape[:-1], t.row_bytes)

    def array(self, name: str) -> np.ndarray:
        """A typed view of a float tensor (F32, F16, F64; BF16 as raw ``uint16``), or raw
        blocks (as :meth:`raw`) for quantized types."""
        t = self.info(name)
        dtypes = {
            GGMLType.F32: np.float32,
            GGMLType.F16: np.float16,
            GGMLType.F64: np.float64,
            GGMLType.BF16: np.uint16,
            GGMLType.I8: np.int8,
            GGMLType.I16: np.int16,
            GGMLType.I32: np.int32,
            GGMLType.I64: np.int64,
        }
        if t.type in dtypes:
            return self.raw(name).view(dtypes[t.type]).reshape(t.shape)
        return self.raw(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (for small tensors and tests; the backends never do
        this for weight matrices)."""
        t = self.info(name)
        check_supported(t, self.path)
        return dequantize(self.raw(name), t.type, t.shape)

    def close(self) -> None:
        """Drop this object's memory map.  Views handed out earlier keep the mapping alive
        until they are garbage-collected."""
        self._data = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_supported(t: TensorInfo, path: Path | str = "") -> None:
    """Raise `UnsupportedModelError` if phimlx cannot compute with tensor ``t``'s type."""
    if t.type not in SUPPORTED_TYPES:
        names = ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
        raise UnsupportedModelError(
            f"{path}: tensor '{t.name}' has type {t.type.name}, which phimlx does not support "
            f"(supported: {names}); convert the model to one of these with llama.cpp's "
            "llama-quantize"
        )


class _Cursor:
    """Bounded little-endian reads over the header bytes; each error names the byte offset."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, what: str, hint: str = "", at: int | None = None) -> GGUFError:
        where = self.pos if at is None else at
        msg = f"{self.path}: {what} (at byte {where})"
        return GGUFError(msg + (f"; {hint}" if hint else ""))

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} needs {n} bytes but only {self.size - self.pos} remain in the "
                f"{self.size}-byte file",
                "the file is truncated (an interrupted download?) or corrupt; download it again",
            )

    def scalar(self, vtype: ValueType, what: str) -> Any:
        fmt = SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def raw_string(self, what: str) -> bytes:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} claims {n} bytes but only {self.size - self.pos} remain",
                "the file is truncated or corrupt",
                at=start,
            )
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw

    def string(self, what: str) -> str:
        start = self.pos
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warning(
                "%s: %s at byte %d is not valid UTF-8; decoded with U+FFFD", self.path, what, start
            )
            return raw.decode("utf-8", errors="replace")

    def key(self, index: int) -> str:
        """A metadata key: non-empty (llama.cpp's gguf.cpp: "key %d is empty"), ASCII and at
        most 65535 bytes (the spec: "It must be a valid ASCII string", "at most 2^16-1")."""
        start = self.pos
        raw = self.raw_string(f"key of metadata entry {index}")
        if not raw:
            raise self.fail(
                f"key of metadata entry {index} is empty",
                "a GGUF key must not be empty (llama.cpp refuses the file); the file is corrupt",
                at=start,
            )
        shown = raw[:80].decode("ascii", "backslashreplace")
        if len(raw) > MAX_KEY_LENGTH:
            raise self.fail(
                f"metadata key '{shown}...' (entry {index}) is {len(raw)} bytes long",
                f"the GGUF spec limits a key to {MAX_KEY_LENGTH} bytes; the file is corrupt",
                at=start,
            )
        if not raw.isascii():
            raise self.fail(
                f"metadata key '{shown}' (entry {index}) is not ASCII",
                "the GGUF spec requires a key to be a valid ASCII string; the file is corrupt",
                at=start,
            )
        return raw.decode("ascii")

    def boolean(self, what: str) -> bool:
        """A bool byte: the spec allows 0 (false) and 1 (true) only ("Anything else is
        invalid"), although llama.cpp reads any nonzero byte as true."""
        at = self.pos
        b = self.scalar(ValueType.UINT8, what)
        if b > 1:
            raise self.fail(
                f"{what} is a bool stored as byte {b:#04x}",
                "a GGUF bool must be 0 or 1 (the spec: anything else is invalid); "
                "the file is corrupt",
                at=at,
            )
        return bool(b)

    def value_type(self, what: str) -> ValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(
                f"{what} has unknown value type {raw}", "the file is corrupt", at=at
            ) from None

    def value(self, vtype: ValueType, what: str, depth: int = 0) -> Any:
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.BOOL:
            return self.boolean(what)
        if vtype != ValueType.ARRAY:
            return self.scalar(vtype, what)
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(
                f"{what} nests arrays deeper than {MAX_ARRAY_NESTING}", "the file is corrupt"
            )
        etype = self.value_type(f"element type of {what}")
        at = self.pos
        count = self.u64(f"length of {what}")
        if count * MIN_VALUE_SIZE[etype] > self.size - self.pos:
            raise self.fail(
                f"{what} claims {count} elements of type {etype.name}, more than the "
                f"{self.size - self.pos} remaining bytes can hold",
                "the file is truncated or corrupt",
                at=at,
            )
        if etype in SCALAR_DTYPES:
            arr = np.frombuffer(self.buf, dtype=SCALAR_DTYPES[etype], count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        if etype == ValueType.BOOL:
            arr = np.frombuffer(self.buf, dtype=np.uint8, count=count, offset=self.pos)
            bad = np.flatnonzero(arr > 1)
            flags = None if bad.size else (arr != 0).tolist()
            first = (int(bad[0]), int(arr[bad[0]])) if bad.size else (0, 0)
            # `arr` views the map: a traceback holding it would keep the map from closing.
            del arr
            if flags is None:
                i, byte = first
                raise self.fail(
                    f"{what}[{i}] is a bool stored as byte {byte:#04x}",
                    "a GGUF bool must be 0 or 1 (the spec: anything else is invalid); "
                    "the file is corrupt",
                    at=self.pos + i,
                )
            self.pos += count
            return flags
        if etype == ValueType.STRING:
            return self._strings(count, what)
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """A string array in one tight loop: vocabularies hold 30k-150k of them."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        raw: list[bytes] = []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                raise self.fail(
                    f"{what}[{i}] claims {n} bytes but only {size - pos} remain",
                    "the file is truncated or corrupt",
                    at=pos - 8,
                )
            raw.append(buf[pos : pos + n])
            pos += n
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            log.warning("%s: %s holds invalid UTF-8; decoded with U+FFFD", self.path, what)
            return [b.decode("utf-8", errors="replace") for b in raw]


def open_gguf(path: str | os.PathLike[str]) -> ModelFile:
    """Open and validate a GGUF file without reading its tensor data.

    Args:
        path: a local ``.gguf`` file.

    Returns:
        A `ModelFile` whose metadata and tensor directory have been checked: every length
        and count fits in the file, every tensor is aligned, inside the file, and apart from
        the others, every type is known, keys and tensor names are unique, keys are
        non-empty ASCII, bools are 0 or 1, and the keys llama.cpp reads have the types it
        reads them as (`format.KEY_TYPES`).

    Raises:
        GGUFError: the file is not a valid GGUF; the message names the field, the byte offset
            and the likely cause.
        FileNotFoundError: there is no file at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise GGUFError(f"{path} is a directory, not a GGUF file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            head = f.read()
            _check_magic(head, path)
            raise GGUFError(
                f"{path}: the file is only {size} bytes, too short for a GGUF header (24 bytes); "
                "it is truncated: download it again"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size, path)


def _check_magic(head: bytes, path: Path) -> None:
    if head[:4] == GGUF_MAGIC:
        return
    hints = {
        b"ggml": "an old GGML file (before GGUF); re-convert it with llama.cpp's convert tools",
        b"ggjt": "an old GGJT file (before GGUF); re-convert it with llama.cpp's convert tools",
        b"ggmf": "an old GGMF file (before GGUF); re-convert it with llama.cpp's convert tools",
        b"FUGG": "a big-endian GGUF; phimlx reads little-endian files only",
        b"vers": "a Git LFS pointer, not the model; fetch the real file (git lfs pull)",
    }
    hint = hints.get(head[:4])
    if hint is None and head[:1] in (b"<", b"{"):
        hint = "an HTML or JSON page, not a model; the download probably failed"
    raise GGUFError(
        f"{path}: not a GGUF file (magic {head[:4]!r} at byte 0, expected b'GGUF'); "
        + (f"this looks like {hint}" if hint else "is this the right file?")
    )


def _check_key_types(cur: _Cursor, metadata: dict[str, Any], type_at: dict[str, int]) -> None:
    """Refuse a known key stored with a type llama.cpp does not read (`format.KEY_TYPES`,
    and `format.ARCH_KEY_TYPES` under the file's own architecture), in file order."""
    arch = metadata.get("general.architecture")
    prefix = f"{arch}." if isinstance(arch, str) else None
    for key, at in type_at.items():
        rule = KEY_TYPES.get(key)
        if rule is None and prefix is not None and key.startswith(prefix):
            rule = ARCH_KEY_TYPES.get(key[len(prefix) :])
        if rule is None:
            continue
        # Both were validated while the value was read.
        vtype = ValueType(_U32.unpack_from(cur.buf, at)[0])
        etype = (
            ValueType(_U32.unpack_from(cur.buf, at + 4)[0]) if vtype == ValueType.ARRAY else None
        )
        if rule.accepts(vtype, etype):
            continue
        stored = f"an array of {etype.name}" if etype is not None else vtype.name
        raise cur.fail(
            f"metadata '{key}' is stored as {stored}; it must be {rule.describe()}",
            f"llama.cpp ({rule.where}) refuses any other type; the file is corrupt or was "
            "written by a broken converter",
            at=at,
        )


def _parse(buf: mmap.mmap, size: int, path: Path) -> ModelFile:
    _check_magic(buf[:4], path)
    cur = _Cursor(buf, size, path)
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version != 0:
            raise cur.fail(
                f"version field reads {version:#x}",
                "this looks like a big-endian GGUF; phimlx reads little-endian files",
                at=4,
            )
        hint = (
            "GGUF v1 is obsolete; re-convert the model with a current llama.cpp"
            if version == 1
            else "a newer or corrupt file; phimlx reads GGUF versions 2 and 3"
        )
        raise cur.fail(f"unsupported GGUF version {version}", hint, at=4)

    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata key/value count")
    remaining = size - cur.pos
    if kv_count * MIN_KV_SIZE > remaining:
        raise cur.fail(
            f"metadata count {kv_count} cannot fit in the {remaining} remaining bytes",
            "the file is truncated or corrupt",
            at=16,
        )
    if tensor_count * MIN_TENSOR_INFO_SIZE > remaining:
        raise cur.fail(
            f"tensor count {tensor_count} cannot fit in the {remaining} remaining bytes",
            "the file is truncated or corrupt",
            at=8,
        )

    metadata: dict[str, Any] = {}
    type_at: dict[str, int] = {}  # key -> byte offset of its value type
    for i in range(kv_count):
        at = cur.pos
        key = cur.key(i)
        type_at[key] = cur.pos
        vtype = cur.value_type(f"value type of '{key}'")
        value = cur.value(vtype, f"value of '{key}'")
        if key in metadata:
            raise cur.fail(f"metadata key '{key}' appears twice", "the file is corrupt", at=at)
        metadata[key] = value
    _check_key_types(cur, metadata, type_at)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
        or alignment > 1 << 20
    ):
        raise GGUFError(
            f"{path}: 'general.alignment' is {alignment!r}; it must be a power of two "
            "(1 to 2^20); the file is corrupt"
        )

    entries: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
    names: set[str] = set()
    for i in range(tensor_count):
        at = cur.pos
        name = cur.string(f"name of tensor {i}")
        if name in names:
            raise cur.fail(f"tensor name '{name}' appears twice", "the file is corrupt", at=at)
        names.add(name)
        n_dims = cur.u32(f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(
                f"tensor '{name}' has {n_dims} dimensions (must be 1 to {MAX_DIMS})",
                "the file is corrupt",
            )
        ne = [cur.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
        type_at = cur.pos
        raw_type = cur.u32(f"type of tensor '{name}'")
        try:
            gtype = GGMLType(raw_type)
        except ValueError:
            raise cur.fail(
                f"tensor '{name}' has unknown type id {raw_type}",
                "the file is corrupt, or made by a newer llama.cpp than phimlx knows",
                at=type_at,
            ) from None
        rel = cur.u64(f"data offset of tensor '{name}'")
        if any(d == 0 for d in ne):
            raise cur.fail(
                f"tensor '{name}' has a zero dimension {ne}", "the file is corrupt", at=at
            )
        block, tsize = TYPE_SIZES[gtype]
        if ne[0] % block:
            raise cur.fail(
                f"tensor '{name}' ({gtype.name}) has rows of {ne[0]} elements, not a multiple "
                f"of its block size {block}",
                "the file is corrupt",
                at=at,
            )
        # Python integers do not overflow; bound the product by the file size as we go so a
        # crafted shape cannot make us compute or allocate anything large.
        nbytes = ne[0] // block * tsize
        for d in ne[1:]:
            nbytes *= d
            if nbytes > size:
                break
        if nbytes > size:
            raise cur.fail(
                f"tensor '{name}' with shape {ne} of {gtype.name} would need more bytes than "
                f"the whole {size}-byte file",
                "the file is truncated or corrupt",
                at=at,
            )
        entries.append((name, tuple(reversed(ne)), gtype, rel, nbytes))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, gtype, rel, nbytes in entries:
        if rel % alignment:
            raise GGUFError(
                f"{path}: tensor '{name}' data offset {rel} is not a multiple of the alignment "
                f"{alignment}; the file is corrupt"
            )
        start = data_offset + rel
        if start + nbytes > size:
            raise GGUFError(
                f"{path}: tensor '{name}' ends at byte {start + nbytes}, past the end of the file "
                f"({size} bytes); the download is probably truncated: download it again"
            )
        tensors[name] = TensorInfo(name, shape, gtype, start, nbytes)

    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(
                f"{path}: tensors '{a.name}' (bytes {a.offset}..{a.offset + a.nbytes}) and "
                f"'{b.name}' (from byte {b.offset}) overlap; the file is corrupt"
            )

    return ModelFile(
        path=path,
        version=version,
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
    )
