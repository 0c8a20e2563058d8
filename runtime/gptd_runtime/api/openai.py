"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions. Thin: validate (refuse what
cannot be honoured), tokenize, check limits (before any model work), map the fields onto the engine's
SamplingParams, run the choices (api/generation.py), shape the answer (api/envelope.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request

from ..engine import ResponseFormat, SamplingParams
from ..redaction import Redactor
from ..state import (
    FEATURE_LOGPROBS,
    FEATURE_PENALTIES,
    FEATURE_RESPONSE_FORMAT,
    FEATURE_SEED,
    RuntimeState,
    context_limit,
    sampling_features,
)
from . import generation
from .deps import check_model, ready_engine, runtime
from .envelope import Envelope
from .errors import APIError, bad_request, unsupported
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter()


def _card(state: RuntimeState) -> dict[str, Any]:
    s = state.settings
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "gptd", "task": s.task,
            "max_model_len": s.max_input_tokens + s.max_new_tokens}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(runtime(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = runtime(request)
    check_model(state, model_id)
    return _card(state)


def _generation_engine(state: RuntimeState, body: SamplingFields) -> Any:
    check_model(state, body.model)
    if state.settings.task != "text-generation":
        raise bad_request(f"model {state.model_name!r} is a {state.settings.task} model: use "
                          f"POST /v2/models/{state.model_name}/infer", param="model", code="wrong_task")
    refused = body.refusal()
    if refused is not None:
        raise unsupported(*refused)
    return ready_engine(state)


def _require(engine: Any, feature: str, field: str) -> None:
    if feature not in sampling_features(engine):
        raise unsupported(field, "the generation engine does not implement it")


def _response_format(body: SamplingFields) -> ResponseFormat | None:
    rf = getattr(body, "response_format", None)
    if rf is None or rf.type == "text":
        return None
    schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else None
    return ResponseFormat(rf.type, schema)


def _params(
    state: RuntimeState, engine: Any, body: SamplingFields, logprobs: int | None, logprobs_field: str
) -> SamplingParams:
    """The request's sampling parameters (max_tokens is set per prompt by `_jobs`)."""
    response_format = _response_format(body)
    if logprobs is not None:
        _require(engine, FEATURE_LOGPROBS, logprobs_field)
    if body.seed is not None:
        _require(engine, FEATURE_SEED, "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            _require(engine, FEATURE_PENALTIES, name)
    if response_format is not None:
        _require(engine, FEATURE_RESPONSE_FORMAT, "response_format")
    if logprobs is not None and state.redactor is not None:
        # token texts and their alternatives would carry what the output's text has masked
        raise unsupported(logprobs_field, "not while the server redacts (--redact)")
    return SamplingParams(
        max_tokens=1,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        response_format=response_format,
    )


def _max_tokens(state: RuntimeState, body: SamplingFields) -> int:
    s = state.settings
    completion_tokens = getattr(body, "max_completion_tokens", None)
    requested = body.max_tokens if body.max_tokens is not None else completion_tokens
    if requested is not None and requested > s.max_new_tokens:
        field = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        raise APIError(400, f"{field}={requested} exceeds the limit of {s.max_new_tokens}",
                       param=field, code="max_tokens_exceeded")
    return requested or s.max_new_tokens


def _jobs(
    state: RuntimeState, body: SamplingFields, prompts: list[list[int]], base: SamplingParams, prompt_param: str,
    echoes: list[str] | None = None,
) -> list[generation.Job]:
    """n choices per prompt. With `seed`, choice j of a prompt samples with seed + j: reproducible, and the
    choices differ from one another."""
    s = state.settings
    n = body.choices
    if len(prompts) * n > s.max_batch_size:
        param = "n" if n > 1 else prompt_param
        raise bad_request(f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} sequences exceed the batch "
                          f"limit of {s.max_batch_size}", param=param, code="unsupported_value")
    wanted = _max_tokens(state, body)
    # Never run past the model's position embeddings, nor past the whole KV cache: a request that cannot fit
    # even alone makes transformers' scheduler raise on its thread, which kills the engine for everyone.
    context = context_limit(state)
    jobs = []
    for p, ids in enumerate(prompts):
        if len(ids) > s.max_input_tokens:
            raise APIError(400, f"{prompt_param} has {len(ids)} tokens, more than the limit of "
                           f"{s.max_input_tokens}", param=prompt_param, code="context_length_exceeded")
        if len(ids) >= context:
            raise APIError(400, f"{prompt_param} has {len(ids)} tokens; the context (model positions and KV "
                           f"cache) holds {context}", param=prompt_param, code="context_length_exceeded")
        params = dataclasses.replace(base, max_tokens=min(wanted, context - len(ids)))
        for j in range(n):
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
            jobs.append(generation.Job(p * n + j, p, ids, seeded, echoes[p] if echoes else ""))
    return jobs


async def _run(
    request: Request, env: Envelope, body: SamplingFields, engine: Any, jobs: list[generation.Job],
    logprobs_field: str = "logprobs",
) -> Any:
    streams = generation.submit_all(engine, jobs, body.streaming, {"logprobs": logprobs_field})
    redactor = runtime(request).redactor
    if body.streaming:
        return generation.sse(env, jobs, streams, body.include_usage, redactor)
    results = await generation.collect(request, jobs, streams, redactor)
    return env.response(results, generation.usage(jobs, streams))


def _prompts(engine: Any, body: CompletionRequest, redactor: Redactor | None) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt, masked first when redacting (token-id prompts: decoded, masked, and
    re-encoded if anything was masked). An empty prompt still needs one token to condition on; a null one is the
    model's text-boundary token."""
    tok = engine.tokenizer
    raw = body.prompt
    if raw is None:
        raw = [_text_boundary_token(tok)]
    if isinstance(raw, list) and not raw:
        raise bad_request("prompt: must not be an empty list", param="prompt")
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    ids_list, texts = [], []
    for item in items:
        if isinstance(item, str):
            text = item if redactor is None else redactor.redact(item)
            ids = tok(text).input_ids
        else:
            ids = list(item)
            if any(i < 0 or i >= len(tok) for i in ids):
                raise bad_request("prompt contains token ids outside the vocabulary", param="prompt")
            text = tok.decode(ids)
            if redactor is not None and (masked := redactor.redact(text)) != text:
                ids, text = tok(masked).input_ids, masked
        ids_list.append(ids or [_text_boundary_token(tok)])
        texts.append(text)
    return ids_list, texts


def _text_boundary_token(tok: Any) -> int:
    """What a null (or empty) prompt means: OpenAI's default prompt is "<|endoftext|>". The vocabulary's own
    <|endoftext|> when it has one (Qwen's, for example, is neither its bos nor its eos), else the model's
    beginning-of-text token, else its end-of-text one."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>")  # an unknown token maps to unk (or None): check it back
    endoftext = eot if isinstance(eot, int) and tok.convert_ids_to_tokens(eot) == "<|endoftext|>" else None
    for token_id in (endoftext, tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise bad_request("prompt: must be given for this model (its tokenizer has neither a beginning- nor an "
                      "end-of-text token to stand for a null prompt)", param="prompt")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = runtime(request)
    engine = _generation_engine(state, body)
    base = _params(state, engine, body, body.logprobs, "logprobs")
    prompts, texts = _prompts(engine, body, state.redactor)
    jobs = _jobs(state, body, prompts, base, "prompt", texts if body.echo else None)
    return await _run(request, Envelope("completion", state.model_name), body, engine, jobs)


def _chat_prompt(tokenizer: Any, body: ChatCompletionRequest, redactor: Redactor | None = None) -> str:
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        content = m.text() if redactor is None else redactor.redact(m.text())  # before the template and model
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:  # templates that know participant names use it
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. unsupported role order) are the request's fault
            raise bad_request(f"chat template rejected the messages: {e}", param="messages") from e
    # Plain fallback for base models without a template: a transcript ending with the assistant's turn.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = runtime(request)
    engine = _generation_engine(state, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    field = "top_logprobs" if body.top_logprobs else "logprobs"
    base = _params(state, engine, body, logprobs, field)
    tok = engine.tokenizer
    # The template already carries any special tokens the model expects.
    ids = tok(_chat_prompt(tok, body, state.redactor), add_special_tokens=False).input_ids
    jobs = _jobs(state, body, [ids], base, "messages")
    return await _run(request, Envelope("chat", state.model_name), body, engine, jobs, field)
