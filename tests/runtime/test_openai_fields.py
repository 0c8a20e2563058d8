"""Every OpenAI request field is honoured or refused (400 naming it), `null` means "default", unknown fields
are ignored with a debug line. The mapping onto the engine's SamplingParams is checked with a stand-in engine
that honours the whole contract (tests/support/engine.py); n, usage and nulls also run on the real engine."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from gptd_runtime.engine import ResponseFormat
from transformers import AutoTokenizer

from tests.support.engine import ContractEngine, logprob_ok
from tests.support.runtime import metric, sse_events

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def contract(models: Any) -> ContractEngine:
    return ContractEngine(AutoTokenizer.from_pretrained(models["chat"]))


def _err(r: Any) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    return r.json()["error"]


async def test_nulls_mean_defaults_on_the_real_engine(app_factory: Any) -> None:
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
                               "frequency_penalty", "logit_bias", "user", "stream_options", "ignore_eos")}
    async with app_factory("chat") as (client, _app):
        r = await client.post("/v1/completions", json={
            "prompt": "hi", "max_tokens": 3, **nulls, "echo": None, "logprobs": None, "best_of": None,
            "suffix": None})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": None, "max_completion_tokens": 3, **nulls, "logprobs": None,
            "top_logprobs": None, "response_format": None, "tools": None, "tool_choice": None, "metadata": None,
            "store": None, "service_tier": None, "modalities": None, "parallel_tool_calls": None})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3


COMPLETION_REFUSED = [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": " the end"}, "suffix"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
]
CHAT_REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages.0.tool_calls"),
]


@pytest.mark.parametrize(("extra", "field"), COMPLETION_REFUSED)
async def test_completion_refuses_what_it_cannot_honour(
    app_factory: Any, contract: ContractEngine, extra: dict[str, Any], field: str
) -> None:
    async with app_factory("chat", engine=contract) as (client, _app):
        err = _err(await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra}))
        assert err["param"] == field
        assert f"{field} is not supported" in err["message"]
        assert contract.submitted == []  # refused before any engine work


@pytest.mark.parametrize(("extra", "field"), CHAT_REFUSED)
async def test_chat_refuses_what_it_cannot_honour(
    app_factory: Any, contract: ContractEngine, extra: dict[str, Any], field: str
) -> None:
    async with app_factory("chat", engine=contract) as (client, _app):
        err = _err(await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra}))
        assert err["param"] == field
        assert f"{field} is not supported" in err["message"]
        assert contract.submitted == []


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_stop_capped_at_four(app_factory: Any, contract: ContractEngine, route: str) -> None:
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}
    async with app_factory("chat", engine=contract) as (client, _app):
        err = _err(await client.post(route, json={**body, "max_tokens": 2, "stop": ["a", "b", "c", "d", "e"]}))
        assert err["param"] == "stop" and "at most 4" in err["message"]
        ok = await client.post(route, json={**body, "max_tokens": 2, "stop": ["a", "b", "c", "d"]})
        assert ok.status_code == 200
        assert contract.submitted[-1].params.stop == ("a", "b", "c", "d")


async def test_unknown_fields_ignored_with_a_debug_line(
    app_factory: Any, contract: ContractEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gptd_runtime.api")
    async with app_factory("chat", engine=contract) as (client, _app):
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 2, "brand_new_field": "secret-value-42", "another_one": 1})
        assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.DEBUG]
    assert any("brand_new_field" in line and "another_one" in line for line in lines), lines
    assert "secret-value-42" not in caplog.text  # names only, never values


@pytest.mark.parametrize(("route", "extra", "field"), [
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/completions", {"seed": 1}, "seed"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
async def test_fields_the_engine_does_not_declare_are_refused(
    app_factory: Any, contract: ContractEngine, route: str, extra: dict[str, Any], field: str
) -> None:
    """An engine honours only the optional features it lists in `sampling_features`; anything else is a 400,
    never a 200 with the field silently dropped."""
    contract.sampling_features = frozenset()
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}
    async with app_factory("chat", engine=contract) as (client, _app):
        err = _err(await client.post(route, json={**body, "max_tokens": 2, **extra}))
        assert err["param"] == field and "not supported" in err["message"]
        assert contract.submitted == []
        # Neutral values ask for nothing and pass.
        ok = await client.post(route, json={**body, "max_tokens": 2, "presence_penalty": 0, "logprobs": None})
        assert ok.status_code == 200, ok.text


async def test_sampling_fields_reach_the_engine(app_factory: Any, contract: ContractEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with app_factory("chat", engine=contract) as (client, _app):
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_completion_tokens": 4, "temperature": 0.3, "top_p": 0.9, "seed": 11,
            "presence_penalty": 0.5, "frequency_penalty": -1.0, "stop": "zz", "ignore_eos": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                       "strict": True}}})
        assert r.status_code == 200, r.text
        [sent] = contract.submitted
        p = sent.params
        assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (4, 0.3, 0.9, 11)
        assert (p.presence_penalty, p.frequency_penalty, p.stop, p.ignore_eos) == (0.5, -1.0, ("zz",), True)
        assert p.response_format == ResponseFormat("json_schema", schema)
        assert p.logprobs is None
        await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 1, "response_format": {"type": "json_object"}})
        assert contract.submitted[-1].params.response_format == ResponseFormat("json_object", None)
        await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 1, "response_format": {"type": "text"}})
        assert contract.submitted[-1].params.response_format is None
        err = _err(await client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 1, "response_format": {"type": "json_schema"}}))
        assert err["param"].startswith("response_format") and "schema" in err["message"]


async def test_n_choices_each_seeded_in_turn(app_factory: Any, contract: ContractEngine) -> None:
    async with app_factory("chat", engine=contract) as (client, _app):
        req = {"prompt": "hi", "max_tokens": 5, "n": 3, "seed": 7}
        first = (await client.post("/v1/completions", json=req)).json()
        assert [s.params.seed for s in contract.submitted] == [7, 8, 9]
        assert [c["index"] for c in first["choices"]] == [0, 1, 2]
        again = (await client.post("/v1/completions", json=req)).json()
        texts = [c["text"] for c in first["choices"]]
        assert texts == [c["text"] for c in again["choices"]]  # same seed, same texts
        assert len(set(texts)) == 3  # each choice is its own sequence
        prompt_tokens = len(contract.submitted[0].prompt_ids)
        assert first["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 15,
                                  "total_tokens": prompt_tokens + 15}


async def test_completion_logprobs_shape(app_factory: Any, contract: ContractEngine) -> None:
    async with app_factory("chat", engine=contract) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "logprobs": 3})
        assert r.status_code == 200, r.text
        assert contract.submitted[0].params.logprobs == 3
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == choice["text"]
        assert all(logprob_ok(x) for x in lp["token_logprobs"])
        assert all(len(top) == 3 and all(logprob_ok(v) for v in top.values()) for top in lp["top_logprobs"])
        # text_offset indexes into the choice's text.
        assert [choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True)] \
            == [True] * 6
        assert lp["text_offset"][0] == 0
        err = _err(await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": 6}))
        assert err["param"] == "logprobs"


async def test_completion_logprobs_streamed(app_factory: Any, contract: ContractEngine) -> None:
    async with app_factory("chat", engine=contract) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "logprobs": 0,
                                                        "stream": True})
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        choices = [c["choices"][0] for c in chunks]
        tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
        offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
        text = "".join(c["text"] for c in choices)
        assert len(tokens) == 5 and "".join(tokens) == text
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(5)]  # continues across chunks
        assert all(top == {} for c in choices for top in c["logprobs"]["top_logprobs"])  # logprobs: 0


async def test_chat_logprobs_shape_with_the_openai_client(app_factory: Any, contract: ContractEngine) -> None:
    from openai import AsyncOpenAI, BadRequestError

    async with app_factory("chat", engine=contract, served_model_name="m") as (http, _app):
        client = AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
        chat = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, logprobs=True,
                                                    top_logprobs=2)
        assert contract.submitted[0].params.logprobs == 2
        content = chat.choices[0].logprobs.content
        assert len(content) == 4 and "".join(t.token for t in content) == chat.choices[0].message.content
        for t in content:
            assert logprob_ok(t.logprob) and bytes(t.bytes).decode() == t.token
            assert len(t.top_logprobs) == 2 and all(logprob_ok(a.logprob) for a in t.top_logprobs)
        plain = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, logprobs=True)
        assert contract.submitted[-1].params.logprobs == 0
        assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
        stream = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=3, logprobs=True,
                                                      top_logprobs=1, stream=True)
        streamed = [t async for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
        assert len(streamed) == 3 and all(len(t.top_logprobs) == 1 for t in streamed)
        with pytest.raises(BadRequestError, match="top_logprobs"):
            await client.chat.completions.create(model="m", messages=CHAT, max_tokens=1, logprobs=True,
                                                 top_logprobs=21)


async def test_n_and_prompt_lists_on_the_real_engine(app_factory: Any, models: Any) -> None:
    tok = AutoTokenizer.from_pretrained(models["plain"])
    async with app_factory() as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": ["one", "two words"], "n": 2, "max_tokens": 4,
                                                        "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        prompt_tokens = len(tok("one").input_ids) + len(tok("two words").input_ids)  # once per prompt
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 16,
                                 "total_tokens": prompt_tokens + 16}
        r = await client.post("/v1/chat/completions", json={
            "messages": CHAT, "n": 2, "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}})
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
        for c in chunks[:-1]:
            [choice] = c["choices"]
            by_index[choice["index"]].append(choice)
        for choices in by_index.values():
            assert choices[0]["delta"]["role"] == "assistant"  # each choice opens with the role
            assert choices[-1]["finish_reason"] == "length"
            assert all(c["finish_reason"] is None for c in choices[:-1])
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        assert chunks[-1]["choices"] == []


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_streamed_chunks_carry_usage_null_until_the_usage_chunk(
    app_factory: Any, contract: ContractEngine, route: str
) -> None:
    """With stream_options.include_usage, OpenAI puts "usage": null on every chunk before the final usage chunk;
    without it, chunks have no usage key at all."""
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}
    req = {**body, "max_tokens": 3, "n": 2, "stream": True}
    async with app_factory("chat", engine=contract) as (client, _app):
        r = await client.post(route, json={**req, "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        *chunks, last = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 6 and all(c["choices"] for c in chunks)  # 2 choices x 3 tokens (chat: + roles)
        assert all("usage" in c and c["usage"] is None for c in chunks)
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
        plain = [json.loads(e) for e in sse_events((await client.post(route, json=req)).text)[:-1]]
        assert plain and all("usage" not in c for c in plain)


async def test_get_model_by_id(app_factory: Any, contract: ContractEngine) -> None:
    from openai import AsyncOpenAI, NotFoundError

    async with app_factory("chat", engine=contract, served_model_name="org/tiny") as (http, _app):
        client = AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
        model = await client.models.retrieve("org/tiny")
        assert (model.id, model.object, model.owned_by) == ("org/tiny", "model", "gptd")
        with pytest.raises(NotFoundError, match="does not exist"):
            await client.models.retrieve("other")
        with pytest.raises(NotFoundError):
            await client.models.retrieve("yet-another")
        text = (await http.get("/metrics")).text
        # Ids are never label values (a scanner would explode the series count): one bounded route label.
        assert metric(text, 'gptd:http_requests_total{route="/v1/models/{id}",status="404"}') == 2
        assert metric(text, 'gptd:http_requests_total{route="/v1/models/{id}",status="200"}') == 1


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/models/nope", None),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": CHAT, "max_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": "nope", "input": "x"}),
])
async def test_an_unknown_model_is_openais_model_not_found(
    app_factory: Any, contract: ContractEngine, method: str, path: str, body: dict[str, Any] | None
) -> None:
    async with app_factory("chat", engine=contract, served_model_name="org/tiny") as (client, _app):
        r = await client.request(method, path, json=body)
        assert r.status_code == 404, r.text
        assert r.json() == {"error": {
            "message": "The model `nope` does not exist or you do not have access to it; this server serves "
                       "`org/tiny`",
            "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
        assert contract.submitted == []
        # An unknown route is typed as OpenAI types it too.
        unknown = (await client.get("/v1/no-such-route")).json()["error"]
        assert unknown["type"] == "invalid_request_error"


async def test_refusals_through_the_openai_client(app_factory: Any, contract: ContractEngine) -> None:
    from openai import AsyncOpenAI, BadRequestError

    async with app_factory("chat", engine=contract, served_model_name="m") as (http, _app):
        client = AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        for kwargs, field in (({"tools": tools}, "tools"), ({"logit_bias": {"3": 1}}, "logit_bias"),
                              ({"reasoning_effort": "low"}, "reasoning_effort"),
                              ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
            with pytest.raises(BadRequestError) as caught:
                await client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, **kwargs)
            assert caught.value.body["param"] == field  # type: ignore[index]
        with pytest.raises(BadRequestError, match="best_of"):
            await client.completions.create(model="m", prompt="x", max_tokens=2, best_of=2)
        assert contract.submitted == []


async def test_echo_and_token_prompts(app_factory: Any, contract: ContractEngine) -> None:
    tok = contract.tokenizer
    async with app_factory("chat", engine=contract) as (client, _app):
        ids = tok("Readability counts").input_ids
        r = await client.post("/v1/completions", json={"prompt": [ids, tok("Flat").input_ids], "max_tokens": 2,
                                                        "echo": True})
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in r.json()["choices"]]
        assert texts[0].startswith("Readability counts") and texts[1].startswith("Flat")
        assert [s.prompt_ids for s in contract.submitted] == [ids, tok("Flat").input_ids]
        bad = await client.post("/v1/completions", json={"prompt": [[1, 10**9]], "max_tokens": 1})
        assert _err(bad)["param"] == "prompt"
        empty = await client.post("/v1/completions", json={"prompt": [], "max_tokens": 1})
        assert _err(empty)["param"] == "prompt"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_top_p_zero_is_greedy_and_outside_0_1_a_400(app_factory: Any, route: str) -> None:
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}

    def text(r: Any) -> str:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if route == "/v1/completions" else choice["message"]["content"]

    async with app_factory("chat") as (client, _app):  # the real engine
        req = {**body, "max_tokens": 8, "ignore_eos": True}
        greedy = text(await client.post(route, json={**req, "temperature": 0}))
        assert text(await client.post(route, json={**req, "top_p": 0, "temperature": 1, "seed": 3})) == greedy
        for bad in (-0.1, 1.01):
            assert _err(await client.post(route, json={**req, "top_p": bad}))["param"] == "top_p"


async def test_a_null_or_omitted_prompt_is_the_text_boundary_token(app_factory: Any) -> None:
    """OpenAI's `prompt` is nullable, defaulting to "<|endoftext|>": one token to condition on (real engine)."""
    async with app_factory() as (client, _app):
        for prompt in ({"prompt": None}, {}):
            r = await client.post("/v1/completions", json={**prompt, "max_tokens": 4, "temperature": 0,
                                                            "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == 1 and body["usage"]["completion_tokens"] == 4
            assert body["choices"][0]["text"]


class _Boundaries:
    """A tokenizer with other beginning/end-of-text tokens (the demo model's are one token)."""

    def __init__(self, tok: Any, bos: int | None, eos: int | None, endoftext: bool = False):
        self._tok, self.bos_token_id, self.eos_token_id, self._endoftext = tok, bos, eos, endoftext

    def convert_tokens_to_ids(self, token: str) -> int | None:  # with or without a "<|endoftext|>" token
        if token == "<|endoftext|>" and not self._endoftext:
            return self._tok.unk_token_id  # what a tokenizer answers for a token it lacks
        return self._tok.convert_tokens_to_ids(token)

    def convert_ids_to_tokens(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        token = self._tok.convert_ids_to_tokens(token_id)
        return "<unk>" if token == "<|endoftext|>" and not self._endoftext else token

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)


@pytest.mark.parametrize(("endoftext", "bos", "eos", "expected"), [
    (True, 5, 7, "endoftext"), (False, 5, 7, [5]), (False, None, 7, [7]), (False, None, None, None)])
@pytest.mark.parametrize("prompt", [None, ""])
async def test_a_null_or_empty_prompt_is_endoftext_else_bos_else_eos_else_a_400(
    app_factory: Any, contract: ContractEngine, endoftext: bool, bos: int | None, eos: int | None,
    expected: list[int] | str | None, prompt: str | None,
) -> None:
    tok = _Boundaries(contract.tokenizer, bos, eos, endoftext)
    if expected == "endoftext":
        expected = [contract.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        assert expected[0] not in (bos, eos)  # the vocabulary's own token, not a stand-in
    engine = ContractEngine(tok)
    async with app_factory("chat", engine=engine) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        if expected is None:
            assert _err(r)["param"] == "prompt"
            assert engine.submitted == []
        else:
            assert r.status_code == 200, r.text
            assert [s.prompt_ids for s in engine.submitted] == [expected]
            assert r.json()["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("seed", [2**63, -2**63 - 1, 2**70])
async def test_a_seed_outside_int64_is_a_400_naming_seed(
    app_factory: Any, contract: ContractEngine, route: str, seed: int
) -> None:
    """A seed past int64 would otherwise be masked to 64 bits and silently alias another (2**70 would be 0)."""
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}
    async with app_factory("chat", engine=contract) as (client, _app):
        err = _err(await client.post(route, json={**body, "max_tokens": 2, "seed": seed}))
        assert err["param"] == "seed", err
        assert contract.submitted == []
        for edge in (2**63 - 1, -2**63):  # the int64 range itself is accepted
            ok = await client.post(route, json={**body, "max_tokens": 2, "seed": edge})
            assert ok.status_code == 200, ok.text
            assert contract.submitted[-1].params.seed == edge
