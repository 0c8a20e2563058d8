"""Fixtures for runtime tests: tiny models built locally (gptd_runtime.demo), in-process apps driven over
httpx's ASGI transport, and real `python -m gptd_runtime serve` subprocesses where signals, exit codes or
true streaming matter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gptd_runtime.config import Settings
from gptd_runtime.demo import build_demo_model

from tests.support.runtime import ServerProcess, running_app


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "plain": build_demo_model(root / "plain"),  # no chat template: plain fallback
        "chat": build_demo_model(root / "chat", chat_template=True),
        "cls": build_demo_model(root / "cls", "text-classification"),
        "ner": build_demo_model(root / "ner", "token-classification"),
    }


@pytest.fixture
def app_factory(models: dict[str, Path]) -> Callable[..., Any]:
    def make(model: str = "plain", engine: Any = None, wait_ready: bool = True, **overrides: Any) -> Any:
        task = {"cls": "text-classification", "ner": "token-classification"}.get(model, "text-generation")
        kwargs: dict[str, Any] = {"model": str(models[model]), "task": task, "max_new_tokens": 64}
        kwargs.update(overrides)
        return running_app(Settings(**kwargs), engine=engine, wait_ready=wait_ready)

    return make


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(list(args), env)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
