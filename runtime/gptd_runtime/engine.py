"""Inference engines behind small interfaces, so the HTTP layer (and tests) never touch transformers directly.

`GenerationEngine` wraps transformers' ContinuousBatchingManager: one background thread runs the forward
passes and every in-flight request shares them (continuous batching with a paged KV cache). Outputs reach
the asyncio loop through the manager's `call_soon_threadsafe` result handlers; nothing here blocks the loop.
`ClassificationEngine` serves sequence/token classification with one worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _cb_internals, attention
from .config import Settings
from .loading import LoadedModel, kv_cache_bytes
from .sampling import RequestSampling, new_request_sampling, sample

log = logging.getLogger("gptd_runtime.engine")

# OpenAI's limit for top_logprobs; the engine computes no more alternatives than this per token.
MAX_LOGPROBS = 20


class EngineError(Exception):
    """Base class for errors the API maps to HTTP statuses."""


class QueueFullError(EngineError):
    """Too many requests in flight (running + waiting): answer 429 and let the client retry."""


class EngineUnavailableError(EngineError):
    """The engine is not started, stopping, or its worker died: answer 503."""


class InvalidParameterError(EngineError, ValueError):
    """A sampling parameter the engine cannot honour as given: answer 400 naming ``param`` (a SamplingParams
    field name). Raised by submit() before anything is queued."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ResponseFormat:
    """Constrained decoding request: ``json_object`` (any JSON object) or ``json_schema`` (strict, ``schema``)."""

    kind: str  # "json_object" | "json_schema"
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, the contract between the HTTP layer and the engine. Every field set here is
    honoured by the engine; the HTTP layer refuses (400) what the engine cannot do rather than drop it."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # None: no logprobs. k >= 0: each token's own logprob plus the k most likely alternatives.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (natural log, after temperature/penalties, before
    top-p truncation, as OpenAI reports) and the ``SamplingParams.logprobs`` most likely alternatives."""

    token: str
    token_id: int
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass
class Delta:
    """A piece of generated text. The last delta of a stream has finish_reason set. ``logprobs`` holds one
    entry per token whose text is in ``text`` (empty unless the request asked for logprobs)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class EngineMetrics(Protocol):
    """What the engine reports; api.metrics.Metrics implements it with prometheus_client."""

    def observe_batch(self, size: int) -> None: ...
    def observe_request(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, e2e: float, finish_reason: str
    ) -> None: ...
    def observe_abort(self) -> None: ...


class NullMetrics:
    def observe_abort(self) -> None:
        pass

    def observe_batch(self, size: int) -> None:
        pass

    def observe_request(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, e2e: float, finish_reason: str
    ) -> None:
        pass


@dataclass
class _Failed:
    """Stands in for the manager's GenerationOutput when gptd itself fails a request (see _fail_request)."""

    request_id: str
    error: str
    generated_tokens: list[int] = field(default_factory=list)
    timestamps: list[float] | None = None

    def is_finished(self) -> bool:
        return True


class GenerationStream:
    """One request's output, consumed with `async for delta in stream`. Leaving the loop early (client gone)
    or calling cancel() frees the request's batch slot and KV pages."""

    def __init__(
        self, engine: GenerationEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
        sampling: RequestSampling | None = None,
    ):
        from tokenizers.decoders import DecodeStream

        self.engine = engine
        self.request_id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        # The newest undelivered output only: each streaming output carries every token so far and supersedes the
        # one before, so a stalled client holds one output, not one per token (O(T^2) memory). A final output
        # (finished or failed) is never superseded.
        self._pending: Any = None
        self._arrived = asyncio.Event()
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # tokens DecodeStream took without emitting text yet (a partial character)
        self._context: list[int] = []  # the last tokens up to the last emitted text
        self._text = ""
        self._emitted = 0
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._done = False
        self._sampling = sampling
        # Logprobs bookkeeping (only when asked for): the text span [start, end) of each generated token, and the
        # index of the first token not yet handed out in a Delta.
        self._want_logprobs = sampling is not None and sampling.logprobs is not None
        self._tokens: list[int] = []
        self._spans: list[tuple[int, int]] = []
        self._lp_next = 0
        self.logprobs: list[TokenLogprob] = []  # every TokenLogprob handed out so far (for non-streamed answers)

    def _on_output(self, output: Any) -> None:  # runs on the event loop
        if self._first_token_at is None and output.generated_tokens:
            # Non-streamed requests only report at the end; their per-token timestamps give the real TTFT.
            ts = output.timestamps
            self._first_token_at = ts[0] if ts else time.perf_counter()
        pending = self._pending
        if pending is not None and (pending.error is not None or pending.is_finished()):
            return  # nothing may replace the last word (the manager sends none after it anyway)
        self._pending = output
        self._arrived.set()

    async def _next_output(self) -> Any:
        await self._arrived.wait()
        self._arrived.clear()
        output, self._pending = self._pending, None
        return output

    def _consume_tokens(self, tokens: list[int], final: bool = False) -> None:
        tok = self.engine.rust_tokenizer
        for token_id in tokens[self.completion_tokens :]:
            start = len(self._text)
            piece = self._decoder.step(tok, token_id)
            if piece:
                self._text += piece
                self._context, self._held = [*self._held, token_id][-4:], []
            else:
                self._held.append(token_id)
            if self._want_logprobs:
                self._tokens.append(token_id)
                self._spans.append((start, len(self._text)))
        self.completion_tokens = len(tokens)
        if final and self._held:
            self._flush()

    def _flush(self) -> None:
        """The text DecodeStream still holds back at the end (bytes of an incomplete UTF-8 character), decoded
        with replacement characters as OpenAI and vLLM emit them; otherwise `text` would lack bytes that the
        logprobs report. Decoded after the last emitting tokens, as DecodeStream does, so decoders that strip a
        leading space at the start of a text (Metaspace) see the same context."""
        tok = self.engine.rust_tokenizer
        base = tok.decode(self._context, skip_special_tokens=True)
        full = tok.decode(self._context + self._held, skip_special_tokens=True)
        tail = full[len(base):] if full.startswith(base) else tok.decode(self._held, skip_special_tokens=True)
        start, n = len(self._text), len(self._held)
        self._text += tail
        self._held = []
        if self._want_logprobs and n:  # the held tokens' text is the tail
            self._spans[-n:] = [(start, len(self._text))] * n

    def _logprobs_upto(self, emitted: int, final: bool) -> list[TokenLogprob]:
        """TokenLogprob of each token whose text is now emitted (all remaining ones that contributed text when the
        request ends), except a final EOS, which OpenAI does not report."""
        if not self._want_logprobs:
            return []
        out: list[TokenLogprob] = []
        choices = self._sampling.choices  # type: ignore[union-attr]
        eos = None if self.params.ignore_eos else self.engine.tokenizer.eos_token_id
        while self._lp_next < len(self._tokens) and self._lp_next < len(choices):
            start, end = self._spans[self._lp_next]
            if not (end <= emitted or (final and start < emitted)):
                break  # its text is not (all) out yet, or (after a stop string) never will be
            i = self._lp_next
            self._lp_next += 1
            if final and i == len(self._tokens) - 1 and self._tokens[i] == eos:
                continue
            out.append(self.engine._token_logprob(choices[i]))
        self.logprobs.extend(out)
        return out

    def _take(self, final: bool) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string ended the request. Text that might be the
        start of a stop string is held back until it is disambiguated."""
        stops = self.params.stop
        if stops:
            window = max(len(s) for s in stops)
            start = max(0, self._emitted - window + 1)
            hits = [i for s in stops if (i := self._text.find(s, start)) != -1]
            if hits:
                end = min(hits)
                out = self._text[self._emitted : end] if end > self._emitted else ""
                self._emitted = max(self._emitted, end)
                return out, True
            if not final:
                safe = max(self._emitted, len(self._text) - window + 1)
                out, self._emitted = self._text[self._emitted : safe], safe
                return out, False
        out, self._emitted = self._text[self._emitted :], len(self._text)
        return out, False

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while not self._done:
                # When the consumer lags (a slow client, many streams on few cores) this is the newest output:
                # one larger delta instead of many small ones.
                output = await self._next_output()
                if output.error is not None:
                    self._done = True
                    self.engine._forget(self.request_id)
                    raise EngineUnavailableError(f"generation failed: {output.error}")
                finished = output.is_finished()
                self._consume_tokens(output.generated_tokens, final=finished)
                del output  # not kept alive through a yield that a slow client blocks
                text, stopped = self._take(final=finished)
                if stopped:
                    self.engine.cancel(self.request_id)
                    lps = self._logprobs_upto(self._emitted, final=True)
                    self._finish("stop")
                    yield Delta(text, self.completion_tokens, "stop", lps)
                elif finished:
                    reason = "length" if self.completion_tokens >= self.params.max_tokens else "stop"
                    lps = self._logprobs_upto(self._emitted, final=True)
                    self._finish(reason)
                    yield Delta(text, self.completion_tokens, reason, lps)
                elif text:
                    yield Delta(text, self.completion_tokens, None, self._logprobs_upto(self._emitted, final=False))
        finally:
            if not self._done:  # consumer went away (client disconnect): free the slot now
                self.cancel()

    async def collect(self) -> tuple[str, str]:
        """Whole text and finish reason (non-streaming requests)."""
        parts = [d.text async for d in self]
        return "".join(parts), self.finish_reason or "stop"

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self.engine.metrics.observe_abort()
            self.engine.cancel(self.request_id)
            self.engine._forget(self.request_id)

    def _finish(self, reason: str) -> None:
        self._done = True
        self.finish_reason = reason
        now = time.perf_counter()
        ttft = None if self._first_token_at is None else self._first_token_at - self._started
        e2e = now - self._started
        self.engine.metrics.observe_request(self.prompt_tokens, self.completion_tokens, ttft, e2e, reason)
        self.engine._forget(self.request_id)


class GenerationEngine:
    """Continuous-batching text generation (transformers' ContinuousBatchingManager) with gptd's own per-request
    sampler (sampling.py: seed, penalties, logprobs, JSON constraints) in place of transformers' engine-wide one."""

    def __init__(self, loaded: LoadedModel, settings: Settings, metrics: EngineMetrics | None = None):
        self.loaded = loaded
        self.settings = settings
        self.metrics: EngineMetrics = metrics or NullMetrics()
        self.tokenizer = loaded.tokenizer
        self.rust_tokenizer = loaded.tokenizer.backend_tokenizer
        self.max_batch_seen = 0
        self.forward_passes = 0
        self._streams: dict[str, GenerationStream] = {}
        # Per-request sampling state, read by the sampler on the manager's thread (dict reads are atomic).
        self._sampling: dict[str, RequestSampling] = {}
        self._ids = itertools.count()
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grammars: Any = None  # constraints.Grammars, built at start (None: response_format unavailable)
        self._grammar_error: str | None = None
        self._attention: attention.VarlenAttention | None = None
        head = loaded.model.get_output_embeddings()
        # Logits rows and the device they come out on. A model split over GPUs (accelerate hooks) hands its outputs
        # back on its input device, model.device, wherever the head sits.
        self.vocab_size = int(head.weight.shape[0]) if head is not None else len(loaded.tokenizer)
        self.logits_device = head.weight.device if head is not None and not loaded.sharded else loaded.model.device

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        s = self.settings
        model = self.loaded.model
        eos = self.tokenizer.eos_token_id
        # No sampling settings here: gptd's sampler replaces transformers' (see _cb_internals.install_sampler).
        gen_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=s.max_new_tokens,
            eos_token_id=eos if eos is not None else -1,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=s.kv_cache_page_size,
            num_blocks=s.kv_blocks(),  # explicit budget: never sized from the node's RAM
            max_batch_tokens=s.batch_tokens(),
            max_requests_per_batch=s.max_batch_size,
            # The sampler is Python reading the current batch's requests: no CUDA-graph capture of the step, and no
            # double-buffered (async) batches whose rows would belong to the previous schedule.
            use_cuda_graph=False,
            use_async_batching=False,
            # CPU offloading copies whole blocks of the flat cache tensor, which a sharded model does not have.
            cpu_offload_space=0.0,
        )
        log.debug(
            "KV cache: %d pages x %d tokens, about %.0f MiB (set GPTD_KV_CACHE_BLOCKS to change)",
            s.kv_blocks(), s.kv_cache_page_size, kv_cache_bytes(model, s) / 2**20,
        )
        try:
            from .constraints import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size)
        except Exception as e:  # a tokenizer llguidance cannot read: everything but response_format still works
            self._grammar_error = f"{type(e).__name__}: {e}"
            log.warning("response_format unavailable for this tokenizer: %s", self._grammar_error)
        with torch.no_grad():
            self._manager = model.init_continuous_batching(
                generation_config=gen_config, continuous_batching_config=cb_config
            )
        mgr = self._manager
        _cb_internals.skip_padding_check(model)
        if self.loaded.sharded:
            # Each layer's KV cache on its layer's GPU (transformers would put all of it on the first one).
            _cb_internals.place_kv_per_layer(mgr, self.loaded.layer_devices)
            log.debug("KV cache per layer: %s", self.loaded.describe_devices())
        varlen = (self.loaded.device == "cpu" and _cb_internals.attention_implementation(model) == "sdpa"
                  and attention.supported(model.config))
        if varlen:
            # Per-request attention instead of sdpa over the whole packed batch (see attention.py).
            self._attention = attention.VarlenAttention()
            _cb_internals.set_attention(model, self._attention.register())
        first = True

        def before_step(bp: Any) -> None:  # the manager's thread, ahead of every forward pass
            nonlocal first
            if first:  # the manager creates its batch processor and cache on its own thread, before the first step
                first = False
                _cb_internals.install_sampler(bp, self._choose)
                if self._attention is not None:
                    direct = self._attention.enable_direct_reads(_cb_internals.cache_of(bp))
                    log.debug("attention: %s, direct cache reads: %s", self._attention.name, direct)
            if self._attention is not None:
                self._attention.new_pass()
            size = _cb_internals.batch_size(bp)
            self.forward_passes += 1
            self.max_batch_seen = max(self.max_batch_seen, size)
            self.metrics.observe_batch(size)

        _cb_internals.wrap_step(mgr, before_step)
        mgr.start()

    def _choose(self, logits: Any, request_ids: list[str]) -> Any:
        """The sampler transformers calls once per forward pass (manager's thread)."""
        get = self._sampling.get
        states = [get(r) for r in request_ids]
        tokens = sample(logits, states, self.tokenizer.eos_token_id)
        for request_id, state in zip(request_ids, states, strict=True):
            if state is not None and state.failed is not None and not state.failure_reported:
                state.failure_reported = True
                log.warning("request %s failed in its sampler; the others continue", request_id)
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._fail_request, request_id, state.failed)
        return tokens

    def _fail_request(self, request_id: str, error: str) -> None:  # the event loop
        """One request's engine-side failure: its stream ends with the error, its batch slot is freed."""
        self.cancel(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream._on_output(_Failed(request_id, error))

    async def warmup(self) -> None:
        """A real generation through the whole path; readiness waits for it."""
        ids = self.tokenizer("warm up").input_ids or [self.tokenizer.eos_token_id or 0]
        # A full-width batch, then a sampled request: the first pass at a new batch shape is several times
        # slower on CPU (allocator growth), and that cost belongs before readiness, not in a user's request.
        width = min(self.settings.max_batch_size, 64)
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        streams = [self.submit(ids, greedy, check_capacity=False) for _ in range(width)]
        await asyncio.gather(*(s.collect() for s in streams))
        sampled = SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True)
        await self.submit(ids, sampled, check_capacity=False).collect()
        self.max_batch_seen = 0  # stats describe real traffic only

    def stop(self, timeout: float = 5.0) -> None:
        if self._manager is not None and self._manager.is_running():
            self._manager.stop(block=True, timeout=timeout, hard_stop=True)

    @property
    def healthy(self) -> bool:
        mgr = self._manager
        return mgr is not None and mgr.is_running() and _cb_internals.fatal_error(mgr) is None

    @property
    def sampling_features(self) -> frozenset[str]:
        """The optional SamplingParams parts honoured here (state.py); the HTTP layer refuses the others.
        response_format needs the grammar built at start (llguidance must read the tokenizer)."""
        from .state import ALL_SAMPLING_FEATURES, FEATURE_RESPONSE_FORMAT

        return ALL_SAMPLING_FEATURES if self._grammars is not None else ALL_SAMPLING_FEATURES - {
            FEATURE_RESPONSE_FORMAT}

    # -- requests -------------------------------------------------------------------------------------------
    def num_inflight(self) -> int:
        return len(self._streams)

    def num_running(self) -> int:
        if self._manager is None:
            return 0
        return min(_cb_internals.active_requests(self._manager), len(self._streams))

    def num_waiting(self) -> int:
        return max(0, len(self._streams) - self.num_running())

    def _request_sampling(self, params: SamplingParams) -> RequestSampling:
        """Check what submit() must refuse (InvalidParameterError naming the field) and build the sampler state."""
        def finite(name: str, value: float, lo: float, hi: float) -> float:
            if not isinstance(value, int | float) or not math.isfinite(value) or not lo <= value <= hi:
                raise InvalidParameterError(name, f"must be a number in [{lo}, {hi}], got {value!r}")
            return float(value)

        temperature = finite("temperature", params.temperature, 0.0, 100.0)
        top_p = finite("top_p", params.top_p, 0.0, 1.0)  # 0: the nucleus is the top token alone (sampling.py)
        presence = finite("presence_penalty", params.presence_penalty, -2.0, 2.0)
        frequency = finite("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
        k = params.logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
            raise InvalidParameterError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        seed = params.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidParameterError("seed", f"must be an integer, got {seed!r}")
        # torch's seed range; beyond it the 64-bit mask in sampling.py would alias another seed. (The API bounds
        # seed to int64; the uint64 top half leaves room for its seed + j of n choices.)
        if seed is not None and not -2**63 <= seed < 2**64:
            raise InvalidParameterError("seed", f"must be in [-2**63, 2**64 - 1], got {seed}")
        constraint = None
        rf = params.response_format
        if rf is not None:
            from .constraints import ConstraintError

            if self._grammars is None:
                raise InvalidParameterError(
                    "response_format", f"constrained decoding is unavailable for this model's tokenizer "
                                       f"({self._grammar_error})")
            if params.ignore_eos:
                raise InvalidParameterError("response_format", "cannot be combined with ignore_eos (the JSON "
                                                               "ends where the grammar allows only EOS)")
            try:
                constraint = self._grammars.compile(rf.kind, rf.schema)
            except ConstraintError as e:
                raise InvalidParameterError("response_format", str(e)) from e
        return new_request_sampling(
            temperature=temperature, top_p=top_p, presence_penalty=presence, frequency_penalty=frequency,
            logprobs=k, seed=seed, constraint=constraint, vocab_size=self.vocab_size,
            device=self.logits_device,
        )

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = False, check_capacity: bool = True
    ) -> GenerationStream:
        """Queue a request. Raises InvalidParameterError (400), QueueFullError (429), EngineUnavailableError (503);
        never blocks."""
        if not self.healthy:
            raise EngineUnavailableError("generation engine is not running")
        sampling = self._request_sampling(params)
        s = self.settings
        if check_capacity and len(self._streams) >= s.max_batch_size + s.max_queue:
            raise QueueFullError(f"{len(self._streams)} requests in flight (max {s.max_batch_size + s.max_queue})")
        request_id = f"gptd-{next(self._ids)}"
        self._loop = asyncio.get_running_loop()  # where _fail_request runs (the loop the handlers run on)
        out = GenerationStream(self, request_id, prompt_ids, params, sampling)
        self._streams[request_id] = out
        self._sampling[request_id] = sampling
        mgr = self._manager
        mgr.register_result_handler(request_id, out._on_output)
        # Token-by-token delivery only when needed (SSE, or stop strings that must be seen as they appear);
        # otherwise one delivery at the end saves per-token work on both threads.
        streaming = stream or bool(params.stop)
        kwargs: dict[str, Any] = {}
        if params.ignore_eos:
            kwargs["eos_token_id"] = -1
        try:
            accepted = mgr.add_request(
                list(prompt_ids),
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                streaming=streaming,
                record_timestamps=not streaming,
                **kwargs,
            )
        except BaseException:
            self._forget(request_id)  # never leave a phantom in-flight entry (it would count toward 429 forever)
            raise
        if accepted is None:
            self._forget(request_id)
            raise EngineUnavailableError("generation engine is stopping")
        return out

    def cancel(self, request_id: str) -> None:
        if self._manager is not None:
            self._manager.cancel_request(request_id)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._sampling.pop(request_id, None)
        if self._manager is not None:
            _cb_internals.forget_handler(self._manager, request_id)

    def _token_logprob(self, choice: Any) -> TokenLogprob:
        def text_and_bytes(token_id: int) -> tuple[str, tuple[int, ...]]:
            raw = self._grammars.token_bytes(token_id) if self._grammars is not None else \
                self.tokenizer.decode([token_id]).encode()
            return raw.decode("utf-8", errors="replace"), tuple(raw)

        token, raw = text_and_bytes(choice.token_id)
        top = []
        for tid, lp in zip(choice.top_ids, choice.top_logprobs, strict=True):
            t, b = text_and_bytes(tid)
            top.append(TopLogprob(t, lp, b))
        return TokenLogprob(token, choice.token_id, choice.logprob, raw, tuple(top))


@dataclass
class ClassificationResult:
    label: str
    score: float
    entities: list[dict[str, Any]] = field(default_factory=list)


class ClassificationEngine:
    """Sequence or token classification. One worker thread: forward passes never run on the event loop, and
    torch gets all cores for one batch at a time instead of thrashing between concurrent calls."""

    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.loaded = loaded
        self.settings = settings
        self.id2label: dict[int, str] = {int(k): v for k, v in loaded.model.config.id2label.items()}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptd-classify")
        self._inflight = 0
        self.healthy = True

    def start(self) -> None:
        pass

    async def warmup(self) -> None:
        await self.infer(["warm up"])

    def stop(self, timeout: float = 5.0) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.healthy = False

    def num_inflight(self) -> int:
        return self._inflight

    def num_running(self) -> int:
        return min(self._inflight, 1)

    def num_waiting(self) -> int:
        return max(0, self._inflight - 1)

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer(text).input_ids)

    async def infer(self, texts: list[str]) -> list[ClassificationResult]:
        """Raises InvalidParameterError for an empty batch or a text without tokens (a 0-token row cannot be
        reshaped into logits: torch fails deep inside the model), QueueFullError when too many wait."""
        if not texts:
            raise InvalidParameterError("texts", "no texts to classify")
        for i, text in enumerate(texts):
            if self.count_tokens(text) == 0:
                raise InvalidParameterError("texts", f"text {i} has no tokens")
        s = self.settings
        if self._inflight >= s.max_batch_size + s.max_queue:
            raise QueueFullError(f"{self._inflight} requests in flight")
        fn: Callable[[list[str]], list[ClassificationResult]] = (
            self._classify_tokens if self.loaded.task == "token-classification" else self._classify
        )
        self._inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, texts)
        finally:
            self._inflight -= 1

    def _encode(self, texts: list[str], offsets: bool) -> Any:
        return self.loaded.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.settings.max_input_tokens,
            return_tensors="pt",
            return_offsets_mapping=offsets,
        )

    def _classify(self, texts: list[str]) -> list[ClassificationResult]:
        import torch

        enc = self._encode(texts, offsets=False).to(self.loaded.device)
        with torch.inference_mode():
            probs = self.loaded.model(**enc).logits.float().softmax(-1)
        scores, ids = probs.max(-1)
        return [ClassificationResult(self.id2label[int(i)], float(p)) for p, i in zip(scores, ids, strict=True)]

    def _classify_tokens(self, texts: list[str]) -> list[ClassificationResult]:
        import torch

        from .ner import aggregate_simple

        enc = self.loaded.tokenizer(
            texts, padding=True, truncation=True, max_length=self.settings.max_input_tokens, return_tensors="pt",
            return_offsets_mapping=True, return_special_tokens_mask=True,
        )
        offsets = enc.pop("offset_mapping").tolist()
        special = enc.pop("special_tokens_mask").tolist()
        enc = enc.to(self.loaded.device)
        with torch.inference_mode():
            probs = self.loaded.model(**enc).logits.float().softmax(-1).cpu().tolist()
        mask = enc["attention_mask"].tolist()
        results = []
        for row, text in enumerate(texts):
            skip = [bool(sp) or not m for sp, m in zip(special[row], mask[row], strict=True)]
            entities = aggregate_simple(text, offsets[row], probs[row], self.id2label, skip)
            results.append(ClassificationResult(label="", score=0.0, entities=entities))
        return results
