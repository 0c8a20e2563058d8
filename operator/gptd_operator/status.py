"""Pure: observed Deployments, pods and HPA → the CR's status and conditions. No I/O, no clock.

Determinism matters: a resync that observes the same cluster must compute byte-identical status, so
the handlers can skip the write. Messages are built from sorted inputs, and a condition's
lastTransitionTime only moves when its status flips.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from . import builders, names
from .api import GPTDeploymentSpec
from .observe import format_time, observe_pod
from .observe import observe_deployment as _observe_deployment

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
# Status keys this module owns; anything else in .status (kopf's, rollout's) is left alone. The revisions
# (currentRevision, updateRevision, lastGoodRevision...) and status.rollout are rollout.py's (rollout.STATUS_KEYS).
OWNED_KEYS = (
    "observedGeneration",
    "phase",
    "replicas",
    "desiredReplicas",
    "readyReplicas",
    "updatedReplicas",
    "readyDisplay",
    "selector",
    "url",
    "service",
    "autoscaling",
    "conditions",
)


def deployment_failure(dep: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) when the Deployment controller itself reports a failure."""
    for cond in ((dep or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "ProgressDeadlineExceeded", cond.get("message") or "progress deadline exceeded"
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("reason") or "ReplicaFailure", cond.get("message") or ""
    return None


CONFIG_ERROR = "CreateContainerConfigError"


def missing_secret_field(spec: GPTDeploymentSpec, kubelet_message: str) -> str | None:
    """The spec field referencing the Secret the kubelet could not find (``secret "hf" not found``).

    The operator never reads Secrets (least privilege): a missing one shows up on the pod, and this names the
    field that points at it."""
    for field, secret in builders.referenced_secrets(spec):
        if f'secret "{secret}" not found' in kubelet_message:
            return field
    return None


# ------------------------------------------------------------------------------------- conditions


def set_condition(
    previous: Sequence[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """A condition whose lastTransitionTime is kept unless its status changed."""
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    cond: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or format_time(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], new: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """New conditions replace same-typed old ones; other types (e.g. rollout's RolledBack) stay."""
    out = {c["type"]: dict(c) for c in previous if c.get("type")}
    for cond in new:
        out[cond["type"]] = cond
    order = {t: i for i, t in enumerate((*CONDITION_TYPES, "RolledBack"))}
    return sorted(out.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


# ----------------------------------------------------------------------------------------- status


def invalid_status(
    name: str, namespace: str, previous: Mapping[str, Any], field: str, message: str, *,
    generation: int | None, now: datetime,
) -> dict[str, Any]:
    """Status for a spec the operator refuses: nothing is created until it is fixed."""
    prev = list(previous.get("conditions") or [])
    text = f"{field}: {message}"
    conditions = [
        set_condition(prev, "Ready", "False", "InvalidSpec", text, generation=generation, now=now),
        set_condition(prev, "Progressing", "False", "InvalidSpec", text, generation=generation, now=now),
        set_condition(prev, "Degraded", "True", "InvalidSpec", text, generation=generation, now=now),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": merge_conditions(prev, conditions),
    }


def waiting_status(
    previous: Mapping[str, Any], message: str, *, generation: int | None, now: datetime
) -> dict[str, Any]:
    """Status while the children of a deleted CR of the same name are still there (garbage collection pending)."""
    prev = list(previous.get("conditions") or [])
    reason = "WaitingForGarbageCollection"
    conditions = [
        set_condition(prev, "Ready", "False", reason, message, generation=generation, now=now),
        set_condition(prev, "Progressing", "True", reason, message, generation=generation, now=now),
        set_condition(prev, "Degraded", "False", "AsExpected", "", generation=generation, now=now),
    ]
    return {"observedGeneration": generation, "phase": "Pending", "conditions": merge_conditions(prev, conditions)}


def compute_status(
    *,
    name: str,
    namespace: str,
    spec: GPTDeploymentSpec,
    generation: int | None,
    desired_revision: str,
    stable: Mapping[str, Any] | None,
    canary: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    hpa: Mapping[str, Any] | None,
    previous: Mapping[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """The status fields in OWNED_KEYS for what was observed. ``pods``: all pods of this instance."""
    prev_conditions = list(previous.get("conditions") or [])
    # The same observations the rollout state machine decides on, so status and plan never disagree.
    s_obs = _observe_deployment(stable) if stable else None
    c_obs = _observe_deployment(canary) if canary else None
    observed = [o for o in (s_obs, c_obs) if o is not None]

    # The HPA may have changed the replica count: the Deployment's spec is the truth, not ours.
    if s_obs is not None and stable and (stable.get("spec") or {}).get("replicas") is not None:
        desired = s_obs.spec_replicas
    elif spec.autoscaling is not None:
        desired = spec.autoscaling.minReplicas
    else:
        desired = spec.replicas
    desired += c_obs.spec_replicas if c_obs is not None else 0
    existing = sum(o.replicas for o in observed)
    ready = sum(o.ready_replicas for o in observed)
    updated = s_obs.updated_replicas if s_obs is not None else 0
    up_to_date = all(o.up_to_date for o in observed)
    stable_revision = s_obs.revision if s_obs is not None else None

    # Degraded: the first problem, in a stable order (pods sorted by name), with the cluster's words. A pod's
    # own problem (the scheduler's or kubelet's message) says more than the Deployment's "timed out
    # progressing", so pods come first and the Deployment's failure is the fallback.
    pod_obs = [(p.get("metadata", {}).get("name", ""), observe_pod(p)) for p in pods]
    pod_obs.sort(key=lambda item: item[0])
    degraded: tuple[str, str] | None = None
    for pod_name, po in pod_obs:
        if po.unschedulable_message:
            degraded = ("Unschedulable", f"pod {pod_name}: {po.unschedulable_message}")
        elif po.crashloop_message:
            # The kubelet's own reason (CrashLoopBackOff, ImagePullBackOff, CreateContainerConfigError...) so
            # alerts on the reason mean what they say.
            text = f"pod {pod_name}: {po.crashloop_message}"
            field = missing_secret_field(spec, po.crashloop_message) if po.waiting_reason == CONFIG_ERROR else None
            degraded = (po.waiting_reason or "CrashLoopBackOff", f"{field}: {text}" if field else text)
        if degraded is not None:
            break
    if degraded is None:
        degraded = deployment_failure(stable) or deployment_failure(canary)

    is_ready = (
        s_obs is not None
        and up_to_date
        and stable_revision == desired_revision
        and c_obs is None
        and updated >= s_obs.spec_replicas
        and ready >= desired
        and existing == desired  # old-revision pods are gone
    )
    previous_current = previous.get("currentRevision")
    if s_obs is None:
        progressing = ("Creating", "creating the Deployment")
    elif (
        stable_revision != desired_revision
        or c_obs is not None
        or (previous_current is not None and previous_current != desired_revision)
    ):
        # The last fully rolled-out revision is not the desired one: a rollout, whatever the counts say.
        progressing = ("RollingOut", f"rolling out revision {desired_revision}")
    elif existing != desired or ready < desired or updated < s_obs.spec_replicas or not up_to_date:
        progressing = ("Scaling", f"{ready}/{desired} replicas ready")
    else:
        progressing = None

    current = stable_revision if is_ready else previous_current  # for the phase only; rollout.py reports it

    gen = generation
    conds = [
        set_condition(
            prev_conditions, "Ready", "True" if is_ready else "False",
            "AllReplicasReady" if is_ready else (degraded[0] if degraded else "ReplicasNotReady"),
            f"{ready}/{desired} replicas ready" + (f", revision {stable_revision}" if is_ready else ""),
            generation=gen, now=now,
        ),
        set_condition(
            prev_conditions, "Progressing", "True" if progressing and not is_ready else "False",
            progressing[0] if progressing and not is_ready else "Complete",
            progressing[1] if progressing and not is_ready else f"revision {stable_revision} is available",
            generation=gen, now=now,
        ),
        set_condition(
            prev_conditions, "Degraded", "True" if degraded else "False",
            degraded[0] if degraded else "AsExpected", degraded[1] if degraded else "",
            generation=gen, now=now,
        ),
    ]

    if degraded is not None and not is_ready:
        # Not "Failed" for the Deployment's ProgressDeadlineExceeded: whether a revision failed is the rollout's
        # call (it rolls back, docs/rollout.md), and a rollout waiting for a GPU is not a failure. "Failed" is
        # for a spec the operator refuses (invalid_status).
        phase = "Degraded"
    elif is_ready:
        phase = "Ready"
    elif current is None and ready == 0:
        phase = "Pending"  # never been ready yet: the first revision is still coming up
    else:
        phase = "Progressing"

    autoscaling = None
    if hpa is not None and spec.autoscaling is not None:
        hst = hpa.get("status") or {}
        autoscaling = {
            "currentReplicas": hst.get("currentReplicas"),
            "desiredReplicas": hst.get("desiredReplicas"),
        }
        autoscaling = {k: v for k, v in autoscaling.items() if v is not None} or None

    return {
        "observedGeneration": generation,
        "phase": phase,
        "replicas": existing,
        "desiredReplicas": desired,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "readyDisplay": f"{ready}/{desired}",
        "selector": builders.selector_string(name),
        "url": builders.service_url(name, namespace, spec),
        "service": names.service(name),
        "autoscaling": autoscaling,
        "conditions": merge_conditions(prev_conditions, conds),
    }


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``old`` status into ``new`` for the keys in ``new``; {} when equal.

    ``None`` in ``new`` removes the key (JSON merge patch semantics). A nested object (``rollout``) is patched
    key by key, with ``None`` for the keys ``new`` dropped: a merge patch would otherwise keep them.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if value is None:
            if before is not None:
                patch[key] = None
        elif isinstance(value, dict) and isinstance(before, dict):
            nested = status_patch(before, {**dict.fromkeys(before), **value})
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch
