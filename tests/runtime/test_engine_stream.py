"""GenerationStream with the real engine: what a stalled consumer holds, the text at the end of a stream, and one
request's failure staying that request's."""

from __future__ import annotations

import asyncio
import codecs
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gptd_runtime.engine import (
    Delta,
    EngineUnavailableError,
    GenerationEngine,
    GenerationStream,
    InvalidParameterError,
    ResponseFormat,
    SamplingParams,
)
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from tests.support.engine import started_engine


@pytest.fixture
async def engine(models: dict[str, Path]) -> AsyncIterator[GenerationEngine]:
    async with started_engine(models["plain"], max_new_tokens=128, max_batch_size=8) as eng:
        yield eng


def _ids(engine: GenerationEngine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


async def _all(stream: GenerationStream) -> list[Delta]:
    return [d async for d in stream]


def _held_outputs(request_id: str) -> list[GenerationOutput]:
    """Every GenerationOutput of this request still alive (queued for the consumer or anywhere else)."""
    return [o for o in gc.get_objects() if type(o) is GenerationOutput and o.request_id == request_id]


async def test_a_paused_consumer_holds_at_most_one_pending_output(engine: GenerationEngine) -> None:
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    expected, _ = await engine.submit(_ids(engine, "the operator"), params).collect()

    stream = engine.submit(_ids(engine, "the operator"), params, stream=True)
    it = stream.__aiter__()
    first = await it.__anext__()  # the stream runs; now the client stalls (an SSE write that blocks)
    finished = False
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the loop delivers whatever the manager sends meanwhile
        finished = any(o.is_finished() for o in _held_outputs(stream.request_id))  # no list kept across polls
    assert finished, "the request never finished while its consumer was paused"
    await asyncio.sleep(0.2)  # nothing else is on its way
    held = len(_held_outputs(stream.request_id))
    assert held <= 1, f"{held} outputs held for one stalled stream"

    rest = [d async for d in it]  # the client resumes: nothing lost, the final output included
    assert first.text + "".join(d.text for d in rest) == expected
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 60
    assert engine.num_inflight() == 0


async def test_a_final_output_or_an_error_is_never_superseded(engine: GenerationEngine) -> None:
    ids = _ids(engine, "the operator reconciles the cluster")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def out(tokens: list[int], status: RequestStatus, error: str | None = None) -> GenerationOutput:
        return GenerationOutput(request_id="direct", generated_tokens=tokens, status=status, error=error)

    stream = GenerationStream(engine, "direct", [1], params)  # fed by hand, as the manager's handler would
    stream._on_output(out(ids[:1], RequestStatus.DECODING))
    stream._on_output(out(ids[:3], RequestStatus.FINISHED))
    stream._on_output(out(ids[:4], RequestStatus.DECODING))  # a stray late output loses to the final one
    deltas = await asyncio.wait_for(_all(stream), 10)  # a lost final output would wait forever
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(ids[:3])
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3

    failed = GenerationStream(engine, "direct", [1], params)
    failed._on_output(out(ids[:1], RequestStatus.DECODING))
    failed._on_output(out(ids[:2], RequestStatus.FAILED, error="boom"))
    failed._on_output(out(ids[:2], RequestStatus.DECODING))
    with pytest.raises(EngineUnavailableError, match="boom"):
        await asyncio.wait_for(_all(failed), 10)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_text_ends_with_every_byte_the_logprobs_report(engine: GenerationEngine, stream: bool) -> None:
    """The byte-level demo model samples lone UTF-8 lead/continuation bytes at temperature 1.5; DecodeStream
    holds an incomplete character back, and at the end it must come out (as U+FFFD) rather than vanish."""
    ids = _ids(engine, "The operator")
    cut_short = 0
    for seed in range(12):
        params = SamplingParams(max_tokens=40, temperature=1.5, seed=seed, logprobs=0, ignore_eos=True)
        s = engine.submit(ids, params, stream=stream)
        text = "".join([d.text async for d in s])
        assert len(s.logprobs) == 40
        raw = b"".join(bytes(t.bytes) for t in s.logprobs)
        # Per-token strings show a split character as one U+FFFD per piece, so compare bytes decoded as a whole.
        assert text == raw.decode("utf-8", errors="replace"), (seed, text[-8:], raw[-8:])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(raw, final=False)
        cut_short += bool(decoder.getstate()[0])  # the output ended inside a character
    assert cut_short, "no seed ended inside a UTF-8 character: the test would not exercise the flush"


async def test_a_seed_past_64_bits_is_refused_not_aliased(engine: GenerationEngine) -> None:
    ids = _ids(engine, "the operator")
    for seed in (2**64, 2**70, -2**63 - 1):
        with pytest.raises(InvalidParameterError) as e:
            engine.submit(ids, SamplingParams(max_tokens=2, temperature=1.0, seed=seed))
        assert e.value.param == "seed"
    assert engine.num_inflight() == 0
    for seed in (2**64 - 1, -2**63):
        await engine.submit(ids, SamplingParams(max_tokens=2, temperature=1.0, seed=seed)).collect()


class _Exploding:
    """A constraint stand-in: the real grammar, except that it raises at its `after`-th call of `fails_in`."""

    def __init__(self, inner: Any, fails_in: str, after: int):
        self.inner, self.fails_in, self.after, self.calls = inner, fails_in, after, 0

    def _maybe_raise(self, where: str) -> None:
        if where == self.fails_in:
            self.calls += 1
            if self.calls >= self.after:
                raise RuntimeError(f"grammar broke in {where}")

    def allowed(self, vocab_size: int, device: Any) -> Any:
        self._maybe_raise("allowed")
        return self.inner.allowed(vocab_size, device)

    def advance(self, token_id: int) -> None:
        self._maybe_raise("advance")
        self.inner.advance(token_id)

    @property
    def error(self) -> str | None:
        return self.inner.error


@pytest.mark.parametrize("fails_in", ["allowed", "advance"])
async def test_a_failing_grammar_fails_its_own_request_only(
        engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch, fails_in: str) -> None:
    grammars = engine._grammars
    assert grammars is not None, "llguidance must read the demo tokenizer"
    real_compile = grammars.compile

    def compile_(kind: str, schema: Any) -> Any:
        constraint = real_compile(kind, schema)
        return _Exploding(constraint, fails_in, 3) if (schema or {}).get("title") == "explode" else constraint

    monkeypatch.setattr(grammars, "compile", compile_)
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    json_ok = SamplingParams(max_tokens=30, temperature=1.0, seed=3, response_format=ResponseFormat("json_object"))
    explode = SamplingParams(max_tokens=30, temperature=1.0, seed=3, response_format=ResponseFormat(
        "json_schema", {"title": "explode", "type": "object"}))
    prompts = [_ids(engine, p) for p in ("the operator", "a cluster", "json please", "json again")]
    alone = [await asyncio.wait_for(engine.submit(p, sp).collect(), 30)
             for p, sp in zip(prompts[:3], (plain, seeded, json_ok), strict=True)]

    streams = [engine.submit(p, sp, stream=True) for p, sp in
               zip(prompts, (plain, seeded, json_ok, explode), strict=True)]
    results = await asyncio.wait_for(asyncio.gather(*(_all(s) for s in streams), return_exceptions=True), 60)
    for (text, reason), deltas in zip(alone, results[:3], strict=True):  # the others: untouched, complete
        assert not isinstance(deltas, BaseException), deltas
        assert "".join(d.text for d in deltas) == text and deltas[-1].finish_reason == reason
    failure = results[3]
    assert isinstance(failure, EngineUnavailableError), results
    assert f"grammar broke in {fails_in}" in str(failure) and "response_format" in str(failure)
    assert engine.healthy and engine.num_inflight() == 0
    again = await asyncio.wait_for(engine.submit(prompts[0], plain).collect(), 30)  # the engine goes on serving
    assert again == alone[0]
