"""The runtime's shape, as tests: the HTTP layer depends on state.py's protocol, never on app.py or on
transformers objects; every 503 says when to retry."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import gptd_runtime
import pytest
from gptd_runtime.engine import ClassificationEngine, EngineUnavailableError, GenerationEngine
from gptd_runtime.state import ClassifierBackend, Engine, GenerationBackend
from transformers import AutoTokenizer

from tests.support.engine import ContractEngine

API = Path(gptd_runtime.__file__).parent / "api"


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = "gptd_runtime.api"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if base and node.module else (node.module or base)
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(API.glob("*.py")), ids=lambda p: p.name)
def test_api_never_imports_app_nor_reaches_into_the_model(path: Path) -> None:
    imported = _imports(path)
    assert not {m for m in imported if m == "gptd_runtime.app" or m.startswith("gptd_runtime.app.")}, imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}, imported
    attributes = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
    assert not attributes & {"loaded", "model_config", "_manager", "batch_processor"}, path.name


def error_statuses_made_outside_the_factory(source: str) -> list[str]:
    """Error responses built by hand: a `status_code=` of 400 or more, or a Retry-After header."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if (isinstance(n, ast.keyword) and n.arg == "status_code" and isinstance(n.value, ast.Constant)
                and isinstance(n.value.value, int) and n.value.value >= 400):
            found.append(f"status_code={n.value.value}")
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.lower() == "retry-after":
            found.append("Retry-After")
        elif (isinstance(n, ast.Name) and n.id == "RETRY_AFTER_SECONDS") or (
                isinstance(n, ast.alias) and n.name == "RETRY_AFTER_SECONDS"):
            found.append("RETRY_AFTER_SECONDS")
    return found


@pytest.mark.parametrize("path", sorted(p for p in API.glob("*.py") if p.name != "errors.py"), ids=lambda p: p.name)
def test_error_responses_come_from_the_one_factory(path: Path) -> None:
    assert error_statuses_made_outside_the_factory(path.read_text()) == [], path.name


def test_the_factory_check_can_fail() -> None:
    old_ready = ('from .errors import RETRY_AFTER_SECONDS\n'
                 'r = JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})')
    assert sorted(error_statuses_made_outside_the_factory(old_ready)) == [
        "RETRY_AFTER_SECONDS", "RETRY_AFTER_SECONDS", "Retry-After", "status_code=503"]
    assert error_statuses_made_outside_the_factory("JSONResponse(body, status_code=200)") == []


def test_real_engines_meet_the_protocol() -> None:
    for cls, protocol in ((GenerationEngine, GenerationBackend), (ClassificationEngine, ClassifierBackend)):
        methods = [n for p in (Engine, protocol) for n, v in vars(p).items() if callable(v) and n[0] != "_"]
        assert "submit" in methods or "infer" in methods
        for name in methods:
            assert callable(getattr(cls, name, None)), (cls.__name__, name)


class _DeadOnSubmit(ContractEngine):
    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise EngineUnavailableError("generation engine is not running")


async def test_every_503_carries_retry_after(app_factory: Any, models: Any) -> None:
    from gptd_runtime.app import drain

    tok = AutoTokenizer.from_pretrained(models["chat"])
    req = {"prompt": "x", "max_tokens": 1}
    async with app_factory("chat", engine=_DeadOnSubmit(tok)) as (client, app):
        dead = await client.post("/v1/completions", json=req)  # the engine fails at submit
        assert dead.status_code == 503 and dead.headers["retry-after"] == "1"
        assert dead.json()["error"]["code"] == "engine_unavailable"
        await drain(app.state.runtime, timeout=0)
        for method, path, body in (("POST", "/v1/completions", req), ("POST", "/v1/embeddings", {"input": "x"}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                                   ("GET", "/health/ready", None), ("GET", "/v2/health/ready", None)):
            r = await client.request(method, path, json=body)
            assert r.status_code == 503, path
            assert r.headers["retry-after"] == "1", path
            if "/health/" in path:  # the probes' own body, not an error object
                assert r.json() == {"status": "draining"}, path
    async with app_factory("cls") as (client, app):
        await drain(app.state.runtime, timeout=0)
        r = await client.post("/v2/models/cls/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (await client.get("/v2/models/cls/ready")).headers["retry-after"] == "1"
