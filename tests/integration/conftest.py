"""Fixtures: the emulator, a kubeconfig pointing at it, and the real kopf operator in the test's loop.

The emulator has no controllers: tests play kube-controller-manager (Deployment status, pods, the
HPA's replica writes, the garbage collector) by calling its API themselves. Nothing is monkey-patched:
kopf and gptd's client both read a kubeconfig file whose server is the emulator's URL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kmock
import kopf
import pytest
from gptd_operator import handlers, kube
from gptd_operator.settings import Settings

from tests.support.apiserver import ApiServer
from tests.support.cluster import Cluster, RunningOperator, operator_dump, register_resources, write_kubeconfig


@pytest.fixture()
async def emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    async with ApiServer() as k, kmock.Server(k) as srv:
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
    memo = handlers.register(registry, operator_settings, reconciler)
    stop = threading.Event()
    errors: list[BaseException] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        await kopf.operator(registry=registry, memo=memo, standalone=True, clusterwide=True, stop_flag=stop,
                            liveness_endpoint=None)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced in the teardown
            errors.append(exc)

    thread = threading.Thread(target=run, name="gptd-operator", daemon=True)
    running = RunningOperator(reconciler, thread)
    thread.start()
    # The operator is stopped whatever happens from here: one left running (its start-up timed out, say) keeps a
    # thread of its loop's executor waiting on ``stop`` for ever, and the interpreter joins that thread at exit.
    try:
        try:
            await running.started()
        except (AssertionError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\nerrors: {errors!r}\n{operator_dump(thread, loops[0] if loops else None)}"
                                 ) from None
        yield running
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
    assert not thread.is_alive(), "the operator did not stop within 20 s\n" + operator_dump(thread, None)
    assert not errors, errors
