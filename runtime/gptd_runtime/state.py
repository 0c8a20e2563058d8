"""What the HTTP layer knows about the server: its phase, its settings, and the engine behind a protocol.

Routes reach all of this through `api.deps.runtime(request)` (one typed accessor); nothing under `api/`
imports `app`, and nothing under `api/` touches transformers objects (model configs, tokenizer internals
beyond encode/decode): what it needs about the model is in `ModelInfo`, filled once at load time."""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .config import Settings

if TYPE_CHECKING:
    from .api.metrics import Metrics
    from .apikeys import FailureLimiter, KeyRing
    from .embeddings import Embedder
    from .engine import ClassificationResult, Delta, SamplingParams
    from .redaction import Redactor


class Phase(enum.StrEnum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


# Optional parts of the SamplingParams contract. An engine lists in `sampling_features` the ones it really
# honours; the HTTP layer refuses (400, naming the field) a request that needs one the engine does not list,
# so a field is never silently ignored while an engine grows into the contract.
FEATURE_LOGPROBS = "logprobs"
FEATURE_SEED = "seed"
FEATURE_PENALTIES = "penalties"  # presence_penalty, frequency_penalty
FEATURE_RESPONSE_FORMAT = "response_format"  # json_object, json_schema
ALL_SAMPLING_FEATURES = frozenset({FEATURE_LOGPROBS, FEATURE_SEED, FEATURE_PENALTIES, FEATURE_RESPONSE_FORMAT})


class TokenStream(Protocol):
    """One generation request's output (engine.GenerationStream implements it)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None

    def __aiter__(self) -> AsyncIterator[Delta]: ...
    def cancel(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """What every engine offers the server: warm up, stop, health, and counters for metrics/drain."""

    @property
    def healthy(self) -> bool: ...
    async def warmup(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def num_running(self) -> int: ...
    def num_waiting(self) -> int: ...


class GenerationBackend(Engine, Protocol):
    """Text generation: submit / cancel. Raises engine.QueueFullError or engine.EngineUnavailableError."""

    tokenizer: Any  # encode (`tokenizer(text).input_ids`), `decode`, `len`, `eos_token_id`, chat template

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = False) -> TokenStream: ...
    def cancel(self, request_id: str) -> None: ...


class ClassifierBackend(Engine, Protocol):
    def count_tokens(self, text: str) -> int: ...
    async def infer(self, texts: list[str]) -> list[ClassificationResult]: ...


def sampling_features(engine: Any) -> frozenset[str]:
    """The optional sampling features an engine honours (none unless it says so)."""
    return frozenset(getattr(engine, "sampling_features", frozenset()))


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model the HTTP layer needs, read once from the model at load time."""

    max_positions: int | None = None  # position embeddings (None: unbounded/unknown)
    hidden_size: int | None = None  # embedding width
    dtype: str = "unknown"
    device: str = "unknown"
    torch_threads: int | None = None
    kv_cache_bytes: int | None = None  # None: no KV cache (classification)

    @classmethod
    def from_model(cls, model: Any, device: str, kv_cache_bytes: int | None = None) -> ModelInfo:
        import torch

        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(
            max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None),
            hidden_size=getattr(cfg, "hidden_size", None),
            dtype=str(getattr(model, "dtype", "unknown")).removeprefix("torch."),
            device=device,
            torch_threads=torch.get_num_threads() if device == "cpu" else None,
            kv_cache_bytes=kv_cache_bytes,
        )


def startup_line(state: RuntimeState) -> str:
    """The one line that says what this server is serving, and with what memory for the KV cache."""
    s, m = state.settings, state.model
    kv = ("no KV cache" if m.kv_cache_bytes is None else
          f"KV cache {s.kv_blocks()} blocks x {s.kv_cache_page_size} tokens = {m.kv_cache_bytes / 2**20:.0f} MiB")
    threads = f" ({m.torch_threads} torch thread(s))" if m.torch_threads else ""
    source = s.model or ("demo" if s.demo else "-")
    return (f"ready: serving {state.model_name!r} ({s.task}) from {source} revision {s.revision or '-'}: "
            f"{m.dtype} on {m.device}{threads}, {kv}")


@dataclass
class RuntimeState:
    settings: Settings
    metrics: Metrics
    api_keys: KeyRing | None  # None: no authentication
    auth_failures: FailureLimiter
    redactor: Redactor | None = None  # --redact: masks prompts before the engine and outputs before the client
    phase: Phase = Phase.LOADING
    engine: Any = None  # a GenerationBackend or ClassifierBackend (or a test stand-in honouring the protocol)
    model: ModelInfo = field(default_factory=ModelInfo)
    embedder: Embedder | None = None
    error: str | None = None
    inflight: int = 0  # HTTP requests being served (streams included); the drain waits for 0
    on_fatal: Callable[[str], None] | None = None
    abandoned: threading.Event = field(default_factory=threading.Event, repr=False)  # set at shutdown
    startup: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def not_ready_reason(self) -> str | None:
        """None when requests may be served; otherwise why not (for a 503)."""
        if self.phase is Phase.READY and self.engine is not None:
            return None
        return {"draining": "server is shutting down", "failed": f"model failed to load: {self.error}"}.get(
            self.phase.value, f"model is not ready ({self.phase.value})"
        )


def context_limit(state: RuntimeState) -> int:
    """Tokens one request may occupy: the KV cache budget, and the model's positions if it has a limit."""
    s = state.settings
    context = s.kv_blocks() * s.kv_cache_page_size
    if state.model.max_positions:
        context = min(context, state.model.max_positions)
    return context

