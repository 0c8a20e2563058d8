"""Pure: live objects (Deployments, pods) → Observations, built once per reconcile.

``rollout.decide`` plans from them and ``status.compute_status`` reports from the same objects, so the plan
and the status never disagree about what the cluster looks like. No I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .builders import ANN_TEMPLATE, GATE_CONDITION, LABEL_REVISION

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
class EvalRun:
    """One evaluator Job as observed: running, succeeded (with the evaluator's JSON) or failed."""

    state: str  # "running" | "succeeded" | "failed"
    started: datetime | None = None
    result: Mapping[str, Any] | None = None
    message: str = ""
    deadline_exceeded: bool = False
    target: str = ""  # the pod it scores


@dataclass(frozen=True)
class EvaluationObs:
    """What the handlers observed for the gate: the dataset identity and the evaluator Jobs, by name."""

    dataset: str
    runs: Mapping[str, EvalRun] = field(default_factory=dict)


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
    evaluation: EvaluationObs | None = None  # set by handlers while a gated rollout is in flight
    name: str = ""  # the GPTDeployment's name (the evaluator Jobs are named after it)


def parse_time(value: str | None) -> datetime | None:
    """An ISO-8601 timestamp ("...Z") as an aware UTC datetime; None stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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
        unschedulable_since=unschedulable_since,
        unschedulable_message=unschedulable_message,
        crashloop_message=crashloop_message,
        restarts=restarts,
        waiting_reason=waiting_reason,
    )


# --- the evaluation gate's Jobs ----------------------------------------------------------------------------

ANN_EVAL_TARGET = "gptd.io/evaluation-target"  # on an evaluator Job: the pod (and revision) it scores


def termination_message(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The evaluator container's termination message from the newest terminated pod of a Job."""
    newest: tuple[str, str] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("message"):
                stamp = term.get("finishedAt") or ""
                if newest is None or stamp >= newest[0]:
                    newest = (stamp, term["message"])
    return None if newest is None else newest[1]


def _result(message: str | None) -> Mapping[str, Any] | None:
    if not message:
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def observe_run(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]] = ()) -> EvalRun:
    """A batch/v1 Job (and its pods, for the result) → EvalRun."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    started = parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp"))
    target = (meta.get("annotations") or {}).get(ANN_EVAL_TARGET, "")
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    result = _result(termination_message(pods))
    if "Complete" in conditions or int(status.get("succeeded") or 0) > 0:
        if result is None or "score" not in result:
            return EvalRun("failed", started, result, "the evaluator finished without a result", target=target)
        return EvalRun("succeeded", started, result, target=target)
    failed = conditions.get("Failed")
    if failed is not None:
        deadline = failed.get("reason") == "DeadlineExceeded"
        error = (result or {}).get("error")
        message = str(error) if error else (failed.get("message") or failed.get("reason") or "the Job failed")
        return EvalRun("failed", started, result, message, deadline_exceeded=deadline, target=target)
    return EvalRun("running", started, target=target)


