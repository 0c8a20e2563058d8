"""Pure: live objects (Deployments, pods, Jobs) → Observations, built once per reconcile.

``rollout.decide`` plans from them and ``status.compute_status`` reports from the same objects, so the plan
and the status never disagree about what the cluster looks like. No I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .builders import ANN_TEMPLATE, GATE_CONDITION, LABEL_COMPONENT, LABEL_MODEL_SHA, LABEL_REVISION

Template = dict[str, Any]
# Waiting reasons that mean a container cannot run as it is.
_BAD_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerError",
        "CreateContainerConfigError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodObs:
    revision: str | None
    ready: bool
    unschedulable_since: datetime | None = None  # PodScheduled=False reason=Unschedulable
    unschedulable_message: str = ""  # e.g. "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    crashloop_message: str = ""  # CrashLoopBackOff / ImagePullBackOff / ErrImagePull, with the container
    restarts: int = 0
    waiting_reason: str = ""  # the container's state.waiting.reason behind crashloop_message
    # For the evaluation gate (evaluation.py): which pod, where, and whether it waits only for the gate.
    name: str = ""
    ip: str = ""
    containers_ready: bool = False  # ContainersReady=True (Ready also needs every readiness gate)
    gated: bool = False  # spec.readinessGates holds gptd.io/evaluated
    evaluated: bool = False  # the gptd.io/evaluated pod condition is True
    uid: str = ""  # metadata.uid: an evaluator Job's target is checked to be the same pod at judgement
    model_sha: str = ""  # label gptd.io/model-sha: the model cache commit it mounts (kept by housekeeping)


@dataclass(frozen=True)
class DeploymentObs:
    revision: str | None  # label gptd.io/revision of the pod template
    template: Template | None  # annotation gptd.io/template (JSON) of the Deployment
    spec_replicas: int
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    up_to_date: bool = True  # status.observedGeneration >= metadata.generation


@dataclass(frozen=True)
class JobObs:
    """A Job gptd started (download, evaluation) and what its latest pod's container said when it ended."""

    name: str
    revision: str | None  # label gptd.io/revision: the revision the Job works for
    purpose: str | None  # label app.kubernetes.io/component: "model-download", "evaluation", ...
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    # type → (status, reason, message) of the Job's conditions (Complete, Failed, SuccessCriteriaMet, Suspended...)
    conditions: tuple[tuple[str, str, str, str], ...] = ()
    start_time: datetime | None = None
    completion_time: datetime | None = None
    created: datetime | None = None  # metadata.creationTimestamp (a suspended Job has no startTime)
    # An evaluator Job's target (annotations gptd.io/evaluation-target-uid/-ip): the pod it scores.
    target_uid: str = ""
    target_ip: str = ""
    pod_name: str | None = None  # the latest pod of the Job (by creation time, then name)
    pod_phase: str | None = None
    exit_code: int | None = None  # its container's state.terminated (or lastState.terminated)
    message: str = ""  # the terminated container's termination message (terminationMessagePath or log tail)
    # The latest pod Failed without a container termination message (rejected at admission, e.g. "OutOfcpu: Pod was
    # rejected: ...", or evicted before its container said anything): its own status "reason: message", the real
    # cause where the Job's condition says only BackoffLimitExceeded.
    pod_failure: str = ""
    running: bool = False  # the latest pod's container is running now (progress can be read from its log)
    waiting: str = ""  # the latest pod's container cannot start: "CreateContainerConfigError: secret ... not found"
    # The latest pod is not scheduled (PodScheduled=False): "Unschedulable: 0/3 nodes are available: ...", and since
    # when; or it is scheduled but its container still waits in ContainerCreating (a volume that cannot attach).
    unschedulable: str = ""
    unschedulable_since: datetime | None = None
    creating_since: datetime | None = None
    # lastTransitionTime of the condition Failed=True: how long the Job has been known to have failed (its pod's
    # termination message, which says why, may reach us later by its own watch).
    failed_since: datetime | None = None

    def condition(self, type_: str) -> tuple[str, str, str] | None:
        """(status, reason, message) of the condition ``type_``, or None."""
        for t, status, reason, message in self.conditions:
            if t == type_:
                return status, reason, message
        return None

    @property
    def complete(self) -> bool:
        return (self.condition("Complete") or ("",))[0] == "True"

    @property
    def finally_failed(self) -> bool:
        """The Job controller gave up (backoffLimit or activeDeadlineSeconds): condition Failed=True."""
        return (self.condition("Failed") or ("",))[0] == "True"


@dataclass(frozen=True)
class Observations:
    now: datetime
    desired_template: Template
    desired_revision: str
    stable: DeploymentObs | None
    canary: DeploymentObs | None
    pods: tuple[PodObs, ...] = ()
    promote: bool = False  # annotation gptd.io/promote=true
    abort: bool = False  # annotation gptd.io/abort=true
    analysis_breach: str | None = None  # set by handlers when canary.analysis found a breach
    # Set by handlers when canary.analysis could not be evaluated (Prometheus unreachable or erroring): the
    # canary is held at its step (no advance, no rollback) until it can be.
    analysis_unavailable: str | None = None
    # The evaluation dataset's identity (evaluation.py), set by handlers once they checked it; the gate's Jobs are
    # in ``jobs`` (purpose "evaluation").
    evaluation_dataset: str | None = None
    name: str = ""  # the GPTDeployment's name (the evaluator Jobs are named after it)
    jobs: tuple[JobObs, ...] = ()  # the CR's Jobs (every purpose), sorted by name
    # spec.model.cache: (Progressing reason, message) while the desired revision is not complete in the cache;
    # rollout.decide then changes no Deployment (model_cache.py).
    download_wait: tuple[str, str] | None = None


def parse_time(value: str | None) -> datetime | None:
    """An ISO-8601 timestamp ("...Z") as an aware UTC datetime; None stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_own_time(value: Any) -> datetime | None:
    """A timestamp the operator wrote into status itself, read back: None when it is not one (the status
    subresource is writable by anyone with the RBAC; a hand-written value must not stop every pass)."""
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def format_time(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe_deployment(dep: dict[str, Any]) -> DeploymentObs:
    """A Deployment (as the API returns it) → what ``decide`` needs to know about it."""
    meta = dep.get("metadata") or {}
    spec = dep.get("spec") or {}
    status = dep.get("status") or {}
    pod_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    raw_template = (meta.get("annotations") or {}).get(ANN_TEMPLATE)
    template: Template | None = None
    if raw_template:
        try:
            loaded = json.loads(raw_template)
            template = loaded if isinstance(loaded, dict) else None
        except ValueError:  # hand-edited annotation: treat as unknown rather than crash the reconcile
            template = None
    replicas = spec.get("replicas")
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    return DeploymentObs(
        revision=pod_labels.get(LABEL_REVISION) or (meta.get("annotations") or {}).get(LABEL_REVISION),
        template=template,
        spec_replicas=1 if replicas is None else int(replicas),  # the API server's default
        replicas=int(status.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        up_to_date=generation is None or (observed is not None and observed >= generation),
    )


def observe_pod(pod: dict[str, Any]) -> PodObs:
    """A Pod (as the API returns it) → readiness, scheduling and crash-loop facts for ``decide``."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable_since: datetime | None = None
    unschedulable_message = ""
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable_since = parse_time(scheduled.get("lastTransitionTime")) or parse_time(
            meta.get("creationTimestamp")
        )
        unschedulable_message = scheduled.get("message") or "Unschedulable"
    restarts = 0
    crashloop_message = waiting_reason = ""
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        restarts += int(cs.get("restartCount") or 0)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        if reason in _BAD_WAITING_REASONS and not crashloop_message:
            waiting_reason = reason
            crashloop_message = f"{reason}: container {cs.get('name')}"
            last = ((cs.get("lastState") or {}).get("terminated")) or {}
            if last:  # why it died is what the user needs (OOMKilled, exit code 1...)
                crashloop_message += f" last exited {last.get('reason') or 'with'} code {last.get('exitCode')}"
            if waiting.get("message"):
                crashloop_message += f": {waiting['message']}"
    gates = ((pod.get("spec") or {}).get("readinessGates")) or []
    return PodObs(
        revision=(meta.get("labels") or {}).get(LABEL_REVISION),
        ready=ready,
        name=meta.get("name") or "",
        ip=status.get("podIP") or "",
        containers_ready=(conditions.get("ContainersReady") or {}).get("status") == "True",
        gated=any(g.get("conditionType") == GATE_CONDITION for g in gates),
        evaluated=(conditions.get(GATE_CONDITION) or {}).get("status") == "True",
        uid=str(meta.get("uid") or ""),
        model_sha=str((meta.get("labels") or {}).get(LABEL_MODEL_SHA) or ""),
        unschedulable_since=unschedulable_since,
        unschedulable_message=unschedulable_message,
        crashloop_message=crashloop_message,
        restarts=restarts,
        waiting_reason=waiting_reason,
    )


ANN_EVAL_TARGET_UID = "gptd.io/evaluation-target-uid"
ANN_EVAL_TARGET_IP = "gptd.io/evaluation-target-ip"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set on a Job's pods by the Job controller


def job_of_pod(pod: dict[str, Any]) -> str | None:
    """The name of the Job a pod belongs to (its controller ownerReference, else the Job controller's label)."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller"):
            return str(ref.get("name"))
    labels = meta.get("labels") or {}
    return next((labels[k] for k in JOB_NAME_LABELS if labels.get(k)), None)


JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")  # likewise, the Job's uid


def pod_of_job(pod: dict[str, Any], job_name: str, job_uid: str | None) -> bool:
    """Whether ``pod`` belongs to this very Job: by uid (its controller ownerReference, else the Job controller's
    controller-uid label), so a pod left by a deleted Job of the same name (a retry recreated under that name, a
    CR recreated) is never read as this Job's; by name only where neither carries a uid."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller"):
            if job_uid and ref.get("uid"):
                return str(ref["uid"]) == job_uid
            return str(ref.get("name")) == job_name
    labels = meta.get("labels") or {}
    uid = next((labels[k] for k in JOB_UID_LABELS if labels.get(k)), None)
    if uid and job_uid:
        return uid == job_uid
    return job_of_pod(pod) == job_name


def observe_job(job: dict[str, Any], pods: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()) -> JobObs:
    """A Job (as the API returns it) and the pods of the CR's Jobs (those of other Jobs are ignored) → JobObs."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    labels = meta.get("labels") or {}
    name = str(meta.get("name") or "")
    mine = [p for p in pods if pod_of_job(p, name, str(meta.get("uid") or "") or None)]
    mine.sort(key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp") or "",
                             (p.get("metadata") or {}).get("name") or ""))
    pod = mine[-1] if mine else None
    pod_name = pod_phase = None
    exit_code: int | None = None
    message = ""
    running = False
    waiting = unschedulable = pod_failure = ""
    unschedulable_since = creating_since = None
    if pod is not None:
        pod_name = (pod.get("metadata") or {}).get("name")
        pod_status = pod.get("status") or {}
        pod_phase = pod_status.get("phase")
        pod_conditions = {c.get("type"): c for c in pod_status.get("conditions") or []}
        scheduled = pod_conditions.get("PodScheduled") or {}
        created = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
        if scheduled.get("status") == "False":
            why = scheduled.get("reason") or "Unschedulable"
            unschedulable = f"{why}: {scheduled.get('message') or ''}".rstrip(": ")
            unschedulable_since = parse_time(scheduled.get("lastTransitionTime")) or created
        for cs in pod_status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            terminated = state.get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            running = running or "running" in state
            reason = (state.get("waiting") or {}).get("reason") or ""
            if reason in _BAD_WAITING_REASONS and not waiting:
                waiting = f"{reason}: {(state.get('waiting') or {}).get('message') or ''}".rstrip(": ")
            if reason == "ContainerCreating" and creating_since is None:
                # Since it was scheduled (the kubelet then mounts the volumes), else since the pod was created.
                creating_since = parse_time(scheduled.get("lastTransitionTime")) or created
            if terminated:
                exit_code = int(terminated.get("exitCode") or 0)
                message = str(terminated.get("message") or "").strip()
        if pod_phase == "Failed" and not message:
            pod_failure = ": ".join(str(pod_status[k]).strip() for k in ("reason", "message") if pod_status.get(k))
    conditions = tuple(
        (str(c.get("type") or ""), str(c.get("status") or ""), str(c.get("reason") or ""), str(c.get("message") or ""))
        for c in status.get("conditions") or []
    )
    failed_since = next((parse_time(c.get("lastTransitionTime")) for c in status.get("conditions") or []
                         if c.get("type") == "Failed" and c.get("status") == "True"), None)
    return JobObs(
        name=name,
        revision=labels.get(LABEL_REVISION),
        purpose=labels.get(LABEL_COMPONENT),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        conditions=conditions,
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(status.get("completionTime")),
        created=parse_time(meta.get("creationTimestamp")),
        target_uid=str((meta.get("annotations") or {}).get(ANN_EVAL_TARGET_UID) or ""),
        target_ip=str((meta.get("annotations") or {}).get(ANN_EVAL_TARGET_IP) or ""),
        pod_name=pod_name,
        pod_phase=pod_phase,
        exit_code=exit_code,
        message=message,
        pod_failure=pod_failure,
        running=running,
        waiting=waiting,
        unschedulable=unschedulable,
        unschedulable_since=unschedulable_since,
        creating_since=creating_since,
        failed_since=failed_since,
    )
