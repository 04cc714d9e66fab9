"""Text <-> token ids, as llama.cpp computes them for the same file.

- `vocab`: the vocabulary and its rules, read from GGUF metadata or a tokenizer.json;
- `models`: the ``tokenizers`` BPE models that encode a fragment (SentencePiece, byte-level);
- `tokenizer`: `Tokenizer`, the special-token partition around those models, and decoding;
- `detokenize`: `StreamingDetokenizer`, text that is safe to show while tokens arrive.
"""

from __future__ import annotations

from .detokenize import StreamingDetokenizer
from .models import PRE_TOKENIZERS
from .tokenizer import Tokenizer
from .vocab import TokenAttr

__all__ = ["PRE_TOKENIZERS", "StreamingDetokenizer", "TokenAttr", "Tokenizer"]
