"""`python -m gptd_runtime fetch hf://org/name --revision REV --dest DIR`: download one revision of a model
repository into a cache directory that runtime pods mount read-only.

Layout of DIR (docs/fetch-and-evaluate.md):
    DIR/<commit-sha>/                 a complete revision: only ever created by one rename, marker inside
    DIR/<commit-sha>/.gptd-complete   JSON marker, written (fsynced) last, before that rename
    DIR/refs/<revision>               the commit sha a branch/tag resolved to (written after the revision)
    DIR/.incomplete/<commit-sha>/     work in progress: verified files under their names, `<name>.part` partial

Properties:
- resumable: a rerun keeps verified files and continues `.part` files with an HTTP Range request;
- verified: LFS files by the sha256 in the hub's metadata, the rest by size; a mismatch is fetched again;
- atomic: a revision directory exists only when complete, so a reader needs just `complete_revision()`;
- selective: from the repo's file list, only what the runtime loads (see `select_files`).
Progress is JSON lines on stdout; a failure is one JSON line `{"error", "reason"}` and exit status 1, or
PERMANENT_EXIT_CODE (3) when trying again cannot help (401/403, repository or revision not found, bad arguments,
no weights): the download Job's podFailurePolicy fails the Job at once on it instead of retrying the pod.
`--result-file F` also writes the last line (the complete revision's, or the error) to F: in a download Job that
is /dev/termination-log, which the operator reads from the pod's status. `--prune --keep SHA...`: after a
successful fetch, delete every other complete revision (and its refs) and abandoned `.incomplete` work.
The hub token (HF_TOKEN or a token file) is sent as a header and never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

MARKER = ".gptd-complete"
INCOMPLETE = ".incomplete"
REFS = "refs"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1024 * 1024
# Hub files the runtime reads besides weights: configs, tokenizers (BPE, WordPiece, SentencePiece,
# tiktoken), chat templates.
_SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_WEIGHT_SAFETENSORS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$|^adapter_model\.safetensors$")
_WEIGHT_BIN = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$|^adapter_model\.bin$")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _Cancelled(Exception):
    """Another file of the revision failed: stop this one at the next chunk."""


PERMANENT_EXIT_CODE = 3
# Reasons a retry of the same pod cannot fix (a new token, repository or revision needs a spec or Secret change,
# which the operator's next Job picks up): exit PERMANENT_EXIT_CODE. Network, HubError, DiskFull, Storage, Busy,
# Corrupt, InvalidResponse and Internal may pass: exit 1, retried by the Job controller.
PERMANENT_REASONS = frozenset({"Unauthorized", "Forbidden", "RepositoryNotFound", "RevisionNotFound", "EntryNotFound",
                               "InvalidArgument", "NoWeights"})


class FetchError(Exception):
    """A download that cannot complete. `reason` is a stable CamelCase word for the operator's status."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # set for LFS files (the hub's metadata), None for plain git files


# ---- pure parts ------------------------------------------------------------------------------------------
def parse_repo_id(uri: str) -> str:
    """`hf://org/name` or `org/name` -> `org/name`."""
    parsed = urlparse(uri)
    if parsed.scheme and parsed.scheme != "hf":
        raise FetchError("InvalidArgument", f"fetch downloads hf://org/name repositories, not {parsed.scheme}:// URIs")
    repo_id = (parsed.netloc + parsed.path).strip("/") if parsed.scheme else uri.strip("/")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FetchError("InvalidArgument", f"model URI must look like hf://org/name, got {uri!r}")
    return repo_id


def select_files(files: Sequence[RemoteFile]) -> list[RemoteFile]:
    """What the runtime loads from a repo root: config/tokenizer files and one weight format.

    safetensors win over `.bin` when both exist; ONNX, Flax, TF, GGUF, Core ML, OpenVINO, training state and
    anything in a sub-folder (`onnx/`, `original/`, ...) are skipped: `from_pretrained(dir)` reads the root.
    """
    # Root files only: this also means no name from the hub can point outside the revision directory.
    root = [f for f in files if "/" not in f.name and "\\" not in f.name]
    safetensors = [f for f in root if _WEIGHT_SAFETENSORS.match(f.name)]
    weights = safetensors or [f for f in root if _WEIGHT_BIN.match(f.name)]
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    other_index = "pytorch_model.bin.index.json" if safetensors else "model.safetensors.index.json"
    support = [
        f for f in root
        if f.name.endswith(_SUPPORT_SUFFIXES) and f.name != other_index and not f.name.startswith(".")
        and (f.name == index or not f.name.endswith(".index.json"))
    ]
    return sorted({f.name: f for f in [*support, *weights]}.values(), key=lambda f: f.name)


def complete_revision(dest: Path, sha: str) -> Path | None:
    """The revision directory if it is complete (marker present), else None. What readers must call."""
    path = Path(dest) / sha
    return path if (path / MARKER).is_file() else None


def _ref_path(dest: Path, revision: str) -> Path:
    """`dest/refs/<revision>`; a revision naming a path outside `dest/refs` (`../../x`, `/etc/x`) is refused,
    as it would read or overwrite a file anywhere the Job can write."""
    refs = (Path(dest) / REFS).resolve()
    path = (refs / revision).resolve()
    if not revision or path == refs or not path.is_relative_to(refs):
        raise FetchError("InvalidArgument", f"revision {revision!r} is not a branch, tag or commit sha")
    return path


def resolve_ref(dest: Path, revision: str) -> str | None:
    """The commit sha a branch/tag resolved to in an earlier fetch (or the sha itself), if known locally."""
    if _SHA_RE.match(revision):
        return revision
    try:
        sha = _ref_path(dest, revision).read_text().strip()
    except OSError:
        return None
    return sha if _SHA_RE.match(sha) else None


class Progress:
    """Counts bytes on disk per file (so resumed and re-fetched bytes are never counted twice) and prints
    `{"bytesDone","bytesTotal","filesDone","filesTotal"}` lines at most every `interval` seconds."""

    def __init__(self, files: Sequence[RemoteFile], out: TextIO, interval: float):
        self.total = sum(f.size for f in files)
        self.files_total = len(files)
        self.on_disk: dict[str, int] = {f.name: 0 for f in files}
        self.done: set[str] = set()
        self.out, self.interval = out, interval
        self._last = 0.0
        self._lock = threading.RLock()  # files download in parallel

    def line(self) -> dict[str, Any]:
        return {"bytesDone": sum(self.on_disk.values()), "bytesTotal": self.total,
                "filesDone": len(self.done), "filesTotal": self.files_total}

    def update(self, name: str, on_disk: int, done: bool = False) -> None:
        with self._lock:
            self.on_disk[name] = on_disk
            if done:
                self.done.add(name)
            else:
                self.done.discard(name)
            self.emit(force=done)

    def emit(self, force: bool = False, **extra: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if force or now - self._last >= self.interval:
                self._last = now
                print(json.dumps({**self.line(), **extra}), file=self.out, flush=True)


# ---- file system -----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: two fetches may update one ref
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_all(out: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def _sha256_prefix(path: Path, length: int) -> Any:
    h = hashlib.sha256()
    if length:
        with open(path, "rb") as f:
            while length and (chunk := f.read(min(_CHUNK, length))):
                h.update(chunk)
                length -= len(chunk)
    return h


def _verified(path: Path, f: RemoteFile) -> bool:
    try:
        if path.stat().st_size != f.size:
            return False
    except OSError:
        return False
    return f.sha256 is None or _sha256(path) == f.sha256


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One fetch per revision at a time (a retried Job may overlap the old one on a shared volume)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise FetchError("Busy", f"another fetch is writing this revision (lock {lock_path} is held)") from e
        yield


# ---- hub -------------------------------------------------------------------------------------------------
class _Hub:
    """The hub's HTTP file API through huggingface_hub: HfApi for the revision and file list, its HTTP
    session and error mapping (hf_raise_for_status) for the file transfers."""

    def __init__(self, endpoint: str | None, token: str | None, timeout: float):
        from huggingface_hub import HfApi, constants

        # constants.ENDPOINT is read from HF_ENDPOINT when huggingface_hub is imported.
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.timeout = timeout
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def revision(self, repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
        info = self.api.model_info(repo_id, revision=revision, files_metadata=True, timeout=self.timeout)
        files = [
            RemoteFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0), s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or []
        ]
        if not info.sha:
            raise FetchError("InvalidResponse", f"the hub returned no commit sha for {repo_id}@{revision}")
        # The sha becomes a directory name (dest/<sha>, later rmtree'd if present): anything but a git commit
        # id from a broken or hostile mirror must never reach a path.
        if not isinstance(info.sha, str) or not _SHA_RE.match(info.sha):
            raise FetchError("InvalidResponse", f"the hub returned an invalid commit sha {str(info.sha)[:80]!r} "
                                                f"for {repo_id}@{revision} (expected 40 hex digits)")
        return info.sha, files

    def stream(self, repo_id: str, sha: str, name: str, start: int) -> Any:
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        # identity: Range offsets and the hub's sizes are of the raw file, not of a compressed body.
        headers = {**build_hf_headers(token=self.token), "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        url = hf_hub_url(repo_id, name, revision=sha, endpoint=self.endpoint)
        timeout = httpx2.Timeout(self.timeout, read=self.timeout)
        return get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True)


def _hub_error(e: Exception, repo_id: str, revision: str) -> FetchError:
    """huggingface_hub's exceptions -> one FetchError keeping the hub's own message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    server = getattr(e, "server_message", None) or ""
    said = f": {server}" if server else ""
    if isinstance(e, RevisionNotFoundError):
        return FetchError("RevisionNotFound", f"revision {revision!r} not found in {repo_id} (hub said{said or ': -'})")
    if isinstance(e, GatedRepoError) or status == 403:
        return FetchError("Forbidden", f"403 Forbidden: no access to {repo_id}{said}")
    # A bad token is a plain 401; a 401 that huggingface_hub maps to RepositoryNotFound is a private or missing
    # repo seen without (enough) credentials.
    if status == 401 and not isinstance(e, RepositoryNotFoundError):
        return FetchError("Unauthorized", f"401 Unauthorized: the hub refused the token for {repo_id}{said}")
    if isinstance(e, RepositoryNotFoundError):
        return FetchError("RepositoryNotFound",
                          f"repository {repo_id} not found, or private and the token has no access ({status}{said})")
    if isinstance(e, RemoteEntryNotFoundError):
        return FetchError("EntryNotFound", f"a file listed for {repo_id}@{revision} is missing on the hub{said}")
    if isinstance(e, HfHubHTTPError):
        return FetchError("HubError", f"hub error {status} for {repo_id}@{revision}{said}")
    return FetchError("Network", f"cannot reach the hub for {repo_id}@{revision}: {type(e).__name__}: {e}")


# ---- download --------------------------------------------------------------------------------------------
@dataclass
class FetchOptions:
    endpoint: str | None = None  # default: HF_ENDPOINT, else huggingface.co
    token: str | None = None
    attempts: int = 5  # per file, for dropped connections, 5xx/429 and corrupt transfers
    backoff_seconds: float = 1.0  # doubled per attempt, capped at 30 s
    timeout_seconds: float = 60.0
    progress_interval: float = 2.0
    jobs: int = 4  # files downloaded at once (sharded weights download in parallel)


def _download_file(hub: _Hub, repo_id: str, sha: str, f: RemoteFile, work: Path, progress: Progress,
                   opts: FetchOptions, cancel: threading.Event) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import hf_raise_for_status

    final = work / f.name
    part = work / (f.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    # sha256 is computed while the bytes stream in (a 16 GB file is not read back from disk to check it);
    # only a .part left by an earlier process is hashed from disk once, before resuming it.
    hasher, hashed = hashlib.sha256(), 0
    for attempt in range(opts.attempts):
        if attempt:
            cancel.wait(min(30.0, opts.backoff_seconds * 2 ** (attempt - 1)))
        if cancel.is_set():
            raise _Cancelled()
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:  # cannot be a prefix of this file
            part.unlink()
            have = 0
        if hashed != have:
            hasher, hashed = _sha256_prefix(part, have), have
        try:
            if have < f.size or f.size == 0:
                with hub.stream(repo_id, sha, f.name, have) as r:
                    if r.status_code == 416:  # we already hold every byte
                        pass
                    else:
                        if r.status_code >= 400:
                            r.read()
                        hf_raise_for_status(r)
                        if have and r.status_code != 206:  # server ignored the Range: start over
                            have, hasher, hashed = 0, hashlib.sha256(), 0
                        # Unbuffered: every byte received is in the file (page cache) at once, so a killed
                        # process loses none; chunks as they arrive, so a dropped connection keeps them.
                        with open(part, "ab" if have else "wb", buffering=0) as out:
                            for chunk in r.iter_bytes():
                                if cancel.is_set():
                                    raise _Cancelled()
                                _write_all(out, chunk)
                                hasher.update(chunk)
                                have += len(chunk)
                                hashed = have
                                progress.update(f.name, have)
                            out.flush()
                            os.fsync(out.fileno())
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status not in _TRANSIENT_STATUS:
                raise _hub_error(e, repo_id, sha) from e
            last_error = f"HTTP {status}"
            continue
        except httpx2.TransportError as e:  # dropped connection, short body, timeout: resume from `have`
            last_error = f"{type(e).__name__}: {e}"
            continue
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FetchError("DiskFull", f"disk full writing {f.name} into {work}: {e.strerror}") from e
            raise
        if part.stat().st_size == f.size and (f.sha256 is None or hasher.hexdigest() == f.sha256):
            os.replace(part, final)
            progress.update(f.name, f.size, done=True)
            return
        # Complete length but wrong content (or wrong length): discard and fetch the whole file again.
        last_error = f"{f.name} failed verification ({'sha256' if f.sha256 else 'size'} mismatch)"
        part.unlink(missing_ok=True)
        hasher, hashed = hashlib.sha256(), 0
        progress.update(f.name, 0)
    reason = "Corrupt" if "verification" in last_error else "Network"
    raise FetchError(reason, f"{f.name}: giving up after {opts.attempts} attempts: {last_error}")


def _lookup(hub: _Hub, repo_id: str, revision: str, opts: FetchOptions) -> tuple[str, list[RemoteFile]]:
    """The revision's commit and file list; a busy or unreachable hub is retried like a transfer."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(opts.attempts):
        if attempt:
            time.sleep(min(30.0, opts.backoff_seconds * 2 ** (attempt - 1)))
        try:
            return hub.revision(repo_id, revision)
        except FetchError:
            raise
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
            transient = status in _TRANSIENT_STATUS or (status is None and isinstance(e, httpx2.TransportError))
            if not transient or attempt + 1 == opts.attempts:
                raise _hub_error(e, repo_id, revision) from e
        except Exception as e:
            raise _hub_error(e, repo_id, revision) from e
    raise AssertionError("unreachable")


def _download_all(hub: _Hub, repo_id: str, sha: str, files: Sequence[RemoteFile], work: Path, progress: Progress,
                  opts: FetchOptions) -> None:
    """`opts.jobs` files at a time, in name order; the first failure stops the others at their next chunk
    and is the one raised."""
    cancel = threading.Event()
    errors: list[BaseException] = []

    def one(f: RemoteFile) -> None:
        try:
            _download_file(hub, repo_id, sha, f, work, progress, opts, cancel)
        except _Cancelled:
            pass
        except BaseException as e:
            with progress._lock:
                errors.append(e)
            cancel.set()

    finished = threading.Event()

    def heartbeat() -> None:
        # A line every interval even when no byte arrives (a stalled hub), so a watcher can tell a live but
        # stuck download from a dead process.
        while not finished.wait(max(opts.progress_interval, 0.05)):
            progress.emit(force=True)

    beat = threading.Thread(target=heartbeat, name="fetch-progress", daemon=True)
    beat.start()
    try:
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs), thread_name_prefix="fetch") as pool:
            for f in files:
                pool.submit(one, f)
    finally:
        finished.set()
        beat.join()
    if errors:
        raise errors[0]


def fetch(repo_id: str, revision: str, dest: Path, opts: FetchOptions | None = None,
          out: TextIO | None = None) -> Path:
    """Download `repo_id@revision` into `dest/<sha>` (see the module doc). Returns that directory."""
    opts = opts or FetchOptions()
    out = out or sys.stdout
    dest = Path(dest)
    hub = _Hub(opts.endpoint, opts.token, opts.timeout_seconds)
    if not _SHA_RE.match(revision):
        _ref_path(dest, revision)  # refused before any network or disk access

    known = resolve_ref(dest, revision) if _SHA_RE.match(revision) else None
    if known and (done := complete_revision(dest, known)):  # a pinned sha already here: no network needed
        _report_complete(done, out)
        return done
    sha, remote = _lookup(hub, repo_id, revision, opts)
    files = select_files(remote)
    if not any(_WEIGHT_SAFETENSORS.match(f.name) or _WEIGHT_BIN.match(f.name) for f in files):
        raise FetchError("NoWeights", f"{repo_id}@{revision} has no safetensors or pytorch_model.bin weights "
                                      "at its root (onnx/gguf/flax/tf only?)")

    if done := complete_revision(dest, sha):
        _report_complete(done, out)
        _write_ref(dest, revision, sha)
        return done

    work = dest / INCOMPLETE / sha
    work.mkdir(parents=True, exist_ok=True)
    # The lock file is never deleted: unlinking it would let a later fetch lock a new file while an earlier
    # one still holds the old inode.
    with _exclusive(dest / INCOMPLETE / f"{sha}.lock"):
        if done := complete_revision(dest, sha):  # another fetch finished it while we looked
            shutil.rmtree(work, ignore_errors=True)
            _report_complete(done, out)
            _write_ref(dest, revision, sha)
            return done
        progress = Progress(files, out, opts.progress_interval)
        todo = []
        for f in files:
            final, part = work / f.name, work / (f.name + ".part")
            if final.exists() and _verified(final, f):
                progress.on_disk[f.name] = f.size
                progress.done.add(f.name)
                continue
            final.unlink(missing_ok=True)  # a corrupt leftover is fetched again
            progress.on_disk[f.name] = part.stat().st_size if part.exists() else 0
            todo.append(f)
        needed = sum(f.size - progress.on_disk[f.name] for f in todo)
        free = shutil.disk_usage(work).free
        if needed > free:
            raise FetchError("DiskFull", f"not enough space in {dest}: {needed} more bytes needed, {free} free")
        progress.emit(force=True)
        _download_all(hub, repo_id, sha, todo, work, progress, opts)

        manifest = {"repo": repo_id, "revision": revision, "sha": sha, "files": {f.name: f.size for f in files},
                    "bytes": progress.total, "completedAt": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        _write_atomic(work / MARKER, json.dumps(manifest, indent=1))
        target = dest / sha
        if target.exists():  # under the lock, so never complete here: no marker, e.g. a copy made by hand
            shutil.rmtree(target)
        os.rename(work, target)  # the one step that makes the revision visible
        _fsync_dir(dest)
    _write_ref(dest, revision, sha)
    progress.emit(force=True, revision=sha, path=str(target), complete=True)
    return target


def _write_ref(dest: Path, revision: str, sha: str) -> None:
    if revision != sha:
        _write_atomic(_ref_path(dest, revision), sha + "\n")


def complete_line(path: Path) -> dict[str, Any]:
    """The last progress line of a complete revision directory (from its marker)."""
    manifest = json.loads((path / MARKER).read_text())
    n = len(manifest["files"])
    return {"bytesDone": manifest["bytes"], "bytesTotal": manifest["bytes"], "filesDone": n, "filesTotal": n,
            "revision": manifest["sha"], "path": str(path), "complete": True}


def _report_complete(path: Path, out: TextIO) -> None:
    print(json.dumps(complete_line(path)), file=out, flush=True)


def prune(dest: Path, keep: Sequence[str]) -> list[str]:
    """Delete the complete revisions in ``dest`` other than ``keep`` (their refs too) and `.incomplete` work no
    fetch holds the lock of. Returns what was deleted (sha names). The caller keeps every revision a pod mounts:
    a directory is never deleted under a reader's feet by anything else, and a running fetch is never touched."""
    keep_set = set(keep)
    gone: list[str] = []
    trash = dest / INCOMPLETE / ".trash"
    for entry in sorted(dest.iterdir()) if dest.is_dir() else []:
        if entry.is_dir() and _SHA_RE.match(entry.name) and entry.name not in keep_set:
            trash.mkdir(parents=True, exist_ok=True)
            hidden = trash / entry.name
            shutil.rmtree(hidden, ignore_errors=True)
            os.rename(entry, hidden)  # gone from DEST/<sha> in one step, then deleted at leisure
            shutil.rmtree(hidden, ignore_errors=True)
            gone.append(entry.name)
    refs = dest / REFS
    if refs.is_dir():
        for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
            try:
                target = ref.read_text().strip()
            except OSError:
                continue
            if target in gone or (_SHA_RE.match(target) and not (dest / target).is_dir()):
                ref.unlink(missing_ok=True)
    work_root = dest / INCOMPLETE
    for work in sorted(work_root.iterdir()) if work_root.is_dir() else []:
        if not (work.is_dir() and _SHA_RE.match(work.name)) or work.name in keep_set:
            continue
        lock = work_root / f"{work.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a fetch of that revision is running: not stale
            shutil.rmtree(work, ignore_errors=True)  # (the lock file stays: see fetch())
            gone.append(f"{INCOMPLETE}/{work.name}")
        finally:
            os.close(fd)
    return gone


# ---- CLI -------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="hf://org/name (or org/name)")
    p.add_argument("--revision", default="main", help="branch, tag or commit sha (default: main)")
    p.add_argument("--dest", required=True, type=Path, help="cache directory; the revision lands in DEST/<sha>")
    p.add_argument("--token-file", type=Path, default=os.environ.get("GPTD_HF_TOKEN_FILE") or None,
                   help="file holding the hub token (HF_TOKEN wins when set) [env GPTD_HF_TOKEN_FILE]")
    p.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--attempts", type=int, default=5, help="tries per file before giving up")
    p.add_argument("--jobs", type=int, default=4, help="files downloaded at once (default 4)")
    p.add_argument("--result-file", type=Path, default=None,
                   help="also write the last line (complete revision or error) here, e.g. /dev/termination-log")
    p.add_argument("--prune", action="store_true",
                   help="after a successful fetch, delete the other revisions in DEST except --keep ones")
    p.add_argument("--keep", nargs="*", default=[], metavar="SHA", help="revisions --prune must keep (mounted ones)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    # A download Job sends no telemetry (huggingface_hub otherwise also fetches an "agent harness" list from
    # the endpoint). Read when huggingface_hub is imported, i.e. below; HF_HUB_DISABLE_TELEMETRY=0 allows it.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    token: str | None = None
    try:
        token = os.environ.get("HF_TOKEN") or None
        if token is None and args.token_file is not None:
            try:
                token = args.token_file.read_text().strip() or None
            except OSError as e:
                raise FetchError("InvalidArgument", f"cannot read token file {args.token_file}: {e.strerror}") from e
        opts = FetchOptions(token=token, progress_interval=args.progress_interval, attempts=max(1, args.attempts),
                            jobs=max(1, args.jobs))
        target = fetch(parse_repo_id(args.uri), args.revision, args.dest, opts, out)
        if args.prune:
            for sha in args.keep:
                if not _SHA_RE.match(sha):
                    raise FetchError("InvalidArgument", f"--keep takes commit shas (40 hex digits), not {sha!r}")
            # Housekeeping must not fail a download that succeeded: an error here is logged, not the result.
            try:
                gone = prune(args.dest, [*args.keep, target.name])
                if gone:
                    print(json.dumps({"pruned": gone}), file=sys.stderr, flush=True)
            except OSError as e:
                print(json.dumps({"pruneError": f"{e.strerror or e} ({e.filename})"}), file=sys.stderr, flush=True)
        _write_result(args.result_file, complete_line(target))
        return 0
    except FetchError as e:
        reason, message = e.reason, e.message
    except OSError as e:  # the cache volume: missing, read-only, not a directory, ...
        reason, message = "Storage", f"cannot write to {args.dest}: {e.strerror or e} ({e.filename or args.dest})"
    except Exception as e:  # still one line for the operator to report, never a traceback
        reason, message = "Internal", f"{type(e).__name__}: {e}"
    if token:
        message = message.replace(token, "***")  # never echo the token
    line = {"error": " ".join(message.split()), "reason": reason}
    print(json.dumps(line), file=out, flush=True)
    _write_result(args.result_file, line)
    return PERMANENT_EXIT_CODE if reason in PERMANENT_REASONS else 1


def _write_result(path: Path | None, line: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(line) + "\n")  # the kubelet reads at most 4096 bytes: a line is far less
    except OSError as e:
        print(json.dumps({"resultFileError": f"{e.strerror or e} ({path})"}), file=sys.stderr, flush=True)
