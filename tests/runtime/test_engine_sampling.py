"""GenerationEngine honours the per-request sampling contract under continuous batching: seed (reproducible
whatever else is in the batch), logprobs (equal to a direct forward pass), presence/frequency penalties (the
exact OpenAI adjustment), response_format (output validates against the schema), and refuses what it cannot do
with InvalidParameterError naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from gptd_runtime import _cb_internals
from gptd_runtime.engine import (
    GenerationEngine,
    InvalidParameterError,
    ResponseFormat,
    SamplingParams,
)

from tests.support.engine import started_engine


@pytest.fixture
async def engine(models: dict[str, Path]) -> AsyncIterator[GenerationEngine]:
    # A small token budget per pass: long prompts are prefilled in chunks next to decoding requests, so "mixed
    # batch" really changes how the other rows are computed.
    async with started_engine(models["plain"], max_new_tokens=128, max_batch_size=8, max_batch_tokens=64) as eng:
        yield eng


def _ids(engine: GenerationEngine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


async def _run(engine: GenerationEngine, prompt: list[int], params: SamplingParams, stream: bool = False) -> Any:
    s = engine.submit(prompt, params, stream=stream)
    deltas = [d async for d in s]
    return s, deltas


async def test_seed_reproducible_alone_and_in_a_mixed_batch(engine: GenerationEngine) -> None:
    prompt = _ids(engine, "The operator reconciles")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone_text, _ = await engine.submit(prompt, params).collect()

    others = [
        (_ids(engine, "a long prompt " * 20), SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)),
        (_ids(engine, "greedy"), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)),
        (_ids(engine, "seeded differently"), SamplingParams(max_tokens=30, temperature=1.3, seed=7, ignore_eos=True)),
        (_ids(engine, "penalised"), SamplingParams(max_tokens=30, frequency_penalty=1.0, ignore_eos=True)),
    ]
    streams = [engine.submit(p, sp) for p, sp in others[:2]]
    await asyncio.sleep(0.05)  # the others are already decoding when the seeded request joins
    mine = engine.submit(prompt, params, stream=True)
    streams += [engine.submit(p, sp) for p, sp in others[2:]]
    batched_text = "".join([d.text async for d in mine])
    await asyncio.gather(*(s.collect() for s in streams))
    assert engine.max_batch_seen > 1  # it really shared forward passes
    assert batched_text == alone_text
    assert mine.completion_tokens == 24

    other_text, _ = await engine.submit(prompt, SamplingParams(**{**params.__dict__, "seed": 1235})).collect()
    assert other_text != alone_text  # the seed matters (24 sampled tokens from a 1000-token vocab)


def _reference(engine: GenerationEngine) -> Any:
    """The same weights loaded again, outside the engine: plain sdpa, no batching, no KV cache."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.loaded.path, dtype=torch.float32).eval()


def _direct_logprobs(engine: GenerationEngine, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward pass of the same model over each prefix: [len(generated), vocab]."""
    model = _reference(engine)
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)


async def test_sampled_rows_next_to_a_chunked_prefill(engine: GenerationEngine) -> None:
    """A prompt longer than the pass's token budget (64) is prefilled over several passes; meanwhile the logits
    carry a padding row for it, which must not shift or break the rows of the greedy and sampled requests
    already decoding beside it."""
    long_prompt = _ids(engine, "a long prompt " * 40)
    assert len(long_prompt) > 64
    seeded = SamplingParams(max_tokens=120, temperature=1.0, seed=3, ignore_eos=True)
    greedy = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    alone = [(await engine.submit(_ids(engine, "seeded"), seeded).collect())[0],
             (await engine.submit(_ids(engine, "greedy"), greedy).collect())[0]]
    # Record every pass's (requests in the batch, requests sampled) from the sampler the engine installed.
    bp = engine._manager.batch_processor
    runner, passes = bp.model_runner, []
    sample = runner._sample

    def recording_sample(scores: Any, output_ids: Any) -> None:
        passes.append((_cb_internals.batch_size(bp), _cb_internals.sampled_request_ids(bp)))
        sample(scores, output_ids)

    runner._sample = recording_sample
    try:
        streams = [engine.submit(_ids(engine, "seeded"), seeded), engine.submit(_ids(engine, "greedy"), greedy)]
        decoding = {s.request_id for s in streams}
        for _ in range(2000):  # both decoding (sampled in one pass) before the long prompt arrives
            if any(set(ids) == decoding for _, ids in passes):
                break
            await asyncio.sleep(0.001)
        streams.append(engine.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
        results = await asyncio.gather(*(s.collect() for s in streams))
    finally:
        runner._sample = sample
    # The scenario really happened: a pass held all three requests and sampled only the two decoding ones (the long
    # prompt mid-prefill: its prefill took more than one pass).
    beside = [ids for size, ids in passes if size == 3 and set(ids) == decoding]
    assert beside, passes
    assert [text for text, _ in results[:2]] == alone
    assert [s.completion_tokens for s in streams] == [120, 120, 4]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_logprobs_match_a_direct_forward_pass(engine: GenerationEngine, temperature: float) -> None:
    prompt = _ids(engine, "Kubernetes operators watch")
    params = SamplingParams(max_tokens=12, temperature=temperature, logprobs=5, seed=3, ignore_eos=True)
    s, deltas = await _run(engine, prompt, params, stream=True)
    lps = [lp for d in deltas for lp in d.logprobs]
    assert s.logprobs == lps
    assert len(lps) == 12  # one per generated token, each delivered with the delta holding its text
    generated = [lp.token_id for lp in lps]
    want = _direct_logprobs(engine, prompt, generated)
    for i, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(float(want[i, lp.token_id]), abs=1e-4)
        top_v, top_i = want[i].topk(5)
        assert [t.logprob for t in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        assert {t.token for t in lp.top} >= {engine.tokenizer.decode([int(j)]) for j in top_i[:1]}
        assert bytes(lp.bytes).decode("utf-8", errors="replace") == lp.token
    # The tokens' bytes spell the text (a token holding half a UTF-8 character comes with the delta after which
    # its bytes are complete, or, at the very end, with no text of its own).
    spelled = b"".join(bytes(lp.bytes) for lp in lps).decode("utf-8", errors="replace")
    text = "".join(d.text for d in deltas)
    assert spelled in (text, text + "\ufffd")
    for d in deltas[:-1]:  # and every token is handed out once its text is: no delta runs ahead of its logprobs
        assert d.logprobs or not d.text
    if temperature == 0.0:  # greedy picks the top token
        assert all(lp.token_id == lp_top for lp, lp_top in zip(lps, want.argmax(-1).tolist(), strict=True))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_no_logprobs_unless_asked(engine: GenerationEngine, temperature: float) -> None:
    params = SamplingParams(max_tokens=5, temperature=temperature, ignore_eos=True)
    s, deltas = await _run(engine, _ids(engine, "hi"), params, stream=True)
    assert all(d.logprobs == [] for d in deltas) and s.logprobs == []


# Small penalties next to this model's logit spread (~0.5 between its top tokens), so that the two terms lead to
# different sequences and swapping them (or dropping one) changes the output.
@pytest.mark.parametrize(("presence", "frequency"), [(0.3, 0.0), (0.0, 0.1), (0.2, 0.2)])
async def test_penalties_are_openais_adjustment(engine: GenerationEngine, presence: float, frequency: float) -> None:
    """Greedy with penalties must pick argmax(logit - count*frequency - (count>0)*presence) at every step."""
    prompt = _ids(engine, "repeat after me")
    plain, _ = await _run(engine, prompt, SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True))
    plain_tokens = [lp.token_id for lp in plain.logprobs]
    assert len(set(plain_tokens)) < 8  # the random demo model repeats itself: penalties have work to do

    params = SamplingParams(max_tokens=16, temperature=0.0, presence_penalty=presence, frequency_penalty=frequency,
                            logprobs=0, ignore_eos=True)
    s, _ = await _run(engine, prompt, params)
    got = [lp.token_id for lp in s.logprobs]
    model = _reference(engine)
    want: list[int] = []
    counts = torch.zeros(engine.vocab_size)
    for _ in range(16):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + want])).logits[0, -1].float()
        adjusted = logits - counts * frequency - (counts > 0).float() * presence
        want.append(int(adjusted.argmax()))
        counts[want[-1]] += 1
    assert got == want
    assert got != plain_tokens


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "replicas": {"type": "integer", "minimum": 0, "maximum": 99},
        "ready": {"type": "boolean"},
        "phase": {"enum": ["Pending", "Running", "Failed"]},
    },
    "required": ["name", "replicas", "ready", "phase"],
    "additionalProperties": False,
}


async def test_json_schema_output_validates(engine: GenerationEngine) -> None:
    prompt = _ids(engine, "Describe the deployment as JSON:")
    rf = ResponseFormat("json_schema", SCHEMA)
    results = await asyncio.gather(*(
        engine.submit(prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=seed, response_format=rf)).collect()
        for seed in range(6)
    ))
    for text, reason in results:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 1  # sampled, not one canned answer


async def test_json_object_output_parses(engine: GenerationEngine) -> None:
    prompt = _ids(engine, "JSON please")
    rf = ResponseFormat("json_object")
    finished = []
    for seed in range(4):
        text, reason = await engine.submit(
            prompt, SamplingParams(max_tokens=64, temperature=1.0, seed=seed, response_format=rf)).collect()
        assert text.startswith("{")
        if reason == "stop":
            finished.append(text)
            assert isinstance(json.loads(text), dict)
    assert finished  # (a random model can also fill max_tokens inside a string: that is "length")
    # Greedy constrained decoding is deterministic and valid too.
    text, reason = await engine.submit(
        prompt, SamplingParams(max_tokens=64, temperature=0.0, response_format=rf)).collect()
    assert reason == "length" or isinstance(json.loads(text), dict)


async def test_top_p_zero_generates_the_greedy_text(engine: GenerationEngine) -> None:
    """OpenAI accepts top_p 0: a nucleus of the most likely token alone, i.e. greedy decoding, seeded or not, at
    any temperature, alone or next to sampling requests."""
    prompt = _ids(engine, "The operator reconciles")
    greedy, _ = await engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)).collect()
    for temperature, seed in ((1.0, 1234), (1.3, None), (0.7, 5)):
        params = SamplingParams(max_tokens=24, temperature=temperature, top_p=0.0, seed=seed, ignore_eos=True)
        neighbour = engine.submit(_ids(engine, "sampled"), SamplingParams(max_tokens=24, temperature=1.0,
                                                                         ignore_eos=True))
        text, _ = await engine.submit(prompt, params).collect()
        await neighbour.collect()
        assert text == greedy, (temperature, seed)


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(max_tokens=4, logprobs=21), "logprobs"),
    (SamplingParams(max_tokens=4, logprobs=-1), "logprobs"),
    (SamplingParams(max_tokens=4, presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(max_tokens=4, frequency_penalty=float("nan")), "frequency_penalty"),
    (SamplingParams(max_tokens=4, top_p=-0.1), "top_p"),
    (SamplingParams(max_tokens=4, top_p=1.5), "top_p"),
    (SamplingParams(max_tokens=4, seed="1"), "seed"),  # type: ignore[arg-type]
    (SamplingParams(max_tokens=4, response_format=ResponseFormat("json_schema", {"type": "nonsense"})),
     "response_format"),
    (SamplingParams(max_tokens=4, response_format=ResponseFormat("json_schema", None)), "response_format"),
    (SamplingParams(max_tokens=4, response_format=ResponseFormat("regex")), "response_format"),
    (SamplingParams(max_tokens=4, ignore_eos=True, response_format=ResponseFormat("json_object")),
     "response_format"),
])
async def test_refused_with_the_field_named(engine: GenerationEngine, params: SamplingParams, field: str) -> None:
    before = engine.num_inflight()
    with pytest.raises(InvalidParameterError) as e:
        engine.submit(_ids(engine, "x"), params)
    assert e.value.param == field and field in str(e.value)
    assert engine.num_inflight() == before  # nothing queued, nothing half-created
