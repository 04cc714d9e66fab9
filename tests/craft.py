"""GGUF bytes by hand, field by field, so tests can craft any violation precisely.

`gguf.GGUFWriter` refuses most malformed files, and phimlx's own reader is what is under
test, so this module encodes the format independently:

    magic | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: str, value_type u32, value)
    tensor_count x (name: str, n_dims u32, ne u64 x n_dims, type u32, offset u64)
    padding to the alignment | tensor data

Every field can be overridden (a count that disagrees with the entries, a raw value blob, an
explicit offset, an explicit padding), and `walk` maps a valid file's fields to byte offsets
so the fuzzer can mutate a chosen count, length, dimension or type id.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import signal
import struct
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Metadata value types (gguf-py `GGUFValueType`).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = (
    range(13)
)
_SCALAR = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<B",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}

# Tensor types (ggml `ggml_type`) and their (block elements, block bytes).
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34),
         Q4_K: (256, 144), Q6_K: (256, 210), BF16: (1, 2)}  # fmt: skip


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def string(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; ``length`` overrides the encoded byte count (a lie, for tests)."""
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return u64(len(raw) if length is None else length) + raw


def value(vtype: int, v: Any) -> bytes:
    """Encode a metadata value.  Arrays are ``(element_type, items)``; nested arrays nest."""
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        etype, items = v
        return u32(etype) + u64(len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack(_SCALAR[vtype], v)


@dataclass
class KV:
    key: str | bytes
    vtype: int
    value: Any = None
    raw: bytes | None = None  # replaces the encoded value (after the type) when set

    def encode(self) -> bytes:
        body = self.raw if self.raw is not None else value(self.vtype, self.value)
        return string(self.key) + u32(self.vtype) + body


@dataclass
class Tensor:
    name: str | bytes
    ne: list[int]  # GGUF order: ne[0] is the contiguous axis (NumPy shape reversed)
    type: int = F32
    data: bytes = b""
    offset: int | None = None  # relative to the data section; None: laid out in order
    n_dims: int | None = None  # overrides len(ne) in the header


@dataclass
class GGUF:
    """A GGUF file as fields.  `build` lays it out; every count and offset can be forced."""

    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32  # used for layout only; the file says it with 'general.alignment'
    tensor_count: int | None = None
    kv_count: int | None = None
    padding: bytes | None = None  # replaces the computed header padding

    def header(self) -> tuple[bytes, list[int]]:
        """The header bytes (through the padding) and each tensor's relative offset."""
        out = [self.magic, u32(self.version)]
        out.append(u64(len(self.tensors) if self.tensor_count is None else self.tensor_count))
        out.append(u64(len(self.kvs) if self.kv_count is None else self.kv_count))
        out += [kv.encode() for kv in self.kvs]
        offsets, pos = [], 0
        for t in self.tensors:
            off = pos if t.offset is None else t.offset
            offsets.append(off)
            if t.offset is None:
                pos = _align(pos + len(t.data), self.alignment)
            name = string(t.name)
            n_dims = len(t.ne) if t.n_dims is None else t.n_dims
            out.append(name + u32(n_dims) + b"".join(u64(d) for d in t.ne))
            out.append(u32(t.type) + u64(off))
        head = b"".join(out)
        pad = self.padding
        if pad is None:
            pad = b"\0" * (_align(len(head), self.alignment) - len(head))
        return head + pad, offsets

    def build(self) -> bytes:
        head, offsets = self.header()
        data = bytearray()
        for t, off in zip(self.tensors, offsets, strict=True):
            if t.offset is not None and off > 1 << 30:
                continue  # an offset lie past any real file: write no data for it
            if len(data) < off:
                data += b"\0" * (off - len(data))
            data[off : off + len(t.data)] = t.data
        return head + bytes(data)

    def write(self, path: Any) -> Any:
        with open(path, "wb") as f:
            f.write(self.build())
        return path

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def drop_tensor(self, name: str) -> None:
        self.tensors = [t for t in self.tensors if t.name != name]

    def set_kv(self, key: str, vtype: int, v: Any) -> None:
        for k in self.kvs:
            if k.key == key:
                k.vtype, k.value, k.raw = vtype, v, None
                return
        self.kvs.append(KV(key, vtype, v))


def _align(n: int, a: int) -> int:
    return -(-n // a) * a if a > 0 else n


def f32_tensor(name: str, array: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return Tensor(name, list(reversed(a.shape)), F32, a.tobytes())


# -- a tiny valid model ------------------------------------------------------------------


def spm_vocab(n_pieces: int = 40) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocab: <unk> <s> </s>, 256 byte tokens, then some pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    pieces = pieces[:n_pieces]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_model(
    arch: str = "llama",
    *,
    n_layers: int = 1,
    hidden: int = 32,
    ffn: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    context: int = 64,
    seed: int = 0,
    tokenizer: bool = True,
    tied: bool = False,
    wtype: int = F32,
) -> GGUF:
    """A small valid `arch` ("llama" or "phi3") model with an SPM tokenizer; weight matrices
    of type ``wtype`` (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; K-quants need hidden and ffn
    multiples of 256), norms F32."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = spm_vocab()
    vocab = len(tokens)
    hd = hidden // n_heads
    g = GGUF()
    g.kvs = [
        KV("general.architecture", STRING, arch),
        KV("general.name", STRING, f"tiny-{arch}"),
        KV(f"{arch}.context_length", UINT32, context),
        KV(f"{arch}.embedding_length", UINT32, hidden),
        KV(f"{arch}.feed_forward_length", UINT32, ffn),
        KV(f"{arch}.block_count", UINT32, n_layers),
        KV(f"{arch}.attention.head_count", UINT32, n_heads),
        KV(f"{arch}.attention.head_count_kv", UINT32, n_kv_heads),
        KV(f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5),
        KV(f"{arch}.rope.dimension_count", UINT32, hd),
        KV("general.alignment", UINT32, 32),
    ]
    if tokenizer:
        g.kvs += [
            KV("tokenizer.ggml.model", STRING, "llama"),
            KV("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            KV("tokenizer.ggml.scores", ARRAY, (FLOAT32, scores)),
            KV("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
            KV("tokenizer.ggml.bos_token_id", UINT32, 1),
            KV("tokenizer.ggml.eos_token_id", UINT32, 2),
            KV("tokenizer.ggml.unknown_token_id", UINT32, 0),
            KV("tokenizer.ggml.add_bos_token", BOOL, True),
        ]

    def w(name: str, rows: int, cols: int) -> None:
        values = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        if wtype == F32:
            g.tensors.append(f32_tensor(name, values))
        elif wtype == F16:
            g.tensors.append(Tensor(name, [cols, rows], F16, values.astype("<f2").tobytes()))
        else:
            g.tensors.append(
                Tensor(name, [cols, rows], wtype, quant_blocks(rng, wtype, rows, cols))
            )

    def norm(name: str) -> None:
        g.tensors.append(f32_tensor(name, 1.0 + 0.1 * rng.standard_normal(hidden)))

    w("token_embd.weight", vocab, hidden)
    norm("output_norm.weight")
    if not tied:
        w("output.weight", vocab, hidden)
    for i in range(n_layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        norm(b + "ffn_norm.weight")
        if arch == "phi3":
            w(b + "attn_qkv.weight", (n_heads + 2 * n_kv_heads) * hd, hidden)
            w(b + "ffn_up.weight", 2 * ffn, hidden)
        else:
            w(b + "attn_q.weight", n_heads * hd, hidden)
            w(b + "attn_k.weight", n_kv_heads * hd, hidden)
            w(b + "attn_v.weight", n_kv_heads * hd, hidden)
            w(b + "ffn_gate.weight", ffn, hidden)
            w(b + "ffn_up.weight", ffn, hidden)
        w(b + "attn_output.weight", hidden, n_heads * hd)
        w(b + "ffn_down.weight", hidden, ffn)
    return g


# Byte offsets of the f16 scale fields of each block, set to small finite values so random
# quantized weights stay finite and small.
_SCALE_FIELDS = {Q8_0: (0,), Q4_0: (0,), Q4_1: (0, 2), Q4_K: (0, 2), Q6_K: (208,)}


def quant_blocks(rng: np.random.Generator, qtype: int, rows: int, cols: int) -> bytes:
    block, size = BLOCK[qtype]
    n = rows * cols // block
    data = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    scale = np.full(n, 0.002, dtype="<f2").view(np.uint8).reshape(n, 2)
    for off in _SCALE_FIELDS[qtype]:
        data[:, off : off + 2] = scale
    return data.tobytes()


# -- field map of a valid file (for structure-aware mutation) ----------------------------


@dataclass(frozen=True)
class Field:
    kind: str  # "version", "count", "length", "vtype", "etype", "n_dims", "dim", "type", "offset"
    offset: int
    size: int  # 4 or 8


def walk(data: bytes) -> tuple[list[Field], int]:
    """Fields of a *valid* GGUF (no validation here), and the end of the tensor directory."""
    fields: list[Field] = [Field("version", 4, 4), Field("count", 8, 8), Field("count", 16, 8)]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def read(fmt: str) -> int:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def skip_string() -> None:
        nonlocal pos
        fields.append(Field("length", pos, 8))
        n = read("<Q")
        pos += n

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == STRING:
            skip_string()
        elif vtype == ARRAY:
            fields.append(Field("etype", pos, 4))
            etype = read("<I")
            fields.append(Field("length", pos, 8))
            n = read("<Q")
            if etype in _SCALAR:
                pos += n * struct.calcsize(_SCALAR[etype])
            else:
                for _ in range(n):
                    skip_value(etype)
        else:
            pos += struct.calcsize(_SCALAR[vtype])

    for _ in range(n_kv):
        skip_string()
        fields.append(Field("vtype", pos, 4))
        skip_value(read("<I"))
    for _ in range(n_tensors):
        skip_string()
        fields.append(Field("n_dims", pos, 4))
        for _ in range(read("<I")):
            fields.append(Field("dim", pos, 8))
            pos += 8
        fields.append(Field("type", pos, 4))
        pos += 4
        fields.append(Field("offset", pos, 8))
        pos += 8
    return fields, pos


# -- guards: a hang becomes a failure, allocation is measured, counts reach the CI log --------


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory in RAM (/dev/shm) when there is one: tests that write thousands
    of small files spend their time in the file system otherwise."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="phimlx-", dir=base) as d:
        yield Path(d)


class Hang(Exception):
    """An operation ran past its time bound."""


_watchdog_armed = False  # a `watchdog` block is running: `time_bound` leaves faulthandler alone


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """faulthandler's watchdog over a whole block: past ``seconds`` it dumps every thread's
    stack and kills the process (a hang inside C code that never returns to Python).  The
    `time_bound` blocks inside it keep their SIGALRM bound but do not arm and cancel the
    watchdog themselves: a test opening ~1800 crafted files did that ~1800 times, and once
    (in ~17 CI runs) CPython 3.11 crashed with a segmentation fault in a thread Python does
    not know, the main thread inside ``cancel_dump_traceback_later``."""
    global _watchdog_armed
    if _watchdog_armed:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True)
    _watchdog_armed = True
    try:
        yield
    finally:
        _watchdog_armed = False
        faulthandler.cancel_dump_traceback_later()


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise `Hang` if the block runs longer than ``seconds`` (POSIX main thread; elsewhere a
    no-op).  A faulthandler watchdog at twice the bound dumps stacks and kills the process if
    the hang is inside C code that never returns to Python; inside a `watchdog` block, that
    block's watchdog does instead."""
    main = threading.current_thread() is threading.main_thread()
    if not (main and hasattr(signal, "setitimer")):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    with watchdog(2 * seconds + 5):
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def alloc_bound(file_size: int) -> int:
    """The allocation an open/validate may make: a small multiple of the file plus 4 MiB.

    Metadata becomes Python objects (a 9-byte one-char string entry becomes a ~50-byte str, a
    one-byte array element an 8-byte list slot), so a constant factor is fair; a length taken
    on trust (gguf-py allocates what a 2^63 count says) is not."""
    return 16 * file_size + (4 << 20)


@contextlib.contextmanager
def traced() -> Iterator[list[int]]:
    """Measure the peak of traced allocations (Python objects and NumPy buffers) in the block;
    the peak is appended to the yielded list."""
    out: list[int] = []
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield out
    finally:
        out.append(max(0, tracemalloc.get_traced_memory()[1] - base))
        if not was:
            tracemalloc.stop()


class Tally:
    """Counts printed in pytest's terminal summary, so CI logs show what a suite tried."""

    _registered: dict[str, Tally] = {}

    def __init__(self, title: str) -> None:
        self.title = title
        self.counts: collections.Counter[str] = collections.Counter()

    @classmethod
    def get(cls, config: Any, title: str) -> Tally:
        if title not in cls._registered:
            tally = cls(title)
            cls._registered[title] = tally
            config.pluginmanager.register(tally, f"phimlx-tally-{title}")
        return cls._registered[title]

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.counts:
            return
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        terminalreporter.write_line(f"{self.title}: {parts}")
