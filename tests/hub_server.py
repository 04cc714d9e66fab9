"""A hub-like HTTP server on 127.0.0.1 for tests: the real `huggingface_hub` client talks to it.

It answers the requests huggingface_hub 2.x makes, with the headers the hub sends:

- ``GET /api/models/{repo}/revision/{rev}``: JSON with ``sha`` and ``siblings``;
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag``; a large (LFS)
  file answers ``302`` to a CDN URL with ``X-Linked-Etag`` (its sha256) and
  ``X-Linked-Size``; the CDN is the same server reached as ``localhost``, a different host,
  so the client treats it as one (no auth header sent there);
- ``GET /cdn/{sha256}``: the bytes, with ``Range`` support (``206``, ``Content-Range``);
- errors as the hub gives them: ``X-Error-Code`` RepoNotFound (401), RevisionNotFound,
  EntryNotFound (404), GatedRepo (401/403).

Faults can be set per file name to play a bad network: ``drop_once`` (the first download
closes the connection half way, then the client resumes with ``Range``), ``drop_always``
(every download closes before any byte), ``short`` (the CDN holds fewer bytes than the hub
announces), ``stall`` (the CDN sends headers, then nothing until the server stops),
``stall_head`` (the hub itself answers nothing about the file until the server stops).
Every request is logged in ``requests`` as ``(method, path, headers)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".bin", ".safetensors")


@dataclass
class Blob:
    """File content: bytes in memory, or a path read by range (for the 98 MB SmolLM2 file)."""

    source: bytes | Path
    size: int = 0
    sha256: str = ""
    git_sha1: str = ""

    def __post_init__(self) -> None:
        h256, h1 = hashlib.sha256(), hashlib.sha1()
        self.size = (
            len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size
        )
        h1.update(f"blob {self.size}\0".encode())
        for chunk in self.chunks(0, self.size):
            h256.update(chunk)
            h1.update(chunk)
        self.sha256, self.git_sha1 = h256.hexdigest(), h1.hexdigest()

    def chunks(self, start: int, end: int, step: int = 1 << 20):
        """The bytes [start, end) in pieces."""
        if isinstance(self.source, bytes):
            for i in range(start, end, step):
                yield self.source[i : min(i + step, end)]
            return
        with open(self.source, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                piece = f.read(min(step, left))
                if not piece:
                    return
                left -= len(piece)
                yield piece


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False


class FakeHub:
    """The server and its content; use as a context manager (``with FakeHub() as hub``)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, Blob] = {}
        self.faults: dict[str, str] = {}  # file name -> fault kind
        self.short_by: int = 0  # bytes the "short" fault leaves out
        self.tokens: set[str] = set()  # tokens that open gated repos
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._served: dict[str, int] = {}  # file name -> downloads started
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -------------------------------------------------------------- content

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        commit: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> str:
        """Add a commit holding ``files`` as the new head of ``branch``; returns its hash."""
        repo = self.repos.setdefault(repo_id, Repo())
        blobs = {name: Blob(data) for name, data in files.items()}
        if commit is None:
            h = hashlib.sha1(repo_id.encode() + str(len(repo.commits)).encode())
            for name, blob in sorted(blobs.items()):
                h.update(name.encode() + blob.sha256.encode())
            commit = h.hexdigest()
        repo.commits[commit] = blobs
        repo.refs[branch] = commit
        for tag in tags:
            repo.refs[tag] = commit
        for blob in blobs.values():
            self.blobs[blob.sha256] = blob
        return commit

    def downloads(self, filename: str) -> int:
        """How many times the CDN started sending ``filename`` (ranged or not)."""
        return self._served.get(filename, 0)

    # ---------------------------------------------------------------- server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._stop.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection (keep-alive ones included)."""
        if self._server is None:
            return
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._conns.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.fake._lock:
                self.fake._conns.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # ---------------------------------------------------------------- routing

    def _route(self, head: bool) -> None:
        path = urlsplit(self.path).path
        self.fake.requests.append((self.command, path, dict(self.headers.items())))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rev = unquote(parts[5]) if len(parts) >= 6 and parts[4] == "revision" else "main"
            return self._model_info(repo_id, rev)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            return self._resolve(repo_id, unquote(parts[3]), unquote("/".join(parts[4:])), head)
        if len(parts) == 2 and parts[0] == "cdn":
            return self._cdn(parts[1], head)
        self._error(404, None, "Not Found")

    def _error(self, status: int, code: str | None, message: str, **headers: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _lookup(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        """(repo, commit), or None after sending the hub's error."""
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            # The hub answers 401 for a missing repo when the request carries no valid token.
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return None
            if auth.removeprefix("Bearer ") not in self.fake.tokens:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return None
        commit = repo.refs.get(rev, rev if rev in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo, commit

    def _model_info(self, repo_id: str, rev: str) -> None:
        found = self._lookup(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = [
            {"rfilename": name, "size": blob.size} for name, blob in repo.commits[commit].items()
        ]
        body = json.dumps(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "siblings": siblings,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
        found = self._lookup(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        if self.fake.faults.get(filename) == "stall_head":
            self.fake._stop.wait(60)
            self.close_connection = True
            return
        blob = repo.commits[commit].get(filename)
        if blob is None:
            self._error(
                404,
                "EntryNotFound",
                f'{filename} does not exist on "{rev}"',
                **{"X-Repo-Commit": commit},
            )
            return
        if filename.endswith(LFS_SUFFIXES):
            # LFS: the hub redirects to a signed CDN URL; metadata rides on the redirect.
            location = f"http://localhost:{self.fake.port}/cdn/{blob.sha256}?name={quote(filename)}"
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{blob.sha256}"')
            self.send_header("X-Linked-Size", str(blob.size))
            self.send_header("ETag", f'"{blob.git_sha1}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{blob.git_sha1}"')
        self.send_header("Content-Length", str(blob.size))
        self.end_headers()
        if not head:
            for chunk in blob.chunks(0, blob.size):
                self.wfile.write(chunk)

    def _cdn(self, sha256: str, head: bool) -> None:
        blob = self.fake.blobs.get(sha256)
        if blob is None:
            self._error(404, None, "Not Found")
            return
        name = unquote(urlsplit(self.path).query.removeprefix("name="))
        fault = self.fake.faults.get(name)
        size = blob.size - self.fake.short_by if fault == "short" else blob.size
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        if start >= size and size > 0:
            self._error(416, None, "Range Not Satisfiable")
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha256}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if head:
            return
        with self.fake._lock:
            count = self.fake._served.get(name, 0)
            self.fake._served[name] = count + 1
        if fault == "stall":
            self.wfile.flush()
            self.fake._stop.wait(60)
            self.close_connection = True
            return
        if fault == "drop_always" or (fault == "drop_once" and count == 0):
            stop = start if fault == "drop_always" else start + (size - start) // 2
            for chunk in blob.chunks(start, stop):
                self.wfile.write(chunk)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        for chunk in blob.chunks(start, size):
            self.wfile.write(chunk)
