"""The one place HTTP errors are made and rendered.

Routes raise `APIError` built by the factories below; the handlers render it as OpenAI's
`{"error": {"message", "type", "param", "code"}}`, or `{"error": "<message>"}` on `/v2` routes (the Open
Inference Protocol's format); the health probes' failures keep their `{"status": ...}` body (`probe_failure`).
Every 503 and 429 carries `Retry-After` because the factories add it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_SECONDS = "1"


def _headers(status: int, given: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(given or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)
    return headers


class APIError(Exception):
    """An error with an HTTP status. Build it with the factories below (they set type, code and headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = _headers(status, headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return APIError(0, message, type=type, param=param, code=code).body()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    """A field (or value) this server does not implement: refused rather than silently ignored."""
    suffix = f": {detail}" if detail else ""
    return APIError(400, f"{param} is not supported by this server{suffix}", param=param,
                    code="unsupported_parameter")


def model_not_found(name: str, served: str) -> APIError:
    """OpenAI's answer for an unknown model: 404, type invalid_request_error, code model_not_found, param null
    (OpenAI names no field for it; the message names the model)."""
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it; this server serves "
                         f"`{served}`", param=None, code="model_not_found")


def unavailable(message: str, code: str = "engine_unavailable") -> APIError:
    return APIError(503, message, type="service_unavailable", code=code)


def busy(message: str) -> APIError:
    return APIError(429, f"server is busy: {message}", type="rate_limit_error", code="queue_full")


def client_gone() -> APIError:
    return APIError(499, "client disconnected", code="client_closed")


def probe_failure(body: dict[str, Any], status: int) -> JSONResponse:
    """A failing health probe: its own small body (`{"status": ...}`, what probes and people read), not an error
    object, but the headers of any error of that status (a 503 says when to retry)."""
    return JSONResponse(body, status_code=status, headers=_headers(status))


def sse_error(message: str) -> dict[str, Any]:
    """The error event sent inside an SSE stream that fails after it started (the status is already 200)."""
    return error_body(message, type="service_unavailable")


# -- rendering ----------------------------------------------------------------------------------------------
def _render(request: Request, err: APIError) -> JSONResponse:
    body: dict[str, Any] = {"error": err.message} if request.url.path.startswith("/v2/") else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    # pydantic puts union member names in the path (e.g. "str", "list[int]"); drop them for readability.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if not any(c in p for c in "[]()") and p not in ("str", "int")) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _render(request, bad_request(f"request body is not valid JSON: {first.get('msg')}", code=None))
        param = _param(tuple(first.get("loc", ())))
        msg = str(first.get("msg")).removeprefix("Value error, ")
        return _render(request, bad_request(f"{param}: {msg}" if param else msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # OpenAI types an unknown route's 404 (and 405) invalid_request_error as well.
        return _render(request, APIError(exc.status_code, str(exc.detail)))
