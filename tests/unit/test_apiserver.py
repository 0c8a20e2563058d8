"""The emulated API server behaves like a real kube-apiserver where the operator depends on it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kmock
import pytest
from gptd_operator.observe import observe_job

from tests.support.apiserver import ApiServer
from tests.support.cluster import Cluster, register_resources
from tests.support.jobs import complete_condition, failed_condition, job_condition, mark_job
from tests.support.quantity import canonical

NS = "ns1"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICES = f"/api/v1/namespaces/{NS}/services"
MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture()
async def http() -> AsyncIterator[tuple[ApiServer, aiohttp.ClientSession]]:
    async with ApiServer() as k, kmock.Server(k) as srv:
        register_resources(k)
        async with aiohttp.ClientSession(str(srv.url).rstrip("/")) as session:
            yield k, session


async def call(session: aiohttp.ClientSession, method: str, path: str, body: Any = None,
               **kw: Any) -> tuple[int, Any]:
    headers = MERGE if method == "PATCH" else {}
    async with session.request(method, path, json=body, headers=headers, **kw) as resp:
        return resp.status, json.loads(await resp.text() or "null")


def deployment(name: str = "d", **pod: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", **pod}]}}}}


@pytest.mark.parametrize(("given", "want"), [
    ("0.5", "500m"), ("1.5m", "1500u"), (1000, "1k"), ("1000", "1k"), (4, "4"), ("1.5Gi", "1536Mi"),
    ("1024Mi", "1Gi"), ("0.5Ki", "512"), ("1e3", "1e3"), ("1.5e3", "1500"), ("0.1n", "1n"), ("1500", "1500"),
    ("0", "0"), ("100m", "100m"), ("2000m", "2"),
])
def test_quantities_canonicalise_like_apimachinery(given: Any, want: str) -> None:
    assert canonical(given) == want


async def test_service_name_must_be_a_dns1035_label(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    status, body = await call(s, "POST", SERVICES, {"metadata": {"name": "llama-3.1-8b"}, "spec": {}})
    assert status == 422 and body["kind"] == "Status" and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    assert body["message"].startswith('Service "llama-3.1-8b" is invalid: metadata.name: Invalid value')
    # The same name is a valid Deployment name (a DNS-1123 subdomain).
    status, _ = await call(s, "POST", DEPLOYMENTS, deployment("llama-3.1-8b"))
    assert status == 201 or status == 200


async def test_label_values_longer_than_63_are_refused(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    status, body = await call(s, "POST", SERVICES, {"metadata": {"name": "x", "labels": {"k": "v" * 64}}})
    assert status == 422 and "must be no more than 63 characters" in body["message"]


async def test_omitempty_and_quantities_on_create(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    status, body = await call(s, "POST", DEPLOYMENTS, deployment(
        env=[{"name": "X", "value": ""}],
        resources={"limits": {"cpu": "0.5", "memory": 1000}, "requests": {}},
    ))
    assert status < 300, body
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == [{"name": "X"}]
    assert container["resources"] == {"limits": {"cpu": "500m", "memory": "1k"}}
    assert body["metadata"]["generation"] == 1 and body["metadata"]["uid"]


async def test_unknown_fields_dropped_or_refused_when_strict(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    typo = deployment(imagePullPolicyy="Always")
    status, body = await call(s, "POST", DEPLOYMENTS, typo, params={"fieldValidation": "Strict"})
    assert status == 400 and 'unknown field "spec.template.spec.containers[0].imagePullPolicyy"' in body["message"]
    status, body = await call(s, "POST", DEPLOYMENTS, typo)
    assert status < 300 and "imagePullPolicyy" not in body["spec"]["template"]["spec"]["containers"][0]


async def test_merge_patch_semantics_and_generation(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    dep = deployment()
    dep["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {}, "podAntiAffinity": {}}
    await call(s, "POST", DEPLOYMENTS, dep)
    # A map in a merge patch merges: the old key stays; only null removes.
    _, body = await call(s, "PATCH", f"{DEPLOYMENTS}/d", {"spec": {"template": {"spec": {"affinity": {}}}}})
    assert set(body["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    assert body["metadata"]["generation"] == 1  # nothing changed
    _, body = await call(s, "PATCH", f"{DEPLOYMENTS}/d",
                         {"spec": {"template": {"spec": {"affinity": {"podAntiAffinity": None}}}}})
    assert set(body["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity"}
    assert body["metadata"]["generation"] == 2
    # Status patches never bump generation and never touch spec.
    _, body = await call(s, "PATCH", f"{DEPLOYMENTS}/d/status", {"status": {"replicas": 1}, "spec": {"replicas": 9}})
    assert body["status"] == {"replicas": 1} and "replicas" not in body["spec"]
    assert body["metadata"]["generation"] == 2
    status, _ = await call(s, "PATCH", f"{DEPLOYMENTS}/missing", {"spec": {}})
    assert status == 404


async def test_list_pagination_and_label_selector(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    _, s = http
    for i in range(5):
        await call(s, "POST", SERVICES, {"metadata": {"name": f"s{i}", "labels": {"odd": str(i % 2)}}})
    names, token = [], None
    while True:
        params = {"limit": "2", **({"continue": token} if token else {})}
        _, body = await call(s, "GET", SERVICES, params=params)
        names += [o["metadata"]["name"] for o in body["items"]]
        token = body["metadata"].get("continue")
        if not token:
            break
    assert names == ["s0", "s1", "s2", "s3", "s4"]
    _, body = await call(s, "GET", SERVICES, params={"labelSelector": "odd=1"})
    assert [o["metadata"]["name"] for o in body["items"]] == ["s1", "s3"]


async def test_expire_watches_sends_410(http: tuple[ApiServer, aiohttp.ClientSession]) -> None:
    k, s = http
    async with s.get(SERVICES, params={"watch": "true"}) as resp:
        await asyncio.sleep(0.1)
        await k.expire_watches()
        line = await asyncio.wait_for(resp.content.readline(), 5)
    event = json.loads(line)
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


async def test_pod_status_conditions_merge_by_type_under_strategic_merge_patch(
    http: tuple[ApiServer, aiohttp.ClientSession],
) -> None:
    """The operator sets the readiness-gate condition with a strategic merge patch: the kubelet's conditions stay (a
    JSON merge patch would replace the list, as on a real server)."""
    _, s = http
    pods = f"/api/v1/namespaces/{NS}/pods"
    kubelet = [{"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "False"}]
    status, _ = await call(s, "POST", pods, {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "i"}]}, "status": {"conditions": kubelet}})
    assert status in (200, 201)
    gate = {"type": "gptd.io/evaluated", "status": "True"}
    async with s.patch(f"{pods}/p/status", json={"status": {"conditions": [gate]}},
                       headers={"Content-Type": "application/strategic-merge-patch+json"}) as resp:
        assert resp.status == 200
    _, pod = await call(s, "GET", f"{pods}/p")
    assert pod["status"]["conditions"] == [*kubelet, gate]
    async with s.patch(f"{pods}/p/status", json={"status": {"conditions": [{**gate, "status": "False"}]}},
                       headers={"Content-Type": "application/strategic-merge-patch+json"}) as resp:
        assert resp.status == 200
    _, pod = await call(s, "GET", f"{pods}/p")
    assert pod["status"]["conditions"] == [*kubelet, {**gate, "status": "False"}]  # replaced by type, not added
    status, _ = await call(s, "PATCH", f"{pods}/p/status", {"status": {"conditions": [gate]}})  # merge patch
    _, pod = await call(s, "GET", f"{pods}/p")
    assert pod["status"]["conditions"] == [gate]


async def test_the_job_controller_stand_in_stamps_conditions_as_a_real_one(
    http: tuple[ApiServer, aiohttp.ClientSession],
) -> None:
    """tests/support/jobs.py: a real Job controller sets lastProbeTime and lastTransitionTime (metav1.Time: RFC 3339,
    UTC, seconds, Z) on every condition; the operator measures the grace of a Job seen Failed from the latter."""
    k, session = http
    cluster = Cluster(k, session)
    await cluster.create("jobs", NS, {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "containers": [{"name": "c", "image": "i"}], "restartPolicy": "Never"}}}})
    before = datetime.now(UTC).replace(microsecond=0)
    await mark_job(cluster, NS, "j", failed_condition(), failed=1)
    job = await cluster.get("jobs", NS, "j")
    (cond,) = job["status"]["conditions"]  # type: ignore[index]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cond["lastTransitionTime"]), cond
    assert cond["lastProbeTime"] == cond["lastTransitionTime"] and cond["reason"] == "BackoffLimitExceeded"
    failed_since = observe_job(job).failed_since  # type: ignore[arg-type]
    assert failed_since is not None and before <= failed_since <= datetime.now(UTC)
    assert "lastTransitionTime" in job_condition("SuccessCriteriaMet") and "lastProbeTime" in complete_condition()
    # set by the test...
    await mark_job(cluster, NS, "j", complete_condition(at="2026-01-01T00:00:40Z"), succeeded=1)
    (cond,) = (await cluster.get("jobs", NS, "j"))["status"]["conditions"]  # type: ignore[index]
    assert cond == {"type": "Complete", "status": "True", "lastProbeTime": "2026-01-01T00:00:40Z",
                    "lastTransitionTime": "2026-01-01T00:00:40Z"}
    # ...or left out, explicitly (a test that depends on "no lastTransitionTime: judged at once")
    await mark_job(cluster, NS, "j", failed_condition(at=None), failed=1)
    job = await cluster.get("jobs", NS, "j")
    (cond,) = job["status"]["conditions"]  # type: ignore[index]
    assert "lastTransitionTime" not in cond and "lastProbeTime" not in cond
    assert observe_job(job).failed_since is None  # type: ignore[arg-type]
