"""OpenAI-compatible routes over the in-process app (completions, chat, streaming, batching, metrics)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.support.runtime import metric, sse_events


async def test_completion_usage_and_length(app_factory: Any, models: Any) -> None:
    n_prompt = len(AutoTokenizer.from_pretrained(models["plain"])("hello world").input_ids)
    async with app_factory() as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 7, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["finish_reason"] == "length"
        assert isinstance(body["choices"][0]["text"], str)
        assert body["usage"]["completion_tokens"] == 7
        assert body["usage"]["prompt_tokens"] == n_prompt
        assert body["usage"]["total_tokens"] == n_prompt + 7


async def test_models_lists_served_name(app_factory: Any) -> None:
    async with app_factory(served_model_name="tiny") as (client, _app):
        r = await client.get("/v1/models")
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == ["tiny"]
        wrong = await client.post("/v1/completions", json={"model": "other", "prompt": "x", "max_tokens": 1})
        assert wrong.status_code == 404
        assert wrong.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("model", "expected_prompt"), [
    ("chat", "<|user|>\nhi there\n<|assistant|>\n"),  # the tokenizer's chat template
    ("plain", "user: hi there\nassistant:"),  # no template: plain transcript fallback
])
async def test_chat_template_and_fallback(app_factory: Any, models: Any, model: str, expected_prompt: str) -> None:
    tok = AutoTokenizer.from_pretrained(models[model])
    async with app_factory(model) as (client, _app):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["prompt_tokens"] == len(tok(expected_prompt, add_special_tokens=False).input_ids)
        assert body["usage"]["completion_tokens"] == 3


async def test_streaming_completion_sse(app_factory: Any, models: Any) -> None:
    n_prompt = len(AutoTokenizer.from_pretrained(models["plain"])("The quick brown fox").input_ids)
    async with app_factory() as (client, _app):
        r = await client.post("/v1/completions", json={
            "prompt": "The quick brown fox", "max_tokens": 12, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert chunks[-1]["usage"] == {
            "prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert reasons[-1] == "length" and all(x is None for x in reasons[:-1])
        assert len(reasons) >= 2  # really streamed, not one blob


async def test_streaming_chat_role_first(app_factory: Any) -> None:
    async with app_factory("chat") as (client, _app):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            "max_tokens": 5, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert {(c["id"], c["object"], c["created"]) for c in chunks} == {
            (chunks[0]["id"], "chat.completion.chunk", chunks[0]["created"])}
        assert chunks[0]["id"].startswith("chatcmpl-")
        first, *middle, last, usage = chunks
        assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None, "logprobs": None}]
        assert middle, "content arrives in its own chunks"
        assert all("role" not in c["choices"][0]["delta"] and c["choices"][0]["finish_reason"] is None
                   for c in middle)
        assert last["choices"][0]["finish_reason"] == "length"  # 5 tokens, EOS ignored
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_stop_string_truncates(app_factory: Any) -> None:
    async with app_factory() as (client, _app):
        req = {"prompt": "Simple is better than", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        full = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
        # Pick a stop string that first occurs well inside the greedy output.
        idx = next(i for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i)
        stop = full[idx:idx + 2]
        r = await client.post("/v1/completions", json={**req, "stop": [stop]})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == full[:idx]


async def test_concurrent_requests_share_forward_passes(app_factory: Any) -> None:
    async with app_factory(max_batch_size=8) as (client, app):
        before = (await client.get("/metrics")).text  # the warm-up already ran batches: compare deltas
        async def one(i: int) -> Any:
            return await client.post("/v1/completions", json={
                "prompt": f"request number {i}", "max_tokens": 16, "ignore_eos": True})

        responses = await asyncio.gather(*(one(i) for i in range(8)))
        assert [r.status_code for r in responses] == [200] * 8
        assert all(r.json()["usage"]["completion_tokens"] == 16 for r in responses)
        engine = app.state.runtime.engine
        assert engine.max_batch_seen > 1
        text = (await client.get("/metrics")).text
        # Some forward pass carried more than one request.
        singles = metric(text, 'gptd:batch_size_bucket{le="1.0"}') - metric(before, 'gptd:batch_size_bucket{le="1.0"}')
        passes = metric(text, "gptd:batch_size_count") - metric(before, "gptd:batch_size_count")
        assert singles < passes
        assert metric(text, "gptd:num_requests_running") == 0
        assert engine.num_inflight() == 0


async def test_metrics_exposition(app_factory: Any, models: Any) -> None:
    n_prompt = len(AutoTokenizer.from_pretrained(models["plain"])("metrics").input_ids)
    async with app_factory() as (client, app):
        engine = app.state.runtime.engine
        before = (await client.get("/metrics")).text  # after warm-up: its requests are counted too
        passes = engine.forward_passes
        r = await client.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        for name in ("gptd:num_requests_running", "gptd:num_requests_waiting", "gptd:time_to_first_token_seconds",
                     "gptd:e2e_request_latency_seconds", "gptd:prompt_tokens_total",
                     "gptd:generation_tokens_total", "gptd:request_success_total", "gptd:batch_size"):
            assert f"# TYPE {name.removesuffix('_total')}" in text, name

        def delta(name: str) -> float:
            return metric(text, name) - metric(before, name)

        assert delta("gptd:prompt_tokens_total") == n_prompt
        assert delta("gptd:generation_tokens_total") == 5
        assert delta('gptd:request_success_total{finished_reason="length"}') == 1
        assert delta("gptd:time_to_first_token_seconds_count") == 1
        assert delta("gptd:e2e_request_latency_seconds_count") == 1
        assert delta("gptd:batch_size_count") == engine.forward_passes - passes > 0  # one sample per pass
        assert metric(text, 'gptd:http_requests_total{route="/v1/completions",status="200"}') == 1
        assert metric(text, 'gptd:http_requests_total{route="/metrics",status="200"}') == 1  # the first scrape
        assert metric(text, "gptd:num_requests_running") == 0
        assert metric(text, "gptd:num_requests_waiting") == 0
        assert metric(text, "gptd:ready") == 1
