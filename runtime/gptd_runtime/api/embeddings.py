"""POST /v1/embeddings, OpenAI's shape, for whatever model is loaded (pooling: see gptd_runtime.embeddings)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request

from ..engine import QueueFullError
from .deps import check_model, ready_engine, runtime
from .errors import APIError, bad_request, busy, unsupported
from .protocol import EmbeddingRequest

router = APIRouter()
MAX_INPUTS = 2048  # OpenAI's cap on inputs per request


def _token_lists(embedder: Any, raw: Any, redactor: Any = None) -> list[list[int]]:
    """Token ids per input; text inputs are masked first when the server redacts (--redact)."""
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise bad_request("input: must not be empty", param="input")
    if isinstance(raw[0], int):
        raw = [raw]
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"input: at most {MAX_INPUTS} inputs per request, got {len(raw)}", param="input")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            text = item if redactor is None else redactor.redact(item)
            ids = embedder.encode(text) if text else []
        else:
            ids = list(item)
            if any(t < 0 or t >= embedder.vocab_size() for t in ids):
                raise bad_request(f"input.{i}: token ids outside the vocabulary", param=f"input.{i}")
        if not ids:
            raise bad_request(f"input.{i}: is empty (no tokens to embed)", param=f"input.{i}")
        out.append(ids)
    return out


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    state = runtime(request)
    check_model(state, body.model)
    ready_engine(state)
    embedder = state.embedder
    if embedder is None:
        raise unsupported("input", "this engine serves no embeddings")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise unsupported("dimensions", f"the model's embeddings have {embedder.dimensions} dimensions and are "
                          "not trained to be shortened")
    inputs = _token_lists(embedder, body.input, state.redactor)
    limit = state.settings.max_input_tokens
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            raise APIError(400, f"input.{i} has {len(ids)} tokens, more than the limit of {limit}",
                           param=f"input.{i}", code="context_length_exceeded")
    if state.model.max_positions:
        longest = max(len(ids) for ids in inputs)
        if longest > state.model.max_positions:
            raise APIError(400, f"an input has {longest} tokens; the model has {state.model.max_positions} "
                           "positions", param="input", code="context_length_exceeded")
    try:
        vectors = await embedder.embed(inputs)
    except QueueFullError as e:
        raise busy(str(e)) from e
    fmt = body.encoding_format or "float"
    tokens = sum(len(ids) for ids in inputs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vectors)],
        "model": state.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
