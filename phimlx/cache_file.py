"""Prompt caches on disk: a session's KV tensors and token ids in one safetensors file.

A long prompt (a system prompt, a document) is prefilled once, saved, and loaded later by
another process to continue from there.  A cache is only valid for the exact model file,
backend and KV dtype that made it, so loading validates everything before trusting the
file: a damaged or foreign cache is a `PromptCacheError`, never wrong output.

Format (``FORMAT``, version ``VERSION``): tensors

- ``tokens``: int32 ``(P,)``, the ids at positions ``0 .. P - 1``;
- ``k``, ``v``: ``(n_layers, n_kv_heads, P, head_dim)`` in the backend's KV dtype (K after
  rope, as both backends cache it);

and string metadata (`safetensors` allows only strings there): ``format``,
``format_version``, ``model_file`` (its name, for messages), ``model_file_size``,
``model_fingerprint`` (see `model_fingerprint`), the shape fields of ``_CONFIG_KEYS``,
``backend``, ``kv_dtype``, ``kv_cache_type`` (how the session stored K and V: the saved
tensors are float32 on the NumPy backend whatever it is, but their values were rounded
to it), ``positions`` (P) and ``max_context`` (the session's: it picks the rope factors of
LongRoPE models, so the loaded session is made with the same).

A cache is loaded only into a session of the same ``kv_cache_type``: continuing an f16
cache in an f32 session would not give what an f32 prefill gives, so it is a
`PromptCacheError` that names both types.  Files written before ``kv_cache_type`` was
recorded hold the type their ``kv_dtype`` names (float32: ``"f32"``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PromptCacheError
from .session import Session

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

FORMAT = "phimlx.prompt_cache"
VERSION = 1
TENSORS = ("tokens", "k", "v")
# ModelConfig fields that shape the cache, stored so that a mismatch names what differs.
_CONFIG_KEYS = ("architecture", "n_layers", "n_kv_heads", "head_dim", "vocab_size")
_SAMPLE_BYTES = 4096  # of each tensor's data, in the fingerprint
# safetensors dtype names of the KV dtypes the backends cache in.
_ST_DTYPES = {"float32": "F32", "float16": "F16"}
# the kv_cache_type of files from before it was recorded, by their kv_dtype
_OLD_KV_CACHE_TYPES = {"float32": "f32", "float16": "f16"}
_REBUILD = "rebuild it with this model (save a fresh prompt cache)"


def model_fingerprint(model: Model) -> str:
    """A sha256 (hex) identifying ``model``'s GGUF file (or checkpoint folder), cheap to
    compute.

    It covers the file's size, its header (metadata and tensor directory, up to the start of
    tensor data) and the first 4 KiB of every tensor: the header alone is the same for two
    files of the same shape with other weights (a fine-tune, another seed), and any change
    to a weight matrix shows in its first rows.

    Raises:
        OSError: the model's file cannot be read.
    """
    mf = model._file
    h = hashlib.sha256()
    h.update(f"{mf.file_size}\n".encode())
    files = getattr(mf, "files", None)  # a safetensors checkpoint folder: each of its files
    if files is not None:
        h.update((Path(mf.path) / "config.json").read_bytes())
        for sf in files:
            h.update(f"{Path(sf.path).name} {sf.file_size}\n".encode())
            with open(sf.path, "rb") as f:
                h.update(f.read(sf.data_offset))
                for t in sorted(sf.tensors.values(), key=lambda t: t.offset):
                    f.seek(t.offset)
                    h.update(f.read(min(t.nbytes, _SAMPLE_BYTES)))
        return h.hexdigest()
    with open(mf.path, "rb") as f:
        h.update(f.read(mf.data_offset))
        for t in sorted(mf.tensors.values(), key=lambda t: t.offset):
            f.seek(t.offset)
            h.update(f.read(min(t.nbytes, _SAMPLE_BYTES)))
    return h.hexdigest()


def _model_metadata(model: Model) -> dict[str, str]:
    c = model.config
    meta = {
        "model_file": Path(model.path).name,
        "model_file_size": str(model._file.file_size),
        "model_fingerprint": model_fingerprint(model),
    }
    meta.update({key: str(getattr(c, key)) for key in _CONFIG_KEYS})
    return meta


def save(path: str | os.PathLike[str], session: Session, model: Model) -> None:
    """Write ``session``'s KV cache and token ids to ``path`` (a safetensors file).

    The file is written under a temporary name in the same folder, flushed to disk, and
    renamed, so ``path`` holds either the previous file or the complete new one.

    Args:
        path: the file to write (replaced if it exists).
        session: a session of ``model`` (`Model.new_session`), holding the prompt to keep.
        model: the model that made ``session``.

    Raises:
        PromptCacheError: the session belongs to another model, holds nothing, or cannot be
            saved (a sliding-window MLX cache that has wrapped).
        OSError: the file cannot be written.
    """
    from safetensors.numpy import save_file

    if session._lock is not model._lock:  # sessions share their model's lock
        raise PromptCacheError("this session was not made by this model; save it with its own")
    with session._lock:  # a consistent snapshot: no forward pass of this model meanwhile
        try:
            k, v = session._inner.kv_state()  # (L, KV, P, D) each
        except ValueError as e:
            raise PromptCacheError(f"cannot save this session: {e}") from e
        tokens = np.asarray(session.tokens, dtype=np.int32)  # (P,)
        max_context = session.max_context
    if tokens.size == 0:
        raise PromptCacheError("the session holds no tokens; prefill a prompt before saving")
    if tokens.size != k.shape[2]:  # the public session keeps them in step; a bug otherwise
        raise PromptCacheError(
            f"the session holds {k.shape[2]} positions but {tokens.size} token ids"
        )
    meta = {
        "format": FORMAT,
        "format_version": str(VERSION),
        **_model_metadata(model),
        "backend": model.backend,
        "kv_dtype": k.dtype.name,
        "kv_cache_type": session._inner.kv_cache_type,
        "positions": str(tokens.size),
        "max_context": str(max_context),
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # C order: save_file writes an array's buffer as it is, whatever its strides.
        kv = {"k": np.ascontiguousarray(k), "v": np.ascontiguousarray(v)}
        save_file({"tokens": tokens, **kv}, tmp, metadata=meta)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the cache
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved a prompt cache of %d tokens to %s", tokens.size, path)


def load(path: str | os.PathLike[str], model: Model) -> Session:
    """A new session of ``model`` holding the prompt cache saved in ``path``.

    Everything is checked before any tensor is read: the file parses as safetensors, its
    format and version, that it was made with this very model file (fingerprint), backend
    and KV dtype, and the tensors' names, dtypes and shapes; then that the token ids are in
    the vocabulary and the KV values finite.

    Args:
        path: a file written by `save`.
        model: the model to continue with (the one that saved it, loaded again).

    Returns:
        A `Session` whose ``tokens`` are the saved ids and whose cache holds their K and V;
        its ``max_context`` is the saved session's.

    Raises:
        PromptCacheError: the file is missing, damaged, or was made for another model,
            backend or KV dtype (the message says which, and how to get a valid one).
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise PromptCacheError(f"prompt cache {path} {what}; save one first")
    (meta, header), _ = _read(path)
    _check_metadata(meta, model, path)
    positions, max_context = int(meta["positions"]), int(meta["max_context"])
    session = model.new_session(max_context)
    kv_dtype = session._inner.kv_state()[0].dtype.name  # what this backend caches in
    if meta["kv_dtype"] != kv_dtype:
        raise PromptCacheError(
            f"{path} holds a {meta['kv_dtype']} KV cache; this model's {model.backend} backend "
            f"caches {kv_dtype} (made on another device?): {_REBUILD}"
        )
    saved_type = meta.get("kv_cache_type", _OLD_KV_CACHE_TYPES.get(meta["kv_dtype"]))
    if saved_type != session.kv_cache_type:
        raise PromptCacheError(
            f"{path} was saved from a {saved_type!r} KV cache; this model's sessions store "
            f"{session.kv_cache_type!r}: load the model with kv_cache_type={saved_type!r} "
            f"(--kv-cache-type {saved_type}), or {_REBUILD}"
        )
    _check_tensors(header, model, kv_dtype, positions, path)
    again, tensors = _read(path, header_only=False)
    if again != (meta, header):  # replaced since the checks: check the new one instead
        raise PromptCacheError(f"{path} changed while it was being loaded; load it again")
    tokens, k, v = (tensors[name] for name in TENSORS)
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        bad = int(tokens[(tokens < 0) | (tokens >= vocab)][0])
        raise PromptCacheError(
            f"{path} holds token id {bad}, outside this model's vocabulary (0..{vocab - 1}): "
            f"the file is damaged: {_REBUILD}"
        )
    if not (np.isfinite(k).all() and np.isfinite(v).all()):
        raise PromptCacheError(f"{path} holds NaN or infinite KV values (damaged): {_REBUILD}")
    try:
        session._inner.load_kv_state(k, v)
    except ValueError as e:  # the checks above rule this out; kept typed all the same
        raise PromptCacheError(f"{path} does not fit this model: {e}; {_REBUILD}") from e
    session._tokens = [int(t) for t in tokens]
    log.info("loaded a prompt cache of %d tokens from %s", positions, path)
    return session


_Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def _read(path: Path, *, header_only: bool = True) -> tuple[tuple[dict[str, str], _Header], Any]:
    """``(metadata, header)`` of ``path`` and, unless ``header_only``, its tensors by name.

    Raises:
        PromptCacheError: safetensors cannot parse the file (truncated, garbage, ...).
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            header = {}
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                sl = f.get_slice(name)
                header[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            tensors = None if header_only else {name: f.get_tensor(name) for name in header}
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes safetensors raise
        raise PromptCacheError(
            f"{path} is not a readable prompt cache (truncated or damaged?): {e}; {_REBUILD}"
        ) from e
    return (meta, header), tensors


def _int(meta: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise PromptCacheError(
            f"{path}: metadata {key!r} is missing or not an integer "
            f"({meta.get(key)!r}); the file is damaged: {_REBUILD}"
        ) from None


def _check_metadata(meta: dict[str, str], model: Model, path: Path) -> None:
    """Format, version, model identity, backend, and the position counts."""
    if meta.get("format") != FORMAT:
        raise PromptCacheError(
            f"{path} is not a phimlx prompt cache (format {meta.get('format')!r}, "
            f"expected {FORMAT!r}); make one with this model"
        )
    version = _int(meta, "format_version", path)
    if version != VERSION:
        raise PromptCacheError(
            f"{path} is a prompt cache of format version {version}; this phimlx reads version "
            f"{VERSION}: {_REBUILD}"
        )
    ours = _model_metadata(model)
    theirs = {key: meta.get(key) for key in ours}
    if any(theirs[key] != ours[key] for key in ours if key != "model_file"):  # may be renamed
        c = model.config
        shape = ", ".join(f"{key}={theirs[key]}" for key in _CONFIG_KEYS)
        differs = [key for key in _CONFIG_KEYS if theirs[key] != ours[key]]
        why = (
            "another shape: " + ", ".join(differs)
            if differs
            else "the same shape, other weights or metadata"
        )
        raise PromptCacheError(
            f"{path} was made for another model ({theirs['model_file']}: {shape}; {why}); "
            f"this model is {ours['model_file']} ({c.architecture}, {c.n_layers} layers): "
            f"{_REBUILD}, or load the model it was made with"
        )
    if meta.get("backend") != model.backend:
        raise PromptCacheError(
            f"{path} was made by the {meta.get('backend')!r} backend; this model runs on "
            f"{model.backend!r} (whose KV values differ): {_REBUILD}, or load the model with "
            f"backend={meta.get('backend')!r}"
        )
    if meta.get("kv_dtype") not in _ST_DTYPES:
        raise PromptCacheError(
            f"{path}: unknown KV dtype {meta.get('kv_dtype')!r}; the file is damaged: {_REBUILD}"
        )
    positions, max_context = _int(meta, "positions", path), _int(meta, "max_context", path)
    limit = model.config.context_length
    if not 0 < positions <= max_context <= limit:
        raise PromptCacheError(
            f"{path} claims {positions} positions in a context of {max_context}; a cache needs "
            f"1 <= positions <= max_context <= the model's context length {limit}: the file "
            f"is damaged: {_REBUILD}"
        )


def _check_tensors(
    header: _Header, model: Model, kv_dtype: str, positions: int, path: Path
) -> None:
    """Tensor names, dtypes and shapes, from the header (no tensor is read yet)."""
    names = set(header)
    if names != set(TENSORS):
        raise PromptCacheError(
            f"{path} holds tensors {sorted(names)}; a prompt cache holds {list(TENSORS)}: "
            f"the file is damaged: {_REBUILD}"
        )
    c = model.config
    kv_shape = (c.n_layers, c.n_kv_heads, positions, c.head_dim)
    expected = {"tokens": ("I32", (positions,)), "k": (_ST_DTYPES[kv_dtype], kv_shape)}
    expected["v"] = expected["k"]
    for name, (dtype, shape) in expected.items():
        got = header[name]
        if got != (dtype, shape):
            raise PromptCacheError(
                f"{path}: tensor {name!r} is {got[0]} {got[1]}, expected {dtype} {shape} "
                f"for {positions} positions of this model: the file is damaged: {_REBUILD}"
            )
