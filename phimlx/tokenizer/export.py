"""A GGUF tokenizer written out as Hugging Face tokenizer files, with ``tokenizers`` only.

`write_tokenizer_files` turns a `Tokenizer` built from a GGUF (`Tokenizer.from_gguf`) into
``tokenizer.json`` + ``tokenizer_config.json`` that transformers' ``AutoTokenizer`` (and so
mlx-lm) loads, encoding as llama.cpp does for the GGUF:

- the model is the same ``tokenizers`` BPE phimlx encodes fragments with (`models`):
  SentencePiece's merge rule with byte fallback, or byte-level BPE behind the
  ``tokenizer.ggml.pre`` regexes;
- SentencePiece's space handling is a normalizer (``" "`` -> ``"▁"``, a ``"▁"`` prepended
  to each text run between special tokens, when the GGUF adds a space prefix);
- control, user-defined and unknown-type tokens are added tokens, matched in the text
  before the model runs (llama.cpp's special-token partition); those after which llama.cpp
  strips whitespace (Phi-3's rule) strip it on their right;
- BOS (and EOS) as the GGUF adds them, in a template post-processor.

No torch, no transformers: `phimlx convert` uses this.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .tokenizer import Tokenizer
from .vocab import _SPECIAL, _SPM_SPACE

__all__ = ["hf_tokenizer", "write_tokenizer_files"]


def hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A complete ``tokenizers`` tokenizer for ``tok`` (a copy: ``tok`` is not changed).

    Raises:
        ValueError: ``tok`` came from a tokenizer.json (write that file instead).
    """
    if not tok._partition_specials:
        raise ValueError("this tokenizer was read from a tokenizer.json; copy that file")
    hf = HFTokenizer.from_str(tok._backend().to_str())  # the fragment model, copied
    if tok._spm:
        steps = [normalizers.Replace(" ", _SPM_SPACE)]
        if tok.add_space_prefix:
            steps.insert(0, normalizers.Prepend(_SPM_SPACE))
        hf.normalizer = normalizers.Sequence(steps)
        strip = [decoders.Strip(content=" ", left=1, right=0)] if tok.add_space_prefix else []
        hf.decoder = decoders.Sequence(
            [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
    else:
        hf.decoder = decoders.ByteLevel()
    hf.add_tokens(
        [
            AddedToken(
                text,
                special=bool(tok._attrs[i] & _SPECIAL),
                normalized=False,
                rstrip=rstrip,
                lstrip=False,
                single_word=False,
            )
            for text, i, rstrip in sorted(tok._cache, key=lambda c: c[1])
        ]
    )
    single, specials = "$A:0", []
    if tok.add_bos and tok.bos_token is not None:
        single = f"{tok.bos_token}:0 {single}"
        specials.append((tok.bos_token, tok.bos_id))
    if tok.add_eos and tok.eos_token is not None:
        single = f"{single} {tok.eos_token}:0"
        specials.append((tok.eos_token, tok.eos_id))
    pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
    hf.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return hf


def write_tokenizer_files(
    tok: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``tok`` into ``out_dir``.

    Args:
        tok: a tokenizer built from a GGUF (`Tokenizer.from_gguf`).
        out_dir: an existing folder.
        chat_template: the GGUF's chat template, written into tokenizer_config.json.
        model_max_length: the model's context.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    hf = hf_tokenizer(tok)
    paths = [out / "tokenizer.json", out / "tokenizer_config.json"]
    hf.save(str(paths[0]))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": bool(tok.add_bos),
        "add_eos_token": bool(tok.add_eos),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1 << 30,
    }
    unk = tok.token_to_id("<unk>")
    if unk is not None:
        cfg["unk_token"] = "<unk>"
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    paths[1].write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return paths
