"""Open Inference Protocol v2 (KServe) routes for classification models:
GET /v2/models/{name}, GET /v2/models/{name}/ready, POST /v2/models/{name}/infer."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ..engine import EngineUnavailableError, InvalidParameterError, QueueFullError
from ..state import RuntimeState
from .deps import ready_engine, runtime
from .errors import APIError, bad_request, busy, model_not_found, unavailable
from .protocol import InferInput, InferRequest

router = APIRouter()
_CLASSIFY_TASKS = ("text-classification", "token-classification")


def _check_model(request: Request, name: str) -> RuntimeState:
    state = runtime(request)
    if name != state.model_name:
        raise model_not_found(name, state.model_name)
    return state


def _outputs(task: str) -> list[dict[str, Any]]:
    if task == "token-classification":
        return [{"name": "entities", "datatype": "BYTES", "shape": [-1]}]
    return [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP32", "shape": [-1]}]


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    state = _check_model(request, name)
    return {
        "name": name,
        "versions": [],
        "platform": "gptd-transformers",
        "task": state.settings.task,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": _outputs(state.settings.task),
    }


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, request: Request) -> dict[str, Any]:
    ready_engine(_check_model(request, name))
    return {"name": name, "ready": True}


def _texts(tensor: InferInput) -> list[str]:
    """The input's strings, row-major. `shape` must describe `data`: either flat (as the v2 protocol sends
    it) with as many items as the shape's product, or nested exactly as the shape says."""
    name = tensor.name
    if any(d < 0 for d in tensor.shape) or not tensor.shape:
        raise bad_request(f"input {name!r}: shape {tensor.shape} must be a non-empty list of sizes >= 0",
                          param="inputs.0.shape")
    flat: list[Any] = []

    def walk(item: Any, depth: int) -> None:
        if isinstance(item, list):
            if depth >= len(tensor.shape) or len(item) != tensor.shape[depth]:
                raise bad_request(f"input {name!r}: data is nested differently from shape {tensor.shape}",
                                  param="inputs.0.shape")
            for x in item:
                walk(x, depth + 1)
        else:
            flat.append(item)

    nested = any(isinstance(x, list) for x in tensor.data)
    if nested:
        walk(tensor.data, 0)
    else:
        flat = list(tensor.data)
    if len(flat) != math.prod(tensor.shape):
        raise bad_request(f"input {name!r}: shape {tensor.shape} holds {math.prod(tensor.shape)} item(s), data "
                          f"has {len(flat)}", param="inputs.0.shape")
    if not flat:
        raise bad_request(f"input {name!r}: data must hold at least one string", param="inputs.0.data")
    for i, text in enumerate(flat):
        if not isinstance(text, str):
            raise bad_request(f"input {name!r}: data[{i}] must be a string, got {type(text).__name__}",
                              param="inputs.0.data")
        if text == "":
            raise bad_request(f"input {name!r}: data[{i}] is an empty string (nothing to classify)",
                              param="inputs.0.data")
    return flat


@router.post("/v2/models/{name}/infer")
async def infer(name: str, body: InferRequest, request: Request) -> dict[str, Any]:
    state = _check_model(request, name)
    task = state.settings.task
    if task not in _CLASSIFY_TASKS:
        raise bad_request(f"model {name!r} is a {task} model: use /v1/completions or /v1/chat/completions")
    engine = ready_engine(state)
    if len(body.inputs) != 1:
        raise bad_request("exactly one input tensor (BYTES, the texts) is expected", param="inputs")
    tensor = body.inputs[0]
    if tensor.datatype.upper() != "BYTES":
        raise bad_request(f"input {tensor.name!r} must have datatype BYTES, got {tensor.datatype}",
                          param="inputs.0.datatype")
    texts = _texts(tensor)
    if state.redactor is not None:  # --redact: the model never sees the values
        texts = [state.redactor.redact(t) for t in texts]
    if len(texts) > state.settings.max_batch_size:
        raise bad_request(f"{len(texts)} texts exceed the batch limit of {state.settings.max_batch_size}",
                          param="inputs.0.data")
    for i, text in enumerate(texts):
        n = engine.count_tokens(text)
        if n == 0:  # e.g. only characters the tokenizer drops: a 0-token row cannot be classified
            raise bad_request(f"input {tensor.name!r}: data[{i}] has no tokens (nothing to classify)",
                              param="inputs.0.data")
        if n > state.settings.max_input_tokens:
            raise APIError(400, f"text {i} has {n} tokens, more than the limit of {state.settings.max_input_tokens}",
                           param="inputs.0.data", code="context_length_exceeded")
    try:
        results = await engine.infer(texts)
    except InvalidParameterError as e:  # the engine's own check (the ones above should already catch it)
        raise bad_request(f"input {tensor.name!r}: {e}", param="inputs.0.data") from e
    except QueueFullError as e:
        raise busy(str(e)) from e
    except EngineUnavailableError as e:
        raise unavailable(str(e)) from e
    shape = list(tensor.shape)  # one output per input text, laid out like the input
    if task == "token-classification":
        outputs = [{"name": "entities", "datatype": "BYTES", "shape": shape,
                    "data": [json.dumps(r.entities, ensure_ascii=False) for r in results]}]
    else:
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": shape, "data": [r.label for r in results]},
            {"name": "score", "datatype": "FP32", "shape": shape, "data": [r.score for r in results]},
        ]
    return {"model_name": name, "id": body.id or uuid.uuid4().hex, "outputs": outputs}
