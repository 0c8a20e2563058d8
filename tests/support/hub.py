"""A local HTTP server that speaks the parts of the Hugging Face Hub's file API that `huggingface_hub` (and so
`gptd_runtime fetch`) uses, for repositories built by the tests.

Endpoints, shaped like the real hub's:
- `GET /api/models/{org}/{name}[/revision/{rev}][?blobs=true]`: revision lookup (`sha`) and the file list
  (`siblings`; with `blobs=true` each has `size`, `blobId` and, for LFS files, `lfs: {sha256, size,
  pointerSize}`).
- `GET /api/models/{org}/{name}/tree/{rev}[/{path}][?recursive=true]`: the tree listing `snapshot_download` uses
  (files with `oid`, `size`, `lfs`; folders as `type: directory`), one page.
- `GET|HEAD /{org}/{name}/resolve/{rev}/{filename}`: the file, with `Range: bytes=N-[M]` (206 +
  Content-Range, 416 past the end), `X-Repo-Commit`, `ETag`, `X-Linked-Size`/`X-Linked-Etag` for LFS.
- Errors carry `X-Error-Code` / `X-Error-Message` and a JSON `{"error": ...}` body, as the hub's do:
  unknown repo (404 RepoNotFound), unknown revision (404 RevisionNotFound), unknown file (404 EntryNotFound),
  bad or missing token (401), gated repo (403 GatedRepo).

Knobs for failure tests (all thread-safe, set them between or during transfers):
- `drop_after[file] = n`: the next response for that file sends n body bytes, then closes the connection.
- `stall_after[file] = n`: the next response sends n bytes, then hangs until `release()` (to kill a client
  mid-file).
- `corrupt[file] = k`: the next k responses for that file carry one flipped byte.
- `api_failures`: statuses the next `/api/...` calls answer with (e.g. `[503, 503]`), one per call.
- `ignore_range`: files whose responses ignore `Range` and send the whole file with 200 (as some proxies do).
- `reported_sha`: when set, the `sha` the revision lookup answers with instead of the commit's (a broken or
  hostile mirror, e.g. `"../../x"`); files are then served under it too.
Counters: `bytes_served[file]` (body bytes written) and `requests` (method, path, range, authorized).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Which files a hub repo stores in LFS: the usual `.gitattributes` of a transformers repo.
_LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".msgpack", ".h5", ".gguf", ".pt", ".pth", ".ot", ".model")
_CHUNK = 64 * 1024


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def lookup(self, revision: str) -> _Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the value for HF_ENDPOINT."""

    def __init__(self, token: str | None = None):
        self.token = token  # when set, every request must carry `Authorization: Bearer <token>`
        self.gated: set[str] = set()  # repos answering 403 GatedRepo even with a valid token
        self.repos: dict[str, _Repo] = {}
        self.last_sha = ""  # commit sha of the latest add_revision
        self.drop_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.api_failures: list[int] = []
        self.reported_sha: str | None = None
        self.bytes_served: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._connections: set[Any] = set()
        self._server: ThreadingHTTPServer | None = None

    # ---- repositories -------------------------------------------------------------------------------------
    def add_revision(self, repo_id: str, files: dict[str, bytes], ref: str = "main") -> str:
        """Store a commit with these files (name -> content) and point `ref` at it. Returns the commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.commits[sha] = _Commit(sha, dict(files))
        repo.refs[ref] = sha
        self.last_sha = sha
        return sha

    def add_directory(self, repo_id: str, path: Path, ref: str = "main", extra: dict[str, bytes] | None = None) -> str:
        """Store every file under `path` (relative names, `/`-separated) plus `extra` as one commit."""
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        files.update(extra or {})
        return self.add_revision(repo_id, files, ref)

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(_LFS_SUFFIXES)

    def release(self) -> None:
        """Let stalled responses finish (they then close without sending the rest)."""
        self._release.set()

    # ---- server -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        # Like a hub that went away: kept-alive connections die too (shutdown() only stops accepting).
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    # ---- request handling (called from handler threads) -------------------------------------------------
    def _authorize(self, headers: Any, repo_id: str) -> None:
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        if repo_id in self.gated:
            raise _HubError(
                403,
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.url}/{repo_id} to ask for access.",
                "GatedRepo",
            )

    def _commit(self, repo_id: str, revision: str) -> _Commit:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        commit = repo.lookup(revision)
        if commit is None and revision == self.reported_sha:  # a mirror serves the files under the sha it reports
            commit = repo.lookup("main")
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _blob(self, name: str, data: bytes) -> tuple[str, dict[str, Any] | None]:
        """(git blob id, LFS info or None) as the hub reports them."""
        if not self.is_lfs(name):
            return _git_blob_sha1(data), None
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        return _git_blob_sha1(pointer.encode()), {"sha256": sha256, "size": len(data), "pointerSize": len(pointer)}

    def tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        commit = self._commit(repo_id, revision)
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
            if len(parts) > 1 and not recursive:
                continue
            oid, lfs = self._blob(name, data)
            entry: dict[str, Any] = {"type": "file", "oid": oid, "size": len(data), "path": name}
            if lfs:
                entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            entries[name] = entry
        if prefix and not entries:
            raise _HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        return list(entries.values())

    def model_info(self, repo_id: str, revision: str, blobs: bool) -> dict[str, Any]:
        commit = self._commit(repo_id, revision)
        siblings = []
        for name, data in sorted(commit.files.items()):
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                entry["size"] = len(data)
                entry["blobId"], lfs = self._blob(name, data)
                if lfs:
                    entry["lfs"] = lfs
            siblings.append(entry)
        sha = commit.sha if self.reported_sha is None else self.reported_sha
        return {"_id": commit.sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "disabled": False, "gated": repo_id in self.gated, "tags": [], "library_name": "transformers",
                "siblings": siblings}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def _send_error(self, err: _HubError) -> None:
        body = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", err.message)
        if err.code:
            self.send_header("X-Error-Code", err.code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: dict[str, Any] | list[Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with hub._lock:
            hub.requests.append({"method": self.command, "path": url.path, "range": self.headers.get("Range"),
                                 "authorized": self.headers.get("Authorization") is not None})
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                with hub._lock:
                    failure = hub.api_failures.pop(0) if hub.api_failures else None
                if failure is not None:
                    raise _HubError(failure, "Service temporarily unavailable")
                repo_id = "/".join(parts[2:4])
                query = {k: v[0].lower() for k, v in parse_qs(url.query).items()}
                if len(parts) >= 6 and parts[4] == "tree":
                    hub._authorize(self.headers, repo_id)
                    recursive = query.get("recursive") == "true"
                    self._send_json(hub.tree(repo_id, parts[5], "/".join(parts[6:]), recursive))
                    return
                if len(parts) == 4:
                    revision = "main"
                elif len(parts) == 6 and parts[4] == "revision":
                    revision = parts[5]
                else:
                    raise _HubError(404, "Not found")
                hub._authorize(self.headers, repo_id)
                self._send_json(hub.model_info(repo_id, revision, query.get("blobs") == "true"))
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo_id = "/".join(parts[:2])
                hub._authorize(self.headers, repo_id)
                self._send_file(hub._commit(repo_id, parts[3]), "/".join(parts[4:]))
            else:
                raise _HubError(404, "Not found")
        except _HubError as e:
            self._send_error(e)

    def _send_file(self, commit: _Commit, name: str) -> None:
        hub = self.hub
        data = commit.files.get(name)
        if data is None:
            raise _HubError(404, f"Entry not found: {name}", "EntryNotFound")
        size = len(data)
        start, end = 0, size - 1
        rng = None if name in hub.ignore_range else self.headers.get("Range")
        if rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        lfs = hub.is_lfs(name)
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit.sha)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return

        body = data[start : end + 1]
        with hub._lock:
            if hub.corrupt.get(name, 0) > 0:
                hub.corrupt[name] -= 1
                body = bytes([body[0] ^ 0xFF]) + body[1:] if body else body
            drop = hub.drop_after.pop(name, None)
            stall = hub.stall_after.pop(name, None)
        limit = drop if drop is not None else stall
        sent = 0
        while sent < len(body):
            n = len(body) - sent if limit is None else min(len(body) - sent, limit - sent)
            if n <= 0:
                break
            chunk = body[sent : sent + min(n, _CHUNK)]
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:  # the client went away
                break
            sent += len(chunk)
            with hub._lock:
                hub.bytes_served[name] += len(chunk)
        if limit is not None and sent < len(body):
            if stall is not None:
                hub._release.wait(60)
            self.close_connection = True  # the rest never comes: the client sees a short body
