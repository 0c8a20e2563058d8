"""End-to-end behaviour of the operator against the emulated API server.

The emulator runs no controllers, so where a real cluster would act (the Deployment controller's
status, the scheduler's pod conditions, the HPA's replica writes, the garbage collector) the test does
it through the API, and says so.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from gptd_operator import builders
from gptd_operator import status as st

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import NS, condition, cr, phase_is, ready_deployment, status_of

pytestmark = pytest.mark.timeout(60)
async def test_create_makes_children(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-gpt2"
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["gptd.io/track"] == "stable" and len(labels["gptd.io/revision"]) == 10
    # None-valued optional fields are not sent on create.
    assert "nodeSelector" not in pod and "affinity" not in pod
    svc = await eventually(lambda: cluster.get("services", NS, "gpt2"), what="Service")
    assert svc["spec"]["ports"][0]["name"] == "http"
    assert svc["metadata"]["ownerReferences"][0]["controller"] is True
    pdb = await eventually(lambda: cluster.get("poddisruptionbudgets", NS, "gpt2"), what="PDB")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert await cluster.get("horizontalpodautoscalers", NS, "gpt2") is None
    st = await eventually(lambda: status_of(cluster), what="status")
    assert st["url"] == "http://gpt2.ns1.svc.cluster.local:8000"
    assert st["selector"] == "app.kubernetes.io/instance=gpt2,app.kubernetes.io/name=gptd-runtime"
    assert st["replicas"] == 0 and st["readyDisplay"] == "0/2" and st["phase"] == "Pending"
    assert st["updateRevision"] == labels["gptd.io/revision"]
    # One Normal Event per child created, on the CR (kopf posts Events of its own too: not counted here).
    async def created_events() -> list[dict[str, Any]] | None:
        evs = [e for e in await cluster.list("events", NS)
               if e.get("reason", "").endswith("Created") and e["involvedObject"].get("uid") == "uid-gpt2"]
        return evs if len(evs) >= 3 else None

    evs = await eventually(created_events, what="Created Events")
    assert sorted((e["reason"], e["type"], e["message"]) for e in evs) == [
        ("DeploymentCreated", "Normal", "Deployment gpt2"),
        ("PodDisruptionBudgetCreated", "Normal", "PodDisruptionBudget gpt2"),
        ("ServiceCreated", "Normal", "Service gpt2"),
    ]


async def test_ready_when_controller_reports_ready(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await ready_deployment(cluster, replicas=2)

    async def ready() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if st.get("phase") == "Ready" else None

    st = await eventually(ready, what="phase Ready")
    assert condition(st, "Ready")["status"] == "True"
    assert condition(st, "Progressing")["status"] == "False"
    assert condition(st, "Degraded")["status"] == "False"
    assert st["readyReplicas"] == 2 and st["readyDisplay"] == "2/2" and st["replicas"] == 2
    assert st["currentRevision"] == st["updateRevision"]
    assert condition(st, "Ready")["observedGeneration"] == 1


async def test_revision_change_updates_deployment(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr())
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    old = dep["spec"]["template"]["metadata"]["labels"]["gptd.io/revision"]
    await ready_deployment(cluster, replicas=1)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"generation": 2},
                                                       "spec": {"model": {"revision": "v2"}}})

    async def new_revision() -> dict[str, Any] | None:
        d = await cluster.get("deployments", NS, "gpt2")
        labels = d["spec"]["template"]["metadata"]["labels"] if d else {}
        return d if labels.get("gptd.io/revision") not in (None, old) else None

    dep = await eventually(new_revision, what="new revision label")
    # Play the Deployment controller mid-rollout: the new pod is not updated/ready yet.
    await cluster.patch("deployments", NS, "gpt2", {"status": {"updatedReplicas": 0, "replicas": 2}}, sub="status")

    async def rolling_out() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Progressing").get("reason") == "RollingOut" else None

    st = await eventually(rolling_out, what="Progressing RollingOut")
    assert st["currentRevision"] == old and st["updateRevision"] != old
    assert condition(st, "Ready")["status"] == "False"
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GPTD_REVISION"] == "v2"
    assert dep["metadata"]["annotations"]["gptd.io/revision"] == dep["spec"]["template"]["metadata"]["labels"][
        "gptd.io/revision"]


async def test_deleted_and_edited_children_are_restored(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await eventually(lambda: cluster.get("services", NS, "gpt2"), what="Service")
    await cluster.delete("deployments", NS, "gpt2")
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="restored Deployment")
    assert dep["spec"]["replicas"] == 2
    # A hand edit of a field we own is reverted.
    await cluster.patch("services", NS, "gpt2", {"spec": {"selector": {"app": "hijacked"}}})

    async def selector_back() -> bool:
        svc = await cluster.get("services", NS, "gpt2")
        return bool(svc) and svc["spec"]["selector"] == builders.selector_labels("gpt2")

    await eventually(selector_back, what="Service selector restored")
    # A hand edit inside the pod template (a list we own) is reverted as well.
    dep = await cluster.get("deployments", NS, "gpt2")
    containers = dep["spec"]["template"]["spec"]["containers"]
    image = containers[0]["image"]
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"template": {"spec": {
        "containers": [{**containers[0], "image": "evil:latest"}]}}}})

    async def image_back() -> bool:
        d = await cluster.get("deployments", NS, "gpt2")
        return bool(d) and d["spec"]["template"]["spec"]["containers"][0]["image"] == image

    await eventually(image_back, what="container image restored")


async def test_noop_resync_makes_zero_writes(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    await cluster.create("gptdeployments", NS, cr("other", "uid-other", autoscaling={
        "minReplicas": 2, "maxReplicas": 4, "targetInflightRequests": 4}))
    await eventually(lambda: cluster.get("poddisruptionbudgets", NS, "gpt2"), what="children")
    await eventually(lambda: cluster.get("horizontalpodautoscalers", NS, "other"), what="children")
    await ready_deployment(cluster, replicas=2)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    await operator.resync_passes(2)  # settle: every reaction to our own writes is done
    before = len(cluster.requests())
    reconciles = operator.reconciler.reconciles
    await operator.resync_passes(3)
    assert operator.reconciler.reconciles >= reconciles + 6  # 2 CRs x 3 passes really ran
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))


async def test_invalid_spec_sets_status_and_creates_nothing(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(model={"uri": "ftp://nope"}))

    async def invalid() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Ready").get("reason") == "InvalidSpec" else None

    st = await eventually(invalid, what="InvalidSpec")
    ready = condition(st, "Ready")
    assert ready["status"] == "False" and "spec.model.uri" in ready["message"]
    assert st["phase"] == "Failed"
    await operator.resync_passes(2)
    assert await cluster.list("deployments", NS) == []
    assert await cluster.list("services", NS) == []
    # One Warning Event, not one per resync.
    warnings = [r for r in cluster.requests() if "/events" in str(r.url) and (r.data or {}).get("type") == "Warning"]
    assert len(warnings) == 1 and warnings[0].data["reason"] == "InvalidSpec"


async def test_a_foreign_object_with_the_childs_name_is_never_adopted(
    cluster: Cluster, operator: RunningOperator
) -> None:
    # Someone's own Deployment already has the name the CR's stable Deployment would get.
    foreign = {"metadata": {"name": "gpt2", "labels": {"team": "other"}},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "other"}}}}
    await cluster.create("deployments", NS, foreign)
    await cluster.create("gptdeployments", NS, cr())

    async def invalid() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Ready").get("reason") == "InvalidSpec" else None

    st = await eventually(invalid, what="InvalidSpec")
    assert condition(st, "Ready")["message"].startswith("metadata.name: Deployment gpt2 already exists")
    await operator.resync_passes(2)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert dep["spec"]["replicas"] == 2 and dep["metadata"]["labels"] == {"team": "other"}
    assert not dep["metadata"].get("ownerReferences") and not dep["metadata"].get("annotations")
    assert await cluster.list("services", NS) == []
    warnings = [r for r in cluster.requests() if "/events" in str(r.url) and (r.data or {}).get("type") == "Warning"]
    assert len(warnings) == 1 and warnings[0].data["reason"] == "InvalidSpec"


async def test_secret_goes_to_the_pod_by_reference_only(cluster: Cluster, operator: RunningOperator) -> None:
    """The operator never reads Secrets (a missing one is reported from the pod: test_real_apiserver.py)."""
    await cluster.create("secrets", NS, {"metadata": {"name": "hf"}, "data": {"token": "aGZfeHl6"}})
    await cluster.create("gptdeployments", NS, cr(model={
        "uri": "hf://org/private", "hfTokenSecretRef": {"name": "hf", "key": "token"}}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert "aGZfeHl6" not in str(dep)
    reads = [r for r in cluster.requests() if "/secrets" in str(r.url) and str(r.method).upper().endswith("GET")]
    assert not reads, "the operator read a Secret"


async def test_degraded_when_pod_unschedulable(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr())
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    # Play the ReplicaSet controller and the scheduler: a pod that can't get a GPU.
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    await cluster.create("pods", NS, {
        "metadata": {"name": "gpt2-abc-1", "labels": dep["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    })

    async def degraded() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if st.get("phase") == "Degraded" else None

    st = await eventually(degraded, what="Degraded")
    deg = condition(st, "Degraded")
    assert deg["status"] == "True" and deg["reason"] == "Unschedulable"
    assert message in deg["message"]
    assert condition(st, "Ready")["status"] == "False"


async def test_degraded_on_crashloop(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr())
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await cluster.create("pods", NS, {
        "metadata": {"name": "gpt2-abc-2", "labels": dep["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "runtime", "restartCount": 4, "ready": False,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}}]},
    })

    async def degraded() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Degraded").get("reason") == "CrashLoopBackOff" else None

    st = await eventually(degraded, what="CrashLoopBackOff")
    assert "gpt2-abc-2" in condition(st, "Degraded")["message"]


async def test_delete_leaves_nothing_behind(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2, autoscaling={
        "minReplicas": 2, "maxReplicas": 3, "targetInflightRequests": 2}))
    for plural in ("deployments", "services", "poddisruptionbudgets", "horizontalpodautoscalers"):
        obj = await eventually(lambda p=plural: cluster.get(p, NS, "gpt2"), what=plural)
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [builders.owner_reference("gpt2", "uid-gpt2")], plural
    # kopf writes its diff base after the handler returns, which can be after the children appear: wait for it.
    async def handled() -> dict[str, Any] | None:
        obj = await cluster.get("gptdeployments", NS, "gpt2")
        return obj if "gptd.io/last-handled-configuration" in obj["metadata"].get("annotations", {}) else None

    gptd = await eventually(handled, what="kopf's last-handled-configuration annotation")
    assert not gptd["metadata"].get("finalizers"), "no finalizer: deletion never waits for the operator"
    # kopf's bookkeeping lives under our prefix, with valid annotation keys.
    kopf_keys = [k for k in gptd["metadata"].get("annotations", {}) if k.startswith("gptd.io/")]
    assert all(re.fullmatch(r"gptd\.io/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", k) for k in kopf_keys), kopf_keys
    await cluster.delete("gptdeployments", NS, "gpt2")
    # Play the garbage collector (the emulator has none): delete what the CR's uid owns.
    for plural in ("deployments", "services", "poddisruptionbudgets", "horizontalpodautoscalers"):
        for obj in await cluster.list(plural, NS):
            if any(r["uid"] == "uid-gpt2" for r in obj["metadata"].get("ownerReferences", [])):
                await cluster.delete(plural, NS, obj["metadata"]["name"])
    await operator.resync_passes(2)
    for plural in ("deployments", "services", "poddisruptionbudgets", "horizontalpodautoscalers"):
        assert await cluster.list(plural, NS) == [], plural


async def test_autoscaling_creates_hpa_and_never_overwrites_replicas(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=1, autoscaling={
        "minReplicas": 1, "maxReplicas": 5, "targetInflightRequests": 4}))
    hpa = await eventually(lambda: cluster.get("horizontalpodautoscalers", NS, "gpt2"), what="HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gpt2" and hpa["spec"]["maxReplicas"] == 5
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert "replicas" not in dep["spec"]
    # Play the HPA: it scales the Deployment to 4.
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"replicas": 4}})
    await cluster.patch("horizontalpodautoscalers", NS, "gpt2",
                        {"status": {"currentReplicas": 1, "desiredReplicas": 4}}, sub="status")
    before = len(cluster.requests())
    await operator.resync_passes(3)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert dep["spec"]["replicas"] == 4
    assert [w for w in cluster.writes(before) if "/deployments/" in w] == []
    st = await eventually(lambda: _desired(cluster, 4), what="desiredReplicas 4")
    assert st["autoscaling"] == {"currentReplicas": 1, "desiredReplicas": 4}


async def _desired(cluster: Cluster, n: int) -> dict[str, Any] | None:
    st = await status_of(cluster)
    return st if st.get("desiredReplicas") == n and st.get("autoscaling") else None


async def test_scale_subresource_moves_deployment(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=1))
    await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    # `kubectl scale gptd/gpt2 --replicas=3` PATCHes the scale subresource with a Scale body; the emulator
    # merges that body ({"spec": {"replicas": 3}}) into the object, which is what the real one's mapping does.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"replicas": 3}}, sub="scale")

    async def scaled() -> bool:
        d = await cluster.get("deployments", NS, "gpt2")
        return bool(d) and d["spec"].get("replicas") == 3

    await eventually(scaled, what="Deployment replicas 3")
    pdb = await eventually(lambda: cluster.get("poddisruptionbudgets", NS, "gpt2"), what="PDB after scale-up")
    assert pdb["spec"]["maxUnavailable"] == 1
    async def status_scaled() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if st.get("desiredReplicas") == 3 else None

    st = await eventually(status_scaled, what="status.desiredReplicas 3")
    # What `kubectl scale` reads back through the scale subresource: the pod selector and the pod count.
    assert st["selector"] == "app.kubernetes.io/instance=gpt2,app.kubernetes.io/name=gptd-runtime"
    assert st["replicas"] == 0 and st["readyDisplay"] == "0/3"  # no pods yet (no controllers here)


async def test_canary_rollout_creates_canary_deployment(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2, rollout={
        "strategy": "Canary", "canary": {"steps": [{"weight": 50}]}}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    old = dep["spec"]["template"]["metadata"]["labels"]["gptd.io/revision"]
    await ready_deployment(cluster, replicas=2)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="first revision Ready")
    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"generation": 2},
                                                       "spec": {"model": {"revision": "v2"}}})
    canary = await eventually(lambda: cluster.get("deployments", NS, "gpt2-canary"), what="canary Deployment")
    labels = canary["spec"]["template"]["metadata"]["labels"]
    assert labels["gptd.io/track"] == "canary" and labels["gptd.io/revision"] != old
    assert canary["spec"]["selector"]["matchLabels"]["gptd.io/track"] == "canary"
    assert canary["metadata"]["ownerReferences"][0]["uid"] == "uid-gpt2"
    stable = await cluster.get("deployments", NS, "gpt2")
    assert stable["spec"]["template"]["metadata"]["labels"]["gptd.io/revision"] == old
    svc = await cluster.get("services", NS, "gpt2")
    assert "gptd.io/track" not in svc["spec"]["selector"]  # both tracks get traffic
    st = await status_of(cluster)
    assert st["rollout"]["phase"] == "Canary" and st["currentRevision"] == old


async def test_the_status_is_computed_once_per_reconcile_pass(
    cluster: Cluster, operator: RunningOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status.compute_status runs once per pass (in _report), from the objects as applied that pass."""
    passes: list[int] = []  # at each call, which pass made it: read in the operator's thread, in that very pass
    real = st.compute_status

    def counting(**kwargs: Any) -> dict[str, Any]:
        # The reconciler counts a pass when it starts, under the CR's lock (one CR here): the count is this pass's.
        passes.append(operator.reconciler.reconciles)
        return real(**kwargs)

    await cluster.create("gptdeployments", NS, cr(replicas=2))
    await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await ready_deployment(cluster, replicas=2)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    await operator.resync_passes(2)  # settle: every reaction to our own writes is done
    monkeypatch.setattr(st, "compute_status", counting)  # looked up at each call, in the operator's thread
    await operator.resync_passes(3)
    seen = list(passes)
    # a pass in flight when the patch landed counts like any other: each pass exactly once, none skipped
    assert len(set(seen)) >= 3, seen
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
