"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions. Thin: validate, tokenize,
check limits (before any model work), hand the request to the engine, format the output."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import EngineUnavailableError, GenerationStream, QueueFullError, SamplingParams
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter()
_DISCONNECT_POLL_SECONDS = 0.5


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state.runtime
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "gptd",
                "task": state.settings.task,
                "max_model_len": state.settings.max_input_tokens + state.settings.max_new_tokens,
            }
        ],
    }


def _engine(request: Request, body: SamplingFields) -> Any:
    state = request.app.state.runtime
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")
    if state.settings.task != "text-generation":
        raise APIError(400, f"model {state.model_name!r} is a {state.settings.task} model: use "
                       f"POST /v2/models/{state.model_name}/infer", param="model", code="wrong_task")
    return state.require_ready()


def _sampling(request: Request, body: SamplingFields, prompt_len: int, prompt_param: str) -> SamplingParams:
    s = request.app.state.runtime.settings
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if prompt_len > s.max_input_tokens:
        raise APIError(400, f"{prompt_param} has {prompt_len} tokens, more than the limit of {s.max_input_tokens}",
                       param=prompt_param, code="context_length_exceeded")
    requested = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if requested is not None and requested > s.max_new_tokens:
        field = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        raise APIError(400, f"{field}={requested} exceeds the limit of {s.max_new_tokens}",
                       param=field, code="max_tokens_exceeded")
    max_tokens = requested or s.max_new_tokens
    engine = request.app.state.runtime.engine
    # Never run past the model's position embeddings, nor past the whole KV cache: a request that cannot fit
    # even alone makes transformers' scheduler raise on its thread, which kills the engine for everyone.
    max_pos = getattr(engine.loaded.model.config, "max_position_embeddings", None) if engine else None
    context = s.kv_blocks() * s.kv_cache_page_size
    if max_pos:
        context = min(context, max_pos)
    if prompt_len >= context:
        raise APIError(400, f"{prompt_param} has {prompt_len} tokens; the context (model positions and KV "
                       f"cache) holds {context}", param=prompt_param, code="context_length_exceeded")
    max_tokens = min(max_tokens, context - prompt_len)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def _submit(engine: Any, ids: list[int], params: SamplingParams, stream: bool) -> GenerationStream:
    if not ids:  # an empty prompt still needs one token to condition on
        ids = [engine.tokenizer.eos_token_id or 0]
    try:
        return engine.submit(ids, params, stream=stream)
    except QueueFullError as e:
        raise APIError(429, f"server is busy: {e}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from e
    except EngineUnavailableError as e:
        raise APIError(503, str(e), type="service_unavailable", code="engine_unavailable",
                       headers={"Retry-After": "1"}) from e


async def _collect(request: Request, stream: GenerationStream) -> tuple[str, str]:
    """Wait for a non-streamed result, cancelling generation if the client goes away meanwhile."""
    task = asyncio.ensure_future(stream.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected", code="client_closed")
    except EngineUnavailableError as e:
        raise APIError(503, str(e), type="service_unavailable", code="engine_unavailable") from e
    finally:
        if not task.done():
            task.cancel()
        stream.cancel()


def _usage(stream: GenerationStream) -> dict[str, int]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


def _sse(
    stream: GenerationStream,
    chunk: Callable[[str, str | None], dict[str, Any]],
    usage_chunk: Callable[[], dict[str, Any]] | None,
    first: dict[str, Any] | None = None,
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for delta in stream:
                if delta.text or delta.finish_reason:
                    yield f"data: {json.dumps(chunk(delta.text, delta.finish_reason))}\n\n"
            if usage_chunk is not None:
                yield f"data: {json.dumps(usage_chunk())}\n\n"
        except EngineUnavailableError as e:
            err = {"error": {"message": str(e), "type": "service_unavailable", "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            # Runs on normal end and when the client disconnects (the task is cancelled): frees the slot.
            stream.cancel()
        yield "data: [DONE]\n\n"

    return _StreamResponse(
        stream, events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _StreamResponse(StreamingResponse):
    """Frees the engine slot however the response ends. The generator's own `finally` does not run when the
    client is gone before its first iteration (disconnect or failed send at response start), which would
    leave the request generating and counted toward the 429 limit."""

    def __init__(self, stream: GenerationStream, content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    engine = _engine(request, body)
    tok = engine.tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tok(prompt).input_ids
        prompt_text = prompt
    else:
        ids = list(prompt)
        if any(i < 0 or i >= len(tok) for i in ids):
            raise APIError(400, "prompt contains token ids outside the vocabulary", param="prompt")
        prompt_text = tok.decode(ids)
    params = _sampling(request, body, len(ids), "prompt")
    stream = _submit(engine, ids, params, body.stream)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.runtime.model_name

    def choice(text: str, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    if body.stream:
        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice(text, reason)]}

        def usage_chunk() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": _usage(stream)}

        include = body.stream_options is not None and body.stream_options.include_usage
        first = chunk(prompt_text, None) if body.echo else None
        return _sse(stream, chunk, usage_chunk if include else None, first)

    text, reason = await _collect(request, stream)
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [choice((prompt_text + text) if body.echo else text, reason)],
        "usage": _usage(stream),
    }


def _chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. unsupported role order) are the request's fault
            raise APIError(400, f"chat template rejected the messages: {e}", param="messages") from e
    # Plain fallback for base models without a template: a transcript ending with the assistant's turn.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    engine = _engine(request, body)
    tok = engine.tokenizer
    # The template already carries any special tokens the model expects.
    ids = tok(_chat_prompt(tok, body), add_special_tokens=False).input_ids
    params = _sampling(request, body, len(ids), "messages")
    stream = _submit(engine, ids, params, body.stream)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.runtime.model_name

    if body.stream:
        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

        def usage_chunk() -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(stream)}

        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}]}
        include = body.stream_options is not None and body.stream_options.include_usage
        return _sse(stream, chunk, usage_chunk if include else None, first)

    text, reason = await _collect(request, stream)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                     "logprobs": None}],
        "usage": _usage(stream),
    }
