"""POST /v1/embeddings on the real tiny models: OpenAI's shape (official client, float and base64), the
documented pooling (mean of the last hidden state, L2-normalised), determinism, and refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer


def _reference(model_dir: Any, cls: Any, text: str) -> list[float]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = cls.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist()


@pytest.mark.parametrize(("model", "cls"), [("plain", AutoModelForCausalLM), ("ner", AutoModelForTokenClassification)])
async def test_embeddings_shape_pooling_and_determinism(app_factory: Any, models: Any, model: str, cls: Any) -> None:
    from openai import AsyncOpenAI

    texts = ["Alice lives in Paris", "a second, longer input about Berlin and Bob", "x"]
    async with app_factory(model, served_model_name="m") as (http, _app):
        r = await http.post("/v1/embeddings", json={"model": "m", "input": texts, "encoding_format": "float"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "m"
        assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
        vectors = [d["embedding"] for d in body["data"]]
        width = AutoModelForCausalLM.from_pretrained(models["plain"]).config.hidden_size
        assert all(len(v) == width for v in vectors)
        assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
        tok = AutoTokenizer.from_pretrained(models[model])
        n_tokens = sum(len(tok(t).input_ids) for t in texts)
        assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        # The documented pooling, computed independently with transformers.
        assert vectors[0] == pytest.approx(_reference(models[model], cls, texts[0]), abs=1e-5)
        # Independent of the other inputs in the request (batched: up to floating-point summation order).
        alone = (await http.post("/v1/embeddings", json={"input": texts[1]})).json()["data"][0]["embedding"]
        assert alone == pytest.approx(vectors[1], abs=1e-6)
        # The official client asks for base64 by default and decodes it: same vectors (float32).
        client = AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
        decoded = await client.embeddings.create(model="m", input=texts)
        for got, want in zip(decoded.data, vectors, strict=True):
            assert got.embedding == pytest.approx(want, abs=1e-6)
        ids = tok(texts[2]).input_ids
        by_ids = (await http.post("/v1/embeddings", json={"input": [ids]})).json()["data"][0]["embedding"]
        assert by_ids == pytest.approx(vectors[2], abs=1e-6)
        same_width = await http.post("/v1/embeddings", json={"input": "x", "dimensions": width})
        assert same_width.status_code == 200
        nulls = await http.post("/v1/embeddings", json={"input": "x", "model": None, "encoding_format": None,
                                                        "dimensions": None, "user": None})
        assert nulls.status_code == 200
        assert nulls.json()["data"][0]["embedding"] == pytest.approx(vectors[2], abs=1e-6)


@pytest.mark.parametrize(("payload", "param", "words"), [
    ({"input": ""}, "input.0", "empty"),
    ({"input": ["ok", ""]}, "input.1", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": [[1, 999999]]}, "input.0", "vocabulary"),
    ({"input": "x", "dimensions": 8}, "dimensions", "not supported"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "word " * 40}, "input.0", "limit"),
])
async def test_embeddings_bad_input(app_factory: Any, payload: dict[str, Any], param: str, words: str) -> None:
    async with app_factory(max_input_tokens=16) as (client, _app):
        r = await client.post("/v1/embeddings", json=payload)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"]


async def test_embeddings_wrong_model_and_not_ready(app_factory: Any) -> None:
    async with app_factory() as (client, app):
        r = await client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        from gptd_runtime.app import drain

        await drain(app.state.runtime, timeout=0)
        r = await client.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_padded_batches_group_by_length_within_budgets() -> None:
    from gptd_runtime.embeddings import padded_batches

    lengths = [5, 1, 9, 3, 3, 40]
    batches = padded_batches(lengths, max_tokens=20, max_inputs=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == [[1, 3, 4], [0, 2], [5]]  # shortest first; 3 x 9 > 20; 40 alone despite the budget
    assert all(len(b) * max(lengths[i] for i in b) <= 20 for b in batches if len(b) > 1)


@pytest.mark.parametrize("model", ["plain", "ner"])
async def test_batched_embeddings_equal_one_at_a_time(models: Any, model: str, monkeypatch: Any) -> None:
    """One request's inputs run as padded batches (fewer forward passes than inputs); each vector equals the one
    its input gets alone, in the request's order; the same request gives the same vectors again."""
    from gptd_runtime import embeddings
    from gptd_runtime.config import Settings
    from gptd_runtime.loading import load_model

    task = {"ner": "token-classification"}.get(model, "text-generation")
    embedder = embeddings.Embedder(load_model(Settings(model=str(models[model]), task=task), models[model]))
    try:
        texts = ["x", "a much longer input about Berlin, Paris and everything in between", "Alice", "Bob is",
                 "the same words again and again and again", "x"]
        inputs = [embedder.encode(t) for t in texts]
        alone = [(await embedder.embed([ids]))[0] for ids in inputs]
        passes: list[int] = []
        forward = embedder._model.forward
        monkeypatch.setattr(embedder._model, "forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
        monkeypatch.setattr(embeddings, "BATCH_TOKENS", 40)  # several batches, some padded
        batched = await embedder.embed(inputs)
        assert 1 < len(passes) < len(inputs)
        for got, want in zip(batched, alone, strict=True):
            assert got == pytest.approx(want, abs=1e-5)
        assert await embedder.embed(inputs) == batched
    finally:
        embedder.stop()


@pytest.mark.parametrize(("model", "cls"), [("plain", AutoModelForCausalLM), ("ner", AutoModelForTokenClassification)])
async def test_embeddings_never_run_the_task_head(models: Any, model: str, cls: Any) -> None:
    """Only the base model runs (an LM head would make [batch tokens, vocab] logits per pass); the vectors are
    still the documented pooling of the full model's last hidden state."""
    from gptd_runtime import embeddings
    from gptd_runtime.config import Settings
    from gptd_runtime.loading import load_model

    task = {"ner": "token-classification"}.get(model, "text-generation")
    embedder = embeddings.Embedder(load_model(Settings(model=str(models[model]), task=task), models[model]))
    try:
        inside = {id(m) for m in embedder._model.modules()}
        heads = [m for m in embedder._view.modules() if id(m) not in inside and m is not embedder._view]
        assert heads, "the view has a task head outside the base model"
        called: list[str] = []
        for m in heads:
            m.register_forward_hook(lambda mod, _i, _o: called.append(type(mod).__name__))
        base_calls: list[int] = []
        embedder._model.register_forward_hook(lambda *_: base_calls.append(1))
        text = "Alice lives in Paris"
        (vector,) = await embedder.embed([embedder.encode(text)])
        assert called == [] and base_calls == [1]
        assert vector == pytest.approx(_reference(models[model], cls, text), abs=1e-5)
    finally:
        embedder.stop()
