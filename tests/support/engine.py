"""A stand-in generation engine that honours the whole SamplingParams contract (engine.py), to test the HTTP
mapping without depending on the real engine's progress: it records every request it gets, and its output
follows the contract (max_tokens tokens, `seed` reproducible, `logprobs` alternatives per token, one delta
per token when streaming, one delta at the end otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptd_runtime.engine import Delta, SamplingParams, TokenLogprob, TopLogprob
from gptd_runtime.state import ALL_SAMPLING_FEATURES


@dataclass
class Submitted:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    request_id: str


class ContractStream:
    def __init__(self, engine: ContractEngine, request: Submitted):
        self.engine = engine
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        seed = request.params.seed
        # Without a seed each request samples differently; with one, the output is a function of the seed.
        self._rng = random.Random(seed if seed is not None else random.random())
        self.cancelled = False

    def _token(self) -> TokenLogprob:
        p = self.request.params
        k = p.logprobs or 0
        ids = self._rng.sample(self.engine.word_ids, max(k, 1))
        lps = sorted((-self._rng.random() * 5 for _ in ids), reverse=True)
        top = tuple(TopLogprob(self.engine.text(i), lp, tuple(self.engine.text(i).encode())) for i, lp in
                    zip(ids, lps, strict=True))[:k]
        chosen = ids[0]
        text = self.engine.text(chosen)
        return TokenLogprob(text, chosen, lps[0], tuple(text.encode()), top)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        p = self.request.params
        pending: list[TokenLogprob] = []
        for n in range(1, p.max_tokens + 1):
            await asyncio.sleep(self.engine.token_delay)
            if self.cancelled:
                return
            pending.append(self._token())
            self.completion_tokens = n
            last = n == p.max_tokens
            if self.request.stream or last:
                reason = "length" if last else None
                if last:
                    self.finish_reason = "length"
                text = "".join(t.token for t in pending)
                logprobs = pending if p.logprobs is not None else []
                yield Delta(text, n, reason, list(logprobs))
                pending = []

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.cancelled.append(self.request.request_id)


@dataclass
class ContractEngine:
    tokenizer: Any
    sampling_features: frozenset[str] = ALL_SAMPLING_FEATURES
    healthy: bool = True
    token_delay: float = 0.0  # seconds per generated token (streams that stay open while a test acts)
    submitted: list[Submitted] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _ids: Any = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        # Tokens that decode to plain visible text (so the texts are easy to compare).
        self.word_ids = [i for i in range(len(self.tokenizer))
                         if (t := self.text(i)).strip() and t.isprintable() and "\ufffd" not in t]

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def warmup(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        self.healthy = False

    def num_running(self) -> int:
        return 0

    def num_waiting(self) -> int:
        return 0

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = False) -> ContractStream:
        request = Submitted(list(prompt_ids), params, stream, f"fake-{next(self._ids)}")
        self.submitted.append(request)
        return ContractStream(self, request)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def logprob_ok(value: float) -> bool:
    return math.isfinite(value) and value <= 0.0


class ScriptedStream(ContractStream):
    """Emits the engine's `script` pieces, one Delta each (streaming) or joined (not)."""

    async def __aiter__(self) -> AsyncIterator[Delta]:
        pieces = self.engine.script
        if not self.request.stream:
            pieces = ["".join(pieces)]
        for n, piece in enumerate(pieces, 1):
            await asyncio.sleep(0)
            if self.cancelled:
                return
            self.completion_tokens = n
            last = n == len(pieces) and self.engine.final_reason
            if last:
                self.finish_reason = "stop"
            yield Delta(piece, n, "stop" if last else None, [])


@dataclass
class ScriptedEngine(ContractEngine):
    """Generates a fixed text in fixed pieces (to test what happens to given output, e.g. split values)."""

    script: list[str] = field(default_factory=list)
    final_reason: bool = True  # False: the last delta carries no finish_reason (the stream just ends)

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = False) -> ContractStream:
        request = Submitted(list(prompt_ids), params, stream, f"scripted-{next(self._ids)}")
        self.submitted.append(request)
        return ScriptedStream(self, request)


@contextlib.asynccontextmanager
async def started_engine(model_dir: Path, **settings: Any) -> AsyncIterator[Any]:
    """A real GenerationEngine on ``model_dir``, started and warmed up, stopped on exit (engine-level tests)."""
    from gptd_runtime.config import Settings
    from gptd_runtime.engine import GenerationEngine
    from gptd_runtime.loading import load_model

    config = Settings(model=str(model_dir), **settings)
    engine = GenerationEngine(load_model(config, model_dir), config)
    engine.start()
    try:
        await engine.warmup()
        yield engine
    finally:
        engine.stop()
