"""Scenario helpers shared by the operator's integration tests and the benchmark: CR bodies, status reads,
and the controllers the emulator lacks (Deployment controller status, ReplicaSet/kubelet pods), played through
the API. Synchronisation is by polling with deadlines (``eventually``)."""

from __future__ import annotations

from typing import Any

from .cluster import Cluster, eventually

NS = "ns1"


def cr(name: str = "gpt2", uid: str = "uid-gpt2", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"uri": "hf://openai-community/gpt2"}, "resources": {"gpus": 1}}
    body.update(spec)
    return {
        "apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment",
        "metadata": {"name": name, "uid": uid, "generation": 1}, "spec": body,
    }


async def status_of(cluster: Cluster, name: str = "gpt2") -> dict[str, Any]:
    obj = await cluster.get("gptdeployments", NS, name)
    return (obj or {}).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def ready_deployment(cluster: Cluster, name: str = "gpt2", replicas: int = 1) -> None:
    """Play the Deployment controller: it saw the latest spec; all replicas exist, are updated and ready."""
    dep = await cluster.get("deployments", NS, name)
    assert dep is not None
    await cluster.patch("deployments", NS, name, {"status": {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
        "availableReplicas": replicas,
    }}, sub="status")



async def phase_is(cluster: Cluster, name: str, phase: str) -> bool:
    return (await status_of(cluster, name)).get("phase") == phase



REV = "gptd.io/revision"
GPU_MESSAGE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
LONG_AGO = "2026-01-01T00:00:00Z"  # older than any surgeGraceSeconds the tests use


def model(revision: str) -> dict[str, Any]:
    return {"uri": "hf://openai-community/gpt2", "revision": revision}


def labels_of(dep: dict[str, Any] | None) -> dict[str, str]:
    return ((((dep or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def env_of(dep: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def strategy_of(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["strategy"]["rollingUpdate"]


async def deployment_where(cluster: Cluster, name: str, what: str, pred: Any) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", NS, name)
        return dep if dep is not None and pred(dep) else None

    return await eventually(check, what=what)


async def status_where(cluster: Cluster, what: str, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if st and pred(st) else None

    return await eventually(check, what=what, timeout=timeout)


def progressing(reason: str) -> Any:
    return lambda st: condition(st, "Progressing").get("reason") == reason


async def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    """Events the operator posted on the CR with this reason (they are real objects on the emulator)."""
    return [
        e for e in await cluster.list("events", NS)
        if e.get("reason") == reason and (e.get("involvedObject") or {}).get("name") == "gpt2"
    ]


async def event(cluster: Cluster, reason: str) -> dict[str, Any]:
    found = await eventually(lambda: events(cluster, reason), what=f"Event {reason}")
    return found[0]


async def started(cluster: Cluster, replicas: int, **spec: Any) -> str:
    """A GPTDeployment on revision v1, rolled out and Ready; returns that revision's hash."""
    await cluster.create("gptdeployments", NS, cr(model=model("v1"), replicas=replicas, **spec))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await ready_deployment(cluster, replicas=replicas)
    await status_where(cluster, "v1 Ready", lambda st: st.get("phase") == "Ready")
    return labels_of(dep)[REV]


async def change_revision(cluster: Cluster, revision: str, old: str, name: str = "gpt2") -> dict[str, Any]:
    """`kubectl edit`: a new spec.model.revision; returns Deployment ``name`` once it runs a new revision."""
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": revision}}})
    return await deployment_where(cluster, name, f"{name} on a revision other than {old}",
                                  lambda d: labels_of(d).get(REV) not in (None, old))


async def add_pod(cluster: Cluster, dep: dict[str, Any], name: str, status: dict[str, Any]) -> None:
    """Play the ReplicaSet controller, scheduler and kubelet: a pod of ``dep``'s template in ``status``."""
    await cluster.create("pods", NS, {"metadata": {"name": name, "labels": labels_of(dep)}, "status": status})


READY_POD = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
UNSCHEDULABLE_POD = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": GPU_MESSAGE,
    "lastTransitionTime": LONG_AGO}]}
CRASHLOOP_POD = {"phase": "Running", "containerStatuses": [{
    "name": "runtime", "restartCount": 3, "ready": False,
    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
    "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}
