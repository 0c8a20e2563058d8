"""API keys: several accepted at once, re-read from the mounted file, and a per-address brake on wrong ones.

The key file (`--api-key-file`, the operator mounts the Secret there) holds one key per line; blank lines and
lines starting with `#` are ignored. It may also be a directory: a Secret with several data keys mounted whole,
each file holding keys the same way. Any listed key authenticates, so a key is rotated by adding the new one,
switching clients, then removing the old one. The kubelet refreshes a mounted Secret within about a minute;
the file is checked (stat, then re-read only if it changed) at most every `reload_seconds` on the request
path, so an edit takes effect on the first request after that, without a restart, and a removed key is
refused from then on. A file that becomes unreadable or empty keeps the previous keys (a half-finished
Secret update must not lock every client out, nor open the server) and logs a warning without any key.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key without stopping early:
the time taken does not depend on how much of a key a guess got right, nor on which key matched. A key is
never logged or exported; metrics name it by `key_id`, the first 8 hex digits of its SHA-256."""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gptd_runtime.apikeys")


class KeyFileError(ValueError):
    """The key file cannot be used at start (unreadable, or no key in it)."""


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_keys(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _files(path: Path) -> list[Path]:
    """The key file, or, for a directory (a Secret with several data keys mounted whole), each of its files
    (the kubelet's `..data` entries and other dot-names skipped)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def _read(path: Path) -> list[str]:
    try:
        keys = [k for f in _files(path) for k in parse_keys(f.read_text())]
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"API key file {path} is not readable: {getattr(e, 'strerror', None) or e}") from e
    if not keys:
        raise KeyFileError(f"API key file {path} holds no key (one key per line; # starts a comment)")
    return keys


class KeyRing:
    def __init__(self, path: Path, reload_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.reload_seconds = reload_seconds
        self._clock = clock
        self._digests: list[tuple[bytes, str]] = []
        self._stamp: tuple[tuple[str, int, int, int], ...] | None = None
        self._checked = clock()
        self._install(_read(self.path), self._stat())

    def _stat(self) -> tuple[tuple[str, int, int, int], ...] | None:
        try:
            return tuple((f.name, (st := os.stat(f)).st_ino, st.st_size, st.st_mtime_ns) for f in _files(self.path))
        except OSError:
            return None

    def _install(self, keys: list[str], stamp: tuple[tuple[str, int, int, int], ...] | None) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in dict.fromkeys(keys)]
        self._stamp = stamp

    @property
    def key_ids(self) -> list[str]:
        return [kid for _, kid in self._digests]

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed since the last read (and the check interval has passed)."""
        now = self._clock()
        if not force and now - self._checked < self.reload_seconds:
            return
        self._checked = now
        stamp = self._stat()
        if stamp is not None and stamp == self._stamp:
            return
        try:
            keys = _read(self.path)
        except KeyFileError as e:
            log.warning("%s; keeping the %d key(s) loaded before", e, len(self._digests))
            return
        before = set(self.key_ids)
        self._install(keys, stamp)
        after = set(self.key_ids)
        if before != after:
            log.info("API keys reloaded: %d key(s), added %s, removed %s", len(after),
                     sorted(after - before) or "none", sorted(before - after) or "none")

    def authenticate(self, token: str) -> str | None:
        """The key id of the key `token` is, or None."""
        self.refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, kid in self._digests:  # no early exit: time does not tell which key matched
            if hmac.compare_digest(digest, known):
                found = kid
        return found


class FailureLimiter:
    """After `limit` failed authentications from one client address within `window` seconds, that address gets
    429s (Retry-After: until its oldest failure leaves the window) without its keys being checked at all."""

    MAX_CLIENTS = 10_000  # bounded memory under a scan from many addresses: the oldest entries go first

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, client: str) -> collections.deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        cutoff = self._clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None if it is not blocked."""
        times = self._recent(client)
        if times is None or len(times) < self.limit:
            return None
        return max(1, int(times[0] + self.window - self._clock() + 0.999))

    def failed(self, client: str) -> None:
        times = self._recent(client)
        if times is None:
            times = self._failures[client] = collections.deque(maxlen=self.limit)
            while len(self._failures) > self.MAX_CLIENTS:
                self._failures.popitem(last=False)
        times.append(self._clock())
