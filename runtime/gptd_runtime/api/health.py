"""Kubernetes probes (and the Open Inference Protocol's equivalents).

live: the process works (an engine whose worker thread died is not live: restart it).
ready: 200 only after load + a real warm-up generation, and not while draining."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..state import Phase
from .deps import runtime
from .errors import probe_failure

router = APIRouter()


# Each handler serves the Kubernetes path and the Open Inference Protocol v2 one.
@router.get("/health/live")
@router.get("/v2/health/live")
async def live(request: Request) -> JSONResponse:
    state = runtime(request)
    engine = state.engine
    # While loading/warming up there may be no engine yet, and a failed load ends the process on its own.
    if engine is not None and state.phase in (Phase.READY, Phase.DRAINING) and not engine.healthy:
        return probe_failure({"status": "engine stopped"}, 500)
    return JSONResponse({"status": "ok"})


@router.get("/health/ready")
@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    state = runtime(request)
    body = {"status": state.phase.value}
    if state.error:
        body["error"] = state.error
    if state.phase is Phase.READY:
        return JSONResponse(body)
    return probe_failure(body, 503)
