"""Canary analysis against a real (tiny) Prometheus: the operator queries it over HTTP during a canary.

The stand-in is an aiohttp server on 127.0.0.1 answering ``GET /api/v1/query`` in Prometheus' JSON shape and
recording the PromQL it received. The first analysis of a step runs as soon as the canary has a Ready pod, so
nothing waits out ``intervalSeconds`` (minimum 10) except the recovery case.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import (
    NS,
    change_revision,
    condition,
    event,
    events,
    labels_of,
    progressing,
    ready_deployment,
    started,
    status_of,
    status_where,
)

pytestmark = pytest.mark.timeout(30)
REV = "gptd.io/revision"


@dataclass
class Prometheus:
    """Answers every instant query with ``error_rate`` or ``ttft`` (by the query's metric), or HTTP 500."""

    url: str = ""
    error_rate: str = "0"
    ttft: str = "0.2"
    failing: bool = False
    queries: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        promql = request.query.get("query", "")
        self.queries.append(promql)
        if self.failing:
            return web.json_response({"status": "error", "errorType": "internal", "error": "tsdb on fire"},
                                     status=500)
        value = self.ttft if "time_to_first_token" in promql else self.error_rate
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [time.time(), value]}]}})


@pytest.fixture()
async def prometheus() -> AsyncIterator[Prometheus]:
    prom = Prometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", prom.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    prom.url = f"http://127.0.0.1:{port}"
    yield prom
    await runner.cleanup()


def canary(prom: Prometheus, steps: list[dict[str, Any]], **limits: Any) -> dict[str, Any]:
    return {"strategy": "Canary", "canary": {"steps": steps, "analysis": {
        "prometheusUrl": prom.url, "maxErrorRate": 0.05, "intervalSeconds": 10, **limits}}}


async def canary_gone(cluster: Cluster) -> bool:
    return await cluster.get("deployments", NS, "gpt2-canary") is None


async def test_error_rate_breach_rolls_back(cluster: Cluster, operator: RunningOperator,
                                            prometheus: Prometheus) -> None:
    prometheus.error_rate = "0.5"
    old = await started(cluster, replicas=4, rollout=canary(prometheus, [{"weight": 25, "pauseSeconds": 600}]))
    dep = await change_revision(cluster, "v2", old, name="gpt2-canary")
    new = labels_of(dep)[REV]
    await status_where(cluster, "step 1", progressing("CanaryStep1of1"))
    await operator.resync_passes(1)
    assert prometheus.queries == []  # no Ready canary pod yet: nothing to measure
    await ready_deployment(cluster, "gpt2-canary", replicas=1)

    await eventually(lambda: canary_gone(cluster), what="canary Deployment deleted")
    st = await status_where(cluster, "AnalysisFailed",
                            lambda s: condition(s, "RolledBack").get("reason") == "AnalysisFailed")
    rb = condition(st, "RolledBack")
    assert rb["status"] == "True" and new in rb["message"]
    assert "gptd:http_requests_total" in rb["message"] and "0.5" in rb["message"] and "0.05" in rb["message"]
    assert st["failedRevision"] == new and st["currentRevision"] == old
    ev = await event(cluster, "RolledBack")
    assert ev["type"] == "Warning" and "canary analysis failed" in ev["message"]
    stable = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(stable)[REV] == old and stable["spec"]["replicas"] == 4

    # What Prometheus was asked: the canary's pods in the CR's namespace, 5xx over all inference requests.
    q = prometheus.queries[0]
    assert 'namespace="ns1"' in q and 'status=~"5.."' in q and "[10s]" in q
    pod_re = re.search(r'pod=~"([^"]+)"', q).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(pod_re, "gpt2-canary-7d9c8b5f4-x2k9p")
    assert not re.fullmatch(pod_re, "gpt2-7d9c8b5f4-x2k9p")  # the stable pods are not judged
    # Rolled back: no more analysis.
    asked = len(prometheus.queries)
    await operator.resync_passes(2)
    assert len(prometheus.queries) == asked and await canary_gone(cluster)


async def test_healthy_canary_advances_and_promotes(cluster: Cluster, operator: RunningOperator,
                                                   prometheus: Prometheus) -> None:
    prometheus.error_rate, prometheus.ttft = "0.01", "0.3"
    spec = canary(prometheus, [{"weight": 25, "pauseSeconds": 0}, {"weight": 50}], maxTimeToFirstTokenSeconds=1.0)
    old = await started(cluster, replicas=4, rollout=spec)
    dep = await change_revision(cluster, "v2", old, name="gpt2-canary")
    new = labels_of(dep)[REV]
    await ready_deployment(cluster, "gpt2-canary", replicas=1)
    await status_where(cluster, "step 2", progressing("CanaryStep2of2"))
    await ready_deployment(cluster, "gpt2-canary", replicas=2)
    await status_where(cluster, "step 2 paused", lambda s: "paused until gptd.io/promote=true" in
                       condition(s, "Progressing").get("message", ""))
    runs, reconciles = operator.reconciler.analyzer.runs, operator.reconciler.reconciles
    await operator.resync_passes(3)  # several reconciles with the (memoised) healthy verdict
    # Not once per reconcile: at most once per intervalSeconds (10 s; 3 passes take ~1.5 s).
    assert operator.reconciler.reconciles >= reconciles + 3 and operator.reconciler.analyzer.runs <= runs + 1
    st = await status_of(cluster)
    assert progressing("CanaryStep2of2")(st) and condition(st, "RolledBack")["status"] == "False"
    assert any("histogram_quantile(0.95" in q for q in prometheus.queries)
    assert any("gptd:http_requests_total" in q for q in prometheus.queries)
    assert runs >= 2  # each new step is analysed at once

    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"annotations": {"gptd.io/promote": "true"}}})
    await status_where(cluster, "Promoting", progressing("Promoting"))
    await ready_deployment(cluster, replicas=4)
    await eventually(lambda: canary_gone(cluster), what="canary Deployment deleted")
    st = await status_where(cluster, "promoted", lambda s: s.get("currentRevision") == new)
    assert condition(st, "RolledBack")["status"] == "False" and st["phase"] == "Ready"


async def test_prometheus_down_holds_the_canary_without_rollback(cluster: Cluster, operator: RunningOperator,
                                                                 prometheus: Prometheus) -> None:
    prometheus.failing = True
    old = await started(cluster, replicas=4, rollout=canary(prometheus, [{"weight": 25, "pauseSeconds": 0},
                                                                         {"weight": 50}]))
    await change_revision(cluster, "v2", old, name="gpt2-canary")
    await ready_deployment(cluster, "gpt2-canary", replicas=1)
    st = await status_where(cluster, "held", lambda s: "not advancing: canary analysis unavailable" in
                            condition(s, "Progressing").get("message", ""))
    assert "HTTP 500" in st["rollout"]["analysisUnavailable"]
    ev = await event(cluster, "AnalysisUnavailable")
    assert ev["type"] == "Warning" and "tsdb on fire" in ev["message"]
    await operator.resync_passes(3)
    st = await status_of(cluster)
    assert progressing("CanaryStep1of2")(st) and st["rollout"]["step"] == 0  # pauseSeconds 0, yet held
    assert condition(st, "RolledBack")["status"] == "False"
    assert (await cluster.get("deployments", NS, "gpt2-canary"))["spec"]["replicas"] == 1
    assert len(await events(cluster, "AnalysisUnavailable")) == 1  # once per outage

    # Prometheus is back: the next analysis (due intervalSeconds after the failed one) lets the canary advance.
    prometheus.failing = False
    st = await status_where(cluster, "step 2", progressing("CanaryStep2of2"), timeout=15)
    assert "analysisUnavailable" not in st["rollout"]
    assert (await event(cluster, "AnalysisRecovered"))["type"] == "Normal"
