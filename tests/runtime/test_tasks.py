"""Classification and NER over the Open Inference Protocol v2."""

from __future__ import annotations

import json
from typing import Any

import pytest


def _infer_body(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


async def test_text_classification(app_factory: Any, models: Any) -> None:
    async with app_factory("cls") as (client, _app):
        meta = await client.get("/v2/models/cls")
        assert meta.status_code == 200
        assert {o["name"] for o in meta.json()["outputs"]} == {"label", "score"}
        assert (await client.get("/v2/models/cls/ready")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        r = await client.post("/v2/models/cls/infer", json=_infer_body(["I love it", "terrible, awful"]))
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["label"]["shape"] == [2]
        assert set(out["label"]["data"]) <= {"negative", "positive"}
        assert all(0.5 <= s <= 1.0 for s in out["score"]["data"])  # argmax of 2 classes
        assert r.json()["model_name"] == "cls"


async def test_token_classification(app_factory: Any) -> None:
    async with app_factory("ner") as (client, _app):
        text = "Alice lives in Paris and works with Bob in Berlin"
        r = await client.post("/v2/models/ner/infer", json=_infer_body([text]))
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        assert out["name"] == "entities" and out["shape"] == [1]
        entities = json.loads(out["data"][0])
        assert entities, "random weights still label some tokens as entities"
        for ent in entities:
            assert ent["entity_group"] in {"PER", "LOC"}
            assert text[ent["start"]:ent["end"]] == ent["word"] == ent["word"].strip()
            assert 0 < ent["score"] <= 1


async def test_v2_errors(app_factory: Any) -> None:
    async with app_factory("cls", max_input_tokens=8) as (client, _app):
        assert (await client.post("/v2/models/nope/infer", json=_infer_body(["x"]))).status_code == 404
        wrong_type = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        r = await client.post("/v2/models/cls/infer", json=wrong_type)
        assert r.status_code == 400 and "BYTES" in r.json()["error"]
        r = await client.post("/v2/models/cls/infer", json=_infer_body(["word " * 40]))
        assert r.status_code == 400
        r = await client.post("/v2/models/cls/infer", json={"inputs": "x"})
        assert r.status_code == 400 and "inputs" in r.json()["error"]
        # An OpenAI route on a classifier says where to go instead.
        r = await client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and "/v2/models/cls/infer" in r.json()["error"]["message"]


@pytest.mark.parametrize("model", ["cls", "ner"])
@pytest.mark.parametrize(("tensor", "words"), [
    ({"shape": [2], "data": ["fine", ""]}, "data[1] is an empty string"),
    ({"shape": [1], "data": [""]}, "empty string"),
    ({"shape": [3], "data": ["a", "b"]}, "holds 3 item(s), data has 2"),
    ({"shape": [1], "data": ["a", "b"]}, "holds 1 item(s)"),
    ({"shape": [2, 2], "data": [["a", "b"], ["c"]]}, "nested differently"),
    ({"shape": [0], "data": []}, "at least one"),
    ({"shape": [1], "data": [3]}, "must be a string"),
])
async def test_v2_input_must_match_its_shape_and_hold_text(
    app_factory: Any, model: str, tensor: dict[str, Any], words: str
) -> None:
    async with app_factory(model) as (client, app):
        r = await client.post(f"/v2/models/{model}/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", **tensor}]})
        assert r.status_code == 400, r.text
        assert words in r.json()["error"] and "'text'" in r.json()["error"]
        assert app.state.runtime.engine.healthy


async def test_v2_output_shape_follows_the_input(app_factory: Any) -> None:
    async with app_factory("cls") as (client, _app):
        body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["good"], ["bad"]]}]}
        r = await client.post("/v2/models/cls/infer", json=body)
        assert r.status_code == 200, r.text
        assert [o["shape"] for o in r.json()["outputs"]] == [[2, 1], [2, 1]]
        assert len(r.json()["outputs"][0]["data"]) == 2


async def test_v2_on_generation_model(app_factory: Any) -> None:
    async with app_factory("plain") as (client, _app):
        r = await client.post("/v2/models/plain/infer", json=_infer_body(["x"]))
        assert r.status_code == 400
