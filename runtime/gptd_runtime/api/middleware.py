"""Pure-ASGI guard in front of every route (pure ASGI, not BaseHTTPMiddleware, so streaming responses and
client disconnects pass through untouched): API-key auth (apikeys.py: several keys, reloaded, wrong keys
braked per client address), request body cap, in-flight accounting for the
drain, and per-route status counters."""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..state import RuntimeState
from .errors import error_body

# One line per request, in place of uvicorn's access log (which prints the raw path and query string): ids,
# sizes, timings and status only. Never bodies, headers, paths beyond the bounded route label, or addresses.
access_log = logging.getLogger("gptd_runtime.access")
log = logging.getLogger("gptd_runtime.api")

# Probes and scrapes must work without credentials and must not count as in-flight work.
EXEMPT_PATHS = frozenset({"/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings")


def route_label(path: str) -> str:
    """Bounded label values: never the raw path (model names / scanners would explode cardinality)."""
    if path in _ROUTES or path in EXEMPT_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v2/models/"):
        return "/v2/models/infer" if path.endswith("/infer") else "/v2/models"
    return "other"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method(method: str) -> str:
    """A client can send any token as the method: only the standard ones reach the log."""
    return method if method in _METHODS else "OTHER"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                        *headers],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, state: RuntimeState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status_box = [500]
        started_box = [False]
        sizes = [0, 0]  # request body bytes read, response body bytes sent
        started = time.monotonic()
        # Always our own id (echoed as X-Request-Id): a client-chosen one could carry anything into the log.
        request_id = uuid.uuid4().hex[:16]

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes[0] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                started_box[0] = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                sizes[1] += len(message.get("body", b""))
            await send(message)

        try:
            if path in EXEMPT_PATHS:
                await self.app(scope, receive, counting_send)
            else:
                self.state.inflight += 1
                try:
                    await self._guarded(scope, counting_receive, counting_send)
                finally:
                    self.state.inflight -= 1
        except Exception as e:
            # An exception's message can quote the request (a tokenizer or template error echoing its input), and
            # uvicorn/Starlette would log it whole: log the type and the frames (code locations) only.
            frames = "".join(traceback.format_tb(e.__traceback__))
            log.error("request id=%s %s failed with %s (message withheld: may quote the request)\n%s",
                      request_id, route_label(path), type(e).__name__, frames.rstrip())
            if not started_box[0]:
                await _send_json(counting_send, 500, error_body(
                    f"internal server error (request id {request_id})", type="server_error", code="internal_error"))
        finally:
            route = route_label(path)
            self.state.metrics.http_requests.labels(route=route, status=str(status_box[0])).inc()
            if path not in EXEMPT_PATHS:  # probes every few seconds, forever: not worth a line each
                access_log.info("request id=%s %s %s status=%d in=%dB out=%dB %.1fms", request_id,
                                _method(scope.get("method", "")), route, status_box[0], sizes[0], sizes[1],
                                (time.monotonic() - started) * 1000)

    async def _authenticated(self, scope: Scope, headers: dict[bytes, bytes], send: Send) -> bool:
        """Bearer key check (keys never logged or echoed); a client address with too many wrong keys gets 429
        before its key is even looked at."""
        keys, limiter, metrics = self.state.api_keys, self.state.auth_failures, self.state.metrics
        assert keys is not None
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = limiter.retry_after(client)
        if wait is not None:
            metrics.auth_failures.labels(status="429").inc()
            await _send_json(send, 429, error_body("too many failed authentications from this address",
                                                   type="rate_limit_error", code="auth_rate_limited"),
                             [(b"retry-after", str(wait).encode())])
            return False
        auth = headers.get(b"authorization")
        scheme, _, token = (auth or b"").decode("latin-1").partition(" ")
        kid = keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if kid is not None:
            metrics.api_key_requests.labels(key_id=kid).inc()
            return True
        if auth is not None:  # a presented credential that is wrong counts toward the brake; a missing one not
            limiter.failed(client)
        metrics.auth_failures.labels(status="401").inc()
        await _send_json(send, 401, error_body("invalid or missing API key", type="authentication_error",
                                               code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        return False

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.state.settings.max_header_bytes:
            await _send_json(send, 431, error_body(
                f"request headers exceed {self.state.settings.max_header_bytes} bytes",
                type="invalid_request_error", code="headers_too_large"))
            return
        headers = dict(scope["headers"])
        if self.state.api_keys is not None and not await self._authenticated(scope, headers, send):
            return

        limit = self.state.settings.max_body_bytes
        too_large = error_body(
            f"request body exceeds {limit} bytes", type="invalid_request_error", code="request_too_large"
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_json(send, 413, too_large)
            return

        # Chunked uploads carry no Content-Length: count the bytes as the app reads them. On overflow we answer
        # 413 ourselves, tell the app the client left, and drop whatever it tries to send afterwards (raising
        # instead would be turned into a 400 by FastAPI's body parsing).
        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected, started
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not started:
                    rejected = started = True
                    await _send_json(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not rejected:
                raise
