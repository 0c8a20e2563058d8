"""The real GenerationEngine behind the real HTTP layer: the sampling features the engine declares
(`sampling_features`) work end to end, and a value only the engine can judge is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from tests.support.runtime import sse_events

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}


async def test_declares_every_feature(app_factory: Any) -> None:
    async with app_factory() as (_client, app):
        from gptd_runtime.state import ALL_SAMPLING_FEATURES

        assert app.state.runtime.engine.sampling_features == ALL_SAMPLING_FEATURES


async def test_seed_logprobs_penalties_and_schema_over_http(app_factory: Any) -> None:
    async with app_factory("chat") as (client, _app):
        body = {"prompt": "seeded", "max_tokens": 12, "temperature": 1.0, "seed": 99, "ignore_eos": True}
        a = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        b = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        c = (await client.post("/v1/completions", json={**body, "seed": 100})).json()["choices"][0]["text"]
        assert a == b != c

        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "logprobs": 2,
                                                        "temperature": 0, "ignore_eos": True,
                                                        "frequency_penalty": 1.0})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == 6 and all(v <= 0 for v in lp["token_logprobs"])
        assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
        # greedy: the chosen token is the most likely one (after the penalty)
        assert all(v >= max(top.values()) - 1e-6 for v, top in zip(lp["token_logprobs"], lp["top_logprobs"],
                                                                     strict=True))

        chat = {"messages": [{"role": "user", "content": "status?"}], "max_tokens": 48, "seed": 1,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA,
                                                                            "strict": True}}}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


async def test_schema_the_grammar_refuses_is_a_400(app_factory: Any) -> None:
    async with app_factory("chat") as (client, app):
        bad = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
               "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                           "schema": {"type": "nonsense"}}}}
        r = await client.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"
        assert app.state.runtime.engine.num_inflight() == 0


class _BrokenGrammar:
    """A constraint stand-in whose mask computation always raises (an llguidance bug, say)."""

    def allowed(self, vocab_size: int, device: Any) -> Any:
        raise RuntimeError("grammar broke")

    def advance(self, token_id: int) -> None:
        raise AssertionError("never reached: the mask already failed")

    error = None


async def test_a_failing_grammar_is_that_requests_clean_error_only(
        app_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async with app_factory("chat") as (client, app):
        engine = app.state.runtime.engine
        real_compile = engine._grammars.compile
        monkeypatch.setattr(engine._grammars, "compile", lambda kind, schema: _BrokenGrammar() if (
            schema or {}).get("title") == "explode" else real_compile(kind, schema))
        broken = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16, "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"title": "explode", "type": "object"}}}}
        plain = {"prompt": "the operator", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        alone = (await client.post("/v1/completions", json=plain)).json()["choices"][0]["text"]

        bad, good, streamed = await asyncio.gather(
            client.post("/v1/chat/completions", json=broken),
            client.post("/v1/completions", json=plain),
            client.post("/v1/chat/completions", json={**broken, "stream": True}),
        )
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone, good.text
        assert bad.status_code == 503, bad.text  # an error, not a 500 and not a hang
        assert "response_format constraint failed" in bad.json()["error"]["message"]
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]"
        assert "response_format constraint failed" in json.loads(events[-2])["error"]["message"], events
        assert engine.healthy and engine.num_inflight() == 0
        after = await client.post("/v1/completions", json=plain)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == alone
