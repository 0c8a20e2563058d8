"""The one typed way a route reaches the server's state (and, through it, a ready engine)."""

from __future__ import annotations

from typing import Any

from starlette.requests import HTTPConnection

from ..state import RuntimeState
from .errors import model_not_found, unavailable


def runtime(request: HTTPConnection) -> RuntimeState:
    state: RuntimeState = request.app.state.runtime
    return state


def ready_engine(state: RuntimeState) -> Any:
    """The engine, or a 503 (with Retry-After) naming the phase while loading, warming up, draining or failed."""
    reason = state.not_ready_reason()
    if reason is not None:
        raise unavailable(reason, code=state.phase.value)
    return state.engine


def check_model(state: RuntimeState, name: str | None) -> None:
    """`name` (None: not given) must be the served model."""
    if name is not None and name != state.model_name:
        raise model_not_found(name, state.model_name)
