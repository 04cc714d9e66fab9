"""The hub cache on disk, as phimlx reads it without asking the network.

Where the cache is (`resolve_cache_dir`, with the environment of *now*), the per-call settings
(`HubSettings`), what it holds (`list_cached`, `cached_snapshot`, the commit a branch pointed at),
the repo listings phimlx keeps beside the snapshots (``phimlx-listings/<commit>.json``), and
the removal of a bad entry (`discard`).  The layout itself is ``huggingface_hub``'s.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub import errors as hf_errors

__all__ = ["CachedModel", "list_cached"]

log = logging.getLogger(__name__)


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
class HubSettings:
    """Per-call settings, read from the arguments and the environment at call time."""

    cache_dir: Path
    endpoint: str | None
    token: str | bool | None
    offline: bool

    @property
    def url(self) -> str:
        return self.endpoint or constants.ENDPOINT


def list_cached(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
    """List the GGUF files in the hub cache (``phimlx list``), sorted by repo and file.

    Args:
        cache_dir: the hub cache; default ``HF_HUB_CACHE`` or ``HF_HOME/hub``.

    Returns:
        One `CachedModel` per GGUF file per cached revision; empty when there is no cache.
    """
    root = resolve_cache_dir(cache_dir)
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


# ---------------------------------------------------------------- settings


def hub_settings(
    cache_dir: str | os.PathLike[str] | None, token: str | bool | None, local_files_only: bool
) -> HubSettings:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    offline = (
        local_files_only
        or constants.is_offline_mode()
        or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    )
    return HubSettings(resolve_cache_dir(cache_dir), endpoint, token, offline)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
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


# ---------------------------------------------------------------- contents


def repo_dir(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / f"models--{repo_id.replace('/', '--')}"


def cached_commit(repo_id: str, revision: str | None, cache_dir: Path) -> str:
    """The commit a branch or tag pointed at when last seen (a commit hash is itself)."""
    rev = revision or "main"
    ref = repo_dir(repo_id, cache_dir) / "refs" / rev
    return ref.read_text().strip() if ref.is_file() else rev


def cached_listing(repo_id: str, revision: str | None, cache_dir: Path) -> list[str] | None:
    commit = cached_commit(repo_id, revision, cache_dir)
    listing = repo_dir(repo_id, cache_dir) / "phimlx-listings" / f"{commit}.json"
    try:
        files = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of ``revision`` (branch, tag or commit), if there is one."""
    snapshot = (
        repo_dir(repo_id, cache_dir) / "snapshots" / cached_commit(repo_id, revision, cache_dir)
    )
    return snapshot if snapshot.is_dir() else None


def commit_of(path: Path, cache_dir: Path) -> str | None:
    """The commit hash of a file under ``<cache>/models--x--y/snapshots/<commit>/``."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(cache_dir).parts
    except ValueError:
        return None
    return parts[2] if len(parts) > 3 and parts[1] == "snapshots" else None


def discard(path: Path, cache_dir: Path) -> None:
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


def local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
