"""The GGUF file format written down as data: magic, limits, element types and their
block sizes, metadata value types (gguf-py's ``constants.py`` is the public description)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 4
# The spec: a key "must be at most 2^16-1/65535 bytes long" and "must be a valid ASCII string".
MAX_KEY_LENGTH = (1 << 16) - 1


class GGMLType(IntEnum):
    """Tensor element types (ggml's ``ggml_type``); ids 4, 5 and 31-33 were retired upstream."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (elements per block, bytes per block) for every type a valid file may hold.
TYPE_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
}

# The types phimlx computes with (both backends have kernels for them); a file may hold
# others, but a model using them is refused at load time with `UnsupportedModelError`.
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(
    {
        GGMLType.F32,
        GGMLType.F16,
        GGMLType.BF16,
        GGMLType.Q8_0,
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q2_K,
        GGMLType.Q3_K,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
    }
)


class ValueType(IntEnum):
    """Metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}
SCALAR_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}
# Smallest encoded size of one element, used to bound counts before looping over them.
MIN_VALUE_SIZE: dict[ValueType, int] = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}
MIN_VALUE_SIZE[ValueType.STRING] = 8
MIN_VALUE_SIZE[ValueType.ARRAY] = 12
MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, smallest value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class KeyType:
    """The value types llama.cpp accepts for one metadata key.

    ``scalars`` are the accepted types of a plain value, ``elements`` the accepted element
    types when the value is an array (empty: an array is refused); ``where`` names the
    llama.cpp source that refuses anything else, for the error message.
    """

    scalars: frozenset[ValueType] = frozenset()
    elements: frozenset[ValueType] = frozenset()
    where: str = "llama-model-loader.cpp"

    def accepts(self, vtype: ValueType, etype: ValueType | None) -> bool:
        """Whether a value of type ``vtype`` (element type ``etype`` for an array) is legal."""
        if vtype == ValueType.ARRAY:
            return etype in self.elements
        return vtype in self.scalars

    def describe(self) -> str:
        """The accepted types in words, e.g. ``UINT32 or an array of INT32/UINT32``."""
        parts = [t.name for t in sorted(self.scalars)]
        if self.elements:
            parts.append("an array of " + "/".join(t.name for t in sorted(self.elements)))
        return " or ".join(parts)


def _scalar(t: ValueType, where: str = "llama-model-loader.cpp") -> KeyType:
    return KeyType(frozenset({t}), where=where)


def _array(*ts: ValueType) -> KeyType:
    return KeyType(elements=frozenset(ts), where="llama-vocab.cpp")


# llama.cpp reads a scalar key through `GGUFMeta::GKV<T>::get_kv`, which throws "key %s has
# wrong type %s but expected type %s" unless the stored type is exactly T's: no other width,
# no signedness change, no float for an int.  Per-layer hyperparameters go through
# `get_key_or_arr`, which also takes an array whose elements `get_arr` accepts for a uint32
# target (INT32, UINT32 and BOOL).
_U32 = _scalar(ValueType.UINT32)
_F32 = _scalar(ValueType.FLOAT32)
_STR = _scalar(ValueType.STRING)
_BOOL = _scalar(ValueType.BOOL)
_PER_LAYER = KeyType(
    frozenset({ValueType.UINT32}),
    frozenset({ValueType.INT32, ValueType.UINT32, ValueType.BOOL}),
)

# The special tokens llama-vocab.cpp looks up (its spelling: "seperator") and its flags.
_SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask",
                   "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix",
                   "suffix", "middle")  # fmt: skip
_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
                    "remove_extra_whitespaces")  # fmt: skip

# Keys named in full.  A key missing here may hold any type (llama.cpp ignores it, or reads
# it as text, as it does `tokenizer.chat_template`).
KEY_TYPES: dict[str, KeyType] = {
    # gguf.cpp: "key '%s' must be of type %s but is %s", checked while parsing the header.
    "general.alignment": _scalar(ValueType.UINT32, "gguf.cpp"),
    "general.architecture": _STR,
    "general.name": _STR,
    "general.file_type": _U32,
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    # llama-vocab.cpp throws "invalid gguf type for %s" unless these are arrays of exactly
    # these element types (integer scores are converted to float there).
    "tokenizer.ggml.tokens": _array(ValueType.STRING),
    "tokenizer.ggml.scores": _array(ValueType.FLOAT32, ValueType.INT32),
    "tokenizer.ggml.token_type": _array(ValueType.INT32),
    # Special token ids are read with `get_key<uint32_t>`, the flags with `get_key<bool>`.
    **{f"tokenizer.ggml.{name}_token_id": _U32 for name in _SPECIAL_TOKENS},
    **{f"tokenizer.ggml.{name}": _BOOL for name in _TOKENIZER_FLAGS},
}

# `{arch}.*` keys by their suffix; they are checked for the file's own `general.architecture`
# only (llama.cpp never reads another architecture's keys).
ARCH_KEY_TYPES: dict[str, KeyType] = {
    "context_length": _U32,
    "embedding_length": _U32,
    "block_count": _U32,
    "vocab_size": _U32,
    "feed_forward_length": _PER_LAYER,
    "attention.head_count": _PER_LAYER,
    "attention.head_count_kv": _PER_LAYER,
    "attention.key_length": _U32,
    "attention.value_length": _U32,
    "attention.layer_norm_rms_epsilon": _F32,
    "attention.sliding_window": _U32,
    "rope.dimension_count": _U32,
    "rope.freq_base": _F32,
    "rope.scaling.type": _STR,
    "rope.scaling.factor": _F32,
    "rope.scaling.attn_factor": _F32,
    "rope.scaling.original_context_length": _U32,
}
