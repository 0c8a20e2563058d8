"""spec.model.cache (issue 10): API, the claim and download Job builders, the pods' mounts, the download state
machine and the rollout's wait for it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from gptd_operator import builders as b
from gptd_operator import model_cache as mc
from gptd_operator.api import InvalidSpec, parse_spec
from gptd_operator.normalize import is_subset, strip_none, with_removals
from gptd_operator.observe import DeploymentObs, JobObs, Observations
from gptd_operator.rollout import decide
from gptd_operator.settings import Settings

from tests.support.specs import spec

S = Settings()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SHA = "1" * 40
SHA_OLD = "0" * 40
CACHE = {"size": "40Gi"}


def cached(**cache: Any) -> Any:
    model: dict[str, Any] = {"uri": "hf://org/m", "revision": "v2", "cache": {**CACHE, **cache}}
    return spec(model=model)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ------------------------------------------------------------------------------------------ API


def test_cache_fields_and_defaults() -> None:
    c = cached().model.cache
    assert (c.size, c.storageClassName, c.accessMode, c.retain) == ("40Gi", "", "ReadWriteMany", False)
    assert cached(size=20 * 2**30).model.cache.size == str(20 * 2**30)  # int-or-string, like the API server


@pytest.mark.parametrize(("cache", "field"), [
    ({}, "spec.model.cache.size"),
    ({"size": "lots"}, "spec.model.cache.size"),
    ({"size": "1Gi", "accessMode": "ReadOnlyMany"}, "spec.model.cache.accessMode"),
    ({"size": "1Gi", "sizeLimit": "2Gi"}, "spec.model.cache.sizeLimit"),
])
def test_bad_cache_is_invalid_spec_naming_the_field(cache: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"model": {"uri": "hf://org/m", "cache": cache}})
    assert e.value.field == field


@pytest.mark.parametrize("uri", ["pvc://models/llama", "file:///models/llama"])
def test_cache_with_a_model_already_on_a_volume_is_refused(uri: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        b.check_spec(spec(model={"uri": uri, "cache": CACHE}), Settings(s3_init_image="aws:1"))
    assert e.value.field == "spec.model.cache" and uri.split("://")[0] in e.value.message


def test_revision_hash_of_crs_without_cache_is_unchanged() -> None:
    # Computed by the operator before spec.model.cache existed (main at 8af61e1): no upgrade rolls these.
    assert b.revision_hash(b.revision_template(spec(), S)) == "d9b3632cff"
    other = spec(model={"uri": "hf://org/m", "revision": "v2", "hfTokenSecretRef": {"name": "hf", "key": "token"}},
                 runtime={"maxBatchSize": 8})
    assert b.revision_hash(b.revision_template(other, S)) == "b605d2dcbd"


def test_the_resolved_sha_is_not_part_of_the_revision() -> None:
    template = b.revision_template(cached(), S)
    assert b.revision_hash(template) != b.revision_hash(b.revision_template(spec(), S))  # the cache is revisioned
    assert b.revision_hash(b.with_resolved(template, SHA)) == b.revision_hash(template)
    # The claim's settings change no pod: no new revision (no download, no rollout).
    for change in ({"size": "80Gi"}, {"retain": True}, {"accessMode": "ReadWriteOnce"}, {"storageClassName": "x"}):
        assert b.revision_hash(b.revision_template(cached(**change), S)) == b.revision_hash(template), change
    assert b.resolved_sha(b.with_resolved(template, SHA)) == SHA and b.resolved_sha(template) is None


# ------------------------------------------------------------------------------------------ builders


def test_claim_owned_unless_retained_and_default_class_left_out() -> None:
    pvc = mc.build_pvc("gpt2", "ns", "uid-1", cached())
    assert pvc["metadata"]["name"] == "gpt2-model-cache"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "40Gi"}}}
    kept = mc.build_pvc("gpt2", "ns", "uid-1", cached(retain=True, storageClassName="fast", accessMode="ReadWriteOnce"))
    assert kept["metadata"]["ownerReferences"] is None  # absent when created...
    # ...and removed from a claim created before retain was turned on.
    assert is_subset(kept, pvc) is False and with_removals(kept, pvc)["metadata"]["ownerReferences"] is None
    assert "ownerReferences" not in strip_none(kept)["metadata"]
    assert kept["spec"]["storageClassName"] == "fast" and kept["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert kept["metadata"]["labels"][b.LABEL_INSTANCE] == "gpt2"  # the claim index finds it without an owner


def test_claim_conflicts_name_the_field() -> None:
    live = {"metadata": {"name": "gpt2-model-cache"},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "standard"}}
    assert mc.claim_conflict(live, cached()) is None
    assert mc.claim_conflict(live, cached(size="80Gi")) is None  # growing is allowed
    assert mc.claim_conflict(live, cached(accessMode="ReadWriteOnce"))[0] == "spec.model.cache.accessMode"
    assert mc.claim_conflict(live, cached(storageClassName="fast"))[0] == "spec.model.cache.storageClassName"


def _job(s: Any = None, keep: tuple[str, ...] = (SHA_OLD,), **settings: Any) -> dict[str, Any]:
    s = s or cached()
    settings_ = Settings(**settings) if settings else S
    template = b.revision_template(s, settings_)
    return mc.build_job("gpt2", "ns", "uid-1", s, settings_, revision="abc1234567", template=template, attempt=1,
                        keep=keep)


def test_download_job_runs_fetch_with_its_contract_command_line() -> None:
    job = _job()
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:9] == ["python", "-m", "gptd_runtime", "fetch", "hf://org/m", "--revision", "v2",
                                "--dest", b.MODEL_CACHE_DIR]
    assert c["command"][c["command"].index("--result-file") + 1] == "/dev/termination-log"
    assert c["command"][c["command"].index("--prune"):][:3] == ["--prune", "--keep", SHA_OLD]
    assert c["image"] == S.runtime_image and c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "model", "mountPath": b.MODEL_CACHE_DIR} in c["volumeMounts"]  # read-write here only
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    # Restricted, like the runtime pods.
    assert c["securityContext"] == b.container_security_context(S)
    assert pod["securityContext"] == b.pod_security_context(S)
    assert c["resources"]["limits"] == {"memory": "1Gi"} and "nvidia.com/gpu" not in json.dumps(c["resources"])
    spec_ = job["spec"]
    assert spec_["backoffLimit"] == mc.BACKOFF_LIMIT and spec_["activeDeadlineSeconds"] == 6 * 3600
    assert spec_["ttlSecondsAfterFinished"] == 24 * 3600
    assert job["metadata"]["labels"] == job["spec"]["template"]["metadata"]["labels"] == b.job_labels(
        "gpt2", "model-download", "abc1234567")
    assert job["metadata"]["name"] == "gpt2-fetch-abc1234567-1" and len(job["metadata"]["name"]) <= 63
    assert "nodeSelector" not in pod and "affinity" not in pod  # ReadWriteMany: any (CPU) node
    assert "--token-file" not in c["command"] and "hf-token" not in json.dumps(pod["volumes"])


def test_hub_token_reaches_the_job_as_a_file_never_as_env() -> None:
    s = spec(model={"uri": "hf://org/m", "cache": CACHE, "hfTokenSecretRef": {"name": "hf", "key": "tok"}},
             runtime={"env": [{"name": "HF_ENDPOINT", "value": "http://mirror"}]})
    pod = _job(s)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][c["command"].index("--token-file") + 1] == mc.TOKEN_FILE
    volume = next(v for v in pod["volumes"] if v["name"] == "hf-token")
    assert volume["secret"]["secretName"] == "hf" and volume["secret"]["items"] == [{"key": "tok", "path": "token"}]
    assert {"name": "hf-token", "mountPath": mc.TOKEN_DIR, "readOnly": True} in c["volumeMounts"]
    assert not any("TOKEN" in e["name"] for e in c["env"])
    assert {"name": "HF_ENDPOINT", "value": "http://mirror"} in c["env"]  # a mirror, as the runtime gets it


def test_read_write_once_job_follows_the_pods_to_their_node() -> None:
    s = spec(model={"uri": "hf://org/m", "cache": {**CACHE, "accessMode": "ReadWriteOnce"}},
             scheduling={"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "t", "operator": "Exists"}]})
    pod = _job(s)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "t", "operator": "Exists"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # A first download: no pod to follow yet, so only preferred.
    (term,) = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == b.selector_labels("gpt2")
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAffinity"]
    # Pods of the CR exist: their node holds the volume, so the Job must run there (required, not preferred).
    template = b.revision_template(s, S)
    required = mc.build_job("gpt2", "ns", "uid-1", s, S, revision="abc1234567", template=template, attempt=1,
                            keep=(), pods_exist=True)["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    assert required == {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": b.selector_labels("gpt2")}, "topologyKey": "kubernetes.io/hostname"}]}
    p = mc.plan_download("gpt2", "ns", "uid-1", s, S, revision=REV, template=template, previous_status={}, jobs=(),
                         progress=None, templates=(), now=at(0), pods_exist=True)
    assert p.create["spec"]["template"]["spec"]["affinity"]["podAffinity"] == required


def test_read_write_once_runtime_pods_all_run_on_one_node() -> None:
    user = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    rwo = spec(model={"uri": "hf://org/m", "cache": {**CACHE, "accessMode": "ReadWriteOnce"}},
               scheduling={"affinity": user})
    pod = b.build_pod_template("gpt2", rwo, S, b.with_resolved(b.revision_template(rwo, S), SHA), "stable")
    affinity = pod["spec"]["affinity"]
    assert affinity["nodeAffinity"] == user["nodeAffinity"]  # the user's affinity kept
    assert affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {"labelSelector": {"matchLabels": b.selector_labels("gpt2")}, "topologyKey": "kubernetes.io/hostname"}]
    rwx = spec(model={"uri": "hf://org/m", "cache": CACHE}, scheduling={"affinity": user})
    assert b.build_pod_template("gpt2", rwx, S, b.with_resolved(b.revision_template(rwx, S), SHA),
                                "stable")["spec"]["affinity"] == user
    plain = b.build_pod_template("gpt2", spec(), S, b.revision_template(spec(), S), "stable")
    assert plain["spec"].get("affinity") is None


def test_pods_mount_the_claim_read_only_and_load_the_resolved_commit() -> None:
    s = spec(model={"uri": "hf://org/m", "cache": CACHE, "hfTokenSecretRef": {"name": "hf", "key": "tok"}})
    template = b.with_resolved(b.revision_template(s, S), SHA)
    pod = b.build_pod_template("gpt2", s, S, template, "stable")
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GPTD_MODEL"] == f"file://{b.MODEL_CACHE_DIR}/{SHA}"
    assert "HF_TOKEN" not in env  # only the download needs the token
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "gpt2-model-cache", "readOnly": True}} in (
        pod["spec"]["volumes"])
    assert {"name": "model", "mountPath": b.MODEL_CACHE_DIR, "readOnly": True} in c["volumeMounts"]
    assert pod["metadata"]["labels"][b.LABEL_REVISION] == b.revision_hash(template)
    with pytest.raises(ValueError):  # never a pod for a revision whose download is not complete
        b.build_pod_template("gpt2", s, S, b.revision_template(s, S), "stable")


# ------------------------------------------------------------------------------------------ parsing


def test_progress_is_the_last_complete_progress_line() -> None:
    text = ('{"bytesDone": 1, "bytesTotal": 9, "filesDone": 0, "filesTotal": 3}\n'
            '{"bytesDone": 5, "bytesTotal": 9, "filesDone": 1, "filesTotal": 3}\n'
            '{"pruned": ["x"]}\n{"bytesDone": 7, "bytesTo')  # a line cut by limitBytes
    assert mc.parse_progress(text) == {"bytesDone": 5, "bytesTotal": 9, "filesDone": 1, "filesTotal": 3}
    assert mc.parse_progress("") is None and mc.parse_progress("Traceback ...") is None


# ------------------------------------------------------------------------------------------ the plan

REV = "abc1234567"


def job(name: str = "gpt2-fetch-abc1234567-1", revision: str = REV, **kw: Any) -> JobObs:
    return JobObs(name=name, revision=revision, purpose=mc.COMPONENT, **kw)


def plan(s: Any = None, status: dict[str, Any] | None = None, jobs: tuple[JobObs, ...] = (), t: float = 0,
         progress: dict[str, int] | None = None, templates: tuple[Any, ...] = (), claim: Any = None,
         revision: str = REV) -> mc.DownloadPlan:
    s = s or cached()
    return mc.plan_download("gpt2", "ns", "uid-1", s, S, revision=revision, template=b.revision_template(s, S),
                            previous_status=status or {}, jobs=jobs, progress=progress, templates=templates,
                            claim=claim, now=at(t))


def then(status: dict[str, Any], p: mc.DownloadPlan) -> dict[str, Any]:
    """The CR status after the plan's status.model is written."""
    return {**status, "model": p.status}


def test_a_new_revision_starts_one_job_and_waits() -> None:
    p = plan()
    assert p.sha is None and p.wait is not None and p.wait[0] == "Downloading"
    assert p.create is not None and p.create["metadata"]["name"] == "gpt2-fetch-abc1234567-1"
    assert p.pvc is not None and p.pvc["metadata"]["name"] == "gpt2-model-cache"
    assert [e[1] for e in p.events] == ["DownloadStarted"] and p.requeue_after is not None and p.requeue_after <= 15
    dl = p.status["download"]
    assert (dl["revision"], dl["modelRevision"], dl["phase"], dl["attempt"]) == (REV, "v2", "Downloading", 1)
    # Not in the Job index yet (the watch lags the POST): the same Job (handlers skip a create they just made),
    # no second event, the status as it was.
    lag = plan(status=then({}, p), t=1)
    assert lag.create == p.create and lag.events == () and lag.status == p.status
    # The Job exists (watch caught up): no second one, no second event.
    again = plan(status=then({}, p), jobs=(job(active=1),), t=1)
    assert again.create is None and again.events == () and again.wait[0] == "Downloading"


def test_progress_rate_and_eta_from_two_readings() -> None:
    status = then({}, plan())
    running = (job(active=1, running=True, pod_name="p"),)
    p1 = plan(status=status, jobs=running, t=10,
              progress={"bytesDone": 1000, "bytesTotal": 11000, "filesDone": 1, "filesTotal": 4})
    dl = p1.status["download"]
    assert (dl["bytesDone"], dl["bytesTotal"], dl["filesDone"], dl["filesTotal"], dl["percent"]) == (
        1000, 11000, 1, 4, 9)
    assert p1.requeue_after is not None and p1.requeue_after <= 15  # refreshed at least every 15 s
    p2 = plan(status=then(status, p1), jobs=running, t=20,
              progress={"bytesDone": 6000, "bytesTotal": 11000, "filesDone": 2, "filesTotal": 4})
    dl = p2.status["download"]
    assert dl["bytesPerSecond"] == 500 and dl["etaSeconds"] == 10 and dl["percent"] == 54
    assert dl["display"] == "54% of 11.0kB" and "54%" in p2.wait[1]
    assert p2.sha is None and p2.create is None


def test_complete_job_gives_the_sha_and_a_finished_event() -> None:
    status = then({}, plan())
    result = json.dumps({"bytesDone": 2_000_000, "bytesTotal": 2_000_000, "filesDone": 3, "filesTotal": 3,
                         "revision": SHA, "path": f"/c/{SHA}", "complete": True})
    done = job(succeeded=1, conditions=(("Complete", "True", "", ""),), exit_code=0, message=result,
               start_time=at(0), completion_time=at(100))
    p = plan(status=status, jobs=(done,), t=101)
    assert p.sha == SHA and p.wait is None and p.degraded is None and p.create is None
    assert p.status["download"]["phase"] == "Complete" and p.status["download"]["sha"] == SHA
    ((kind, reason, message),) = p.events
    assert (kind, reason) == ("Normal", "DownloadFinished")
    assert "2.0MB" in message and "100s" in message and "20.0kB/s" in message and SHA in message
    # Afterwards the recorded sha suffices (the Job may be gone by its TTL): no new Job.
    later = plan(status=then(status, p), t=99999)
    assert later.sha == SHA and later.create is None and later.events == ()


def test_a_complete_revision_starts_no_job() -> None:
    s = cached()
    running = b.with_resolved(b.revision_template(s, S), SHA)  # what the stable Deployment runs
    p = plan(s, templates=(running,), revision=b.revision_hash(running))
    assert p.sha == SHA and p.create is None and p.wait is None and p.events == ()


def test_failure_is_degraded_with_the_hub_message_and_retried_with_backoff() -> None:
    status = then({}, plan())
    error = json.dumps({"error": "401 Unauthorized: Invalid credentials in Authorization header",
                        "reason": "Unauthorized"})
    failed = job(failed=5, conditions=(("Failed", "True", "BackoffLimitExceeded", "Job has reached the limit"),),
                 exit_code=1, message=error)
    p = plan(status=status, jobs=(failed,), t=50)
    assert p.sha is None and p.create is None and p.wait[0] == "DownloadFailed"
    assert p.degraded == ("DownloadFailed", "401 Unauthorized: Invalid credentials in Authorization header")
    assert [e[:2] for e in p.events] == [("Warning", "DownloadFailed")] and "Unauthorized" in p.events[0][2]
    assert p.requeue_after == pytest.approx(mc.RETRY_SECONDS)
    status = then(status, p)
    # Within the backoff: nothing new, no second Warning.
    p = plan(status=status, jobs=(failed,), t=50 + mc.RETRY_SECONDS - 1)
    assert p.create is None and p.delete == () and p.events == () and p.degraded is not None
    # Backoff over: the failed Job goes, then attempt 2 starts.
    p = plan(status=then(status, p), jobs=(failed,), t=50 + mc.RETRY_SECONDS)
    assert p.delete == ("gpt2-fetch-abc1234567-1",) and p.create is None
    p = plan(status=then(status, p), jobs=(), t=51 + mc.RETRY_SECONDS)
    assert p.create["metadata"]["name"] == "gpt2-fetch-abc1234567-2"
    assert [e[1] for e in p.events] == ["DownloadRetried"] and p.status["download"]["attempt"] == 2
    # Attempt 2 failing waits twice as long.
    assert mc.retry_delay(2) == 2 * mc.retry_delay(1) and mc.retry_delay(10) == mc.RETRY_MAX_SECONDS


def test_a_failed_try_is_reported_while_the_job_controller_retries() -> None:
    status = then({}, plan())
    error = json.dumps({"error": "revision nope not found", "reason": "RevisionNotFound"})
    retrying = job(active=0, failed=1, exit_code=1, message=error, running=False)
    p = plan(status=status, jobs=(retrying,), t=20)
    assert p.degraded is not None and "revision nope not found" in p.degraded[1]
    assert p.wait[0] == "Downloading" and p.sha is None
    missing = job(active=1, waiting='CreateContainerConfigError: secret "hf" not found')
    assert 'secret "hf" not found' in plan(status=status, jobs=(missing,), t=20).degraded[1]
    # A try evicted before its container started (no exit code, no message): the pod's own reason, at once.
    evicted = job(active=0, failed=1, pod_phase="Failed", pod_failure="Evicted: The node was low on resource: memory.")
    degraded = plan(status=status, jobs=(evicted,), t=20).degraded
    assert degraded is not None and degraded[1].endswith("failed (retrying): Evicted: The node was low on resource: "
                                                         "memory."), degraded


def test_a_spec_change_cancels_the_old_download() -> None:
    old = job("gpt2-fetch-0ldrev0000-1", revision="0ldrev0000", active=1, running=True)
    other = JobObs(name="gpt2-eval-0ldrev0000", revision="0ldrev0000", purpose="evaluation", active=1)
    p = plan(jobs=(old, other))
    assert p.delete == ("gpt2-fetch-0ldrev0000-1",)  # never another purpose's Job
    assert [e[1] for e in p.events] == ["DownloadStarted", "DownloadCancelled"] or \
        [e[1] for e in p.events] == ["DownloadCancelled", "DownloadStarted"]
    assert p.create is not None


def test_removing_the_cache_deletes_download_jobs_and_status() -> None:
    p = plan(spec(), jobs=(job(active=1),))
    assert p.delete == ("gpt2-fetch-abc1234567-1",) and p.status is None and p.wait is None and p.pvc is None


def test_a_claim_that_cannot_change_is_reported_and_left_alone() -> None:
    live = {"metadata": {"name": "gpt2-model-cache"}, "spec": {"accessModes": ["ReadWriteOnce"]}}
    p = plan(claim=live)
    assert p.pvc is None and p.degraded[0] == "InvalidCache" and "spec.model.cache.accessMode" in p.degraded[1]


# ------------------------------------------------------------------------------------------ rollout waits

TA = {"model": {"uri": "hf://org/a", "revision": "main"}, "runtime": {"image": "rt:1"}}
TB = {"model": {"uri": "hf://org/b", "revision": "main"}, "runtime": {"image": "rt:1"}, b.MODEL_CACHE_KEY: True}
RA, RB = b.revision_hash(TA), b.revision_hash(TB)


def _obs(t: float, stable: DeploymentObs | None, wait: tuple[str, str] | None, template: Any = TB) -> Observations:
    return Observations(now=at(t), desired_template=template, desired_revision=RB, stable=stable, canary=None,
                        download_wait=wait)


def test_downloading_keeps_the_running_template_and_starts_no_rollout() -> None:
    s = parse_spec({"model": {"uri": "hf://org/b", "cache": CACHE}, "replicas": 2})
    status = {"currentRevision": RA, "lastGoodRevision": RA, "lastGoodTemplate": TA}
    stable = DeploymentObs(revision=RA, template=TA, spec_replicas=2, replicas=2, ready_replicas=2,
                           updated_replicas=2, available_replicas=2)
    p = decide(s, status, _obs(0, stable, ("Downloading", "downloading hf://org/b: 40% of 16GB")))
    assert p.stable is not None and p.stable.template == TA and p.stable.revision == RA and p.canary is None
    progressing = next(c for c in p.conditions if c.type == "Progressing")
    assert (progressing.status, progressing.reason) == ("True", "Downloading") and "40%" in progressing.message
    assert p.status.get("rollout") is None and p.status["currentRevision"] == RA and p.events == ()
    failed = decide(s, status, _obs(0, stable, ("DownloadFailed", "401")))
    assert failed.stable.template == TA
    assert next(c for c in failed.conditions if c.type == "Progressing").status == "False"
    # Complete: the rollout of the new revision starts, on the resolved template.
    resolved = b.with_resolved(TB, SHA)
    started = decide(s, status, _obs(1, stable, None, resolved))
    assert started.stable.template == resolved and started.stable.revision == RB
    assert started.status["rollout"]["revision"] == RB and [e.reason for e in started.events] == ["RolloutStarted"]


def test_a_first_revision_gets_no_deployment_until_its_download_is_complete() -> None:
    s = parse_spec({"model": {"uri": "hf://org/b", "cache": CACHE}})
    p = decide(s, {}, _obs(0, None, ("Downloading", "starting")))
    assert p.stable is None and p.canary is None and p.status.get("rollout") is None
    assert p.status["updateRevision"] == RB


def test_a_finished_job_waits_briefly_for_its_pods_report() -> None:
    """The Job and its pods are separate watches: the Job's Complete/Failed may arrive before the pod's message."""
    status = then({}, plan())
    done = job(succeeded=1, conditions=(("Complete", "True", "", ""),))
    p = plan(status=status, jobs=(done,), t=10)
    assert p.sha is None and p.degraded is None and p.events == () and p.wait[0] == "Downloading"
    assert p.requeue_after is not None and p.requeue_after <= 5
    p = plan(status=then(status, p), jobs=(done,), t=10 + mc.RESULT_GRACE_SECONDS)
    assert p.degraded is not None and p.status["download"]["reason"] == "NoResult"
    failed = job(failed=5, conditions=(("Failed", "True", "DeadlineExceeded", "Job was active longer than allowed"),))
    p = plan(status=status, jobs=(failed,), t=10)
    assert p.degraded is None and p.events == ()
    p = plan(status=then(status, p), jobs=(failed,), t=10 + mc.RESULT_GRACE_SECONDS)
    assert p.degraded == ("DownloadFailed", "DeadlineExceeded: Job was active longer than allowed")


def test_a_failed_job_whose_pod_never_started_is_judged_at_once_on_the_pods_reason() -> None:
    """A pod Failed without a container state (evicted before it started, rejected at admission) never reports: no
    grace for its report, and its own reason is the message."""
    status = then({}, plan())
    failed = job(failed=1, conditions=(("Failed", "True", "BackoffLimitExceeded", "Job has reached the specified "
                                        "backoff limit"),), pod_name="gpt2-fetch-abc1234567-1-x", pod_phase="Failed",
                 pod_failure="Evicted: The node was low on resource: ephemeral-storage.")
    p = plan(status=status, jobs=(failed,), t=10)
    assert p.degraded == ("DownloadFailed", "Evicted: The node was low on resource: ephemeral-storage.")
    assert p.status["download"]["reason"] == "BackoffLimitExceeded"


# ------------------------------------------------------------------------------------------ s3:// through the cache


def test_s3_needs_the_operators_aws_image_and_becomes_the_download_job() -> None:
    s3 = spec(model={"uri": "s3://bucket/models/llama", "cache": CACHE},
              runtime={"env": [{"name": "AWS_REGION", "value": "eu-west-1"}]})
    with pytest.raises(InvalidSpec) as e:
        b.check_spec(s3, S)
    assert e.value.field == "spec.model.uri" and "GPTD_S3_INIT_IMAGE" in e.value.message
    settings = Settings(s3_init_image="amazon/aws-cli:2")
    b.check_spec(s3, settings)
    job = _job(s3, s3_init_image="amazon/aws-cli:2")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "amazon/aws-cli:2" and c["command"][:2] == ["sh", "-c"]
    assert "aws s3 sync --only-show-errors s3://bucket/models/llama" in c["command"][2]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in c["env"]
    sha = mc.s3_commit(b.revision_template(s3, settings))
    template = b.with_resolved(b.revision_template(s3, settings), sha)
    pod = b.build_pod_template("gpt2", s3, settings, template, "stable")
    assert not pod["spec"].get("initContainers")  # the init container's sync became the Job
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["GPTD_MODEL"] == f"file://{b.MODEL_CACHE_DIR}/{sha}"


S3_SPEC = spec(model={"uri": "s3://bucket/models/llama", "cache": CACHE})
S3_SHA = mc.s3_commit(b.revision_template(S3_SPEC, S))


def _s3_script(tmp_path: Any) -> tuple[str, Any, Any]:
    """The Job's script as built (keeping SHA_OLD), with the claim's mount and the termination-log path mapped into
    tmp_path."""
    (c,) = _job(S3_SPEC, s3_init_image="aws:2")["spec"]["template"]["spec"]["containers"]
    cache, log = tmp_path / "cache", tmp_path / "termination-log"
    return c["command"][2].replace(b.MODEL_CACHE_DIR, str(cache)).replace(mc.RESULT_FILE, str(log)), cache, log


def _fake_aws(tmp_path: Any, body: str) -> dict[str, str]:
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text("#!/bin/sh\n" + body)
    aws.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_s3_job_script_syncs_atomically_and_reports_like_fetch(tmp_path: Any) -> None:
    import subprocess

    source = tmp_path / "bucket"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"w" * 100)
    calls = tmp_path / "calls"
    # `aws s3 sync --only-show-errors URI DEST`, played by cp; it records each call.
    env = _fake_aws(tmp_path, f'echo "$@" >> {calls}\nmkdir -p "$5" && cp -r {source}/. "$5"\n')
    script, cache, log = _s3_script(tmp_path)
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    result = mc.last_json_line(log.read_text())
    sha = S3_SHA
    assert result == {"revision": sha, "complete": True, "path": f"{cache}/{sha}"}
    assert (cache / sha / "model.safetensors").read_bytes() == b"w" * 100 and (cache / sha / ".gptd-complete").exists()
    assert not (cache / ".incomplete" / sha).exists()
    assert calls.read_text().split() == ["s3", "sync", "--only-show-errors", "s3://bucket/models/llama",
                                         f"{cache}/.incomplete/{sha}"]
    log.unlink()
    # Housekeeping: another complete revision goes, the kept one (SHA_OLD) and what is not a revision stay.
    stale = "a" * 40
    for kept in (stale, SHA_OLD):
        (cache / kept).mkdir()
        (cache / kept / "model.safetensors").write_text("old")
    (cache / "refs").mkdir()
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)  # complete already: no sync
    assert len(calls.read_text().splitlines()) == 1 and mc.last_json_line(log.read_text())["revision"] == sha
    assert sorted(p.name for p in cache.iterdir()) == sorted([".incomplete", "refs", SHA_OLD, sha])
    assert list((cache / ".incomplete").iterdir()) == []


def test_the_cache_is_keyed_on_the_model_not_on_runtime_fields() -> None:
    """A runtime-only change is a new revision (a rollout) but the same files: no new Job, the same commit."""
    s1 = cached()
    s2 = spec(model={"uri": "hf://org/m", "revision": "v2", "cache": CACHE}, runtime={"maxBatchSize": 8})
    t1, t2 = b.revision_template(s1, S), b.revision_template(s2, S)
    assert b.revision_hash(t1) != b.revision_hash(t2) and mc.model_key(t1) == mc.model_key(t2)
    running = b.with_resolved(t1, SHA)
    p = plan(s=s2, revision=b.revision_hash(t2), templates=(running,))
    assert p.sha == SHA and p.create is None and p.wait is None
    # Known from the last download's status too (a first revision, changed before any pod ran it).
    done = plan(s=s1, status=then({}, plan()), jobs=(job(succeeded=1, conditions=(("Complete", "True", "", ""),),
                                                          exit_code=0, message=json.dumps(
        {"revision": SHA, "complete": True, "bytesTotal": 10}), completion_time=at(5)),), t=6)
    assert done.sha == SHA and done.status["download"]["modelKey"] == mc.model_key(t1)
    again = plan(s=s2, revision=b.revision_hash(t2), status=then({}, done), t=7)
    assert again.sha == SHA and again.create is None
    # Another model revision, token or uri is other files.
    for other in ({"revision": "v3"}, {"uri": "hf://org/n"}, {"hfTokenSecretRef": {"name": "t", "key": "k"}}):
        s3 = spec(model={"uri": "hf://org/m", "revision": "v2", "cache": CACHE, **other})
        assert mc.model_key(b.revision_template(s3, S)) != mc.model_key(t1)
    # s3: the directory id is the model key, the same across a runtime-only change.
    a = spec(model={"uri": "s3://bkt/m", "cache": CACHE})
    c = spec(model={"uri": "s3://bkt/m", "cache": CACHE}, runtime={"maxBatchSize": 8})
    assert mc.s3_commit(b.revision_template(a, S)) == mc.s3_commit(b.revision_template(c, S))


def test_a_failing_s3_sync_publishes_nothing(tmp_path: Any) -> None:
    import subprocess

    env = _fake_aws(tmp_path, 'mkdir -p "$5" && echo partial > "$5/part"\necho "An error occurred (AccessDenied)" >&2\n'
                              "exit 1\n")
    script, cache, log = _s3_script(tmp_path)
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "AccessDenied" in done.stderr  # the log tail: FallbackToLogsOnError's message
    assert not (cache / S3_SHA).exists() and not log.exists()


def test_a_job_whose_pod_left_plain_text_reports_it_at_once() -> None:
    """FallbackToLogsOnError: an AWS CLI (or a crash) leaves the log's tail, not a JSON line."""
    failed = job(failed=5, conditions=(("Failed", "True", "BackoffLimitExceeded", "limit"),), exit_code=1,
                 message="An error occurred (AccessDenied) when calling the ListObjectsV2 operation")
    p = plan(status=then({}, plan()), jobs=(failed,), t=1)
    assert p.degraded is not None and "AccessDenied" in p.degraded[1] and p.events[0][1] == "DownloadFailed"


# ------------------------------------------------------------------------------------------ blocked downloads


def _job_dict(name: str = "gpt2-fetch-abc1234567-1") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {b.LABEL_REVISION: REV, b.LABEL_COMPONENT: mc.COMPONENT}},
            "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}


def _pod(status: dict[str, Any], name: str = "gpt2-fetch-abc1234567-1") -> dict[str, Any]:
    return {"metadata": {"name": f"{name}-x", "labels": {"batch.kubernetes.io/job-name": name},
                         "creationTimestamp": "2026-01-01T00:00:01Z"}, "status": status}


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": "2026-01-01T00:00:01Z",
    "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims"}]}
CREATING = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:02Z"}],
    "containerStatuses": [{"name": "fetch", "state": {"waiting": {"reason": "ContainerCreating"}}}]}


@pytest.mark.parametrize("pod_status, grace, words", [
    (UNSCHEDULABLE, mc.UNSCHEDULABLE_GRACE_SECONDS, "unbound immediate PersistentVolumeClaims"),
    (CREATING, mc.ATTACH_GRACE_SECONDS, "ContainerCreating"),
])
def test_a_download_pod_that_cannot_start_is_degraded_naming_the_cache(
    pod_status: dict[str, Any], grace: int, words: str
) -> None:
    from gptd_operator.observe import observe_job

    started = then({}, plan())
    jo = observe_job(_job_dict(), [_pod(pod_status)])
    early = plan(status=started, jobs=(jo,), t=grace - 10)
    assert early.degraded is None and early.wait[0] == "Downloading"  # a moment: a node scaling up
    late = plan(status=started, jobs=(jo,), t=5 * 3600)
    assert late.degraded is not None and late.degraded[0] == "CacheUnavailable"
    assert late.degraded[1].startswith("spec.model.cache:") and words in late.degraded[1]
    assert late.status["download"]["display"] == "blocked" and late.create is None


def test_a_claim_still_pending_after_a_grace_is_degraded() -> None:
    started = then({}, plan())
    claim = {"metadata": {"name": "gpt2-model-cache"}, "spec": {"accessModes": ["ReadWriteMany"],
             "resources": {"requests": {"storage": "40Gi"}}}, "status": {"phase": "Pending"}}
    jobs = (job(active=1),)
    assert plan(status=started, jobs=jobs, claim=claim, t=30).degraded is None
    late = plan(status=started, jobs=jobs, claim=claim, t=mc.CLAIM_PENDING_GRACE_SECONDS + 1)
    assert late.degraded is not None and late.degraded[0] == "CacheUnavailable"
    assert "gpt2-model-cache is still Pending" in late.degraded[1] and "ReadWriteMany" in late.degraded[1]
    bound = {**claim, "status": {"phase": "Bound"}}
    assert plan(status=started, jobs=jobs, claim=bound, t=3600).degraded is None


def test_a_smaller_size_than_the_live_request_is_a_conflict_compared_as_quantities() -> None:
    live = {"metadata": {"name": "gpt2-model-cache"}, "spec": {"accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "40Gi"}}}}
    assert mc.claim_conflict(live, cached(size="40Gi")) is None
    assert mc.claim_conflict(live, cached(size="50Gi")) is None  # growing is a patch
    assert mc.claim_conflict(live, cached(size="42949672960")) is None  # the same bytes, written otherwise
    field, message = mc.claim_conflict(live, cached(size="40G"))  # 40G < 40Gi
    assert field == "spec.model.cache.size" and "can't shrink" in message
    p = plan(s=cached(size="30Gi"), claim=live)
    shrink = message.replace("40G)", "30Gi)")
    assert p.pvc is None and p.degraded == ("InvalidCache", f"spec.model.cache.size: {shrink}")


# ------------------------------------------------------------------------------------------ a rollout in flight

TC = {"model": {"uri": "hf://org/c", "revision": "main"}, "runtime": {"image": "rt:1"}, b.MODEL_CACHE_KEY: True}
RC = b.revision_hash(TC)
TA_R, TB_R = b.with_resolved(TA, "a" * 40), b.with_resolved(TB, "b" * 40)
INFLIGHT = {"currentRevision": RA, "lastGoodRevision": RA, "lastGoodTemplate": TA_R,
            "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                        "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0}}


def _c_obs(t: float, stable: DeploymentObs, **kw: Any) -> Observations:
    """The spec now asks for C (downloading) while B's rollout is in flight on the stable Deployment."""
    canary = kw.pop("canary", None)
    return Observations(now=at(t), desired_template=TC, desired_revision=RC, stable=stable, canary=canary,
                        download_wait=("Downloading", "downloading C"), **kw)


def _b_stable(spec_replicas: int = 2) -> DeploymentObs:
    return DeploymentObs(revision=RB, template=TB_R, spec_replicas=spec_replicas, replicas=3, ready_replicas=1,
                         updated_replicas=1, available_replicas=1)


def test_abort_during_a_download_rolls_the_in_flight_rollout_back() -> None:
    from gptd_operator.rollout import ABORT_ANNOTATION

    s = parse_spec({"model": {"uri": "hf://org/c", "cache": CACHE}, "replicas": 2})
    p = decide(s, INFLIGHT, _c_obs(10, _b_stable(), abort=True))
    assert p.stable.template == TA_R and p.stable.revision == RA  # back to the last good, downloading or not
    assert p.status["rollout"]["phase"] == "RolledBack" and p.status["rollout"]["revision"] == RB
    assert ABORT_ANNOTATION in p.annotations_to_clear and [e.reason for e in p.events] == ["RolledBack"]
    assert p.status["updateRevision"] == RC


def test_the_in_flight_rollout_is_still_supervised_during_a_download() -> None:
    from gptd_operator.observe import PodObs

    s = parse_spec({"model": {"uri": "hf://org/c", "cache": CACHE}, "replicas": 2})
    crash = PodObs(revision=RB, ready=False, restarts=5, crashloop_message="CrashLoopBackOff: container runtime",
                   waiting_reason="CrashLoopBackOff")
    p = decide(s, INFLIGHT, _c_obs(10, _b_stable(), pods=(crash,)))
    assert p.stable.template == TA_R and p.status["rollout"]["reason"] == "CrashLoop"
    late = decide(s, INFLIGHT, _c_obs(s.rollout.progressDeadlineSeconds + 1, _b_stable()))
    assert late.stable.template == TA_R and late.status["rollout"]["reason"] == "ProgressDeadlineExceeded"
    ok = decide(s, INFLIGHT, _c_obs(10, _b_stable()))
    assert ok.stable.template == TB_R and ok.status["rollout"]["phase"] == "RollingOut" and ok.events == ()
    assert next(c for c in ok.conditions if c.type == "Progressing").reason == "Downloading"


def test_promote_and_abort_are_kept_while_nothing_can_honour_them() -> None:
    s = parse_spec({"model": {"uri": "hf://org/b", "cache": CACHE}, "replicas": 2})
    status = {"currentRevision": RA, "lastGoodRevision": RA, "lastGoodTemplate": TA}
    stable = DeploymentObs(revision=RA, template=TA, spec_replicas=2)
    obs = Observations(now=at(0), desired_template=TB, desired_revision=RB, stable=stable, canary=None,
                       download_wait=("Downloading", "x"), promote=True, abort=True)
    p = decide(s, status, obs)
    assert p.annotations_to_clear == () and p.stable.template == TA
    # While a canary of B is in flight, promote is not honoured for it either: kept for C's rollout.
    s2 = parse_spec({"model": {"uri": "hf://org/c", "cache": CACHE}, "replicas": 2})
    p2 = decide(s2, INFLIGHT, _c_obs(10, _b_stable(), promote=True))
    assert p2.annotations_to_clear == ()


def test_an_in_place_canary_keeps_its_stable_replicas_while_the_next_revision_downloads() -> None:
    s = parse_spec({"model": {"uri": "hf://org/c", "cache": CACHE}, "replicas": 2})
    status = {**INFLIGHT, "rollout": {**INFLIGHT["rollout"], "phase": "Canary", "step": 0, "inPlace": True}}
    stable = DeploymentObs(revision=RA, template=TA_R, spec_replicas=1, replicas=1, ready_replicas=1)
    canary = DeploymentObs(revision=RB, template=TB_R, spec_replicas=1, replicas=1, ready_replicas=1)
    p = decide(s, status, _c_obs(10, stable, canary=canary))
    assert p.stable.replicas == 1 and p.canary.replicas == 1 and p.canary.template == TB_R
    settled = decide(s, {k: v for k, v in status.items() if k != "rollout"}, _c_obs(10, stable))
    assert settled.stable.replicas == 2  # nothing in flight: the spec's count


def test_prune_keeps_every_commit_a_live_pod_mounts() -> None:
    """A→B→C→D: B's old-ReplicaSet pods still run while C is stable, A last good and D downloads."""
    from gptd_operator.observe import observe_pod

    shas = {x: x * 40 for x in "abcd"}
    s = cached()
    t_b = b.with_resolved(b.revision_template(s, S), shas["b"])
    pod = b.build_pod_template("gpt2", s, S, t_b, "stable")
    assert pod["metadata"]["labels"][b.LABEL_MODEL_SHA] == shas["b"]
    assert b.LABEL_MODEL_SHA not in b.build_pod_template("gpt2", spec(), S, b.revision_template(spec(), S),
                                                         "stable")["metadata"]["labels"]
    mounted = observe_pod({"metadata": pod["metadata"], "status": {"phase": "Running"}}).model_sha
    assert mounted == shas["b"]
    t_c, t_a = b.with_resolved(TB, shas["c"]), b.with_resolved(TA, shas["a"])
    p = mc.plan_download("gpt2", "ns", "uid-1", s, S, revision=REV, template=b.revision_template(s, S),
                         previous_status={}, jobs=(), progress=None, templates=[t_c, None, t_a], now=at(0),
                         mounted=[mounted, "not-a-sha; rm -rf /"])
    command = p.create["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--keep") + 1:] == sorted([shas["a"], shas["b"], shas["c"]])


def test_a_pod_of_a_deleted_job_of_the_same_name_is_not_this_jobs() -> None:
    from gptd_operator.observe import observe_job

    def pod(uid: str, how: str, code: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": f"j-{uid}", "creationTimestamp": f"2026-01-01T00:00:0{code}Z",
                                "labels": {"batch.kubernetes.io/job-name": "j"}}
        if how == "owner":
            meta["ownerReferences"] = [{"kind": "Job", "name": "j", "uid": uid, "controller": True}]
        else:
            meta["labels"]["batch.kubernetes.io/controller-uid"] = uid
        return {"metadata": meta, "status": {"phase": "Failed", "containerStatuses": [
            {"name": "fetch", "state": {"terminated": {"exitCode": code, "message": f"from {uid}"}}}]}}

    new_job = {"metadata": {"name": "j", "uid": "new"}, "status": {"active": 1}}
    for how in ("owner", "label"):
        # The old Job's pod is the newer one by creation time: only its uid tells it apart.
        seen = observe_job(new_job, [pod("new", how, 1), pod("old", how, 2)])
        assert (seen.pod_name, seen.exit_code, seen.message) == ("j-new", 1, "from new")
        assert observe_job(new_job, [pod("old", how, 2)]).pod_name is None
    # A pod without any uid (a hand-made one) still matches by the job-name label.
    bare = {"metadata": {"name": "j-x", "labels": {"batch.kubernetes.io/job-name": "j"}}, "status": {}}
    assert observe_job(new_job, [bare]).pod_name == "j-x"


def test_a_permanent_fetch_error_fails_the_job_at_once_and_evictions_are_not_counted() -> None:
    policy = _job()["spec"]["podFailurePolicy"]
    assert policy["rules"][0] == {"action": "FailJob", "onExitCodes": {
        "containerName": "fetch", "operator": "In", "values": [mc.PERMANENT_EXIT_CODE]}}
    assert policy["rules"][1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                                           "status": "True"}]}
    assert _job()["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires
    fetch = pytest.importorskip("gptd_runtime.fetch", reason="the runtime package is not installed here")
    assert fetch.PERMANENT_EXIT_CODE == mc.PERMANENT_EXIT_CODE  # the one contract between them
    assert {"Unauthorized", "Forbidden", "RevisionNotFound", "RepositoryNotFound"} <= fetch.PERMANENT_REASONS
    assert "Network" not in fetch.PERMANENT_REASONS and "DiskFull" not in fetch.PERMANENT_REASONS
