"""Open Inference Protocol v2 (KServe) routes for classification models:
GET /v2/models/{name}, GET /v2/models/{name}/ready, POST /v2/models/{name}/infer."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ..engine import EngineUnavailableError, QueueFullError
from .protocol import APIError, InferRequest

router = APIRouter()
_CLASSIFY_TASKS = ("text-classification", "token-classification")


def _check_model(request: Request, name: str) -> Any:
    state = request.app.state.runtime
    if name != state.model_name:
        raise APIError(404, f"model {name!r} not found; this server serves {state.model_name!r}",
                       type="not_found_error", code="model_not_found")
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
    state = _check_model(request, name)
    state.require_ready()
    return {"name": name, "ready": True}


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


@router.post("/v2/models/{name}/infer")
async def infer(name: str, body: InferRequest, request: Request) -> dict[str, Any]:
    state = _check_model(request, name)
    task = state.settings.task
    if task not in _CLASSIFY_TASKS:
        raise APIError(400, f"model {name!r} is a {task} model: use /v1/completions or /v1/chat/completions")
    engine = state.require_ready()
    if len(body.inputs) != 1:
        raise APIError(400, "exactly one input tensor (BYTES, the texts) is expected", param="inputs")
    tensor = body.inputs[0]
    if tensor.datatype.upper() != "BYTES":
        raise APIError(400, f"input {tensor.name!r} must have datatype BYTES, got {tensor.datatype}",
                       param="inputs.0.datatype")
    texts = _flatten(tensor.data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"input {tensor.name!r} data must be a non-empty list of strings",
                       param="inputs.0.data")
    if len(texts) > state.settings.max_batch_size:
        raise APIError(400, f"{len(texts)} texts exceed the batch limit of {state.settings.max_batch_size}",
                       param="inputs.0.data")
    for i, text in enumerate(texts):
        n = engine.count_tokens(text)
        if n > state.settings.max_input_tokens:
            raise APIError(400, f"text {i} has {n} tokens, more than the limit of {state.settings.max_input_tokens}",
                           param="inputs.0.data", code="context_length_exceeded")
    try:
        results = await engine.infer(texts)
    except QueueFullError as e:
        raise APIError(429, f"server is busy: {e}", headers={"Retry-After": "1"}) from e
    except EngineUnavailableError as e:
        raise APIError(503, str(e)) from e
    shape = [len(texts)]
    if task == "token-classification":
        outputs = [{"name": "entities", "datatype": "BYTES", "shape": shape,
                    "data": [json.dumps(r.entities) for r in results]}]
    else:
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": shape, "data": [r.label for r in results]},
            {"name": "score", "datatype": "FP32", "shape": shape, "data": [r.score for r in results]},
        ]
    return {"model_name": name, "id": body.id or uuid.uuid4().hex, "outputs": outputs}
