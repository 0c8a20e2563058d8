"""Running the sequences of one OpenAI request: `n` choices per prompt, each its own engine request.

Submitting is all-or-nothing (a 429 on the third of four choices cancels the first two: no half-served
requests); results are collected, or streamed as SSE chunks of the shared `Envelope`, and every engine
request is cancelled however the HTTP exchange ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import (
    Delta,
    EngineUnavailableError,
    InvalidParameterError,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
)
from ..redaction import Redactor
from ..state import GenerationBackend, TokenStream
from .envelope import ChoiceResult, Envelope, Usage
from .errors import bad_request, busy, client_gone, sse_error, unavailable

_DISCONNECT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Job:
    """One choice: which prompt it continues, its token ids and its sampling parameters."""

    index: int  # the choice's index in the response
    prompt: int  # index of its prompt (prompt tokens are counted once per prompt, not once per choice)
    ids: list[int]
    params: SamplingParams
    echo: str = ""  # completions `echo`: the prompt text, returned before the generated text


def submit_all(
    engine: GenerationBackend, jobs: Sequence[Job], stream: bool, fields: dict[str, str] | None = None
) -> list[TokenStream]:
    """`fields` maps a SamplingParams name to the request field it came from (for the engine's 400s)."""
    streams: list[TokenStream] = []
    try:
        for job in jobs:
            streams.append(engine.submit(job.ids, job.params, stream=stream))
    except InvalidParameterError as e:  # checked by the engine before anything is queued
        _cancel(streams)
        param = (fields or {}).get(e.param, e.param)
        raise bad_request(str(e).replace(e.param, param, 1), param=param) from e
    except QueueFullError as e:
        _cancel(streams)
        raise busy(str(e)) from e
    except EngineUnavailableError as e:
        _cancel(streams)
        raise unavailable(str(e)) from e
    except BaseException:
        _cancel(streams)
        raise
    return streams


def _cancel(streams: Sequence[TokenStream]) -> None:
    for s in streams:
        s.cancel()


def usage(jobs: Sequence[Job], streams: Sequence[TokenStream]) -> Usage:
    prompts = {job.prompt: s.prompt_tokens for job, s in zip(jobs, streams, strict=True)}
    return Usage(sum(prompts.values()), sum(s.completion_tokens for s in streams))


async def _one(job: Job, stream: TokenStream, redactor: Redactor | None = None) -> ChoiceResult:
    parts: list[str] = [job.echo]
    logprobs: list[TokenLogprob] | None = [] if job.params.logprobs is not None else None
    reason: str | None = None
    async for delta in stream:
        parts.append(delta.text)
        if logprobs is not None:
            logprobs.extend(delta.logprobs)
        reason = delta.finish_reason or reason
    text = "".join(parts)
    if redactor is not None:  # the echoed prompt part is masked already; masks are not matched again
        text = redactor.redact(text)
    return ChoiceResult(job.index, text, reason or stream.finish_reason or "stop", logprobs)


async def collect(
    request: Request, jobs: Sequence[Job], streams: Sequence[TokenStream], redactor: Redactor | None = None
) -> list[ChoiceResult]:
    """Wait for every choice, cancelling generation if the client goes away meanwhile."""
    task = asyncio.ensure_future(asyncio.gather(*(_one(j, s, redactor) for j, s in zip(jobs, streams, strict=True))))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise client_gone()
    except EngineUnavailableError as e:
        raise unavailable(str(e)) from e
    finally:
        if not task.done():
            task.cancel()
        _cancel(streams)


async def _merged(streams: Sequence[TokenStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of all streams as they come, tagged with the stream's position."""
    if len(streams) == 1:  # the common case: no extra task or queue hop per token
        async for delta in streams[0]:
            yield 0, delta
        return
    q: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

    async def pump(i: int, s: TokenStream) -> None:
        try:
            async for delta in s:
                q.put_nowait((i, delta))
            q.put_nowait((i, None))
        except Exception as e:  # handed to the consumer
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def sse(
    env: Envelope, jobs: Sequence[Job], streams: Sequence[TokenStream], include_usage: bool,
    redactor: Redactor | None = None,
) -> StreamingResponse:
    def chunk(choice: dict[str, Any]) -> str:
        return _event(env.chunk([choice], usage_follows=include_usage))

    async def events() -> AsyncIterator[str]:
        offsets = [0] * len(jobs)
        # One per choice: holds back a bounded tail so a value split across deltas is still masked.
        held = [redactor.stream() for _ in jobs] if redactor is not None else None
        try:
            for i, job in enumerate(jobs):
                if env.kind == "chat":
                    yield chunk(env.role_choice(job.index))
                elif job.echo:
                    choice, offsets[i] = env.delta_choice(job.index, job.echo, None, None, 0)
                    yield chunk(choice)
            async for i, delta in _merged(streams):
                job = jobs[i]
                text = delta.text
                if held is not None:
                    text = held[i].feed(text) + (held[i].flush() if delta.finish_reason else "")
                if text or delta.finish_reason or delta.logprobs:
                    lps = delta.logprobs if job.params.logprobs is not None else None
                    choice, offsets[i] = env.delta_choice(job.index, text, delta.finish_reason, lps, offsets[i])
                    yield chunk(choice)
            for i, rest in enumerate(h.flush() for h in held or ()):  # a stream that ended without a reason
                if rest:
                    choice, offsets[i] = env.delta_choice(jobs[i].index, rest, None, None, offsets[i])
                    yield chunk(choice)
            if include_usage:
                yield _event(env.usage_chunk(usage(jobs, streams)))
        except EngineUnavailableError as e:
            yield _event(sse_error(str(e)))
        finally:
            # Runs on normal end and when the client disconnects (the task is cancelled): frees the slots.
            _cancel(streams)
        yield "data: [DONE]\n\n"

    return _StreamResponse(
        streams, events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _StreamResponse(StreamingResponse):
    """Frees the engine slots however the response ends. The generator's own `finally` does not run when the
    client is gone before its first iteration (disconnect or failed send at response start), which would
    leave the requests generating and counted toward the 429 limit."""

    def __init__(self, streams: Sequence[TokenStream], content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self._streams)
