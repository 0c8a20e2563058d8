"""Pure-ASGI guard in front of every route (pure ASGI, not BaseHTTPMiddleware, so streaming responses and
client disconnects pass through untouched): API-key auth, request body cap, in-flight accounting for the
drain, and per-route status counters."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..state import RuntimeState
from .errors import error_body

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

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            if path in EXEMPT_PATHS:
                await self.app(scope, receive, counting_send)
            else:
                self.state.inflight += 1
                try:
                    await self._guarded(scope, receive, counting_send)
                finally:
                    self.state.inflight -= 1
        finally:
            self.state.metrics.http_requests.labels(route=route_label(path), status=str(status_box[0])).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        if key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            # Constant-time comparison; the key itself is never logged or echoed.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                await _send_json(
                    send,
                    401,
                    error_body("invalid or missing API key", type="authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")],
                )
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
