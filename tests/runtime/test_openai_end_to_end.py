"""The OpenAI fields that need the engine's half of the contract, end to end over HTTP on the real engine
(the tiny random model): logprobs shapes, seeds under concurrent traffic, response_format, engine refusals."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema

from tests.support.runtime import sse_events

CHAT = [{"role": "user", "content": "hi"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "replicas": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}},
    "required": ["name", "replicas"],
    "additionalProperties": False,
}


async def test_chat_logprobs_greedy(app_factory: Any) -> None:
    async with app_factory("chat") as (client, _app):
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 6, "ignore_eos": True, "temperature": 0, "logprobs": True,
            "top_logprobs": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == body["usage"]["completion_tokens"] == 6
        for t in content:
            top = t["top_logprobs"]
            assert len(top) == 3 and [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
            assert (t["token"], t["logprob"]) == (top[0]["token"], top[0]["logprob"])  # greedy picks the top one
            assert t["logprob"] <= 0 and bytes(t["bytes"]) == bytes(top[0]["bytes"])


async def test_completion_logprobs_streamed(app_factory: Any) -> None:
    async with app_factory() as (client, _app):
        r = await client.post("/v1/completions", json={
            "prompt": "hello", "max_tokens": 6, "ignore_eos": True, "logprobs": 2, "stream": True})
        choices = [json.loads(e)["choices"][0] for e in sse_events(r.text)[:-1]]
        lps = [c["logprobs"] for c in choices if c["logprobs"] is not None]
        tokens = [t for lp in lps for t in lp["tokens"]]
        offsets = [o for lp in lps for o in lp["text_offset"]]
        assert len(tokens) == 6 and all(len(top) <= 2 for lp in lps for top in lp["top_logprobs"])
        assert offsets == sorted(offsets) and offsets[0] == 0


async def test_seeded_choices_reproducible_under_concurrent_traffic(app_factory: Any) -> None:
    async with app_factory(max_batch_size=8) as (client, _app):
        req = {"prompt": "Flat is better", "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "n": 2,
               "seed": 1234}

        async def noise(i: int) -> Any:
            return await client.post("/v1/completions", json={"prompt": f"other {i}", "max_tokens": 12,
                                                               "ignore_eos": True})

        alone = (await client.post("/v1/completions", json=req)).json()
        mixed, *others = await asyncio.gather(client.post("/v1/completions", json=req), *(noise(i) for i in range(4)))
        assert all(o.status_code == 200 for o in others)
        texts = [c["text"] for c in alone["choices"]]
        assert texts == [c["text"] for c in mixed.json()["choices"]]
        assert texts[0] != texts[1]  # seed + j: each choice its own sample
        unseeded = (await client.post("/v1/completions", json={**req, "seed": None})).json()
        assert [c["text"] for c in unseeded["choices"]] != texts


async def test_json_schema_response_validates(app_factory: Any) -> None:
    async with app_factory("chat", max_new_tokens=96) as (client, _app):
        fmt = {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA, "strict": True}}
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 96, "n": 3, "seed": 3, "response_format": fmt})
        assert r.status_code == 200, r.text
        finished = [c for c in r.json()["choices"] if c["finish_reason"] == "stop"]
        assert finished, r.json()
        for c in finished:
            jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)


async def test_engine_refusals_name_the_field(app_factory: Any) -> None:
    async with app_factory("chat") as (client, app):
        for extra in ({"ignore_eos": True, "response_format": {"type": "json_object"}},
                      {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}):
            r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **extra})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "response_format"
        assert app.state.runtime.engine.num_inflight() == 0
