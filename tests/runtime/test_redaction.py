"""Opt-in redaction: each rule's check digits, precision/recall on the labelled corpus, streaming with values
split across chunks, and the serving path (prompt masked before the engine, output before the client)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from gptd_runtime.__main__ import main
from gptd_runtime.config import Settings, load_settings
from gptd_runtime.redaction import ENTITIES, Redactor, cn_resident_id_ok, iban_ok, luhn_ok
from pydantic import ValidationError
from transformers import AutoTokenizer

from tests.support.engine import ScriptedEngine
from tests.support.redaction import load_corpus, score
from tests.support.runtime import metric, sse_events

EMAIL, CARD = "alice.liddell@example.org", "4111 1111 1111 1111"


def test_check_digits() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82 WEST 1234 5698 7654 33") and not iban_ok("DE8937040044053201300")  # check / length
    assert cn_resident_id_ok("11010519491231002X") and cn_resident_id_ok("11010519491231002x")
    assert not cn_resident_id_ok("110105194912310021") and not cn_resident_id_ok("11010519491331002X")


def test_corpus_precision_and_recall() -> None:
    corpus = load_corpus()
    assert len(corpus) >= 200
    labelled = {e for _, labels in corpus for e, _ in labels}
    assert labelled == set(ENTITIES)
    assert sum(1 for _, labels in corpus if not labels) >= 80  # near-misses
    scores, misses = score(corpus)
    for entity, s in scores.items():
        assert s.tp >= 20, entity
        # the figures docs/security.md reports (benchmarks/redaction_eval.py prints them)
        assert s.precision >= 0.95 and s.recall >= 0.9, (entity, s, misses)


def test_only_the_chosen_entities() -> None:
    text = f"mail {EMAIL}, card {CARD}, ip 10.0.0.1"
    assert Redactor(["email"]).redact(text) == f"mail [EMAIL], card {CARD}, ip 10.0.0.1"
    assert Redactor(["creditCard", "ipAddress"]).redact(text) == f"mail {EMAIL}, card [CREDIT_CARD], ip [IP_ADDRESS]"


def _chunks(text: str, rng: random.Random, max_len: int) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_len)
        out.append(text[i:i + n])
        i += n
    return out


def test_streaming_matches_whole_text_however_it_is_split() -> None:
    r = Redactor(ENTITIES)
    rng = random.Random(7)
    corpus = [t for t, _ in load_corpus()]
    # also long outputs: several values in one stream, a whitespace-free run longer than the hold-back
    corpus += [" ".join(corpus[i:i + 12]) for i in range(0, len(corpus), 12)]
    corpus.append("x" * 600 + f" then {EMAIL} and " + "y" * 300 + CARD)
    for text in corpus:
        whole = r.redact(text)
        for max_len in (1, 3, 17):
            s = r.stream()
            pieces = [s.feed(c) for c in _chunks(text, rng, max_len)]
            assert "".join(pieces) + s.flush() == whole, (text, max_len)


def test_stream_holds_back_only_a_bounded_tail() -> None:
    s = Redactor(ENTITIES).stream()
    sent = "".join(s.feed(w + " ") for w in ["word"] * 200)
    assert len(sent) >= 1000 - 100  # at most SPACED_MAX (96) characters held back


def test_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings().redact == ()
    assert load_settings(env={"GPTD_REDACT": "email, creditCard,email"}).redact == ("email", "creditCard")
    assert load_settings({"redact": "iban"}, env={"GPTD_REDACT": "email"}).redact == ("iban",)
    with pytest.raises(ValidationError, match="unknown entity passport"):
        load_settings(env={"GPTD_REDACT": "email,passport"})
    assert main(["serve", "--demo", "--redact", "emails"]) == 2
    err = capsys.readouterr().err
    assert "redact (GPTD_REDACT)" in err and "unknown entity emails" in err


@pytest.fixture
def scripted(models: Any) -> ScriptedEngine:
    # the output splits the e-mail address and the card number across deltas
    return ScriptedEngine(AutoTokenizer.from_pretrained(models["chat"]),
                          script=["Sure: ali", "ce.liddell@exa", "mple.org, card 4111 11", "11 1111 ", "1111 ok"])


PROMPT = f"My mail is {EMAIL} and my card {CARD}."


async def test_prompt_masked_before_the_engine_and_output_before_the_client(
    app_factory: Any, scripted: ScriptedEngine
) -> None:
    async with app_factory("chat", engine=scripted, redact=("email", "creditCard")) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "echo": True})
        assert r.status_code == 200
        seen = scripted.tokenizer.decode(scripted.submitted[-1].prompt_ids)
        assert seen == "My mail is [EMAIL] and my card [CREDIT_CARD]."
        assert r.json()["choices"][0]["text"] == seen + "Sure: [EMAIL], card [CREDIT_CARD] ok"
        # token-id prompts too
        ids = scripted.tokenizer(PROMPT).input_ids
        assert (await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5})).status_code == 200
        assert scripted.tokenizer.decode(scripted.submitted[-1].prompt_ids) == seen
        for stream_body in (
            {"prompt": PROMPT, "max_tokens": 5, "stream": True},
        ):
            r = await client.post("/v1/completions", json=stream_body)
            texts = [json.loads(e)["choices"][0]["text"] for e in sse_events(r.text)[:-1]]
            assert "".join(texts) == "Sure: [EMAIL], card [CREDIT_CARD] ok"
            assert not any("@" in t or "1111" in t for t in texts)
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True})
        deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(r.text)[:-1]]
        assert "".join(deltas) == "Sure: [EMAIL], card [CREDIT_CARD] ok"
        chat_prompt = scripted.tokenizer.decode(scripted.submitted[-1].prompt_ids)
        assert "[EMAIL]" in chat_prompt and EMAIL not in chat_prompt and "4111" not in chat_prompt
        refused = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        text = (await client.get("/metrics")).text
    # 4 requests x (prompt + output) with one e-mail and one card each; the echo is not counted twice
    assert metric(text, 'gptd:redactions_total{entity="email"}') == 8
    assert metric(text, 'gptd:redactions_total{entity="creditCard"}') == 8


async def test_without_redact_nothing_is_masked(app_factory: Any, scripted: ScriptedEngine) -> None:
    async with app_factory("chat", engine=scripted) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
        assert r.json()["choices"][0]["text"] == "Sure: alice.liddell@example.org, card 4111 1111 1111 1111 ok"
        assert scripted.tokenizer.decode(scripted.submitted[-1].prompt_ids) == PROMPT


MASKED = "My mail is [EMAIL] and my card [CREDIT_CARD]."


async def test_embeddings_and_classification_inputs_are_masked(app_factory: Any) -> None:
    """The model sees the masked text: same vectors / scores as for the masked text itself."""
    async with app_factory("plain", redact=("email", "creditCard")) as (client, _app):
        raw = (await client.post("/v1/embeddings", json={"input": PROMPT})).json()
        masked = (await client.post("/v1/embeddings", json={"input": MASKED})).json()
        assert raw["data"][0]["embedding"] == masked["data"][0]["embedding"]
        assert raw["usage"] == masked["usage"]
        assert metric((await client.get("/metrics")).text, 'gptd:redactions_total{entity="email"}') == 1

    def infer(text: str) -> dict[str, Any]:
        return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}

    async with app_factory("cls", redact=("email", "creditCard")) as (client, _app):
        raw = (await client.post("/v2/models/cls/infer", json=infer(PROMPT))).json()
        masked = (await client.post("/v2/models/cls/infer", json=infer(MASKED))).json()
        assert raw["outputs"] == masked["outputs"]
    async with app_factory("cls") as (client, _app):  # control: without --redact the scores differ
        plain = (await client.post("/v2/models/cls/infer", json=infer(PROMPT))).json()
        assert plain["outputs"] != masked["outputs"]


def test_documented_figures_are_the_measured_ones() -> None:
    """docs/security.md's precision/recall table is what the corpus gives today (regenerate it with
    benchmarks/redaction_eval.py when a rule or the corpus changes)."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+ \| \d+ \| \d+ \| \d+ \| [\d.]+ \| [\d.]+) \|$", doc, re.M))
    scores, _ = score(load_corpus())
    for entity, s in scores.items():
        assert rows.get(entity) == (f"{s.tp + s.fn} | {s.tp} | {s.fp} | {s.fn} | {s.precision:.3f} | "
                                    f"{s.recall:.3f}"), entity


async def test_held_tail_is_sent_when_a_stream_ends_without_a_reason(app_factory: Any,
                                                                     scripted: ScriptedEngine) -> None:
    scripted.final_reason = False
    async with app_factory("chat", engine=scripted, redact=("email", "creditCard")) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
        texts = [json.loads(e)["choices"][0]["text"] for e in sse_events(r.text)[:-1]]
        assert "".join(texts) == "Sure: [EMAIL], card [CREDIT_CARD] ok"
