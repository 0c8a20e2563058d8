"""Response shapes of the OpenAI routes, one builder shared by completions and chat.

`Envelope` carries what every response and chunk repeats (id, object, created, model); the choice builders
differ only where OpenAI's two APIs differ (`text` vs `message`/`delta`, and the two logprobs shapes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine import TokenLogprob

Kind = Literal["completion", "chat"]
_OBJECTS = {"completion": ("text_completion", "text_completion"), "chat": ("chat.completion", "chat.completion.chunk")}
_ID_PREFIX = {"completion": "cmpl", "chat": "chatcmpl"}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ChoiceResult:
    """A finished choice (non-streaming): its whole text, finish reason and token logprobs."""

    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None  # None: not requested
    # completions: `text_offset` of the first token, counted in the choice's text, so 0 (as vLLM; echo, which would
    # put the prompt first, cannot be combined with logprobs)
    text_offset: int = 0


@dataclass
class Envelope:
    kind: Kind
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{_ID_PREFIX[self.kind]}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": _OBJECTS[self.kind][chunk], "created": self.created, "model": self.model}

    def response(self, choices: Sequence[ChoiceResult], usage: Usage) -> dict[str, Any]:
        built = [self._full_choice(c) for c in choices]
        return {**self._head(False), "choices": built, "usage": usage.body()}

    def chunk(self, choices: list[dict[str, Any]], usage_follows: bool = False) -> dict[str, Any]:
        """One streamed chunk. ``usage_follows`` (stream_options.include_usage): OpenAI then puts ``"usage": null``
        on every chunk before the final usage chunk."""
        out = {**self._head(True), "choices": choices}
        if usage_follows:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage.body()}

    # -- choices ------------------------------------------------------------------------------------------
    def _full_choice(self, c: ChoiceResult) -> dict[str, Any]:
        if self.kind == "completion":
            lp = None if c.logprobs is None else completion_logprobs(c.logprobs, c.text_offset)[0]
            return {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": lp}
        return {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "finish_reason": c.finish_reason,
                "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs)}

    def role_choice(self, index: int) -> dict[str, Any]:
        """Chat streams open each choice with the assistant role (OpenAI sends it in the first chunk)."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                "logprobs": None}

    def delta_choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None, offset: int
    ) -> tuple[dict[str, Any], int]:
        """One streamed piece of a choice; returns it and the completions text offset after it."""
        if self.kind == "completion":
            lp, offset = (None, offset + len(text)) if logprobs is None else completion_logprobs(logprobs, offset)
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": lp}, offset
        delta = {"content": text} if text else {}
        lps = None if logprobs is None else chat_logprobs(logprobs)
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": lps}, offset


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """Completions' legacy shape: parallel lists; `text_offset` is each token's character offset in the choice's
    text, starting at ``offset`` (0 for the first token; a stream passes on where its previous chunk ended)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{alt.token: alt.logprob for alt in t.top} for t in tokens],
        "text_offset": offsets,
    }, offset


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
             "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }
