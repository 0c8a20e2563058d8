"""Prometheus metrics, named like vLLM's with a `gptd:` prefix so existing dashboards/HPA rules carry over.

`gptd:num_requests_inflight` (running + waiting) is what the operator's HPA scales on, as the custom metric
`gptd_num_requests_inflight` after the prometheus-adapter rename (manifests/prometheus-adapter/rules.yaml): keep that
name. Running alone is capped by the batch size, so a growing queue would never scale anything. Each app has its own
registry (several apps can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from .deps import runtime

# `*_created` samples double the exposition size and nothing here uses them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("gptd:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("gptd:num_requests_waiting", "Requests admitted but waiting for a batch slot", registry=r)
        self.inflight = Gauge(
            "gptd:num_requests_inflight", "Requests running or waiting (what the HPA scales on)", registry=r
        )
        self.ready = Gauge("gptd:ready", "1 when the model is loaded, warmed up and not draining", registry=r)
        self.http_requests = Counter(
            "gptd:http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.api_key_requests = Counter(
            "gptd:api_key_requests", "Authenticated requests by key id (SHA-256 prefix, never the key)", ["key_id"],
            registry=r,
        )
        self.auth_failures = Counter(
            "gptd:auth_failures", "Requests refused: 401 (missing/wrong key) or 429 (too many wrong keys)", ["status"],
            registry=r,
        )
        self.redactions = Counter(
            "gptd:redactions", "Values masked by --redact, in prompts and outputs, by entity", ["entity"], registry=r
        )
        self.request_success = Counter(
            "gptd:request_success", "Finished generation requests by finish reason", ["finished_reason"], registry=r
        )
        self.request_aborted = Counter(
            "gptd:request_aborted", "Requests cancelled before finishing (client went away)", registry=r
        )
        self.prompt_tokens = Counter("gptd:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("gptd:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "gptd:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "gptd:e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "gptd:batch_size", "Requests sharing one forward pass", buckets=_BATCH_BUCKETS, registry=r
        )

    def bind(self, running: Callable[[], float], waiting: Callable[[], float], ready: Callable[[], float]) -> None:
        """Gauges are read from the engine at scrape time (no bookkeeping to drift)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        # One gauge, read in one scrape: a query summing two series could mix samples from different scrapes.
        self.inflight.set_function(lambda: running() + waiting())
        self.ready.set_function(ready)

    # EngineMetrics protocol (called from the engine; prometheus_client is thread-safe)
    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_abort(self) -> None:
        self.request_aborted.inc()

    def observe_request(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, e2e: float, finish_reason: str
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        self.request_success.labels(finished_reason=finish_reason).inc()


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
