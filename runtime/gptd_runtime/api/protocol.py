"""Request models (pydantic) for the OpenAI-compatible and Open Inference Protocol v2 routes, and the error
type the routes raise. Responses are built as plain dicts in the routes (hot path; no re-validation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error with an HTTP status, rendered OpenAI-style: {"error": {"message", "type", "param", "code"}}."""

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
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return APIError(0, message, type=type, param=param, code=code).body()


class _Request(BaseModel):
    # Unknown fields are ignored (clients send many optional OpenAI fields we do not implement).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # OpenAI's newer name for chat; treated like max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extension: generate exactly max_tokens (benchmarks).
    ignore_eos: bool = False
    user: str | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class CompletionRequest(SamplingFields):
    # A string, or a single pre-tokenized prompt; batches of prompts are not supported (n=1 semantics).
    prompt: str | list[int] | list[str]
    echo: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


# -- Open Inference Protocol v2 (KServe) -------------------------------------------------------------------
class InferInput(_Request):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(_Request):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)
    parameters: dict[str, Any] | None = None
