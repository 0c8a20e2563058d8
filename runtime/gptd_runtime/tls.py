"""HTTPS for the server: one `ssl.SSLContext` whose certificate chain is reloaded when the files change.

cert-manager renews a certificate by rewriting its Secret; the kubelet then swaps the mounted files atomically
(`tls.crt -> ..data/tls.crt`, `..data` re-pointed to a new timestamped directory). `CertReloader.check()`
compares what the paths resolve to (inode, size, mtime) with what was loaded and, on a change, loads the new
pair into the *same* context: OpenSSL copies the certificate into each connection at its handshake, so
established connections (streams in flight) keep theirs and only new handshakes get the new one. The check
runs on the event loop thread (the one that also makes handshakes), never concurrently with them.

A pair that does not load (the key not matching the certificate, a half-written file) is first tried in a
scratch context, so a bad renewal leaves the old certificate served and is retried at the next check.

The client CA bundle (mutual TLS) is watched the same way. OpenSSL can add CAs to a live context but not remove
them, so a changed bundle (or pair) is loaded into a *new* context, and the listening context's servername
callback — which OpenSSL calls at every handshake, with or without SNI — moves each new connection onto the
newest context before the client's certificate is verified: a CA removed from the bundle is no longer trusted,
without a restart. With mutual TLS there is no session resumption and no TLS 1.2 (a resumed session skips
client verification and would outlive a rotation; see _server_context)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("gptd_runtime.tls")

# HTTP/1.1 only: uvicorn's protocols do not speak h2 (an h2-preferring client falls back).
ALPN = ["http/1.1"]


class TLSConfigError(ValueError):
    """The TLS files given at start cannot be used (the message names the flag)."""


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the kubelet's symlinks: a swapped ..data gives a new inode
    return st.st_ino, st.st_size, st.st_mtime_ns


def _server_context(client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
        # No session resumption with mutual TLS: a resumed handshake does not verify the client's certificate
        # again, and resumption is served by the listening context whatever CA bundle is current, so a client of a
        # CA removed from the bundle would stay in for the session's lifetime. TLS 1.3 resumes only with tickets
        # (none are issued); TLS 1.2 also resumes by session id from a server cache Python cannot switch off, so
        # mutual TLS is TLS 1.3 only.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


class CertReloader:
    """Owns the server's SSLContext and keeps its certificate chain (and client CA bundle) in step with the files."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self.reloads = 0  # successful reloads after the first load
        self.failures = 0  # renewals seen but refused (kept serving the previous pair)
        try:
            self.context = _server_context(self.client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"--tls-client-ca-file {self.client_ca_file}: {e}") from e
        try:
            self._loaded = self._stamp()
            self.context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"--tls-cert-file {self.cert_file} / --tls-key-file {self.key_file}: {e}") from e
        # The context new handshakes get. Without mutual TLS it is always self.context (renewals load into it);
        # with it, a reload builds a new one and _pick moves each handshake onto it.
        self.current = self.context
        if self.client_ca_file is not None:
            self.context.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not self.context:
            conn.context = current  # OpenSSL SSL_set_SSL_CTX: this connection's certificate and CA store

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        files = (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())
        return tuple(_fingerprint(f) for f in files)

    def check(self) -> bool:
        """Reload the pair (and the client CA bundle) if a file changed. True when new files are now served."""
        try:
            stamp = self._stamp()
        except OSError as e:  # mid-swap, or the Secret was removed: keep serving what we have
            log.warning("TLS files not readable, keeping the current certificate: %s", e.strerror or e)
            return False
        if stamp == self._loaded:
            return False
        try:
            # A scratch context first: a failed load_cert_chain can leave a context with the new cert but no key.
            fresh = _server_context(self.client_ca_file)
            fresh.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.client_ca_file is None:
                self.context.load_cert_chain(str(self.cert_file), str(self.key_file))
            else:
                self.current = fresh
        except (OSError, ssl.SSLError) as e:
            self.failures += 1
            log.warning("renewed TLS files not loaded, keeping the current ones (retrying): %s", e)
            return False
        self._loaded = stamp
        self.reloads += 1
        log.info("TLS files reloaded (%s%s)", self.cert_file,
                 f", client CA {self.client_ca_file}" if self.client_ca_file else "")
        return True

    async def watch(self, interval: float) -> None:
        """Check every `interval` seconds until cancelled (runs on the server's event loop)."""
        while True:
            await asyncio.sleep(interval)
            self.check()


def reloader_from(cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None) -> CertReloader | None:
    if cert_file is None or key_file is None:
        return None
    return CertReloader(cert_file, key_file, client_ca_file)
