"""The runtime's Prometheus gauges as the autoscaler reads them."""

from __future__ import annotations

from gptd_runtime.api.metrics import Metrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _samples(m: Metrics) -> dict[str, float]:
    text = generate_latest(m.registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_inflight_gauge_is_running_plus_waiting_read_at_scrape_time() -> None:
    state = {"running": 4.0, "waiting": 7.0}
    m = Metrics()
    m.bind(lambda: state["running"], lambda: state["waiting"], lambda: 1.0)
    first = _samples(m)
    assert first["gptd:num_requests_running"] == 4.0
    assert first["gptd:num_requests_waiting"] == 7.0
    # The HPA's metric: a full batch (running capped at maxBatchSize) plus a queue must still grow.
    assert first["gptd:num_requests_inflight"] == 11.0
    state["waiting"] = 0.0
    state["running"] = 2.0
    assert _samples(m)["gptd:num_requests_inflight"] == 2.0
