"""Canary analysis: PromQL for the canary's pods, and the verdict on what Prometheus answered.

Pure parts (unit-tested): ``build_queries`` and ``evaluate``/``missing``, plus ``analysis_key`` which says
whether (and under which key) a CR's canary is to be analysed now. I/O parts: ``query`` (one instant query
over HTTP) and ``Analyzer`` (runs the queries at most once per ``intervalSeconds`` per canary and step,
remembering the last outcome in memory). The state machine (``rollout.decide``) gets the outcome as
``Observations.analysis_breach`` (a breach: abort and roll back) or ``Observations.analysis_unavailable``
(Prometheus could not answer: hold the canary at its step, never roll back for it).

Which requests count as errors: HTTP 5xx answers on the inference routes (``/v1/completions``,
``/v1/chat/completions``, ``/v2/models/infer``). 503 counts: the runtime answers it when it is not ready, has
failed or drains, and a canary that does that to the traffic it is sent is serving badly. 429 does not count:
it is load shedding at ``maxBatchSize + maxQueue`` in flight, a property of the traffic volume, not of the
revision, and counting it would roll back a good revision on a traffic spike. Other 4xx are the client's.

No data (no canary traffic in the window, so 0/0 = NaN or an empty vector; no TTFT observations) is no breach:
a canary nobody called can't be judged. The Analyzer logs it; steps with pauses then advance on schedule.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import names
from .api import CanaryAnalysis, GPTDeploymentSpec

log = logging.getLogger(__name__)

ERROR_RATE = "errorRate"
TTFT_P95 = "ttftP95"
INFERENCE_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v2/models/infer")
QUERY_TIMEOUT_SECONDS = 5.0


class PrometheusError(Exception):
    """Prometheus could not be asked or gave no usable answer (an infrastructure problem, not a verdict)."""


# ------------------------------------------------------------------------------------------------ pure


def _promql_string(value: str) -> str:
    """A PromQL double-quoted string literal's content (backslashes and quotes escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def canary_pod_regex(name: str) -> str:
    """The canary's pods, ``<base>-canary-<pod-template-hash>-<suffix>`` (the canary Deployment is named after the
    base, names.py, not the CR: ``llama-3.1-8b``'s pods start ``llama-3-1-8b--<hash>-canary-``); fully anchored by
    Prometheus, so the stable pods ``<base>-<hash>-<suffix>`` and another CR's ``<base>-canary-x`` don't match."""
    # A base holds [a-z0-9-] and, kept from the legacy release (names.LegacyName), '.': the one to escape.
    return names.deployment(name, "canary").replace(".", "\\.") + "-[a-z0-9]+-[a-z0-9]+"


def build_queries(name: str, namespace: str, analysis: CanaryAnalysis) -> dict[str, str]:
    """PromQL per metric key: the canary's error rate and (when a limit is set) its p95 time to first token."""
    window = f"[{analysis.intervalSeconds}s]"
    pods = f'namespace="{_promql_string(namespace)}",pod=~"{_promql_string(canary_pod_regex(name))}"'
    routes = f'route=~"{"|".join(INFERENCE_ROUTES)}"'
    requests = f"gptd:http_requests_total{{{pods},{routes}"
    queries = {
        ERROR_RATE: (
            f'sum(rate({requests},status=~"5.."}}{window})) / sum(rate({requests}}}{window}))'
        ),
    }
    if analysis.maxTimeToFirstTokenSeconds is not None:
        queries[TTFT_P95] = (
            f"histogram_quantile(0.95, sum by (le) (rate(gptd:time_to_first_token_seconds_bucket{{{pods}}}{window})))"
        )
    return queries


def _no_data(value: float | None) -> bool:
    return value is None or math.isnan(value)


def missing(results: Mapping[str, float | None]) -> list[str]:
    """The metric keys Prometheus had no data for (empty vector or NaN)."""
    return [key for key, value in results.items() if _no_data(value)]


def evaluate(analysis: CanaryAnalysis, results: Mapping[str, float | None]) -> str | None:
    """The first breach as a message naming the metric, its value and the limit; None when within limits
    (metrics without data are not breaches: see the module docstring)."""
    window = f"{analysis.intervalSeconds}s"
    rate = results.get(ERROR_RATE)
    if not _no_data(rate) and rate > analysis.maxErrorRate:  # type: ignore[operator]
        return (
            f"error rate (5xx share of gptd:http_requests_total) of the canary over {window} is "
            f"{rate:.4g}, above maxErrorRate {analysis.maxErrorRate:g}"
        )
    limit = analysis.maxTimeToFirstTokenSeconds
    ttft = results.get(TTFT_P95)
    if limit is not None and not _no_data(ttft) and ttft > limit:  # type: ignore[operator]
        return (
            f"p95 time to first token (gptd:time_to_first_token_seconds) of the canary over {window} is "
            f"{ttft:.4g}s, above maxTimeToFirstTokenSeconds {limit:g}"
        )
    return None


def analysis_key(spec: GPTDeploymentSpec, status: Mapping[str, Any], revision: str,
                 canary_ready_replicas: int) -> tuple[str, int] | None:
    """``(revision, step)`` when the CR's canary is to be analysed: analysis configured, a canary of this
    revision in flight (phase Canary or Promoting) with at least one Ready pod (nothing serves before that,
    so there is nothing to measure). A new key (a new revision or step) is analysed at once."""
    canary = spec.rollout.canary
    if spec.rollout.strategy != "Canary" or canary is None or canary.analysis is None:
        return None
    ro = status.get("rollout") or {}
    if ro.get("phase") not in ("Canary", "Promoting") or ro.get("revision") != revision:
        return None
    if canary_ready_replicas < 1:
        return None
    return revision, int(ro.get("step") or 0)


# ------------------------------------------------------------------------------------------------- I/O


def _sample(data: Any) -> float | None:
    """The value of an instant query's answer: first sample of a vector, or a scalar; None when empty."""
    if not isinstance(data, dict):
        raise PrometheusError(f"unexpected answer: {str(data)[:200]}")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector" and isinstance(result, list):
        if not result:
            return None
        value = result[0].get("value") if isinstance(result[0], dict) else None
    elif kind == "scalar":
        value = result
    else:
        raise PrometheusError(f"unexpected resultType {kind!r}")
    if not isinstance(value, list) or len(value) != 2:
        raise PrometheusError(f"malformed sample: {str(value)[:200]}")
    try:
        number = float(value[1])  # "NaN", "+Inf" included
    except (TypeError, ValueError) as exc:
        raise PrometheusError(f"malformed sample value: {value[1]!r}") from exc
    return None if math.isnan(number) else number


async def query(session: aiohttp.ClientSession, prometheus_url: str, promql: str,
                timeout: float = QUERY_TIMEOUT_SECONDS) -> float | None:
    """One instant query (GET /api/v1/query): the first sample's value, None for no data; raises
    ``PrometheusError`` when Prometheus is unreachable, slow, erroring or answers something else."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/query"
    try:
        async with session.get(url, params={"query": promql}, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise PrometheusError(f"{url}: HTTP {resp.status}: {text[:200]}")
            try:
                body = await resp.json(content_type=None)
            except ValueError as exc:
                raise PrometheusError(f"{url}: not JSON: {text[:200]}") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PrometheusError(f"{url}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise PrometheusError(f"{url}: query failed: {error or str(body)[:200]}")
    return _sample(body.get("data"))


@dataclass(frozen=True)
class Outcome:
    """One analysis run: a breach message, or why it could not be judged (Prometheus down), or neither."""

    breach: str | None = None
    unavailable: str | None = None
    no_data: tuple[str, ...] = ()


@dataclass
class _Memo:
    key: tuple[str, int]
    at: float
    outcome: Outcome


class Analyzer:
    """Runs a CR's canary analysis at most once per ``intervalSeconds`` (per CR uid, revision and step) and
    reuses the last outcome in between; in memory only (after an operator restart the first run is at once)."""

    def __init__(self, timeout: float = QUERY_TIMEOUT_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self.runs = 0  # queries batches sent (tests)
        self._memo: dict[str, _Memo] = {}
        self._session: aiohttp.ClientSession | None = None

    async def analyse(self, uid: str, key: tuple[str, int], name: str, namespace: str,
                      analysis: CanaryAnalysis) -> tuple[Outcome, float]:
        """The outcome for this canary, and the seconds until the next run is due."""
        now = self.clock()
        memo = self._memo.get(uid)
        if memo is not None and memo.key == key and now - memo.at < analysis.intervalSeconds:
            return memo.outcome, analysis.intervalSeconds - (now - memo.at)
        outcome = await self._run(name, namespace, analysis)
        self._memo[uid] = _Memo(key, now, outcome)
        return outcome, float(analysis.intervalSeconds)

    async def _run(self, name: str, namespace: str, analysis: CanaryAnalysis) -> Outcome:
        self.runs += 1
        queries = build_queries(name, namespace, analysis)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            values = await asyncio.gather(
                *(query(self._session, analysis.prometheusUrl, q, self.timeout) for q in queries.values())
            )
        except PrometheusError as exc:
            log.warning("canary analysis of %s/%s unavailable: %s", namespace, name, exc)
            return Outcome(unavailable=f"Prometheus unavailable: {exc}")
        results = dict(zip(queries, values, strict=True))
        absent = tuple(missing(results))
        if absent:
            log.info("canary analysis of %s/%s: no data for %s (no canary traffic in the last %ss?): "
                     "not a breach", namespace, name, ", ".join(absent), analysis.intervalSeconds)
        breach = evaluate(analysis, results)
        log.info("canary analysis of %s/%s: %s -> %s", namespace, name, results, breach or "within limits")
        return Outcome(breach=breach, no_data=absent)

    def forget(self, uid: str) -> None:
        self._memo.pop(uid, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
