"""Request models (pydantic) for the OpenAI-compatible and Open Inference Protocol v2 routes.

Every field of OpenAI's Completions and Chat Completions requests is declared here, and is either honoured
or refused: `refusal()` names the first field whose value this server cannot honour (400, "not supported").
`null` is accepted wherever OpenAI accepts it (it means "the default"). Fields OpenAI does not define are
ignored with a debug log line naming them (clients send new fields first), never their values.
Responses are built in `api/envelope.py`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("gptd_runtime.api")

MAX_STOP_SEQUENCES = 4  # OpenAI's cap
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                log.debug("%s: ignoring unknown field(s) %s", cls.__name__, ", ".join(unknown))
        return data


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class SamplingFields(_Request):
    """Fields shared by completions and chat. `None` stands for "not given" throughout."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: only the most likely token (as OpenAI allows)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI; larger values would alias
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extension: generate exactly max_tokens (benchmarks).
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _cap_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
        return v

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    def refusal(self) -> tuple[str, str] | None:
        """(field, why) for the first field whose value cannot be honoured, else None."""
        if self.logit_bias:
            return "logit_bias", "token biases are not implemented"
        if self.stream_options is not None:
            if not self.streaming:
                return "stream_options", "only allowed when stream is true"
            if self.stream_options.include_obfuscation:
                return "stream_options.include_obfuscation", "stream obfuscation is not implemented"
        return None


class CompletionRequest(SamplingFields):
    # A string, a list of strings, one pre-tokenized prompt, or a list of pre-tokenized prompts. Null or omitted:
    # OpenAI's default "<|endoftext|>", i.e. the model's beginning (else end) of text token (api/openai.py).
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: str | None = None

    def refusal(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.choices:
            return "best_of", "server-side selection of the best of several samples is not implemented (use n)"
        if self.suffix:
            return "suffix", "insertion (text after the completion) is not implemented"
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs (prompt logprobs) is not implemented"
        return super().refusal()


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any | None = None
    audio: Any | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def refused_field(self) -> tuple[str, str] | None:
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    return f"content.{i}.type", f"content part type {part.type!r} (only 'text' parts)"
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(self, name):
                return name, "tool calls and audio are not implemented"
        return None


class JSONSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatField(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatField:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("json_schema.schema is required when type is json_schema")
        return self


# Chat fields we cannot honour: refused unless null (or a value meaning "nothing", checked by the predicate).
_CHAT_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not v, "tool calling is not implemented"),
    # "auto" with no tools (the only case that gets here) chooses no tool: nothing is dropped.
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not implemented"),
    "functions": (lambda v: not v, "function calling is not implemented"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not implemented"),
    "audio": (lambda v: v is None, "audio output is not implemented"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality"),
    "prediction": (lambda v: v is None, "predicted outputs are not implemented"),
    "reasoning_effort": (lambda v: v is None, "this is not a reasoning model"),
    "verbosity": (lambda v: v is None, "verbosity control is not implemented"),
    "web_search_options": (lambda v: v is None, "web search is not implemented"),
    "store": (lambda v: not v, "this server stores no completions"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only the default service tier"),
}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    response_format: ResponseFormatField | None = None
    parallel_tool_calls: bool | None = None  # only meaningful with tools, which are refused
    # Informational: they change nothing in the output, so accepting them drops nothing the caller relies on.
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Declared so that they can be refused by name (see _CHAT_REFUSED).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    store: bool | None = None
    service_tier: str | None = None

    def refusal(self) -> tuple[str, str] | None:
        for name, (ok, why) in _CHAT_REFUSED.items():
            if not ok(getattr(self, name)):
                return name, why
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "requires logprobs: true"
        for i, message in enumerate(self.messages):
            refused = message.refused_field()
            if refused:
                return f"messages.{i}.{refused[0]}", refused[1]
        return super().refusal()


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


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
