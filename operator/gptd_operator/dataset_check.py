"""The dataset-check Job of a PVC evaluation dataset (docs/evaluation.md): pure, no I/O, no clock.

The operator reads a ``configMapRef`` dataset itself, but cannot read a file on a claim. So before the template of a
gated new revision changes, a Job (the runtime image, the claim mounted read-only with the file as its subPath, as
the evaluator Job mounts it) runs ``python -m gptd_runtime evaluate --check-dataset``: the evaluator's own parser over
every row, ``{"rows": N, "labels": [...]}`` or the one-line error naming the line, as its termination message.
``plan_check`` turns what the handlers observed into: hold the rollout (no pod of the new revision yet, the old one
untouched, like the model cache's download wait), refuse it (InvalidSpec naming ``spec.evaluation.dataset.pvc`` and
the line; no retry), or go on with the dataset's identity.

The verdict is kept in ``status.datasetCheck`` under a key of (dataset identity, revision, task), so the Job runs
once: a pass holds for that key whatever else of spec.evaluation changes (thresholds do not change the rows); a
failure holds until the key or spec.evaluation changes. A file edited in place on the claim is not noticed (the
operator cannot read it): a new path, or any change to spec.evaluation, checks it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import builders, evaluation, names
from .api import GPTDeploymentSpec
from .evaluation import DATASET_FILE, RESULT_FILE, evaluation_hash, failed_grace_left, pvc_claim, pvc_identity, sighting
from .observe import JobObs, format_time
from .settings import Settings

COMPONENT = "dataset-check"  # app.kubernetes.io/component of the check Jobs and their pods
FIELD = "spec.evaluation.dataset.pvc"
STATUS_KEY = "datasetCheck"
WAIT_REASON = "CheckingDataset"  # the Progressing reason while the rollout waits for the check
# evaluation.RESULT_GRACE_SECONDS (the evaluator Jobs' too): how long a Job seen Complete whose pod is gone
# (deleted, garbage-collected) waits for the pod's result, and a Job seen Failed first for its pod's error. Read
# through the module, as failed_grace_left reads it, so both paths here always use the same value.


@dataclass(frozen=True)
class CheckPlan:
    """plan_check's answer: exactly one of ``identity`` (passed: the gate goes on with it), ``wait`` (the rollout
    holds) or ``invalid`` (refused) is set."""

    identity: str | None = None
    wait: tuple[str, str] | None = None  # (Progressing reason, message)
    invalid: str | None = None  # the InvalidSpec message for FIELD
    record: dict[str, Any] | None = None  # new status.datasetCheck (None: unchanged)
    requeue_after: float | None = None  # a Failed Job in its grace: look again then (no watch event may come)
    create: dict[str, Any] | None = None  # the check Job to create
    delete: tuple[str, ...] = ()  # check Jobs to delete (done, or of another key)
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)


def check_key(spec: GPTDeploymentSpec, revision: str) -> str:
    """What a check's verdict is about: the file, the revision it gates, and the task the rows are parsed for."""
    return hashlib.sha256("\0".join((pvc_identity(spec), revision, spec.model.task)).encode()).hexdigest()[:16]


def job_name(name: str, key: str) -> str:
    """``<base>-dscheck-<digest>`` (names.job: fits the job-name label): one Job per key and spec.evaluation."""
    return names.job(name, "dscheck", hashlib.sha256(key.encode()).hexdigest()[:10])


def _since(now: datetime, when: datetime | None) -> float:
    return 0.0 if when is None else (now - when).total_seconds()


def _refusal(spec: GPTDeploymentSpec, error: str) -> str:
    """The evaluator's error with its in-pod path replaced by where the file is on the claim."""
    claim, path = pvc_claim(spec)
    error = " ".join(error.split()).removeprefix(f"dataset {DATASET_FILE}: ")
    return f"PersistentVolumeClaim {claim} file {path}: {error}"


def verdict(job: JobObs, now: datetime, seen: datetime | None = None
            ) -> tuple[str, dict[str, Any] | str | None, float | None]:
    """("passed", {"rows", "labels"}, None) | ("failed", message, None) | ("running", what it waits on, seconds to
    look again or None) for one check Job; ``seen``: when the operator first saw it Failed (status), if it did."""
    try:
        result = json.loads(job.message) if job.message else None
    except ValueError:
        result = None
    result = result if isinstance(result, dict) else {}
    if job.complete or job.succeeded > 0:
        if isinstance(result.get("rows"), int):
            return "passed", {"rows": result["rows"], "labels": list(result.get("labels") or [])}, None
        if job.exit_code is not None:
            return "failed", "the dataset check finished without a result", None
        done = job.completion_time or job.start_time or job.created
        grace = evaluation.RESULT_GRACE_SECONDS
        if job.pod_name is None and _since(now, done) > grace:
            return "failed", f"the dataset check completed but its pod is gone after {grace}s", None
        return "running", job.waiting or None, None  # the pod's terminated state (the result) not seen yet
    failed = job.condition("Failed")
    if job.finally_failed and failed is not None:
        _, reason, message = failed
        if result.get("error"):
            return "failed", str(result["error"]), None
        # Seen Failed before its pod's terminated state: wait (the grace, woken at its end) for the line it names
        # rather than refuse with the Job controller's generic BackoffLimitExceeded.
        left = failed_grace_left(job, now, seen)
        if left is not None:
            wait = "the Job failed; waiting for its pod's message"
            return "running", f"{wait} ({job.waiting})" if job.waiting else wait, left
        if reason == "DeadlineExceeded":
            # e.g. a path missing on the claim: the kubelet cannot create the read-only subPath and says so
            why = job.waiting or job.pod_failure or "can the claim be mounted by a pod of this namespace?"
            return "failed", f"the dataset check did not finish in time ({why})", None
        return "failed", job.waiting or job.pod_failure or message or reason or "the dataset check Job failed", None
    return "running", job.waiting or None, None


def plan_check(
    spec: GPTDeploymentSpec, name: str, namespace: str, uid: str, settings: Settings, image: str,
    status: Mapping[str, Any], revision: str, jobs: Sequence[JobObs], now: datetime,
) -> CheckPlan:
    """Where the check of ``revision``'s PVC dataset stands (spec.evaluation.dataset.pvc set, the claim exists)."""
    key = check_key(spec, revision)
    identity = pvc_identity(spec)
    prev = dict(status.get(STATUS_KEY) or {})
    mine = [j for j in jobs if j.purpose == COMPONENT]
    if prev.get("key") == key and prev.get("passed") is True:
        return CheckPlan(identity=identity, delete=tuple(j.name for j in mine))
    spec_hash = evaluation_hash(spec)
    if prev.get("key") == key and prev.get("passed") is False and prev.get("specHash") == spec_hash:
        return CheckPlan(invalid=str(prev.get("message") or ""), delete=tuple(j.name for j in mine))
    jname = job_name(name, f"{key} {spec_hash}")  # a new Job (not the deleted failed one) after a spec change
    stale = tuple(j.name for j in mine if j.name != jname)
    job = next((j for j in mine if j.name == jname), None)
    base = {"key": key, "revision": revision, "dataset": identity, "specHash": spec_hash}
    waiting = f"checking the evaluation dataset {identity} (Job {jname}) before rolling out revision {revision}"
    if job is None:
        started = {**base, "job": jname, "startedAt": format_time(now)}
        return CheckPlan(wait=(WAIT_REASON, waiting), create=build_job(name, namespace, uid, spec, settings, image,
                                                                       revision, jname, key),
                         delete=stale, record=started if prev != started else None,
                         events=(("Normal", "DatasetCheckStarted", waiting),))
    mine_prev = prev if prev.get("key") == key and prev.get("job") == jname else {}
    seen = sighting(mine_prev.get("failedSeenAt"), now)
    state, detail, recheck = verdict(job, now, seen)
    if state == "running":
        record = None
        if recheck is not None and seen is None:
            # First seen Failed before its pod's message: recorded, so the grace is timed by the operator's clock
            # from here (failed_grace_left), across passes and restarts.
            record = {**base, "job": jname, "startedAt": mine_prev.get("startedAt") or format_time(job.created or now),
                      "failedSeenAt": format_time(now)}
        return CheckPlan(wait=(WAIT_REASON, f"{waiting}: {detail}" if detail else waiting), delete=stale,
                         requeue_after=recheck, record=record)
    finished = format_time(now)
    if state == "passed":
        assert isinstance(detail, dict)
        record = {**base, "passed": True, **detail, "finishedAt": finished}
        message = f"the evaluation dataset {identity} has {detail['rows']} valid rows"
        return CheckPlan(identity=identity, record=record, delete=(*stale, jname),
                         events=(("Normal", "DatasetChecked", message),))
    message = _refusal(spec, str(detail))
    record = {**base, "passed": False, "message": message, "finishedAt": finished}
    return CheckPlan(invalid=message, record=record, delete=(*stale, jname))


def build_job(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings, image: str, revision: str,
    jname: str, key: str,
) -> dict[str, Any]:
    """The check Job: runtime image, the claim read-only with the file as subPath (as the evaluator Job mounts it),
    the verdict as the termination message, no network or API access needed, Pod Security "restricted"."""
    ev = spec.evaluation
    assert ev is not None
    claim, path = pvc_claim(spec)
    args = ["python", "-m", "gptd_runtime", "evaluate", "--check-dataset", "--dataset", DATASET_FILE,
            "--task", spec.model.task]
    if ev.samples is not None:
        args += ["--samples", str(ev.samples)]
    args += ["--result-file", RESULT_FILE]
    labels = {**builders.job_labels(name, COMPONENT, revision), "gptd.io/evaluation-key": key}
    # activeDeadlineSeconds: e.g. a claim no pod here can mount fails, named.
    return builders.verdict_job(
        name, namespace, uid, settings, job_name=jname, labels=labels,
        annotations={"gptd.io/dataset": pvc_identity(spec)},
        container={
            "name": "check",
            "image": image,
            "command": args,
            "volumeMounts": [
                {"name": "dataset", "mountPath": DATASET_FILE, "subPath": path, "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"}],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        },
        volumes=[
            {"name": "dataset", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "tmp", "emptyDir": {}}],
        deadline_seconds=ev.timeoutSeconds, result_file=RESULT_FILE,
    )
