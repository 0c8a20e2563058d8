"""Fixtures: the emulator, a kubeconfig pointing at it, and the real kopf operator in the test's loop.

The emulator has no controllers: tests play kube-controller-manager (Deployment status, pods, the
HPA's replica writes, the garbage collector) by calling its API themselves. Nothing is monkey-patched:
kopf and gptd's client both read a kubeconfig file whose server is the emulator's URL.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from gptd_operator import handlers, kube
from gptd_operator.settings import Settings

from tests.support.cluster import Cluster, RunningOperator, register_resources, write_kubeconfig


class Emulator(kmock.KubernetesEmulator):
    """The emulator plus three things every real API server does and the operator relies on:
    ``metadata.uid`` on create (kopf keys its indices by namespace+name+uid, so a Service and a
    Deployment both named ``gpt2`` without uids would evict each other), ``metadata.generateName``
    (kopf posts Events that way), and ``metadata.generation`` (1 on create, +1 when a PATCH changes
    ``spec``; status.observedGeneration is how "the controller has seen my change" is told)."""

    async def _handle(self, request: Any) -> Any:
        data = request.data
        method = str(request.method).upper()
        if method.endswith("POST") and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
        elif method.endswith("PATCH") and isinstance(data, dict) and "spec" in data and not request.subresource:
            key = (request.resource, request.namespace, request.name)
            stored = self.objects[key] if key in self.objects else None
            if stored is not None and not stored.deleted and "generation" not in (data.get("metadata") or {}):
                before = stored.get("spec")
                merged = _merged(before, data["spec"])
                if merged != before:
                    generation = (stored.get("metadata") or {}).get("generation") or 1
                    data.setdefault("metadata", {})["generation"] = generation + 1
        return await super()._handle(request)


def _merged(base: Any, patch: Any) -> Any:
    """JSON merge patch semantics, to tell whether a PATCH changes spec at all."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(base.get(k), v)
    return out


@pytest.fixture()
async def emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    async with Emulator() as k, kmock.Server(k) as srv:
        register_resources(k)
        yield k, str(srv.url).rstrip("/")


@pytest.fixture()
def kubeconfig(tmp_path: Path, emulator: tuple[kmock.KubernetesEmulator, str],
               monkeypatch: pytest.MonkeyPatch) -> Path:
    _, url = emulator
    path = write_kubeconfig(tmp_path / "kubeconfig", url)
    monkeypatch.setenv("KUBECONFIG", str(path))
    # Both kopf (via the operator's login handler) and gptd's client read this file.
    kube.configure(str(path))
    return path


@pytest.fixture()
async def cluster(emulator: tuple[kmock.KubernetesEmulator, str]) -> AsyncIterator[Cluster]:
    k, url = emulator
    async with aiohttp.ClientSession(url) as session:
        yield Cluster(k, session)


@pytest.fixture()
def operator_settings() -> Settings:
    return Settings(resync_seconds=0.5)


@pytest.fixture()
async def operator(kubeconfig: Path, operator_settings: Settings) -> AsyncIterator[RunningOperator]:
    """The operator in its own thread and event loop, like ``kopf.testing.KopfRunner`` does.

    Not a task in the test's loop: at shutdown kopf cancels (and waits for) every task it did not see
    when it started, which would include this fixture's own teardown.
    """
    registry = kopf.OperatorRegistry()
    reconciler = handlers.Reconciler(operator_settings, kube.Kube(kube.load_config(str(kubeconfig))))
    handlers.register(registry, operator_settings, reconciler)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, standalone=True, clusterwide=True, stop_flag=stop, liveness_endpoint=None,
            ))
        except BaseException as exc:  # surfaced in the teardown
            errors.append(exc)

    thread = threading.Thread(target=run, name="gptd-operator", daemon=True)
    thread.start()
    running = RunningOperator(reconciler, thread)
    await running.resync_passes(1)  # the operator is up: its resync loop runs
    yield running
    stop.set()
    await asyncio.to_thread(thread.join, 20)
    assert not thread.is_alive(), "the operator did not stop within 20 s"
    assert not errors, errors
