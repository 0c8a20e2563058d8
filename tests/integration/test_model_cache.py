"""spec.model.cache against the emulated API server (issue 10). The test plays the Job controller and the kubelet:
it creates the download Job's pod, writes its log (fetch's JSON progress lines) and its termination message, and
sets the Job's status, as they would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gptd_operator import builders

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.jobs import complete_condition, failed_condition, mark_job
from tests.support.scenario import (
    NS,
    REV,
    condition,
    cr,
    env_of,
    event,
    labels_of,
    ready_deployment,
    status_of,
    status_where,
)

pytestmark = pytest.mark.timeout(90)
SHA1, SHA2 = "1" * 40, "2" * 40
CACHE = {"size": "10Gi"}


def cached(revision: str = "v1", **cache: Any) -> dict[str, Any]:
    return {"uri": "hf://openai-community/gpt2", "revision": revision, "cache": {**CACHE, **cache}}


async def download_job(cluster: Cluster, *, other_than: tuple[str, ...] = ()) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        for job in await cluster.list("jobs", NS):
            if job["metadata"]["name"] not in other_than:
                return job
        return None

    return await eventually(check, what="a download Job")


async def run_pod(cluster: Cluster, job: dict[str, Any], state: dict[str, Any], suffix: str = "a") -> str:
    """Play the Job controller and the kubelet: the Job's pod, in ``state``."""
    name = f"{job['metadata']['name']}-{suffix}"
    uid = job["metadata"]["uid"]
    # As the Job controller does: the job-name and controller-uid labels, and a controller ownerReference by uid.
    labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"],
              "batch.kubernetes.io/controller-uid": uid}
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": uid, "controller": True,
             "blockOwnerDeletion": True}
    phase = "Running" if "running" in state else ("Succeeded" if state.get("terminated", {}).get("exitCode") == 0
                                                  else "Failed")
    await cluster.create("pods", NS, {"metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
                                      "status": {"phase": phase, "containerStatuses": [{"name": "fetch",
                                                                                         "state": state}]}})
    return name


def progress(done: int, total: int = 4000, files: int = 1) -> str:
    return json.dumps({"bytesDone": done, "bytesTotal": total, "filesDone": files, "filesTotal": 3}) + "\n"


def result(sha: str, total: int = 4000) -> str:
    return json.dumps({"bytesDone": total, "bytesTotal": total, "filesDone": 3, "filesTotal": 3, "revision": sha,
                       "path": f"/var/lib/gptd/model-cache/{sha}", "complete": True})


async def complete(cluster: Cluster, job: dict[str, Any], sha: str, suffix: str = "a") -> None:
    """The pod exits 0 with fetch's result in its termination message; the Job controller marks the Job Complete."""
    pod = f"{job['metadata']['name']}-{suffix}"
    if await cluster.get("pods", NS, pod) is None:
        await run_pod(cluster, job, {"terminated": {"exitCode": 0, "message": result(sha)}}, suffix)
    else:
        await cluster.patch("pods", NS, pod, {"status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "fetch", "state": {"terminated": {"exitCode": 0, "message": result(sha)}}}]}}, sub="status")
    await mark_job(cluster, NS, job["metadata"]["name"], complete_condition(at="2026-01-01T00:00:40Z"), succeeded=1,
                   startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T00:00:40Z")


async def first_deploy(cluster: Cluster) -> dict[str, Any]:
    """A CR with a cache on revision v1, downloaded (SHA1), rolled out and Ready; returns its Deployment."""
    await cluster.create("gptdeployments", NS, cr(model=cached("v1")))
    job = await download_job(cluster)
    await complete(cluster, job, SHA1)
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await ready_deployment(cluster)
    await status_where(cluster, "Ready", lambda st: st.get("phase") == "Ready")
    return dep


async def test_first_deploy_waits_for_the_download_with_progress_in_status(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(model=cached("v1")))
    job = await download_job(cluster)
    pvc = await eventually(lambda: cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache"), what="claim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi" and pvc["metadata"]["ownerReferences"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:8] == ["python", "-m", "gptd_runtime", "fetch", "hf://openai-community/gpt2", "--revision", "v1",
                           "--dest"]
    st = await status_where(cluster, "Downloading",
                            lambda s: condition(s, "Progressing").get("reason") == "Downloading")
    assert condition(st, "Progressing")["status"] == "True" and st["model"]["download"]["phase"] == "Downloading"
    assert (await event(cluster, "DownloadStarted"))["type"] == "Normal"

    pod = await run_pod(cluster, job, {"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    cluster.emulator.set_pod_log(NS, pod, progress(0) + progress(1000))
    st = await status_where(cluster, "25% in status", lambda s: (s.get("model") or {}).get("download", {}).get(
        "percent") == 25)
    dl = st["model"]["download"]
    assert (dl["bytesDone"], dl["bytesTotal"], dl["filesDone"], dl["filesTotal"]) == (1000, 4000, 1, 3)
    assert dl["display"] == "25% of 4.0kB" and "25%" in condition(st, "Progressing")["message"]
    cluster.emulator.set_pod_log(NS, pod, progress(1000) + progress(3000, files=2))
    st = await status_where(cluster, "75%", lambda s: s["model"]["download"].get("percent") == 75)
    assert st["model"]["download"]["bytesPerSecond"] > 0 and st["model"]["download"]["etaSeconds"] is not None
    # Still no Deployment, so no pod asked for a GPU.
    assert await cluster.get("deployments", NS, "gpt2") is None
    assert st["phase"] == "Pending"

    await complete(cluster, job, SHA1)
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment after the download")
    assert env_of(dep)["GPTD_MODEL"] == f"file://{builders.MODEL_CACHE_DIR}/{SHA1}"
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "gpt2-model-cache", "readOnly": True}} in volumes
    finished = await event(cluster, "DownloadFinished")
    assert SHA1 in finished["message"] and "4.0kB" in finished["message"]
    await ready_deployment(cluster)
    st = await status_where(cluster, "Ready", lambda s: s.get("phase") == "Ready")
    assert st["model"]["download"]["phase"] == "Complete" and st["model"]["download"]["sha"] == SHA1


async def test_rollout_after_download_and_a_complete_revision_starts_no_job(
    cluster: Cluster, operator: RunningOperator
) -> None:
    dep = await first_deploy(cluster)
    old_rev, first_job = labels_of(dep)[REV], (await cluster.list("jobs", NS))[0]["metadata"]["name"]
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v2"}}})
    job = await download_job(cluster, other_than=(first_job,))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--keep") + 1] == SHA1  # the mounted revision survives the housekeeping
    await status_where(cluster, "Downloading", lambda s: condition(s, "Progressing").get("reason") == "Downloading")
    await operator.resync_passes(2)
    live = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(live)[REV] == old_rev and env_of(live)["GPTD_MODEL"].endswith(SHA1)  # old pods keep serving
    assert (await status_of(cluster))["phase"] == "Ready"  # they still serve: nothing is wrong

    # Back to v1 mid-download: v1 is complete in the cache (the pods run it): the v2 Job goes, no new Job.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v1"}}})

    async def no_jobs() -> bool:  # (v1's finished Job went when v2's started: other revisions' Jobs are of no use)
        return await cluster.list("jobs", NS) == []

    await eventually(no_jobs, what="the v2 download cancelled and no Job for v1")
    await operator.resync_passes(2)
    assert await no_jobs()
    st = await status_of(cluster)
    assert st["phase"] == "Ready" and st["model"]["download"]["sha"] == SHA1
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old_rev

    # v2 again, this time to the end: the Deployment changes only once the download is complete.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v2"}}})
    job = await download_job(cluster, other_than=(first_job,))
    await complete(cluster, job, SHA2)
    new = await eventually(lambda: _on_sha(cluster, SHA2), what="Deployment on the new commit")
    assert labels_of(new)[REV] != old_rev
    await ready_deployment(cluster)
    st = await status_where(cluster, "v2 Ready", lambda s: s.get("phase") == "Ready" and s.get("currentRevision") ==
                            labels_of(new)[REV])
    assert st["lastGoodTemplate"]["resolved"] == {"sha": SHA2}  # a rollback returns to these very files


async def _on_sha(cluster: Cluster, sha: str) -> dict[str, Any] | None:
    dep = await cluster.get("deployments", NS, "gpt2")
    return dep if dep is not None and env_of(dep)["GPTD_MODEL"].endswith(sha) else None


async def test_a_failed_download_keeps_the_old_pods_and_is_degraded_with_the_hubs_message(
    cluster: Cluster, operator: RunningOperator
) -> None:
    dep = await first_deploy(cluster)
    first_job = (await cluster.list("jobs", NS))[0]["metadata"]["name"]
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "nope"}}})
    job = await download_job(cluster, other_than=(first_job,))
    error = json.dumps({"error": "revision nope not found in openai-community/gpt2 (404 Revision Not Found)",
                        "reason": "RevisionNotFound"})
    await run_pod(cluster, job, {"terminated": {"exitCode": 1, "message": error}})
    await mark_job(cluster, NS, job["metadata"]["name"], failed_condition(), failed=5)
    st = await status_where(cluster, "Degraded", lambda s: s.get("phase") == "Degraded" and condition(
        s, "Progressing").get("reason") == "DownloadFailed")
    degraded = condition(st, "Degraded")
    assert degraded["reason"] == "DownloadFailed" and "revision nope not found" in degraded["message"]
    assert condition(st, "Progressing")["reason"] == "DownloadFailed"
    assert st["model"]["download"]["phase"] == "Failed" and st["model"]["download"]["reason"] == "RevisionNotFound"
    warning = await event(cluster, "DownloadFailed")
    assert warning["type"] == "Warning" and "revision nope not found" in warning["message"]
    await operator.resync_passes(3)
    live = await cluster.get("deployments", NS, "gpt2")
    assert live["spec"]["template"] == dep["spec"]["template"]  # no pod touched
    # No retry storm: the failed Job stays until its backoff (minutes) is over; v1's finished Job is gone.
    assert [j["metadata"]["name"] for j in await cluster.list("jobs", NS)] == [job["metadata"]["name"]]
    failures = [e["message"] for e in await cluster.list("events", NS) if e.get("reason") == "DownloadFailed"]
    assert len(failures) == 1, failures


async def test_a_spec_change_cancels_the_running_download(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(model=cached("v1")))
    job = await download_job(cluster)
    await run_pod(cluster, job, {"running": {}})
    await cluster.patch("jobs", NS, job["metadata"]["name"], {"status": {"active": 1}}, sub="status")
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v2"}}})
    new = await download_job(cluster, other_than=(job["metadata"]["name"],))
    assert new["spec"]["template"]["spec"]["containers"][0]["command"][6] == "v2"

    async def old_gone() -> bool:
        return await cluster.get("jobs", NS, job["metadata"]["name"]) is None

    await eventually(old_gone, what="the v1 download Job deleted")
    assert (await event(cluster, "DownloadCancelled"))["type"] == "Normal"
    assert await cluster.get("deployments", NS, "gpt2") is None
    assert (await status_of(cluster))["model"]["download"]["modelRevision"] == "v2"


async def test_invalid_cache_combinations_create_nothing(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(model={"uri": "pvc://models/gpt2", "cache": CACHE}))
    st = await status_where(cluster, "InvalidSpec", lambda s: s.get("phase") == "Failed")
    for type_ in ("Ready", "Degraded"):
        assert condition(st, type_)["reason"] == "InvalidSpec", st
        assert condition(st, type_)["message"].startswith("spec.model.cache"), st
    assert await cluster.list("jobs", NS) == [] and await cluster.list("persistentvolumeclaims", NS) == []


async def test_a_retained_claim_has_no_owner_and_is_reused_by_a_new_cr_of_the_same_name(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(model=cached("v1", retain=True)))
    pvc = await eventually(lambda: cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache"), what="claim")
    assert "ownerReferences" not in pvc["metadata"]
    await download_job(cluster)
    # `kubectl delete gptd gpt2`; the emulator runs no garbage collector and the claim has no owner anyway.
    await cluster.delete("gptdeployments", NS, "gpt2")
    for plural in ("jobs", "services", "deployments"):  # owned by the CR: play the garbage collector
        for obj in await cluster.list(plural, NS):
            await cluster.delete(plural, NS, obj["metadata"]["name"])
    await cluster.create("gptdeployments", NS, cr(uid="uid-gpt2-again", model=cached("v1", retain=True)))
    async def new_job() -> dict[str, Any] | None:
        return next((j for j in await cluster.list("jobs", NS)
                     if j["metadata"]["ownerReferences"][0]["uid"] == "uid-gpt2-again"), None)

    job = await eventually(new_job, what="the new CR's download Job")
    await complete(cluster, job, SHA1)
    await eventually(lambda: _on_sha(cluster, SHA1), what="the new CR's Deployment on the retained claim")
    claim = await cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache")
    assert claim["metadata"]["uid"] == pvc["metadata"]["uid"]  # the same claim, not a new one
    st = await status_of(cluster)
    assert st.get("phase") != "Failed" and condition(st, "Degraded").get("status") != "True", st


async def test_a_noop_resync_of_a_cached_cr_makes_zero_writes(cluster: Cluster, operator: RunningOperator) -> None:
    await first_deploy(cluster)
    await operator.resync_passes(2)  # settle: every reaction to our own writes is done
    before = len(cluster.requests())
    await operator.resync_passes(3)
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))
    assert len(await events_named(cluster, "DownloadStarted")) == 1


async def events_named(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in await cluster.list("events", NS) if e.get("reason") == reason]


async def test_the_claim_grows_but_its_access_mode_cannot_change(cluster: Cluster, operator: RunningOperator) -> None:
    dep = await first_deploy(cluster)
    jobs = [j["metadata"]["name"] for j in await cluster.list("jobs", NS)]
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"cache": {"size": "20Gi"}}}})

    async def grown() -> bool:
        claim = await cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache")
        return claim["spec"]["resources"]["requests"]["storage"] == "20Gi"

    await eventually(grown, what="the claim's request grown to 20Gi")
    # The claim's size is not revisioned: no download, no rollout.
    await operator.resync_passes(2)
    assert [j["metadata"]["name"] for j in await cluster.list("jobs", NS)] == jobs
    assert condition(await status_of(cluster), "Progressing").get("reason") != "Downloading"
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == labels_of(dep)[REV]
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"cache": {"accessMode": "ReadWriteOnce"}}}})
    st = await status_where(cluster, "InvalidCache", lambda s: condition(s, "Degraded").get("reason") == "InvalidCache")
    assert "spec.model.cache.accessMode" in condition(st, "Degraded")["message"]
    claim = await cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # left as it is
    assert (await cluster.get("deployments", NS, "gpt2"))["spec"]["template"]["spec"]["volumes"] == (
        dep["spec"]["template"]["spec"]["volumes"])


async def test_with_an_evaluation_gate_the_download_comes_first_then_the_gated_rollout(
    cluster: Cluster, operator: RunningOperator
) -> None:
    """Issues 10 and 11 together: a new revision is downloaded before any pod exists, then rolled out gated."""
    dep = await first_deploy(cluster)
    first_job = (await cluster.list("jobs", NS))[0]["metadata"]["name"]
    rows = json.dumps({"prompt": "2 + 2 =", "expected": "4"}) + "\n"
    await cluster.create("configmaps", NS, {"metadata": {"name": "eval"}, "data": {"eval.jsonl": rows}})
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {
        "model": {"revision": "v2"},
        "evaluation": {"dataset": {"configMapRef": {"name": "eval", "key": "eval.jsonl"}}, "minScore": 0.5}}})
    job = await download_job(cluster, other_than=(first_job,))
    assert job["metadata"]["labels"][builders.LABEL_COMPONENT] == "model-download"
    await operator.resync_passes(2)
    live = await cluster.get("deployments", NS, "gpt2")
    assert live["spec"]["template"] == dep["spec"]["template"]  # nothing rolled while downloading
    assert [j["metadata"]["name"] for j in await cluster.list("jobs", NS)] == [job["metadata"]["name"]]

    await complete(cluster, job, SHA2)
    new = await eventually(lambda: _on_sha(cluster, SHA2), what="the gated Deployment on the new commit")
    assert new["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": "gptd.io/evaluated"}]
    assert labels_of(new)[REV] != labels_of(dep)[REV]


async def test_a_refused_resize_or_a_shrink_is_degraded_and_the_other_children_still_apply(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await first_deploy(cluster)
    cluster.emulator.allow_volume_expansion = False  # a class without allowVolumeExpansion: the resize is 403
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"replicas": 3, "model": {"cache": {"size": "20Gi"}}}})
    st = await status_where(cluster, "InvalidCache", lambda s: condition(s, "Degraded").get("reason") == "InvalidCache")
    message = condition(st, "Degraded")["message"]
    assert message.startswith("spec.model.cache:") and "403" in message and "support resize" in message
    assert condition(st, "Ready").get("reason") != "InvalidSpec"

    async def scaled() -> bool:  # the Deployment was still patched, in the same passes
        return (await cluster.get("deployments", NS, "gpt2"))["spec"]["replicas"] == 3

    await eventually(scaled, what="the Deployment scaled to 3 although the claim was refused")
    claim = await cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache")
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    # A smaller request: a conflict found before any write (the server would 422 it); the claim is left alone.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"cache": {"size": "5Gi"}}}})
    st = await status_where(cluster, "shrink refused",
                            lambda s: "spec.model.cache.size" in condition(s, "Degraded").get("message", ""))
    assert condition(st, "Degraded")["reason"] == "InvalidCache"
    assert (await cluster.get("persistentvolumeclaims", NS, "gpt2-model-cache"))["spec"]["resources"]["requests"][
        "storage"] == "10Gi"


async def test_housekeeping_keeps_the_commit_any_live_pod_mounts(cluster: Cluster, operator: RunningOperator) -> None:
    """A→B→C→D: pods of an old ReplicaSet may still run a revision that is neither stable, canary nor last good."""
    dep = await first_deploy(cluster)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels[builders.LABEL_MODEL_SHA] == SHA1
    old = "9" * 40  # an old ReplicaSet's pod, still terminating or serving
    await cluster.create("pods", NS, {"metadata": {"name": "gpt2-old-rs-x", "labels": {
        **labels, builders.LABEL_MODEL_SHA: old, REV: "0123456789"}}, "status": {"phase": "Running"}})
    first_job = (await cluster.list("jobs", NS))[0]["metadata"]["name"]
    await operator.resync_passes(1)
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v2"}}})
    job = await download_job(cluster, other_than=(first_job,))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    keep = command[command.index("--keep") + 1:]
    assert old in keep and SHA1 in keep


async def test_the_evaluation_dataset_is_not_read_while_downloading_and_a_missing_one_does_not_block_it(
    cluster: Cluster, operator: RunningOperator
) -> None:
    dep = await first_deploy(cluster)
    first_job = (await cluster.list("jobs", NS))[0]["metadata"]["name"]
    before = len(cluster.requests())
    # The ConfigMap does not exist yet: the download still starts.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {
        "model": {"revision": "v2"},
        "evaluation": {"dataset": {"configMapRef": {"name": "eval", "key": "eval.jsonl"}}, "minScore": 0.5}}})
    job = await download_job(cluster, other_than=(first_job,))
    await status_where(cluster, "Downloading", lambda s: condition(s, "Progressing").get("reason") == "Downloading")
    await operator.resync_passes(2)
    reads = [str(r.url.path) for r in cluster.requests()[before:] if "/configmaps" in str(r.url.path)]
    assert reads == [], reads  # no dataset GET while the revision downloads
    assert condition(await status_of(cluster), "Ready").get("reason") != "InvalidSpec"
    # Complete: now the gate would start, so the dataset is read, and its absence is InvalidSpec naming it.
    await complete(cluster, job, SHA2)
    st = await status_where(cluster, "InvalidSpec", lambda s: "spec.evaluation.dataset" in json.dumps(
        s.get("conditions") or []))
    assert (await cluster.get("deployments", NS, "gpt2"))["spec"]["template"] == dep["spec"]["template"], st
    rows = json.dumps({"prompt": "2 + 2 =", "expected": "4"}) + "\n"
    await cluster.create("configmaps", NS, {"metadata": {"name": "eval"}, "data": {"eval.jsonl": rows}})
    new = await eventually(lambda: _on_sha(cluster, SHA2), what="the gated Deployment once the dataset exists",
                           timeout=30)
    assert new["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": "gptd.io/evaluated"}]
