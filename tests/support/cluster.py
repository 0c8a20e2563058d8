"""Helpers for the integration tests (see conftest.py)."""


from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml
from gptd_operator import handlers

VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
RESOURCES = {
    "gptd.io/v1alpha1/gptdeployments": ("GPTDeployment", True, {"status", "scale"}),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}),
    "v1/services": ("Service", True, set()),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/secrets": ("Secret", True, set()),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/events": ("Event", True, set()),
    "v1/namespaces": ("Namespace", False, set()),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, {"status"}),
    "keda.sh/v1alpha1/scaledobjects": ("ScaledObject", True, {"status"}),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, set()),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, {"status"}),
    # cert-manager's CRD; a test without cert-manager removes it (CERT_MANAGER), as a cluster without it lacks it.
    "cert-manager.io/v1/certificates": ("Certificate", True, {"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}

CERT_MANAGER = "cert-manager.io/v1/certificates"


def register_resources(emulator: kmock.KubernetesEmulator) -> None:
    """kopf only watches what discovery lists with verbs; the emulator lists what is registered."""
    for key, (kind, namespaced, subs) in RESOURCES.items():
        emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, subresources=subs, verbs=VERBS)


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig whose only cluster is the emulator at ``url`` (read by kopf and by gptd's client)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
    }))
    return path


PATHS = {
    "gptdeployments": "/apis/gptd.io/v1alpha1/namespaces/{ns}/gptdeployments",
    "deployments": "/apis/apps/v1/namespaces/{ns}/deployments",
    "services": "/api/v1/namespaces/{ns}/services",
    "pods": "/api/v1/namespaces/{ns}/pods",
    "secrets": "/api/v1/namespaces/{ns}/secrets",
    "events": "/api/v1/namespaces/{ns}/events",
    "poddisruptionbudgets": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "horizontalpodautoscalers": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
    "scaledobjects": "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects",
    "networkpolicies": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "certificates": "/apis/cert-manager.io/v1/namespaces/{ns}/certificates",
    "jobs": "/apis/batch/v1/namespaces/{ns}/jobs",
    "persistentvolumeclaims": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "configmaps": "/api/v1/namespaces/{ns}/configmaps",
}
WRITE_METHODS = {"POST", "PATCH", "PUT"}


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")
        await asyncio.sleep(0.05)  # polling interval, not synchronisation


@dataclass
class Cluster:
    """A test's handle on the emulator: plain HTTP calls, as kubectl or a controller would make."""

    emulator: kmock.KubernetesEmulator
    session: aiohttp.ClientSession

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, path, json=body, headers=headers) as resp:
            if resp.status == 404:
                return None
            assert resp.status < 400, f"{method} {path}: {resp.status} {await resp.text()}"
            return await resp.json(content_type=None)

    async def create(self, plural: str, ns: str, body: dict[str, Any]) -> Any:
        body = {**body, "metadata": {"namespace": ns, **body["metadata"]}}
        return await self._call("POST", PATHS[plural].format(ns=ns), body)

    async def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        return await self._call("GET", f"{PATHS[plural].format(ns=ns)}/{name}")

    async def patch(self, plural: str, ns: str, name: str, patch: dict[str, Any], sub: str = "") -> Any:
        return await self._call("PATCH", f"{PATHS[plural].format(ns=ns)}/{name}{'/' + sub if sub else ''}", patch)

    async def delete(self, plural: str, ns: str, name: str) -> Any:
        return await self._call("DELETE", f"{PATHS[plural].format(ns=ns)}/{name}")

    async def list(self, plural: str, ns: str) -> list[dict[str, Any]]:
        return (await self._call("GET", PATHS[plural].format(ns=ns)) or {}).get("items", [])

    def requests(self) -> list[Any]:
        log = getattr(self.emulator, "log", None)  # ApiServer keeps every request there (kmock only in-flight ones)
        return list(log) if log is not None else list(self.emulator)

    def writes(self, since: int = 0, *, path_part: str = "") -> list[str]:
        """Writes after request number ``since``: 'METHOD path' strings (events included)."""
        out = []
        for req in self.requests()[since:]:
            method = str(req.method).rsplit(".", 1)[-1].upper()
            if method in WRITE_METHODS and path_part in str(req.url):
                out.append(f"{method} {req.url.path}")
        return out


@dataclass
class RunningOperator:
    reconciler: handlers.Reconciler
    thread: threading.Thread

    async def started(self, timeout: float = 10.0) -> None:
        """Wait until the operator is up: its resync loop's first pass (run at once, on start-up) is done.

        Not ``resync_passes(1)``: that counts from the passes already done when it is called, and the operator's
        thread may have done the first one by then, so it would wait for the second, a whole resync period away."""
        async def first_pass() -> bool:
            if not self.thread.is_alive():  # not an AssertionError: eventually() would go on polling
                raise RuntimeError("the operator's thread ended during start-up")
            return self.reconciler.resync_passes >= 1

        await eventually(first_pass, timeout=timeout, what="the first resync pass")

    async def resync_passes(self, n: int = 2, timeout: float = 10.0) -> None:
        """Wait until ``n`` more full resync passes (every CR reconciled) have completed."""
        target = self.reconciler.resync_passes + n
        await eventually(lambda: _true(self.reconciler.resync_passes >= target), timeout=timeout,
                         what=f"{n} resync passes")


def operator_dump(thread: threading.Thread, loop: asyncio.AbstractEventLoop | None) -> str:
    """What an operator that is stuck is doing: its thread's stack and, given its loop, each pending task's."""
    lines = [f"operator thread alive={thread.is_alive()}:"]
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is not None:
        lines += traceback.format_stack(frame)
    if loop is not None:
        try:  # read from another thread: a task added meanwhile may change the set under us
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError as exc:
            tasks, lines = [], [*lines, f"tasks not listed: {exc}"]
        for task in tasks:
            lines.append(f"task {task.get_name()}: {task.get_coro()!r}")
            lines += ["    " + line.strip() for frame in task.get_stack(limit=6)
                      for line in traceback.format_stack(frame, limit=1)]
    return "\n".join(lines)


async def _true(value: bool) -> bool:
    return value


