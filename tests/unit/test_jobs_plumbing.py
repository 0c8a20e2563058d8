"""Shared plumbing for the Jobs gptd runs (model download, evaluation): labels, names, JobObs, the snapshot, and
the emulator's handling of Jobs and PersistentVolumeClaims."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
import pytest
from gptd_operator import builders, handlers, kube, names, observe

from tests.support.apiserver import ApiServer
from tests.support.cluster import register_resources

NS = "ns1"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"


def test_kube_knows_jobs_and_claims() -> None:
    assert kube.BY_KIND["Job"].path(NS, "j") == JOBS + "/j"
    assert kube.BY_KIND["PersistentVolumeClaim"].path(NS, "c") == PVCS + "/c"


def test_job_labels_never_select_as_serving_pods() -> None:
    labels = builders.job_labels("gpt2", "model-download", "abc123")
    # The Service, PDB and NetworkPolicy select these two labels: a Job's pod must not match them.
    selector = builders.selector_labels("gpt2")
    assert not all(labels.get(k) == v for k, v in selector.items())
    assert labels[builders.LABEL_INSTANCE] == "gpt2" and labels[builders.LABEL_COMPONENT] == "model-download"
    assert labels[builders.LABEL_REVISION] == "abc123"


@pytest.mark.parametrize("cr", ["gpt2", "a" * 56, "llama-3.1-8b", "x" * 253])
def test_job_names_fit_the_job_name_label(cr: str) -> None:
    name = names.job(cr, "fetch", "0123456789")
    assert len(name) <= 63 and name.endswith("-fetch-0123456789")
    assert names.job(cr + "b", "fetch", "0123456789") != name  # distinct CRs, distinct Jobs


def test_model_cache_claim_name() -> None:
    assert names.model_cache("gpt2") == "gpt2-model-cache"


def _job(name: str = "gpt2-fetch-r1", **status: Any) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "labels": builders.job_labels("gpt2", "model-download", "r1"),
                         "ownerReferences": [builders.owner_reference("gpt2", "uid-gpt2")]},
            "status": status}


def _pod(name: str, job: str, created: str, state: dict[str, Any]) -> dict[str, Any]:
    labels = {**builders.job_labels("gpt2", "model-download", "r1"), "batch.kubernetes.io/job-name": job}
    return {"metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": labels,
                         "creationTimestamp": created},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "fetch", "state": state}]}}


def test_observe_job_reads_conditions_and_the_latest_pods_termination() -> None:
    job = _job(active=0, failed=2, startTime="2026-01-01T00:00:00Z",
               conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                            "message": "Job has reached the specified backoff limit"}])
    pods = [
        _pod("gpt2-fetch-r1-aaaaa", "gpt2-fetch-r1", "2026-01-01T00:00:01Z",
             {"terminated": {"exitCode": 1, "message": '{"error": "first"}'}}),
        _pod("gpt2-fetch-r1-bbbbb", "gpt2-fetch-r1", "2026-01-01T00:00:09Z",
             {"terminated": {"exitCode": 1, "message": '{"error": "401 Unauthorized", "reason": "Unauthorized"}'}}),
        _pod("other-zzzzz", "other-job", "2026-01-01T00:00:10Z", {"terminated": {"exitCode": 0}}),
    ]
    obs = observe.observe_job(job, pods)
    assert (obs.name, obs.revision, obs.purpose) == ("gpt2-fetch-r1", "r1", "model-download")
    assert obs.failed == 2 and obs.finally_failed and not obs.complete
    assert obs.condition("Failed") == ("True", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert obs.pod_name == "gpt2-fetch-r1-bbbbb" and obs.exit_code == 1
    assert json.loads(obs.message)["reason"] == "Unauthorized"
    assert obs.start_time is not None and obs.start_time.year == 2026 and obs.completion_time is None


def test_observe_job_running_pod_and_pod_found_by_owner_reference() -> None:
    pod = _pod("p", "ignored", "2026-01-01T00:00:01Z", {"running": {"startedAt": "2026-01-01T00:00:02Z"}})
    pod["metadata"]["labels"].pop("batch.kubernetes.io/job-name")
    pod["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "gpt2-fetch-r1", "controller": True}]
    obs = observe.observe_job(_job(active=1), [pod])
    assert obs.running and obs.active == 1 and obs.exit_code is None and obs.pod_name == "p"


def test_snapshot_separates_job_pods_from_serving_pods() -> None:
    key = (NS, "gpt2")
    serving = {"metadata": {"name": "gpt2-abc", "uid": "u1", "labels": builders.common_labels("gpt2")}}
    job_pod = _pod("gpt2-fetch-r1-x", "gpt2-fetch-r1", "2026-01-01T00:00:01Z", {"running": {}})
    stray = _pod("stray-x", "someone-elses-job", "2026-01-01T00:00:01Z", {"running": {}})
    foreign_job = _job("gpt2-fetch-r0")
    foreign_job["metadata"]["ownerReferences"] = [builders.owner_reference("gpt2", "another-uid")]
    pvc = {"metadata": {"name": "gpt2-model-cache", "uid": "c1", "labels": builders.common_labels("gpt2")}}
    indices = {"gptd_pods": {key: [serving]}, "gptd_job_pods": {key: [job_pod, stray]},
               "gptd_jobs": {key: [_job(), foreign_job]}, "gptd_pvcs": {key: [pvc]}}
    children = handlers.snapshot(indices, NS, "gpt2", "uid-gpt2")
    assert [p["metadata"]["name"] for p in children.pods] == ["gpt2-abc"]
    assert [j["metadata"]["name"] for j in children.jobs] == ["gpt2-fetch-r1"]  # not another CR uid's
    assert [p["metadata"]["name"] for p in children.job_pods] == ["gpt2-fetch-r1-x"]
    # A retained claim has no ownerReference and is still the CR's cache.
    assert children.pvc is pvc and children.by_kind("PersistentVolumeClaim", "gpt2-model-cache", "gpt2") is pvc
    assert children.by_kind("Job", "gpt2-fetch-r1", "gpt2") is children.jobs[0]


async def test_the_runtime_pod_index_skips_pods_with_a_component_label() -> None:
    labels = {**builders.common_labels("gpt2"), builders.LABEL_COMPONENT: "evaluation"}
    body = {"metadata": {"name": "p", "namespace": NS, "labels": labels}, "status": {}}
    assert await handlers.index_pods(namespace=NS, labels=labels, body=body) is None
    assert await handlers.index_job_pods(namespace=NS, labels=labels, body=body) is not None


def test_relist_covers_jobs_claims_and_job_pods() -> None:
    listed = {(res.plural, sel) for res, sel in handlers.LISTED}
    assert ("jobs", "app.kubernetes.io/managed-by=gptd-operator") in listed
    assert ("persistentvolumeclaims", "app.kubernetes.io/managed-by=gptd-operator") in listed
    assert ("pods", "app.kubernetes.io/name=gptd-job") in listed


# ------------------------------------------------------------------------------------------ emulator


@pytest.fixture()
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with ApiServer() as k, kmock.Server(k) as srv:
        register_resources(k)
        async with aiohttp.ClientSession(str(srv.url).rstrip("/")) as session:
            yield session


async def call(session: aiohttp.ClientSession, method: str, path: str, body: Any = None,
               params: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    async with session.request(method, path, json=body, headers=headers, params=params) as resp:
        return resp.status, json.loads(await resp.text() or "null")


def job_body(name: str = "j", **container: Any) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 3, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "c", "image": "i", "resources": {"requests": {"memory": "0.5Gi"}}, **container}]}}}}


async def test_emulator_walks_jobs_against_the_schema(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "POST", JOBS, job_body(bogus=1), {"fieldValidation": "Strict"})
    assert status == 400 and 'unknown field "spec.template.spec.containers[0].bogus"' in body["message"]
    status, body = await call(http, "POST", JOBS, job_body())
    assert status in (200, 201)
    assert body["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "512Mi"
    status, body = await call(http, "POST", JOBS, job_body("j" * 64))
    assert status == 422 and body["details"]["causes"][0]["field"] == "metadata.name"
    # The status subresource: a main-resource PATCH never changes status.
    await call(http, "PATCH", f"{JOBS}/j/status", {"status": {"active": 1}})
    status, body = await call(http, "PATCH", f"{JOBS}/j", {"status": {"active": 5}})
    assert body["status"] == {"active": 1}


async def test_emulator_walks_claims_against_the_schema(http: aiohttp.ClientSession) -> None:
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                    "resources": {"requests": {"storage": "40960Mi"}}}}
    status, body = await call(http, "POST", PVCS, {**pvc, "spec": {**pvc["spec"], "size": "1Gi"}},
                              {"fieldValidation": "Strict"})
    assert status == 400 and 'unknown field "spec.size"' in body["message"]
    status, body = await call(http, "POST", PVCS, pvc)
    assert status in (200, 201) and body["spec"]["resources"]["requests"]["storage"] == "40Gi"


async def test_emulator_serves_pod_logs_and_kube_reads_their_tail() -> None:
    async with ApiServer() as k, kmock.Server(k) as srv:
        register_resources(k)
        client = kube.Kube(kube.Config(server=str(srv.url).rstrip("/")))
        try:
            async with aiohttp.ClientSession(str(srv.url).rstrip("/")) as http:
                await call(http, "POST", f"/api/v1/namespaces/{NS}/pods", {"metadata": {"name": "p"}})
            assert await client.pod_log(NS, "missing") is None  # 404
            assert await client.pod_log(NS, "p") is None  # no log yet: 400 "waiting to start"
            k.set_pod_log(NS, "p", "".join(f'{{"bytesDone": {i}}}\n' for i in range(10)))
            assert await client.pod_log(NS, "p", tail_lines=2) == '{"bytesDone": 8}\n{"bytesDone": 9}\n'
        finally:
            await client.close()


async def test_emulator_refuses_what_a_real_server_cannot_change(http: aiohttp.ClientSession) -> None:
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
           "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}}
    await call(http, "POST", PVCS, pvc)
    status, body = await call(http, "PATCH", f"{PVCS}/c", {"spec": {"accessModes": ["ReadWriteOnce"]}})
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec"
    status, body = await call(http, "PATCH", f"{PVCS}/c", {"spec": {"resources": {"requests": {"storage": "5Gi"}}}})
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec.resources.requests.storage"
    status, body = await call(http, "PATCH", f"{PVCS}/c", {"spec": {"resources": {"requests": {"storage": "20Gi"}}}})
    assert status == 200 and body["spec"]["resources"]["requests"]["storage"] == "20Gi"
    await call(http, "POST", JOBS, job_body())
    status, body = await call(http, "PATCH", f"{JOBS}/j", {"spec": {"template": {"spec": {"restartPolicy": "Never",
                                                                                           "containers": []}}}})
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec.template"
    status, _ = await call(http, "PATCH", f"{JOBS}/j", {"metadata": {"labels": {"a": "b"}}})
    assert status == 200
