"""Helpers shared by the runtime tests and benchmarks: server subprocesses, in-process apps, SSE, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from gptd_runtime.app import create_app
from gptd_runtime.config import Settings

REPO = Path(__file__).resolve().parents[2]


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before deadline")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, engine: Any = None, wait_ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan running (load + warm-up), and a client. Yields (client, app)."""
    app = create_app(settings, engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            if wait_ready:
                async def ready() -> bool:
                    if app.state.runtime.phase.value == "failed":
                        raise AssertionError(app.state.runtime.error)
                    return (await client.get("/health/ready")).status_code == 200

                await wait_until(ready, timeout=60)
            yield client, app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptd_runtime", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metric(text: str, name: str) -> float:
    """Value of one sample line (exact name incl. labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


def sse_events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]



class ThreadedServer:
    """The app behind the real uvicorn server the runtime runs (`app.make_server`: TLS, reload, no banner), on
    its own thread and loop, listening on 127.0.0.1 (an in-process engine; no model load)."""

    def __init__(self, settings: Settings, engine: Any):
        import threading

        from gptd_runtime.app import make_server

        self.port = settings.port
        self.app = create_app(settings, engine=engine)
        self.server = make_server(self.app, settings)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        scheme = "https" if settings.tls else "http"
        self.url = f"{scheme}://localhost:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and self.app.state.runtime.phase.value == "ready"):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
