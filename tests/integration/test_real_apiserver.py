"""What a real kube-apiserver does and the operator must survive (issue 8's defects, issue 14's gaps).

Each test runs the real operator against ``tests.support.apiserver.ApiServer`` (names validated, omitempty
drops, canonical quantities, merge-patch maps, strict fields, 410 Gone, pagination) and plays the controllers
the emulator lacks through the API.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from gptd_operator.settings import Settings

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import NS, condition, cr, phase_is, ready_deployment, status_of

pytestmark = pytest.mark.timeout(60)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CHILDREN = ("deployments", "services", "poddisruptionbudgets", "horizontalpodautoscalers")


async def owned(cluster: Cluster, plural: str, uid: str) -> list[dict[str, Any]]:
    return [o for o in await cluster.list(plural, NS)
            if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]


async def one_owned(cluster: Cluster, plural: str, uid: str) -> dict[str, Any] | None:
    found = await owned(cluster, plural, uid)
    return found[0] if len(found) == 1 else None


async def settle(cluster: Cluster, operator: RunningOperator, name: str, uid: str, replicas: int = 1) -> None:
    """Children exist, the Deployment controller reports them ready, the CR is Ready and the operator idle."""
    dep = await eventually(lambda: one_owned(cluster, "deployments", uid), what=f"Deployment of {name}")
    await ready_deployment(cluster, dep["metadata"]["name"], replicas=replicas)
    await eventually(lambda: phase_is(cluster, name, "Ready"), what=f"{name} Ready")
    await operator.resync_passes(2)


async def idle_writes(cluster: Cluster, operator: RunningOperator, passes: int = 2) -> list[str]:
    before = len(cluster.requests())
    await operator.resync_passes(passes)
    return cluster.writes(before)


# ---------------------------------------------------------------------------------- defect 1: names


@pytest.mark.parametrize("name", ["llama-3.1-8b", "m" * 70, "7b.instruct"])
async def test_model_named_cr_gets_dns_safe_children(cluster: Cluster, operator: RunningOperator, name: str) -> None:
    uid = f"uid-{len(name)}"
    await cluster.create("gptdeployments", NS, cr(name, uid, replicas=2))
    svc = await eventually(lambda: one_owned(cluster, "services", uid), what="Service")
    dep = await eventually(lambda: one_owned(cluster, "deployments", uid), what="Deployment")
    await eventually(lambda: one_owned(cluster, "poddisruptionbudgets", uid), what="PDB")
    svc_name = svc["metadata"]["name"]
    assert DNS1035.match(svc_name) and len(svc_name) <= 63, svc_name
    assert all(len(v) <= 63 for v in dep["spec"]["template"]["metadata"]["labels"].values())

    async def served() -> dict[str, Any] | None:
        st = await status_of(cluster, name)
        return st if st.get("service") else None

    st = await eventually(served, what="status.service")
    assert st["service"] == svc_name
    assert st["url"] == f"http://{svc_name}.{NS}.svc.cluster.local:8000"
    assert st["phase"] == "Pending" and condition(st, "Ready").get("reason") != "InvalidSpec"
    assert svc["spec"]["selector"] == {k: dep["spec"]["template"]["metadata"]["labels"][k]
                                       for k in svc["spec"]["selector"]}


# ------------------------------------------------------------------------------ defect 2: write storms

ODD_SPEC: dict[str, Any] = {
    "replicas": 2,
    "resources": {"gpus": 0, "cpu": "1.5m", "memory": "0.5Gi"},
    "runtime": {"env": [
        {"name": "EMPTY", "value": ""},
        {"name": "LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": 1}}},
    ]},
    "scheduling": {
        "tolerations": [{"key": "dedicated", "operator": "Exists", "value": "", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [],
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}], "matchFields": []}]},
        }},
        "nodeSelector": {},
        "priorityClassName": "",
    },
}


async def test_zero_writes_while_idle_for_odd_spec_shapes(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(**ODD_SPEC))
    await cluster.create("gptdeployments", NS, cr("hpa", "uid-hpa", autoscaling={
        "minReplicas": 2, "maxReplicas": 4, "targetInflightRequests": 1000}))
    await eventually(lambda: one_owned(cluster, "horizontalpodautoscalers", "uid-hpa"), what="HPA")
    await settle(cluster, operator, "gpt2", "uid-gpt2", replicas=2)
    dep = await cluster.get("deployments", NS, "gpt2")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["cpu"] == "1500u"  # the server's form, not a rejection
    writes = await idle_writes(cluster, operator)
    assert writes == [], "\n".join(writes)


# ------------------------------------------------------------------ defect 3 / issue 14.4: exact maps


AFFINITY = {
    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}},
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "x"}}}}]},
}


def pod_spec(dep: dict[str, Any] | None) -> dict[str, Any]:
    return ((dep or {}).get("spec") or {}).get("template", {}).get("spec") or {}


async def test_removed_affinity_term_and_whole_affinity_leave_the_deployment(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(scheduling={"affinity": AFFINITY}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert set(pod_spec(dep)["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"scheduling": {"affinity": {"podAntiAffinity": None}}}})

    async def one_term() -> bool:
        return set(pod_spec(await cluster.get("deployments", NS, "gpt2")).get("affinity") or {}) == {"nodeAffinity"}

    await eventually(one_term, what="podAntiAffinity removed from the Deployment")
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"scheduling": {"affinity": None}}})

    async def none() -> bool:
        return "affinity" not in pod_spec(await cluster.get("deployments", NS, "gpt2"))

    await eventually(none, what="affinity removed from the Deployment")


async def test_hand_added_node_selector_and_resource_keys_are_removed(
    cluster: Cluster, operator: RunningOperator
) -> None:
    """Each hand edit on its own: any patch the operator sends replaces the containers list, which would
    hide a missed resources key if both edits came together."""
    await cluster.create("gptdeployments", NS, cr(resources={"gpus": 1, "cpu": "2"}))
    await settle(cluster, operator, "gpt2", "uid-gpt2")
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"template": {"spec": {
        "nodeSelector": {"hand-added": "yes"}}}}})

    async def no_node_selector() -> bool:
        return "nodeSelector" not in pod_spec(await cluster.get("deployments", NS, "gpt2"))

    await eventually(no_node_selector, what="hand-added nodeSelector removed")
    container = pod_spec(await cluster.get("deployments", NS, "gpt2"))["containers"][0]
    res = container["resources"]
    hacked = {**container, "resources": {"limits": {**res["limits"], "memory": "1Gi"},
                                         "requests": {**res["requests"], "ephemeral-storage": "1Gi"}}}
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"template": {"spec": {"containers": [hacked]}}}})

    async def no_extra_keys() -> bool:
        res = pod_spec(await cluster.get("deployments", NS, "gpt2"))["containers"][0]["resources"]
        return "memory" not in res["limits"] and "ephemeral-storage" not in res["requests"]

    await eventually(no_extra_keys, what="hand-added resource keys removed")


# --------------------------------------------------------- defect 4 / 6 / issue 14.1: children restored


@pytest.fixture()
def operator_settings(request: pytest.FixtureRequest) -> Settings:
    """Settings(resync_seconds=0.5) unless a test parametrizes it (``indirect``) with other keywords."""
    return Settings(**{"resync_seconds": 0.5, **getattr(request, "param", {})})


def settings(**kwargs: Any) -> Any:
    return pytest.mark.parametrize("operator_settings", [kwargs], indirect=True, ids=["settings"])


@settings(resync_seconds=60)
async def test_deleted_child_is_restored_by_its_watch_event(cluster: Cluster, operator: RunningOperator) -> None:
    """Settled operator, a resync far away: only the DELETED watch event can bring the child back in time."""
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    for plural in ("deployments", "services", "poddisruptionbudgets"):
        await eventually(lambda p=plural: cluster.get(p, NS, "gpt2"), what=plural)
    await ready_deployment(cluster, replicas=2)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    for plural in ("services", "poddisruptionbudgets", "deployments"):
        old = await cluster.get(plural, NS, "gpt2")
        await cluster.delete(plural, NS, "gpt2")

        async def back(p: str = plural, uid: str = old["metadata"]["uid"]) -> bool:
            obj = await cluster.get(p, NS, "gpt2")
            return obj is not None and obj["metadata"]["uid"] != uid

        await eventually(back, timeout=3, what=f"{plural} restored by its DELETED event")


@settings(scale_to_zero_provider="keda", prometheus_url="http://prom:9090")
async def test_deleted_scaled_object_is_recreated_and_for_a_recreated_cr(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetInflightRequests": 4}}
    await cluster.create("gptdeployments", NS, cr(**spec))
    first = await eventually(lambda: cluster.get("scaledobjects", NS, "gpt2"), what="ScaledObject")
    await operator.resync_passes(2)
    await cluster.delete("scaledobjects", NS, "gpt2")

    async def recreated(uid: str = first["metadata"]["uid"]) -> dict[str, Any] | None:
        obj = await cluster.get("scaledobjects", NS, "gpt2")
        return obj if obj is not None and obj["metadata"]["uid"] != uid else None

    again = await eventually(recreated, timeout=3, what="ScaledObject recreated within a resync")
    # The CR deleted (the garbage collector, played here, removes its children) and recreated: a new one.
    await cluster.delete("gptdeployments", NS, "gpt2")
    for plural in (*CHILDREN, "scaledobjects"):
        for obj in await owned(cluster, plural, "uid-gpt2"):
            await cluster.delete(plural, NS, obj["metadata"]["name"])
    await cluster.create("gptdeployments", NS, cr(uid="uid-gpt2-b", **spec))

    async def new_owner() -> dict[str, Any] | None:
        obj = await cluster.get("scaledobjects", NS, "gpt2")
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        return obj if refs and refs[0]["uid"] == "uid-gpt2-b" else None

    await eventually(new_owner, timeout=5, what="a ScaledObject for the recreated CR")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]


async def test_child_deleted_during_a_watch_gap_is_recreated(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    await settle(cluster, operator, "gpt2", "uid-gpt2", replicas=2)
    old = await cluster.get("deployments", NS, "gpt2")
    # The DELETED event is lost (a watch gap), then the watch expires and kopf re-lists.
    cluster.emulator.delete_silently("deployments", NS, "gpt2")
    cluster.emulator.delete_silently("services", NS, "gpt2")
    await cluster.emulator.expire_watches()

    async def back() -> bool:
        dep = await cluster.get("deployments", NS, "gpt2")
        svc = await cluster.get("services", NS, "gpt2")
        return bool(dep and svc) and dep["metadata"]["uid"] != old["metadata"]["uid"]

    await eventually(back, timeout=5, what="Deployment and Service recreated after the gap")
    lists = [r for r in cluster.requests() if str(r.method).endswith("GET") and "labelSelector" in r.params]
    assert lists, "the resync LISTs the children by label"


# ------------------------------------------------------------------------------- defect 7: no Secrets


async def test_missing_secret_is_reported_from_the_pod_and_never_read(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(model={
        "uri": "hf://org/private", "hfTokenSecretRef": {"name": "hf", "key": "token"}}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment without a Secret read")
    # Play the kubelet: the container can't start, the Secret is missing.
    await cluster.create("pods", NS, {
        "metadata": {"name": "gpt2-abc-1", "labels": dep["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Pending", "containerStatuses": [{
            "name": "runtime", "restartCount": 0, "ready": False,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}}}]},
    })

    async def degraded() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Degraded").get("reason") == "CreateContainerConfigError" else None

    st = await eventually(degraded, what="Degraded CreateContainerConfigError")
    message = condition(st, "Degraded")["message"]
    assert message.startswith("spec.model.hfTokenSecretRef: ") and 'secret "hf" not found' in message
    assert st["phase"] == "Degraded"
    assert not [r for r in cluster.requests() if "/secrets" in str(r.url)], "the operator read a Secret"


# ---------------------------------------------------------------------- defect 9: GC race, canary names


async def test_cr_recreated_before_gc_waits_then_takes_over(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr())
    await eventually(lambda: one_owned(cluster, "services", "uid-gpt2"), what="children of the first CR")
    await eventually(lambda: one_owned(cluster, "deployments", "uid-gpt2"), what="children of the first CR")
    await cluster.delete("gptdeployments", NS, "gpt2")
    await cluster.create("gptdeployments", NS, cr(uid="uid-gpt2-b"))

    async def waiting() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Progressing").get("reason") == "WaitingForGarbageCollection" else None

    st = await eventually(waiting, what="waiting for the garbage collector")
    assert st["phase"] != "Failed" and condition(st, "Ready").get("reason") != "InvalidSpec"
    await operator.resync_passes(2)
    assert (await status_of(cluster))["phase"] != "Failed"
    # Play the garbage collector: the old owner's children go; the new CR's appear.
    for plural in CHILDREN:
        for obj in await owned(cluster, plural, "uid-gpt2"):
            await cluster.delete(plural, NS, obj["metadata"]["name"])
    await eventually(lambda: one_owned(cluster, "deployments", "uid-gpt2-b"), what="new Deployment")
    await eventually(lambda: one_owned(cluster, "services", "uid-gpt2-b"), what="new Service")


async def test_cr_named_like_anothers_canary_does_not_collide(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr("x", "uid-x", replicas=2, rollout={
        "strategy": "Canary", "canary": {"steps": [{"weight": 50}]}}))
    await cluster.create("gptdeployments", NS, cr("x-canary", "uid-xc"))
    await settle(cluster, operator, "x", "uid-x", replicas=2)
    await settle(cluster, operator, "x-canary", "uid-xc")
    await cluster.patch("gptdeployments", NS, "x", {"spec": {"model": {"revision": "v2"}}})

    async def canary() -> list[dict[str, Any]]:
        return [d for d in await owned(cluster, "deployments", "uid-x")
                if d["metadata"]["labels"].get("gptd.io/track") == "canary"]

    await eventually(canary, what="x's canary Deployment")
    mine = await owned(cluster, "deployments", "uid-xc")
    assert len(mine) == 1
    st = await status_of(cluster, "x-canary")
    assert st["phase"] == "Ready", st


# --------------------------------------------------------------------- strict fields: typo = InvalidSpec


async def test_typo_in_affinity_is_invalid_spec_naming_the_field(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(scheduling={"affinity": {"nodeAfinity": {}}}))

    async def invalid() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Ready").get("reason") == "InvalidSpec" else None

    st = await eventually(invalid, what="InvalidSpec")
    assert condition(st, "Ready")["message"].startswith("spec.scheduling.affinity: ")
    assert "nodeAfinity" in condition(st, "Ready")["message"]
    assert await cluster.get("deployments", NS, "gpt2") is None
