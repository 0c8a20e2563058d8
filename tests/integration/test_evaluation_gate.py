"""The evaluation gate (issue 11, docs/evaluation.md) with the real operator against the emulated API server.

The test plays what the emulator lacks: the Deployment controller, the ReplicaSet controller and the kubelet (pods
with IPs; a gated pod has ContainersReady=True but Ready=False until gptd.io/evaluated is True, as the kubelet
computes readiness with readiness gates), and the Job controller and the evaluator's pod (Job status, the pod's
termination message carrying the evaluator's JSON). It asserts what the operator writes: the Deployment's
template, the Jobs, the pod condition, the CR's status and Events.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from gptd_operator import builders, evaluation
from gptd_operator.settings import Settings

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.jobs import complete_condition, failed_condition, mark_job, rfc3339
from tests.support.scenario import (
    NS,
    REV,
    add_pod,
    change_revision,
    condition,
    event,
    events,
    labels_of,
    ready_deployment,
    started,
    status_where,
)

pytestmark = pytest.mark.timeout(40)

GATE = "gptd.io/evaluated"
# The scenario's CR serves text-generation (hf://openai-community/gpt2): exactMatch on prompt/expected rows.
GOOD_ROWS = [{"prompt": "2 + 2 =", "expected": "4"}, {"prompt": "The capital of France is", "expected": "Paris"}]
EVALUATION = {"dataset": {"configMapRef": {"name": "sentiment-eval", "key": "eval.jsonl"}}, "minScore": 0.85,
              "timeoutSeconds": 300}
OLD_IP, NEW_IP = "10.1.0.1", "10.1.0.9"


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


async def dataset(cluster: Cluster, text: str) -> None:
    await cluster.create("configmaps", NS, {"metadata": {"name": "sentiment-eval"}, "data": {"eval.jsonl": text}})


def ready_pod(ip: str) -> dict[str, Any]:
    return {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "True"}]}


def gated_pod(ip: str) -> dict[str, Any]:
    """A started pod whose readiness gate is not met: the kubelet reports Ready=False."""
    return {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "False",
                                                        "reason": "ReadinessGatesNotReady"}]}


async def new_pod(cluster: Cluster, dep: dict[str, Any], name: str = "gpt2-new-1") -> None:
    """Play the ReplicaSet controller and the kubelet: a pod of ``dep``'s template, with its readiness gates."""
    await cluster.create("pods", NS, {
        "metadata": {"name": name, "labels": labels_of(dep)},
        "spec": {"containers": [{"name": "runtime", "image": "i"}],
                 "readinessGates": dep["spec"]["template"]["spec"].get("readinessGates")},
        "status": gated_pod(NEW_IP),
    })


async def start(cluster: Cluster, text: str = jsonl(GOOD_ROWS), **evaluation: Any) -> str:
    """v1 rolled out (no evaluation yet), one Ready old pod, the dataset ConfigMap, then spec.evaluation set."""
    old = await started(cluster, replicas=1)
    v1 = await cluster.get("deployments", NS, "gpt2")
    await add_pod(cluster, v1, "gpt2-old-1", ready_pod(OLD_IP))  # type: ignore[arg-type]
    await dataset(cluster, text)
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": {**EVALUATION, **evaluation}}})
    await status_where(cluster, "Evaluated NotEvaluated", lambda s: condition(s, "Evaluated").get("reason")
                       == "NotEvaluated")
    return old


async def eval_jobs(cluster: Cluster, role: str | None = None) -> list[dict[str, Any]]:
    jobs = [j for j in await cluster.list("jobs", NS)
            if (j["metadata"].get("labels") or {}).get(builders.LABEL_COMPONENT) == "evaluation"]
    return [j for j in jobs if role is None or j["metadata"]["labels"].get("gptd.io/evaluation-role") == role]


async def job_for(cluster: Cluster, role: str) -> dict[str, Any]:
    async def one() -> dict[str, Any] | None:
        jobs = await eval_jobs(cluster, role)
        return jobs[0] if len(jobs) == 1 else None

    return await eventually(one, what=f"one {role} evaluation Job")


async def candidate_of_v2(cluster: Cluster) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """start(), then revision v2 with its first pod: (the old revision, the v2 Deployment, its candidate Job)."""
    old = await start(cluster)
    dep = await change_revision(cluster, "v2", old)
    await new_pod(cluster, dep)
    return old, dep, await job_for(cluster, "candidate")


def url_of(job: dict[str, Any]) -> str:
    args = job["spec"]["template"]["spec"]["containers"][0]["command"]
    return args[args.index("--url") + 1]


async def finish(cluster: Cluster, job: dict[str, Any], result: dict[str, Any], *, ok: bool = True) -> None:
    """Play the Job controller and the kubelet: the evaluator's pod terminated with ``result`` as its termination
    message (written to /dev/termination-log by --result-file), then the Job's final condition."""
    await terminated_pod(cluster, job, result, ok=ok)
    await mark_job(cluster, NS, job["metadata"]["name"], complete_condition() if ok else failed_condition(),
                   succeeded=1 if ok else 0, failed=0 if ok else 1)


async def job_pod(cluster: Cluster, job: dict[str, Any], status: dict[str, Any]) -> None:
    """Play the Job controller and the kubelet: the Job's pod (its labels, owner and container as the Job's template
    has them), with ``status``."""
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": name}
    await cluster.create("pods", NS, {
        "metadata": {"name": f"{name}-x7k2p", "labels": labels,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                          "uid": job["metadata"]["uid"], "controller": True}]},
        "spec": {"containers": [{"name": c["name"], "image": c["image"]} for c in template["spec"]["containers"]],
                 "restartPolicy": "Never"},
        "status": status,
    })


async def terminated_pod(cluster: Cluster, job: dict[str, Any], result: dict[str, Any], *, ok: bool) -> None:
    """Play the kubelet: the Job's pod terminated just now with ``result`` as its termination message."""
    container = job["spec"]["template"]["spec"]["containers"][0]["name"]  # "evaluate", or a check Job's "check"
    await job_pod(cluster, job, {"phase": "Succeeded" if ok else "Failed", "containerStatuses": [{
        "name": container, "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error",
                                 "message": json.dumps(result), "finishedAt": rfc3339()}}}]})


async def run_job(cluster: Cluster, job: dict[str, Any], started_at: str) -> None:
    """Play the Job controller: the Job started at ``started_at`` and is running."""
    await cluster.patch("jobs", NS, job["metadata"]["name"], {"status": {"startTime": started_at, "active": 1}},
                        sub="status")


async def pod_condition(cluster: Cluster, name: str) -> dict[str, Any]:
    pod = await cluster.get("pods", NS, name) or {}
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == GATE), {})


def scores(score: float) -> dict[str, Any]:
    return {"metric": "exactMatch", "average": None, "score": score, "samples": 2, "perLabel": {}, "seconds": 0.1}


# ------------------------------------------------------------------------------------------------- tests


async def test_only_evaluation_changed_rolls_nothing_then_a_pass_opens_the_gate(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old = await start(cluster)
    # Changing only spec.evaluation: the Deployment's pod template is not touched (no pod rolls).
    dep = await cluster.get("deployments", NS, "gpt2")
    assert dep is not None and labels_of(dep)[REV] == old
    assert not dep["spec"]["template"]["spec"].get("readinessGates")
    assert dep["metadata"]["generation"] == 1, "the Deployment spec was patched"
    assert await eval_jobs(cluster) == []
    # Removed again before any gated rollout: the NotEvaluated condition goes with it; added back, it returns.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": None}})
    await status_where(cluster, "no Evaluated", lambda s: not condition(s, "Evaluated"))
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": EVALUATION}})
    await status_where(cluster, "NotEvaluated", lambda s: condition(s, "Evaluated").get("reason") == "NotEvaluated")

    # The next revision carries the readiness gate and is scored on a new pod by IP.
    dep = await change_revision(cluster, "v2", old)
    new = labels_of(dep)[REV]
    assert dep["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]
    await new_pod(cluster, dep)
    job = await job_for(cluster, "candidate")
    assert url_of(job) == f"http://{NEW_IP}:8000"
    assert job["metadata"]["labels"][REV] == new
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert "--result-file" in c["command"] and c["terminationMessagePath"] == "/dev/termination-log"
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["dataset"]["configMap"]["name"] == "sentiment-eval"
    st = await status_where(cluster, "Evaluating", lambda s: condition(s, "Evaluated").get("reason") == "Evaluating")
    assert condition(st, "Progressing")["reason"] == "Evaluating"
    assert await pod_condition(cluster, "gpt2-new-1") == {}  # no traffic before the score

    await finish(cluster, job, scores(0.9))
    st = await status_where(cluster, "passed", lambda s: (s.get("evaluation") or {}).get("passed") is True)
    ev = st["evaluation"]
    assert (ev["revision"], ev["metric"], ev["score"], ev["samples"]) == (new, "exactMatch", 0.9, 2)
    assert ev["finishedAt"] and ev["dataset"].startswith("configmap sentiment-eval/eval.jsonl sha256:")
    assert condition(st, "Evaluated")["status"] == "True"
    # The gate condition is set on the pod (the kubelet's own conditions are kept) ...
    cond = await eventually(lambda: pod_condition(cluster, "gpt2-new-1"), what="gptd.io/evaluated on the pod")
    assert cond["status"] == "True"
    pod = await cluster.get("pods", NS, "gpt2-new-1")
    assert {c["type"] for c in pod["status"]["conditions"]} == {"ContainersReady", "Ready", GATE}  # type: ignore[index]
    assert (await event(cluster, "EvaluationPassed"))["type"] == "Normal"
    # ... and the finished Job is deleted (its result is in status).
    await eventually(lambda: _no_jobs(cluster), what="evaluation Jobs deleted")

    # The verdict is in: the dataset is not read again, so deleting it now does not freeze the rollout.
    await cluster.delete("configmaps", NS, "sentiment-eval")
    # Play the kubelet and the Deployment controller: the pod is Ready now, the rollout completes.
    await cluster.patch("pods", NS, "gpt2-new-1", {"status": {"conditions": [
        {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "True"}, cond]}}, sub="status")
    await cluster.delete("pods", NS, "gpt2-old-1")
    await ready_deployment(cluster, replicas=1)
    st = await status_where(cluster, "v2 Ready", lambda s: s.get("phase") == "Ready" and s.get("currentRevision")
                            == new)
    assert condition(st, "Degraded").get("reason") != "InvalidSpec"
    # A later pod of the same revision (a restart, a scale-up) gets the condition too.
    await new_pod(cluster, dep, "gpt2-new-2")
    await eventually(lambda: pod_condition(cluster, "gpt2-new-2"), what="condition on a later pod")

    # Settled on a gated revision: resyncs write nothing and read no ConfigMap (the dataset is read only for a
    # gated rollout).
    await operator.resync_passes(2)
    before = len(cluster.requests())
    await operator.resync_passes(3)
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))
    assert not [r for r in cluster.requests()[before:] if "/configmaps" in str(r.url)]


async def _no_jobs(cluster: Cluster) -> bool:
    return await eval_jobs(cluster) == []


async def test_a_low_score_rolls_back_with_the_scores_and_is_not_retried(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old, dep, job = await candidate_of_v2(cluster)
    new = labels_of(dep)[REV]
    await finish(cluster, job, scores(0.5))

    dep = await eventually(lambda: _on_revision(cluster, old), what="rolled back to v1")
    assert not dep["spec"]["template"]["spec"].get("readinessGates")  # the old ReplicaSet's template, unchanged
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "EvaluationFailed" and "exactMatch 0.5000 < minScore 0.85" in rb["message"]
    assert new in rb["message"] and old in rb["message"]
    assert condition(st, "Evaluated")["reason"] == "EvaluationFailed"
    assert st["evaluation"]["passed"] is False and st["evaluation"]["score"] == 0.5
    warning = await event(cluster, "RolledBack")
    assert warning["type"] == "Warning" and "0.5000" in warning["message"]
    assert (await event(cluster, "EvaluationFailed"))["type"] == "Warning"
    assert await pod_condition(cluster, "gpt2-new-1") == {}  # never took traffic

    # Not retried while the spec asks for v2: no new Job, no writes to the Deployment.
    await eventually(lambda: _no_jobs(cluster), what="the Job deleted")
    await operator.resync_passes(3)
    assert await eval_jobs(cluster) == []
    assert len(await events(cluster, "EvaluationStarted")) == 1

    # A retried revision's dataset is checked before any pod rolls: broken now, the lower bar is refused and v1
    # keeps serving untouched.
    await cluster.patch("configmaps", NS, "sentiment-eval", {"data": {"eval.jsonl": '{"prompt": "x"}\n'}})
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": {"minScore": 0.4}}})
    st = await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    assert "line 1" in condition(st, "Degraded")["message"]
    dep = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(dep)[REV] == old and await eval_jobs(cluster) == []  # type: ignore[arg-type]
    # Fixed (same rows as scored): the next pass re-judges the stored score (no new Job) and v2 rolls out.
    await cluster.patch("configmaps", NS, "sentiment-eval", {"data": {"eval.jsonl": jsonl(GOOD_ROWS)}})
    await operator.resync_passes(1)
    st = await status_where(cluster, "re-judged", lambda s: (s.get("evaluation") or {}).get("passed") is True)
    assert "0.5000 >= minScore 0.4" in st["evaluation"]["message"] and st["rollout"]["phase"] == "RollingOut"
    dep = await eventually(lambda: _on_revision(cluster, new), what="v2 again")
    assert dep["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]
    await eventually(lambda: pod_condition(cluster, "gpt2-new-1"), what="the v2 pod passed")
    assert await eval_jobs(cluster) == []


async def _on_revision(cluster: Cluster, rev: str) -> dict[str, Any] | None:
    dep = await cluster.get("deployments", NS, "gpt2")
    return dep if dep is not None and labels_of(dep).get(REV) == rev else None


async def test_an_evaluator_past_its_timeout_rolls_back_as_evaluation_timeout(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old = await start(cluster, timeoutSeconds=30)
    dep = await change_revision(cluster, "v2", old)
    await new_pod(cluster, dep)
    job = await job_for(cluster, "candidate")
    # Play the Job controller: the Job has been running since long before timeoutSeconds.
    await run_job(cluster, job, "2026-01-01T00:00:00Z")
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "EvaluationTimeout" and "did not finish within 30s" in rb["message"]
    assert condition(st, "Evaluated")["reason"] == "EvaluationTimeout"
    await eventually(lambda: _on_revision(cluster, old), what="rolled back to v1")
    await eventually(lambda: _no_jobs(cluster), what="the running Job deleted")


async def test_a_missing_dataset_is_refused_before_any_new_pod(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=1)
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": EVALUATION, "model": {"revision": "v2"}}})
    st = await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    assert condition(st, "Degraded")["message"] == (
        "spec.evaluation.dataset.configMapRef: ConfigMap sentiment-eval not found")
    await operator.resync_passes(2)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(dep)[REV] == old and await eval_jobs(cluster) == []  # the old revision untouched
    assert (await event(cluster, "InvalidSpec"))["type"] == "Warning"

    # Fixed: the next pass (a trigger or the resync) rolls out v2.
    await dataset(cluster, jsonl(GOOD_ROWS))
    dep = await eventually(lambda: _not_on_revision(cluster, old), what="v2 rolled out once the dataset exists")
    assert dep["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]


async def _not_on_revision(cluster: Cluster, rev: str) -> dict[str, Any] | None:
    dep = await cluster.get("deployments", NS, "gpt2")
    return dep if dep is not None and labels_of(dep).get(REV) not in (None, rev) else None


async def test_a_bad_row_is_refused_naming_the_line(cluster: Cluster, operator: RunningOperator) -> None:
    text = jsonl(GOOD_ROWS) + '{"prompt": "no expected answer"}\n'
    old = await start(cluster, text)
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"model": {"revision": "v2"}}})
    st = await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    assert condition(st, "Degraded")["message"] == (
        'spec.evaluation.dataset.configMapRef: ConfigMap sentiment-eval key eval.jsonl: line 3: '
        'missing field "expected"')
    await operator.resync_passes(2)
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]
    assert await eval_jobs(cluster) == []


async def test_baseline_regression_rolls_back(cluster: Cluster, operator: RunningOperator) -> None:
    old = await start(cluster, maxRegression=0.02)
    dep = await change_revision(cluster, "v2", old)
    # The baseline is measured on a Ready pod of the current revision, at once.
    base = await job_for(cluster, "baseline")
    assert url_of(base) == f"http://{OLD_IP}:8000" and base["metadata"]["labels"][REV] == old
    await new_pod(cluster, dep)
    cand = await job_for(cluster, "candidate")
    await finish(cluster, base, scores(0.97))
    await finish(cluster, cand, scores(0.9))  # >= minScore 0.85, but 0.07 below the baseline
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "EvaluationFailed"
    assert "more than maxRegression 0.02 below the baseline 0.9700" in rb["message"]
    assert st["evaluation"]["baseline"] == 0.97 and st["evaluation"]["score"] == 0.9
    assert st["evaluationBaseline"]["revision"] == old and st["evaluationBaseline"]["score"] == 0.97
    await eventually(lambda: _on_revision(cluster, old), what="rolled back to v1")

    # The next revision against the same current revision and data: no second baseline Job.
    await eventually(lambda: _no_jobs(cluster), what="Jobs deleted")
    dep = await change_revision(cluster, "v3", old)
    await cluster.delete("pods", NS, "gpt2-new-1")
    await new_pod(cluster, dep, "gpt2-new-3")
    cand = await job_for(cluster, "candidate")
    assert await eval_jobs(cluster, "baseline") == []
    await finish(cluster, cand, scores(0.96))
    st = await status_where(cluster, "v3 passed", lambda s: (s.get("evaluation") or {}).get("passed") is True)
    assert st["evaluation"]["baseline"] == 0.97 and labels_of(dep)[REV] == st["evaluation"]["revision"]


async def test_canary_first_step_is_gated_then_later_pods_pass_at_once(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old = await started(cluster, replicas=4, rollout={"strategy": "Canary", "canary": {"steps": [
        {"weight": 25, "pauseSeconds": 0}, {"weight": 50}]}})
    v1 = await cluster.get("deployments", NS, "gpt2")
    await add_pod(cluster, v1, "gpt2-old-1", ready_pod(OLD_IP))  # type: ignore[arg-type]
    await dataset(cluster, jsonl(GOOD_ROWS))
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": EVALUATION}})
    canary = await change_revision(cluster, "v2", old, name="gpt2-canary")
    assert canary["spec"]["replicas"] == 1
    assert canary["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]
    stable = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(stable)[REV] == old and not stable["spec"]["template"]["spec"].get("readinessGates")  # type: ignore[index]
    await new_pod(cluster, canary, "gpt2-canary-1")
    job = await job_for(cluster, "candidate")
    st = await status_where(cluster, "step 1 evaluating", lambda s: "evaluating revision" in
                            condition(s, "Progressing").get("message", ""))
    assert condition(st, "Progressing")["reason"] == "CanaryStep1of2"
    await finish(cluster, job, scores(1.0))
    await eventually(lambda: pod_condition(cluster, "gpt2-canary-1"), what="the canary pod passed")

    # Play the kubelet and the Deployment controller: the canary is Ready; step 2 follows, no second evaluation.
    await ready_deployment(cluster, "gpt2-canary", replicas=1)
    canary = await _canary_with(cluster, 2)
    assert canary["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]
    await new_pod(cluster, canary, "gpt2-canary-2")
    await eventually(lambda: pod_condition(cluster, "gpt2-canary-2"), what="a later canary pod passes at once")
    await eventually(lambda: _no_jobs(cluster), what="no evaluation Job left")
    assert len(await events(cluster, "EvaluationStarted")) == 1


async def _canary_with(cluster: Cluster, replicas: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", NS, "gpt2-canary")
        return dep if dep is not None and dep["spec"]["replicas"] == replicas else None

    return await eventually(check, what=f"{replicas} canary replicas")


async def check_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    return [j for j in await cluster.list("jobs", NS)
            if (j["metadata"].get("labels") or {}).get(builders.LABEL_COMPONENT) == "dataset-check"]


async def check_job(cluster: Cluster) -> dict[str, Any]:
    async def one() -> dict[str, Any] | None:
        jobs = await check_jobs(cluster)
        return jobs[0] if len(jobs) == 1 else None

    return await eventually(one, what="one dataset-check Job")


async def claim(cluster: Cluster) -> None:
    """The claim a pvc dataset names (eval-data)."""
    await cluster.create("persistentvolumeclaims", NS, {
        "metadata": {"name": "eval-data"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})


async def pvc_start(cluster: Cluster, path: str = "sets/gen.jsonl") -> str:
    """v1 rolled out with one Ready old pod; then spec.evaluation with a pvc dataset and v2, in one change."""
    old = await started(cluster, replicas=1)
    v1 = await cluster.get("deployments", NS, "gpt2")
    await add_pod(cluster, v1, "gpt2-old-1", ready_pod(OLD_IP))  # type: ignore[arg-type]
    pvc_eval = {**EVALUATION, "dataset": {"pvc": f"eval-data/{path}"}}
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": pvc_eval, "model": {"revision": "v2"}}})
    return old


async def check_started(cluster: Cluster) -> tuple[str, dict[str, Any]]:
    """The claim, then pvc_start: the old revision and the dataset-check Job the operator created."""
    await claim(cluster)
    old = await pvc_start(cluster)
    return old, await check_job(cluster)


async def test_a_pvc_dataset_needs_its_claim_and_a_bad_row_is_refused_by_the_check_job(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old = await pvc_start(cluster)
    st = await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    assert condition(st, "Degraded")["message"] == (
        "spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data not found")
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]
    assert await check_jobs(cluster) == []

    await claim(cluster)
    job = await check_job(cluster)
    spec = job["spec"]["template"]["spec"]
    command = spec["containers"][0]["command"]
    assert command[:5] == ["python", "-m", "gptd_runtime", "evaluate", "--check-dataset"] and "--url" not in command
    assert {"name": "dataset", "persistentVolumeClaim": {"claimName": "eval-data", "readOnly": True}} in spec["volumes"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "dataset")
    assert mount["subPath"] == "sets/gen.jsonl" and mount["readOnly"] is True
    st = await status_where(cluster, "CheckingDataset",
                            lambda s: condition(s, "Progressing").get("reason") == "CheckingDataset")
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]
    # The check fails naming the line (its termination message): refused, no pod of v2, no evaluator, no retry.
    error = {"error": 'dataset /var/run/gptd/eval-dataset/dataset.jsonl: line 4: missing field "expected"', "line": 4}
    await finish(cluster, job, error, ok=False)
    st = await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    assert condition(st, "Degraded")["message"] == (
        'spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data file sets/gen.jsonl: line 4: '
        'missing field "expected"')
    assert st["datasetCheck"]["passed"] is False
    await eventually(lambda: _none_left(cluster), what="the failed check Job deleted")
    await operator.resync_passes(2)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(dep)[REV] == old and "readinessGates" not in dep["spec"]["template"]["spec"]  # type: ignore[index]
    assert await check_jobs(cluster) == [] and await eval_jobs(cluster) == []
    messages = [e["message"] for e in await events(cluster, "InvalidSpec")]
    assert sum("line 4" in m for m in messages) == 1, messages  # one Warning for the refusal, not one per pass


async def _none_left(cluster: Cluster) -> bool:
    return await check_jobs(cluster) == []


async def test_a_good_pvc_dataset_is_checked_once_then_rolled_out_and_evaluated(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old, job = await check_started(cluster)
    await operator.resync_passes(1)
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]
    await finish(cluster, job, {"rows": 2, "labels": []})
    dep = await eventually(lambda: _not_on_revision(cluster, old), what="v2 rolled out once the check passed")
    assert dep["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": GATE}]
    st = (await cluster.get("gptdeployments", NS, "gpt2"))["status"]  # type: ignore[index]
    assert st["datasetCheck"]["passed"] is True and st["datasetCheck"]["rows"] == 2
    await eventually(lambda: _none_left(cluster), what="the passed check Job deleted")
    await new_pod(cluster, dep)
    cand = await job_for(cluster, "candidate")
    assert f"//{NEW_IP}:" in url_of(cand)
    await finish(cluster, cand, scores(1.0))
    await eventually(lambda: _passed(cluster), what="the new pod marked evaluated")
    await operator.resync_passes(1)
    assert await check_jobs(cluster) == []  # checked once: not run again for the same revision and file
    assert len(await events(cluster, "DatasetCheckStarted")) == 1


async def _passed(cluster: Cluster) -> bool:
    return (await pod_condition(cluster, "gpt2-new-1")).get("status") == "True"


def _refused(s: dict[str, Any]) -> bool:
    return condition(s, "Degraded").get("reason") == "InvalidSpec"


async def check_failed_first(cluster: Cluster) -> tuple[str, dict[str, Any]]:
    """A pvc dataset's check Job seen Failed (stamped with lastTransitionTime, as a real Job controller does)
    before any pod of it; returns the old revision and the Job once the status says the check waits for the pod."""
    old, job = await check_started(cluster)
    now = rfc3339()
    await mark_job(cluster, NS, job["metadata"]["name"], failed_condition(at=now), failed=1, startTime=now)
    await status_where(cluster, "waiting for the pod", lambda s: "waiting for its pod's message" in
                       condition(s, "Progressing").get("message", ""))
    return old, job


async def test_a_check_job_seen_failed_before_its_pod_is_refused_naming_the_line(
    cluster: Cluster, operator: RunningOperator
) -> None:
    # The pod whose termination message names the line comes only later: not refused meanwhile with the generic
    # BackoffLimitExceeded.
    old, job = await check_failed_first(cluster)
    await operator.resync_passes(2)
    st = (await cluster.get("gptdeployments", NS, "gpt2"))["status"]  # type: ignore[index]
    assert not _refused(st) and condition(st, "Progressing")["reason"] == "CheckingDataset"
    seen = st["datasetCheck"]["failedSeenAt"]  # the grace is timed from the operator's first sighting...
    assert st["datasetCheck"]["job"] == job["metadata"]["name"]
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]
    error = {"error": 'dataset /var/run/gptd/eval-dataset/dataset.jsonl: line 3: not valid JSON', "line": 3}
    await terminated_pod(cluster, job, error, ok=False)
    st = await status_where(cluster, "InvalidSpec", _refused)
    assert condition(st, "Degraded")["message"] == (
        "spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data file sets/gen.jsonl: line 3: not valid JSON")
    assert seen and "failedSeenAt" not in st["datasetCheck"] and "job" not in st["datasetCheck"]  # ...until judged
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]


async def test_a_check_job_whose_pod_was_rejected_is_refused_at_once_naming_the_pods_reason(
    cluster: Cluster, operator: RunningOperator
) -> None:
    # The kubelet rejected the pod at admission: Failed with no container state, so no termination message will
    # ever come. Refused without the 60 s grace, on what the pod says rather than the Job's BackoffLimitExceeded.
    old, job = await check_started(cluster)
    why = "Pod was rejected: Node didn't have enough resource: cpu, requested: 500, used: 3800, capacity: 4000"
    await job_pod(cluster, job, {"phase": "Failed", "reason": "OutOfcpu", "message": why})
    now = rfc3339()
    await mark_job(cluster, NS, job["metadata"]["name"], failed_condition(at=now), failed=1, startTime=now)
    st = await status_where(cluster, "InvalidSpec", _refused)  # within 10 s: not after the grace
    assert condition(st, "Degraded")["message"] == (
        f"spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data file sets/gen.jsonl: OutOfcpu: {why}")
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]


class TestACheckJobsGraceEndsWithoutAWatchEvent:
    """With the resync out of the way, only the wake-up the check asked for ends the grace of a Job whose pod never
    comes (no watch event announces that time has passed)."""

    @pytest.fixture()
    def operator_settings(self) -> Settings:
        return Settings(resync_seconds=3600)

    async def test_refused_on_the_jobs_own_message_when_the_grace_ends(
        self, cluster: Cluster, operator: RunningOperator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(evaluation, "RESULT_GRACE_SECONDS", 3)  # read at each judgement: short for the test
        old, _ = await check_failed_first(cluster)
        st = await status_where(cluster, "InvalidSpec after the grace", _refused)
        assert condition(st, "Degraded")["message"] == (
            "spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data file sets/gen.jsonl: "
            "Job has reached the specified backoff limit")
        assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old  # type: ignore[arg-type]


    async def test_even_when_every_pass_ends_before_the_report(
        self, cluster: Cluster, operator: RunningOperator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Someone else took over the Service: every pass is refused at apply (metadata.name) and never reaches the
        # report, so the check's wake-up cannot ride on the report's delays (handlers._pvc_check asks for it).
        monkeypatch.setattr(evaluation, "RESULT_GRACE_SECONDS", 3)
        _, job = await check_started(cluster)
        await cluster.patch("services", NS, "gpt2", {"metadata": {"ownerReferences": []}})
        await status_where(cluster, "the Service refused", lambda s: _refused(s) and
                           "metadata.name" in condition(s, "Degraded").get("message", ""))
        now = rfc3339()
        await mark_job(cluster, NS, job["metadata"]["name"], failed_condition(at=now), failed=1, startTime=now)
        st = await status_where(cluster, "the check refused after the grace", lambda s: "backoff limit" in
                                condition(s, "Degraded").get("message", ""))
        assert condition(st, "Degraded")["message"] == (
            "spec.evaluation.dataset.pvc: PersistentVolumeClaim eval-data file sets/gen.jsonl: "
            "Job has reached the specified backoff limit")


async def test_a_refused_dataset_does_not_stop_marking_a_passed_revisions_pods(
    cluster: Cluster, operator: RunningOperator
) -> None:
    _, dep, job = await candidate_of_v2(cluster)
    await finish(cluster, job, scores(0.9))
    await eventually(lambda: pod_condition(cluster, "gpt2-new-1"), what="the v2 pod passed")
    # Mid-rollout the dataset goes and spec.evaluation changes (so it must be read again): refused...
    await cluster.delete("configmaps", NS, "sentiment-eval")
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"evaluation": {"minScore": 0.8}}})
    await status_where(cluster, "InvalidSpec", lambda s: condition(s, "Degraded").get("reason") == "InvalidSpec")
    # ...but a new pod of the revision that passed (a restart, a scale-up) still gets its condition.
    await new_pod(cluster, dep, "gpt2-new-2")
    cond = await eventually(lambda: pod_condition(cluster, "gpt2-new-2"), what="condition on a later pod")
    assert cond["status"] == "True"


async def test_a_job_seen_failed_before_its_pod_is_judged_on_the_evaluators_own_error(
    cluster: Cluster, operator: RunningOperator
) -> None:
    # The Job and its pod come by separate watches: here the Job controller's Failed (with its lastTransitionTime,
    # as a real one sets it) is seen first, the pod that says why only later.
    old, _, job = await candidate_of_v2(cluster)
    now = rfc3339()
    await mark_job(cluster, NS, job["metadata"]["name"], failed_condition(at=now), failed=1, startTime=now)
    await status_where(cluster, "waiting for the pod", lambda s: "waiting for its pod's message" in
                       (s.get("evaluation") or {}).get("message", ""))
    await operator.resync_passes(2)
    st = await status_where(cluster, "still held", lambda s: s.get("rollout", {}).get("phase") == "RollingOut")
    assert condition(st, "RolledBack").get("status") != "True"
    assert list(st["evaluation"]["failedSeen"]) == [job["metadata"]["name"]]  # its grace timed from this sighting
    error = "dataset sentiment-eval: line 2: the runtime answered 400 Bad Request"
    await terminated_pod(cluster, job, {"error": error}, ok=False)  # now the pod, created after the Job's condition
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "EvaluationFailed" and error in rb["message"]
    await eventually(lambda: _on_revision(cluster, old), what="rolled back to v1")
