"""NER aggregation (gptd_runtime.ner): the same entities as transformers' pipeline with
aggregation_strategy="simple" on the tiny model, minus its byte-level artefacts (leading spaces, entities
overlapping inside one CJK character or emoji), over the v2 route."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gptd_runtime.ner import aggregate_simple

LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def _p(label: int, score: float = 0.9) -> list[float]:
    rest = (1 - score) / 4
    return [score if i == label else rest for i in range(5)]


def test_simple_grouping_rules() -> None:
    text = "Ann Lee in New York"
    offsets = [(0, 3), (3, 7), (7, 10), (10, 14), (14, 19)]  # byte-level style: offsets carry the space
    probs = [_p(1), _p(2, 0.7), _p(0), _p(3), _p(4, 0.5)]
    assert aggregate_simple(text, offsets, probs, LABELS) == [
        {"entity_group": "PER", "score": pytest.approx(0.8), "word": "Ann Lee", "start": 0, "end": 7},
        {"entity_group": "LOC", "score": pytest.approx(0.7), "word": "New York", "start": 11, "end": 19},
    ]
    # A B- tag starts a new entity even right after one of the same type; a bare I- continues it.
    probs = [_p(1), _p(1), _p(0), _p(4), _p(4)]
    assert [(e["word"], e["entity_group"]) for e in aggregate_simple(text, offsets, probs, LABELS)] == [
        ("Ann", "PER"), ("Lee", "PER"), ("New York", "LOC")]


def test_bytes_of_one_character_form_one_unit() -> None:
    text = "東 😀"
    # Three byte tokens for 東 (labelled differently), a whitespace-only token, four byte tokens for the emoji.
    offsets = [(0, 1)] * 3 + [(1, 2)] + [(2, 3)] * 4
    probs = [_p(1, 0.9), _p(3, 0.5), _p(1, 0.6), _p(3, 0.9), _p(4), _p(4), _p(4), _p(0, 0.3)]
    [a, b] = aggregate_simple(text, offsets, probs, LABELS)
    # 東: mean probabilities PER-B (0.9+0.125+0.6)/3 beat LOC-B (0.025+0.5+0.1)/3; the score is that mean.
    assert (a["entity_group"], a["word"], a["start"], a["end"]) == ("PER", "東", 0, 1)
    assert a["score"] == pytest.approx((0.9 + 0.125 + 0.6) / 3)
    # The space (B-LOC) and the emoji (mean: I-LOC) form one entity; its span and word exclude the space.
    assert (b["entity_group"], b["word"], b["start"], b["end"]) == ("LOC", "😀", 2, 3)
    assert b["score"] == pytest.approx((0.9 + (0.9 * 3 + 0.175) / 4) / 2)


def test_special_and_padding_tokens_are_skipped() -> None:
    text = "Bob"
    offsets = [(0, 0), (0, 3), (0, 0), (0, 0)]
    probs = [_p(3), _p(1), _p(3), _p(3)]
    out = aggregate_simple(text, offsets, probs, LABELS, skip=[True, False, True, True])
    assert [(e["entity_group"], e["word"]) for e in out] == [("PER", "Bob")]


def _infer(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


async def test_matches_the_transformers_pipeline(app_factory: Any, models: Any) -> None:
    from transformers import pipeline

    texts = ["Alice lives in Paris and works with Bob in Berlin", "Readability counts, said Tim Peters"]
    pipe = pipeline("token-classification", model=str(models["ner"]), aggregation_strategy="simple",
                    device="cpu")
    async with app_factory("ner") as (client, _app):
        r = await client.post("/v2/models/ner/infer", json=_infer(texts))
        assert r.status_code == 200, r.text
        got = [json.loads(d) for d in r.json()["outputs"][0]["data"]]
    for text, entities in zip(texts, got, strict=True):
        expected = []
        for e in pipe(text):
            if not e["word"].strip():
                continue  # the pipeline reports whitespace-only entities
            lead = len(e["word"]) - len(e["word"].lstrip())  # the pipeline keeps the leading space
            expected.append({"entity_group": e["entity_group"], "score": pytest.approx(float(e["score"]), abs=1e-5),
                             "word": text[e["start"] + lead:e["end"]], "start": e["start"] + lead, "end": e["end"]})
        assert entities == expected
        assert entities, "random weights label some tokens"


@pytest.mark.parametrize("text", ["東京に住む 😀 Alice 🇫🇷 x", "Bob 👩‍👩‍👧 在北京 und Zoë", "😀😀😀"])
async def test_cjk_and_emoji_entities_never_overlap(app_factory: Any, text: str) -> None:
    async with app_factory("ner") as (client, _app):
        r = await client.post("/v2/models/ner/infer", json=_infer([text]))
        assert r.status_code == 200, r.text
        entities = json.loads(r.json()["outputs"][0]["data"][0])
    assert entities
    end = 0
    for e in entities:
        assert e["start"] >= end, entities  # in order, no two over one span
        assert e["start"] < e["end"] and e["word"] == text[e["start"]:e["end"]]
        assert e["word"] == e["word"].strip() and "\ufffd" not in e["word"]
        end = e["end"]


@pytest.mark.parametrize("texts", [[], [""], ["fine", ""]])
async def test_classification_engine_refuses_empty_input(app_factory: Any, texts: list[str]) -> None:
    """The engine guards itself too (not only the route): an empty text used to fail inside torch
    ("cannot reshape tensor of 0 elements")."""
    from gptd_runtime.engine import InvalidParameterError

    async with app_factory("ner") as (_client, app):
        engine = app.state.runtime.engine
        with pytest.raises(InvalidParameterError, match="no t"):
            await engine.infer(texts)
        assert (await engine.infer(["still works"]))[0].label == ""
