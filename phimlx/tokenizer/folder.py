"""The tokenizer of a Hugging Face / mlx-lm model folder, as transformers reads it.

``tokenizer.json`` is run by the ``tokenizers`` library (what transformers' fast tokenizers
are), so ids equal ``AutoTokenizer``'s for the same folder; ``tokenizer_config.json`` names
BOS/EOS and whether BOS is added; the chat template is ``chat_template.jinja`` (what
transformers 5 writes) or ``tokenizer_config.json``'s ``chat_template`` (a string, or a
list of named templates: the ``default`` one).  End-of-generation ids also come from
``generation_config.json`` and ``config.json`` (``eos_token_id``, an id or a list).

A rendered chat prompt is encoded as ``apply_chat_template`` encodes it: no special tokens
added (the template writes any BOS itself), unlike llama.cpp's rule for GGUF files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")  # fmt: skip


def _json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); ignored", path, e)
        return {}
    return d if isinstance(d, dict) else {}


def read_chat_template(folder: str | Path) -> str | None:
    """The folder's chat template (``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template``), or None."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def eos_ids(folder: str | Path) -> set[int]:
    """``eos_token_id`` of generation_config.json and config.json (each an id or a list)."""
    folder = Path(folder)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        v = _json(folder / name).get("eos_token_id")
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                ids.add(i)
    return ids
