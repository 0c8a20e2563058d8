"""Constrained decoding for `response_format` (json_object / json_schema) with llguidance.

Why llguidance: it is a maintained Rust library (Microsoft's guidance; also used by vLLM and SGLang) with CPU
wheels and no Python dependencies, and it computes a token mask from the grammar state on the host in ~tens of
microseconds, which is all transformers' continuous batching needs: the mask is applied in gptd's own sampler
(sampling.py), per request, whatever else is in the batch. (xgrammar wants torch.compile or its own kernels for
the mask; outlines-core builds a full regex index per schema up front.)

A `Constraint` lives with one request: `allowed()` gives the mask for the next token, `advance()` feeds the chosen
token. EOS is allowed exactly when the grammar accepts, so a constrained request ends as soon as its JSON is
complete (or at max_tokens, with finish_reason "length" and truncated JSON, as OpenAI does).
"""

from __future__ import annotations

import json
import threading
from typing import Any

# Compact JSON: with flexible whitespace a random or weak model can fill max_tokens with newlines.
_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The schema cannot be compiled into a grammar. str() says why; the HTTP layer answers 400."""


class Grammars:
    """Per-engine factory: the llguidance tokenizer view (built once, ~1 s for a large vocabulary)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int):
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self._eos = hf_tokenizer.eos_token_id
        self._lock = threading.Lock()
        self._token_bytes: dict[int, bytes] = {}

    def compile(self, kind: str, schema: dict[str, Any] | None) -> Constraint:
        """A fresh constraint for one request. Raises ConstraintError for a schema llguidance refuses."""
        import llguidance

        if kind == "json_object":
            schema = {"type": "object"}
        elif kind != "json_schema":
            raise ConstraintError(f"response_format type {kind!r} is not supported (json_object, json_schema)")
        elif not isinstance(schema, dict):
            raise ConstraintError("response_format.json_schema.schema must be a JSON object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_OPTIONS)
        except ValueError as e:
            raise ConstraintError(f"invalid response_format schema: {e}") from e
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"unsupported response_format schema: {matcher.get_error()}")
        return Constraint(matcher, self._eos)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a byte-level token can be half a UTF-8 character)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            with self._lock:
                cached = self._token_bytes[token_id] = self._tokenizer.decode_bytes([token_id])
        return cached


class Constraint:
    def __init__(self, matcher: Any, eos: int | None = None):
        self._matcher = matcher
        self._eos = eos

    def allowed(self, vocab_size: int, device: Any) -> Any:
        """Bool [vocab_size]: tokens the grammar allows next (EOS only once the JSON is complete)."""
        import torch

        bias = self._matcher.compute_logit_bias()  # one byte per token: 0 forbidden, 200 allowed
        mask = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[:vocab_size] != 0
        if mask.numel() < vocab_size:  # model rows beyond the tokenizer's vocabulary are never valid
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.numel(), dtype=torch.bool)])
        if not mask.any() and self._eos is not None:
            # The matcher is stopped or in an error state: end the request rather than sample from nothing.
            mask[self._eos] = True
        return mask.to(device, non_blocking=True)

    def advance(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
