"""Canary analysis: the PromQL built for a canary, the verdict on Prometheus' answers, the instant-query parser."""

from __future__ import annotations

import math
import re
import socket
from typing import Any

import aiohttp
import pytest
from gptd_operator import analysis, api, names
from gptd_operator.analysis import ERROR_RATE, TTFT_P95, build_queries, evaluate, missing


def cfg(**kw: Any) -> api.CanaryAnalysis:
    return api.CanaryAnalysis.model_validate({"prometheusUrl": "http://prom:9090", **kw})


def test_error_rate_query_selects_the_canary_pods_inference_routes_and_5xx() -> None:
    q = build_queries("chat", "team-a", cfg(intervalSeconds=60))
    assert set(q) == {ERROR_RATE}  # no TTFT limit, no TTFT query
    sel = 'namespace="team-a",pod=~"chat-canary-[a-z0-9]+-[a-z0-9]+"'
    routes = 'route=~"/v1/completions|/v1/chat/completions|/v2/models/infer"'
    assert q[ERROR_RATE] == (
        f'sum(rate(gptd:http_requests_total{{{sel},{routes},status=~"5.."}}[60s])) / '
        f"sum(rate(gptd:http_requests_total{{{sel},{routes}}}[60s]))"
    )


def test_ttft_query_is_the_p95_of_the_canary_histogram() -> None:
    q = build_queries("chat", "ns", cfg(maxTimeToFirstTokenSeconds=1.5, intervalSeconds=30))
    assert q[TTFT_P95] == (
        'histogram_quantile(0.95, sum by (le) (rate(gptd:time_to_first_token_seconds_bucket{namespace="ns",'
        'pod=~"chat-canary-[a-z0-9]+-[a-z0-9]+"}[30s])))'
    )


def test_pod_regex_matches_canary_pods_only() -> None:
    rx = re.compile(analysis.canary_pod_regex("chat"))  # Prometheus anchors regex matchers: fullmatch
    assert rx.fullmatch("chat-canary-7d9c8b5f4-x2k9p")
    assert not rx.fullmatch("chat-7d9c8b5f4-x2k9p")  # the stable pods
    assert not rx.fullmatch("chat-canary-x-7d9c8b5f4-x2k9p")  # another CR named chat-canary-x
    assert not rx.fullmatch("chatty-canary-7d9c8b5f4-x2k9p")
    # The canary Deployment is named after the base (names.py): a dotted CR's pods start <stem>--<hash>-canary-.
    base = names.base("my.model")
    q = build_queries("my.model", "ns", cfg())[ERROR_RATE]
    assert f'pod=~"{base}-canary-' in q and re.compile(analysis.canary_pod_regex("my.model")).fullmatch(
        f"{base}-canary-7d9c8b5f4-x2k9p")
    # A kept legacy base (names.LegacyName) keeps its dots: literal, escaped for the regex and the PromQL string.
    q = build_queries(names.LegacyName("my.model"), "ns", cfg())[ERROR_RATE]
    assert 'pod=~"my\\\\.model-canary-' in q


@pytest.mark.parametrize(
    "results,expected",
    [
        ({ERROR_RATE: 0.01}, None),
        ({ERROR_RATE: 0.05}, None),  # at the limit is within it
        ({ERROR_RATE: 0.5}, "error rate (5xx share of gptd:http_requests_total) of the canary over 60s is 0.5, "
                            "above maxErrorRate 0.05"),
        ({ERROR_RATE: None}, None),  # no traffic
        ({ERROR_RATE: math.nan}, None),  # 0/0
        ({ERROR_RATE: 0.0, TTFT_P95: 2.25}, "p95 time to first token (gptd:time_to_first_token_seconds) of the "
                                            "canary over 60s is 2.25s, above maxTimeToFirstTokenSeconds 1.5"),
        ({ERROR_RATE: 0.0, TTFT_P95: 1.0}, None),
        ({ERROR_RATE: None, TTFT_P95: None}, None),
    ],
)
def test_evaluate(results: dict[str, float | None], expected: str | None) -> None:
    assert evaluate(cfg(maxTimeToFirstTokenSeconds=1.5), results) == expected


def test_evaluate_ignores_ttft_without_a_limit_and_reports_missing_data() -> None:
    assert evaluate(cfg(), {ERROR_RATE: 0.0, TTFT_P95: 99.0}) is None
    assert missing({ERROR_RATE: None, TTFT_P95: math.nan}) == [ERROR_RATE, TTFT_P95]
    assert missing({ERROR_RATE: 0.0}) == []


def test_analysis_key_only_for_an_analysed_canary_in_flight_with_a_ready_pod() -> None:
    def spec(with_analysis: bool = True) -> api.GPTDeploymentSpec:
        canary: dict[str, Any] = {"steps": [{"weight": 10}]}
        if with_analysis:
            canary["analysis"] = {"prometheusUrl": "http://prom:9090"}
        return api.parse_spec({"model": {"uri": "hf://org/a"}, "rollout": {"strategy": "Canary", "canary": canary}})

    canary = {"rollout": {"phase": "Canary", "revision": "r2", "step": 1}}
    assert analysis.analysis_key(spec(), canary, "r2", 1) == ("r2", 1)
    assert analysis.analysis_key(spec(), {"rollout": {**canary["rollout"], "phase": "Promoting"}}, "r2", 1)
    assert analysis.analysis_key(spec(), canary, "r2", 0) is None  # nothing serves yet
    assert analysis.analysis_key(spec(), canary, "r3", 1) is None  # the spec moved on
    assert analysis.analysis_key(spec(False), canary, "r2", 1) is None
    assert analysis.analysis_key(spec(), {"rollout": {"phase": "RolledBack", "revision": "r2"}}, "r2", 1) is None
    assert analysis.analysis_key(spec(), {}, "r2", 1) is None


@pytest.mark.parametrize(
    "data,value",
    [
        ({"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "0.25"]}]}, 0.25),
        ({"resultType": "vector", "result": []}, None),
        ({"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "NaN"]}]}, None),
        ({"resultType": "scalar", "result": [1.0, "+Inf"]}, math.inf),
    ],
)
def test_sample(data: dict[str, Any], value: float | None) -> None:
    assert analysis._sample(data) == value


@pytest.mark.parametrize(
    "data",
    [{"resultType": "matrix", "result": []}, {"resultType": "vector", "result": [{"value": [1.0, "x"]}]}, None],
)
def test_sample_rejects_malformed_answers(data: Any) -> None:
    with pytest.raises(analysis.PrometheusError):
        analysis._sample(data)


async def test_query_raises_a_typed_error_when_prometheus_is_unreachable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with aiohttp.ClientSession() as session:
        with pytest.raises(analysis.PrometheusError, match=r"127\.0\.0\.1:\d+/api/v1/query: Client"):
            await analysis.query(session, f"http://127.0.0.1:{port}", "up", timeout=2)


async def test_analyzer_runs_at_most_once_per_interval_and_at_once_for_a_new_step() -> None:
    now = [0.0]

    class Fake(analysis.Analyzer):
        async def _run(self, name: str, namespace: str, config: api.CanaryAnalysis) -> analysis.Outcome:
            self.runs += 1
            return analysis.Outcome(breach=f"run {self.runs}")

    an = Fake(clock=lambda: now[0])
    c = cfg(intervalSeconds=60)
    assert await an.analyse("uid", ("r2", 0), "chat", "ns", c) == (analysis.Outcome(breach="run 1"), 60.0)
    now[0] = 45.0
    assert await an.analyse("uid", ("r2", 0), "chat", "ns", c) == (analysis.Outcome(breach="run 1"), 15.0)
    assert (await an.analyse("uid", ("r2", 1), "chat", "ns", c))[0].breach == "run 2"  # new step: at once
    now[0] = 105.0
    assert (await an.analyse("uid", ("r2", 1), "chat", "ns", c))[0].breach == "run 3"  # interval passed
    an.forget("uid")
    assert (await an.analyse("uid", ("r2", 1), "chat", "ns", c))[0].breach == "run 4"
