"""Playing the Job controller through the API: a Job's final condition (Complete or Failed), stamped as a real one.

A real Job controller stamps every condition it sets with ``lastProbeTime`` and ``lastTransitionTime`` (metav1.Time:
RFC 3339, UTC, whole seconds, ``Z``); the operator reads the latter (evaluation.failed_grace_left: a Job seen Failed
waits for its pod's message from its own first sighting, or from lastTransitionTime if that is longer ago). So the
helpers here stamp them by default; a test of a condition without them says so with ``at=None``.

Simpler than a real controller: Kubernetes >= 1.31 first writes an interim ``FailureTarget`` (or
``SuccessCriteriaMet``) condition and adds ``Failed`` (``Complete``) only once the Job's pods have terminated; these
helpers write the final condition alone, which is the only one the operator reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from .cluster import Cluster

NOW: Final = "now"  # ``at``'s default: the time of the call


def rfc3339(when: datetime | None = None) -> str:
    """``when`` (default: now) as the API server serialises metav1.Time: UTC, seconds precision, ``Z``."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_condition(type_: str, *, reason: str = "", message: str = "", at: str | None = NOW) -> dict[str, Any]:
    """A Job condition ``type_`` = True. ``at``: the time of both stamps (default: now; an RFC 3339 string sets it;
    None omits both, as no real Job controller does)."""
    cond: dict[str, Any] = {"type": type_, "status": "True"}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    if at is not None:
        stamp = rfc3339() if at == NOW else at
        cond["lastProbeTime"] = cond["lastTransitionTime"] = stamp
    return cond


def complete_condition(*, at: str | None = NOW) -> dict[str, Any]:
    return job_condition("Complete", at=at)


def failed_condition(reason: str = "BackoffLimitExceeded", message: str = "Job has reached the specified backoff limit",
                     *, at: str | None = NOW) -> dict[str, Any]:
    return job_condition("Failed", reason=reason, message=message, at=at)


async def mark_job(cluster: Cluster, namespace: str, name: str, condition: dict[str, Any], **status: Any) -> None:
    """Patch Job ``name``'s status: ``condition`` as its only condition, plus the other status fields given
    (``succeeded``, ``failed``, ``startTime``, ``completionTime``...)."""
    await cluster.patch("jobs", namespace, name, {"status": {**status, "conditions": [condition]}}, sub="status")
