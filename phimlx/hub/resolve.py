"""Find a model: a local file, a named preset, or a file in a Hugging Face hub repo.

`huggingface_hub` owns the cache layout, the progress bar, tokens, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE``; this module adds what a model runner needs on top of it:

- a cached file is used with no network call at all (``hf_hub_download`` asks the hub for
  the newest commit of a branch on every call; `download` is the way to refresh);
- ``filename`` may be a glob, resolved against the repo listing (kept in the cache per commit,
  so the answer is the same online and offline);
- every file is validated with `open_gguf` before it is returned, and a short or corrupt
  download is deleted from the cache so that the next call fetches it again;
- every failure becomes a typed error that says what happened and what to do.

``huggingface_hub`` reads its environment once, at import; the variables that choose the
cache, the endpoint and offline mode are read again at each call (`cache.hub_settings`), so
a process (or a test) that sets them later is still obeyed.

Presets live in `presets`, the cache on disk is read in `cache`, and the network (with its
error messages) is `fetch`; the package's ``__init__`` exposes the public names of all four.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import GGUFError, ModelNotFoundError, UnsupportedModelError
from ..formats import CheckpointError, is_checkpoint_dir, open_checkpoint
from ..formats.checkpoint import INDEX
from ..gguf import open_gguf
from ..tokenizer.folder import TOKENIZER_FILES
from .cache import (
    HubSettings,
    cached_listing,
    cached_snapshot,
    commit_of,
    discard,
    hub_settings,
    local_files,
)
from .fetch import (
    fetch_file,
    fetch_tokenizer,
    format_listing,
    offline_message,
    repo_files,
)
from .presets import PRESETS, bundled_file


@dataclass(frozen=True)
class ResolvedModel:
    """A validated local GGUF file (or safetensors checkpoint folder: ``path`` is the
    folder, ``filename`` its ``config.json``) and where it came from.

    ``repo_id`` and ``revision`` (a commit hash) are None for a file that did not come from
    the hub cache; ``tokenizer_json`` is set only when a ``tokenizer_repo`` was asked for.
    """

    path: Path
    repo_id: str | None
    filename: str
    revision: str | None
    tokenizer_json: Path | None


def resolve_model(
    model: str | os.PathLike[str],
    *,
    filename: str | None = None,
    revision: str | None = None,
    tokenizer_repo: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> ResolvedModel:
    """Turn a model name into a validated GGUF file on disk, downloading it if needed.

    Args:
        model: a local ``.gguf`` file (used as is, no network), a local directory holding
            GGUF files (or an mlx-lm / Hugging Face checkpoint: config.json and
            safetensors), a preset name (see `PRESETS`), or a hub repo id ``"owner/name"``
            (a repo without GGUF files but with config.json and safetensors weights is
            fetched as a snapshot of the files a model needs).
        filename: the file in the repo (or directory); may be a glob such as
            ``"*q4*.gguf"`` (matched case-insensitively), which must match exactly one file.
            Without it, the repo must hold exactly one ``.gguf`` file.
        revision: a branch, tag or commit hash (default ``"main"``).
        tokenizer_repo: a hub repo whose ``tokenizer.json`` should be used instead of the
            tokenizer inside the GGUF; fetched and cached like the model.
        cache_dir: the hub cache; default ``HF_HUB_CACHE`` or ``HF_HOME/hub``.
        token: a hub token for gated or private repos; None uses the saved login or
            ``HF_TOKEN``; False sends none.
        local_files_only: never touch the network (as does ``HF_HUB_OFFLINE=1``).

    Returns:
        A `ResolvedModel` whose ``path`` passed `open_gguf`. A file already in the cache is
        returned without any network call.

    Raises:
        ModelNotFoundError: no such local file, preset, repo, revision or file; or offline
            and not cached. The message lists candidates where there are some.
        GGUFError: the file is not a valid GGUF (a download that ended short or corrupt is
            deleted from the cache first, so that running again downloads it again).
        HubAccessError: the repo is gated or private and the token does not grant access.
        HubConnectionError: the hub cannot be reached, timed out, or dropped the download.
        CacheWriteError: the disk is full or the cache directory is not writable.
        HubError: any other answer from the hub that is not a file.
    """
    return _resolve(
        model,
        filename,
        revision,
        tokenizer_repo,
        hub_settings(cache_dir, token, local_files_only),
        refresh=False,
    )


def download(
    model: str,
    *,
    filename: str | None = None,
    revision: str | None = None,
    tokenizer_repo: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> ResolvedModel:
    """Download a model into the cache, asking the hub for the newest commit (``phimlx download``).

    Unlike `resolve_model`, a cached copy of a branch is checked against the hub (one HEAD
    request) and replaced when the branch has moved; offline, the cached copy is returned.

    Args:
        model: as in `resolve_model`.
        filename: as in `resolve_model`.
        revision: as in `resolve_model`.
        tokenizer_repo: as in `resolve_model`.
        cache_dir: as in `resolve_model`.
        token: as in `resolve_model`.
        local_files_only: as in `resolve_model`.

    Returns:
        The `ResolvedModel` of the downloaded (or already current) file.

    Raises:
        The errors of `resolve_model`.
    """
    return _resolve(
        model,
        filename,
        revision,
        tokenizer_repo,
        hub_settings(cache_dir, token, local_files_only),
        refresh=True,
    )


# ---------------------------------------------------------------- resolution


def _resolve(
    model: str | os.PathLike[str],
    filename: str | None,
    revision: str | None,
    tokenizer_repo: str | None,
    hub: HubSettings,
    *,
    refresh: bool,
) -> ResolvedModel:
    path, repo_id, filename, commit = _resolve_gguf(model, filename, revision, hub, refresh)
    tokenizer_json = (
        fetch_tokenizer(tokenizer_repo, hub, refresh) if tokenizer_repo is not None else None
    )
    return ResolvedModel(path, repo_id, filename, commit, tokenizer_json)


def _resolve_gguf(
    model: str | os.PathLike[str],
    filename: str | None,
    revision: str | None,
    hub: HubSettings,
    refresh: bool,
) -> tuple[Path, str | None, str, str | None]:
    """(validated path, repo id, file name, commit) of the model's GGUF."""
    local = Path(model).expanduser()
    if local.is_file():
        if filename is not None:
            raise ModelNotFoundError(
                f"{local} is a file; filename={filename!r} only applies to a directory or a repo"
            )
        return _validated(local), None, local.name, None
    if local.is_dir():
        files = local_files(local)
        if filename is None and not _matches(files, None) and is_checkpoint_dir(local):
            return _validated(local), None, local.name, None  # an mlx-lm / HF folder
        path = local / _pick(files, filename, where=f"directory {local}")
        return _validated(path), None, path.name, None

    name = str(model)
    preset = PRESETS.get(name.lower())
    if preset is not None:
        bundled = bundled_file(preset, filename, revision)
        if bundled is not None:
            return _validated(bundled), None, bundled.name, None
        repo_id, filename = preset.repo_id, filename or preset.filename
        revision = revision or preset.revision
    elif isinstance(model, str) and _looks_like_repo_id(name):
        repo_id = name
    else:
        raise ModelNotFoundError(
            f"{name!r} is not a local file, a preset or a hub repo id ('owner/name'). "
            f"Presets: {', '.join(PRESETS)}"
        )

    if filename is None:
        # A preset's repo named by its id: the preset's file (the repo may hold several).
        filename = next((p.filename for p in PRESETS.values() if p.repo_id == repo_id), None)
    if filename is None or _is_glob(filename):
        files, where = _repo_listing(repo_id, filename, revision, hub, refresh)
        if filename is None and not _matches(files, None) and _is_checkpoint_listing(files):
            return _fetch_checkpoint(repo_id, files, revision, hub, refresh)
        filename = _pick(files, filename, where=where)
    path = fetch_file(repo_id, filename, revision, hub, refresh)
    try:
        _validated(path)
    except GGUFError as e:
        discard(path, hub.cache_dir)
        raise GGUFError(
            f"{repo_id}/{filename} in the cache is not a valid GGUF ({e}); the download was "
            "incomplete or corrupt and has been deleted from the cache: run again to re-download"
        ) from e
    return path, repo_id, filename, commit_of(path, hub.cache_dir)


def _validated(path: Path) -> Path:
    """Check the file with `open_gguf` (header and tensor directory only), or a checkpoint
    folder with `open_checkpoint` (config and safetensors headers)."""
    if path.is_dir():
        open_checkpoint(path).close()
    else:
        open_gguf(path).close()
    return path


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith(("./", "../", "~"))


def _is_glob(filename: str) -> bool:
    return any(c in filename for c in "*?[")


def _matches(files: list[str], pattern: str | None) -> list[str]:
    """The files that a glob (default ``*.gguf``, case-insensitive) matches."""
    glob = (pattern or "*.gguf").lower()
    return sorted(f for f in files if fnmatch.fnmatchcase(f.lower(), glob))


def _pick(files: list[str], pattern: str | None, *, where: str) -> str:
    """The one file of ``files`` that ``pattern`` (default ``*.gguf``) names, or an error."""
    if pattern is not None and not _is_glob(pattern):
        if pattern in files:
            return pattern
        raise ModelNotFoundError(
            f"{where} has no file {pattern!r}; its GGUF files: {format_listing(files)}"
        )
    matches = _matches(files, pattern)
    if len(matches) == 1:
        return matches[0]
    shown = pattern or "*.gguf"
    if not matches:
        raise ModelNotFoundError(
            f"no file in {where} matches {shown!r}; its GGUF files: {format_listing(files)}"
        )
    raise ModelNotFoundError(
        f"{len(matches)} files in {where} match {shown!r}: {', '.join(matches)}; "
        "pass filename= with one of them (or a narrower pattern)"
    )


def _choose_file(
    repo_id: str, pattern: str | None, revision: str | None, hub: HubSettings, refresh: bool
) -> str:
    """Resolve a glob (or no filename) against the repo listing, cached or asked for."""
    files, where = _repo_listing(repo_id, pattern, revision, hub, refresh)
    return _pick(files, pattern, where=where)


def _repo_listing(
    repo_id: str, pattern: str | None, revision: str | None, hub: HubSettings, refresh: bool
) -> tuple[list[str], str]:
    """The repo's files (and how messages name the listing), cached or asked for.

    The listing of a commit never changes, so it is kept in the cache next to the snapshot:
    the same call gives the same answer whether the hub is reachable or not.
    """
    where = f"{repo_id} (revision {revision or 'main'})"
    files = None if refresh else cached_listing(repo_id, revision, hub.cache_dir)
    if files is None and hub.offline:
        snapshot = cached_snapshot(repo_id, revision, hub.cache_dir)
        if snapshot is None:
            raise ModelNotFoundError(offline_message(repo_id, pattern or "*.gguf", revision, hub))
        # Downloaded by another tool: only the files it fetched are known.
        files = local_files(snapshot)
        where = f"the cached files of {where} (offline, and the repo listing is not cached)"
    if files is None:
        files = repo_files(repo_id, revision, hub)
    return files, where


def _is_checkpoint_listing(files: list[str]) -> bool:
    """A repo of an mlx-lm / Hugging Face checkpoint: config.json and safetensors weights."""
    return "config.json" in files and any(
        "/" not in f and f.endswith(".safetensors") for f in files
    )


def _fetch_checkpoint(
    repo_id: str, files: list[str], revision: str | None, hub: HubSettings, refresh: bool
) -> tuple[Path, str | None, str, str | None]:
    """Fetch the files a checkpoint needs (config, index, weights, tokenizer files; not the
    README, images or other formats) into one snapshot folder, each cached as a GGUF is
    (no network call when cached), and validate the folder with `open_checkpoint`."""
    config = fetch_file(repo_id, "config.json", revision, hub, refresh)
    commit = commit_of(config, hub.cache_dir)
    rev = commit or revision  # the other files from the same commit as config.json
    names = [n for n in TOKENIZER_FILES if n in files]
    if INDEX in files:
        index = fetch_file(repo_id, INDEX, rev, hub, refresh)
        names.insert(0, INDEX)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            discard(index, hub.cache_dir)
            raise CheckpointError(
                f"{repo_id}/{INDEX} is not a safetensors index ({e}); it has been deleted "
                "from the cache: run again to re-download"
            ) from e
    else:  # as the folder reader: model*.safetensors, else every top-level one
        top = [f for f in files if "/" not in f and f.endswith(".safetensors")]
        shards = [f for f in top if f.startswith("model")] or top
    bad = [s for s in shards if "/" in s or "\\" in s or not s.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{repo_id}/{INDEX} names {bad[0]!r}, not a weight file of the repo")
    paths = [fetch_file(repo_id, n, rev, hub, refresh) for n in [*shards, *names]]
    folder = config.parent
    try:
        _validated(folder)
    except CheckpointError as e:
        if not isinstance(e, UnsupportedModelError):  # a bad download, not a bad model
            for path in paths:
                if path.name.endswith(".safetensors"):
                    discard(path, hub.cache_dir)
            raise CheckpointError(
                f"{repo_id} in the cache is not a valid checkpoint ({e}); its weight files "
                "have been deleted from the cache: run again to re-download"
            ) from e
        raise
    return folder, repo_id, "config.json", commit
