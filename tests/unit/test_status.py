"""status.py: observed Deployments/pods/HPA → status + conditions, deterministic and transition-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gptd_operator import builders, rollout
from gptd_operator import status as st
from gptd_operator.api import parse_spec
from gptd_operator.observe import observe_deployment, observe_pod
from gptd_operator.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = parse_spec({"model": {"uri": "hf://o/m"}, "replicas": 2})
TEMPLATE = builders.revision_template(SPEC, Settings())
REV = builders.revision_hash(TEMPLATE)


def deployment(replicas: int = 2, ready: int = 0, updated: int = 0, existing: int | None = None,
               revision: str = REV, conditions: list[dict[str, Any]] | None = None,
               generation: int | None = None, observed: int | None = None) -> dict[str, Any]:
    dep = builders.build_deployment("gpt2", "ns", "uid", SPEC, Settings(), replicas=replicas)
    dep["spec"]["template"]["metadata"]["labels"][builders.LABEL_REVISION] = revision
    dep["status"] = {"replicas": replicas if existing is None else existing, "readyReplicas": ready,
                     "updatedReplicas": updated, "conditions": conditions or []}
    if generation is not None:
        dep["metadata"]["generation"] = generation
        dep["status"]["observedGeneration"] = observed
    return dep


def compute(stable: dict[str, Any] | None, pods: list[dict[str, Any]] | None = None,
            previous: dict[str, Any] | None = None, now: datetime = T0, **kw: Any) -> dict[str, Any]:
    return st.compute_status(
        name="gpt2", namespace="ns", spec=kw.pop("spec", SPEC), generation=3, desired_revision=REV,
        stable=stable, canary=kw.pop("canary", None), pods=pods or [], hpa=kw.pop("hpa", None),
        previous=previous or {}, now=now,
    )


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_no_deployment_yet_is_pending() -> None:
    s = compute(None)
    assert s["phase"] == "Pending"
    assert cond(s, "Ready")["status"] == "False"
    assert cond(s, "Progressing")["status"] == "True" and cond(s, "Progressing")["reason"] == "Creating"
    assert s["readyDisplay"] == "0/2" and s["selector"] == builders.selector_string("gpt2")
    assert s["url"] == "http://gpt2.ns.svc.cluster.local:8000"


def test_all_ready_is_ready() -> None:
    s = compute(deployment(ready=2, updated=2))
    assert s["phase"] == "Ready"
    assert cond(s, "Ready") == {"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                                "message": f"2/2 replicas ready, revision {REV}",
                                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}
    assert cond(s, "Progressing")["status"] == "False" and cond(s, "Degraded")["status"] == "False"
    assert (s["replicas"], s["readyReplicas"], s["updatedReplicas"], s["readyDisplay"]) == (2, 2, 2, "2/2")
    assert not set(s) & set(rollout.STATUS_KEYS), "revisions and status.rollout are rollout.py's"


def test_one_owner_per_status_field() -> None:
    assert set(st.OWNED_KEYS).isdisjoint(rollout.STATUS_KEYS)
    s = compute(deployment(ready=2, updated=2))
    assert set(s) <= set(st.OWNED_KEYS)


def test_partially_ready_is_progressing_after_first_ready() -> None:
    s = compute(deployment(ready=1, updated=2), previous={"currentRevision": REV})
    assert s["phase"] == "Progressing" and cond(s, "Progressing")["reason"] == "Scaling"
    assert cond(s, "Ready")["status"] == "False"


def test_old_revision_pods_mean_not_ready() -> None:
    # Ready count is fine, but an old-revision pod still exists (surge not finished).
    s = compute(deployment(ready=2, updated=2, existing=3))
    assert s["phase"] != "Ready" and cond(s, "Ready")["status"] == "False"
    stale = compute(deployment(ready=2, updated=2, revision="0000000000"), previous={"currentRevision": "x"})
    assert cond(stale, "Progressing")["reason"] == "RollingOut" and stale["phase"] == "Progressing"


def test_generation_not_observed_is_not_ready() -> None:
    s = compute(deployment(ready=2, updated=2, generation=5, observed=4))
    assert cond(s, "Ready")["status"] == "False"
    assert compute(deployment(ready=2, updated=2, generation=5, observed=5))["phase"] == "Ready"


def test_unschedulable_pod_is_degraded_with_scheduler_message() -> None:
    msg = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    pod = {"metadata": {"name": "gpt2-x", "labels": {}}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg,
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    s = compute(deployment(), pods=[pod])
    assert s["phase"] == "Degraded"
    assert cond(s, "Degraded")["reason"] == "Unschedulable" and msg in cond(s, "Degraded")["message"]
    assert cond(s, "Ready")["reason"] == "Unschedulable"
    obs = observe_pod(pod)
    assert obs.unschedulable_message == msg and obs.unschedulable_since == T0


def test_crashloop_is_degraded() -> None:
    pod = {"metadata": {"name": "gpt2-y"}, "status": {"containerStatuses": [
        {"name": "runtime", "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                      "message": "back-off"}}}]}}
    s = compute(deployment(), pods=[pod])
    assert cond(s, "Degraded")["reason"] == "CrashLoopBackOff"
    assert "gpt2-y" in cond(s, "Degraded")["message"] and "runtime" in cond(s, "Degraded")["message"]
    assert observe_pod(pod).restarts == 5


def test_image_pull_failure_is_degraded_with_its_own_reason() -> None:
    pod = {"metadata": {"name": "gpt2-z"}, "status": {"containerStatuses": [
        {"name": "runtime", "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                      "message": "pull access denied"}}}]}}
    s = compute(deployment(), pods=[pod])
    assert cond(s, "Degraded")["reason"] == "ImagePullBackOff"
    assert "pull access denied" in cond(s, "Degraded")["message"]


def test_progress_deadline_is_degraded_not_failed() -> None:
    # The rollout decides whether a revision failed (and rolls back); the Deployment's deadline is a symptom.
    dep = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                  "message": 'ReplicaSet "gpt2-1" has timed out progressing.'}])
    s = compute(dep)
    assert s["phase"] == "Degraded" and cond(s, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert "timed out progressing" in cond(s, "Degraded")["message"]


def test_pod_problem_is_named_before_the_deployment_deadline() -> None:
    dep = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                  "message": 'ReplicaSet "gpt2-1" has timed out progressing.'}])
    pod = {"metadata": {"name": "gpt2-x"}, "status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    s = compute(dep, pods=[pod])
    assert s["phase"] == "Degraded" and cond(s, "Degraded")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond(s, "Degraded")["message"]


def test_ready_wins_over_a_stale_deployment_deadline() -> None:
    # After a rollback the last good revision serves again before the controller clears its old condition.
    dep = deployment(ready=2, updated=2, conditions=[{"type": "Progressing", "status": "False",
                                                      "reason": "ProgressDeadlineExceeded", "message": "x"}])
    s = compute(dep)
    assert s["phase"] == "Ready" and cond(s, "Ready")["status"] == "True"


def test_transition_time_moves_only_on_flip() -> None:
    first = compute(deployment(ready=0))
    later = compute(deployment(ready=1), previous=first, now=T0 + timedelta(minutes=5))
    assert cond(later, "Ready")["lastTransitionTime"] == cond(first, "Ready")["lastTransitionTime"]
    flipped = compute(deployment(ready=2, updated=2), previous=later, now=T0 + timedelta(minutes=9))
    assert cond(flipped, "Ready")["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_same_observation_same_status_no_patch() -> None:
    pods = [{"metadata": {"name": n}, "status": {}} for n in ("b", "a")]
    one = compute(deployment(ready=1), pods=pods)
    two = compute(deployment(ready=1), pods=list(reversed(pods)), previous=one, now=T0 + timedelta(hours=1))
    assert one == two
    assert st.status_patch(one, two) == {}
    assert st.status_patch({"a": 1, "b": 2}, {"a": 1, "b": None, "c": 3}) == {"b": None, "c": 3}
    assert st.status_patch({"a": 1}, {"b": None}) == {}


def test_autoscaled_desired_comes_from_deployment_and_hpa_status() -> None:
    spec = parse_spec({"model": {"uri": "hf://o/m"}, "autoscaling": {"maxReplicas": 6, "targetInflightRequests": 3}})
    dep = deployment(replicas=4, ready=4, updated=4)
    hpa = {"status": {"currentReplicas": 4, "desiredReplicas": 5}}
    s = compute(dep, spec=spec, hpa=hpa)
    assert s["desiredReplicas"] == 4 and s["readyDisplay"] == "4/4"
    assert s["autoscaling"] == {"currentReplicas": 4, "desiredReplicas": 5}


def test_canary_counts_and_blocks_ready() -> None:
    canary = deployment(replicas=1, ready=1, updated=1)
    s = compute(deployment(ready=2, updated=2), canary=canary)
    assert s["desiredReplicas"] == 3 and s["readyReplicas"] == 3
    assert cond(s, "Ready")["status"] == "False" and cond(s, "Progressing")["reason"] == "RollingOut"


def test_invalid_status() -> None:
    s = st.invalid_status("gpt2", "ns", {}, "spec.model.uri", "bad", generation=2, now=T0)
    assert s["phase"] == "Failed"
    ready = cond(s, "Ready")
    assert ready["reason"] == "InvalidSpec" and ready["message"] == "spec.model.uri: bad"
    assert ready["observedGeneration"] == 2


def test_other_conditions_are_kept() -> None:
    prev = {"conditions": [{"type": "RolledBack", "status": "True", "reason": "X", "message": ""}]}
    s = compute(deployment(), previous=prev)
    assert [c["type"] for c in s["conditions"]] == ["Ready", "Progressing", "Degraded", "RolledBack"]


def test_observation_reads_what_builders_write() -> None:
    # status and rollout observe through observe.observe_deployment; it must read the builders' annotations.
    obs = observe_deployment(deployment(ready=1, updated=2))
    assert obs.template == TEMPLATE and obs.revision == REV
    assert (obs.spec_replicas, obs.ready_replicas, obs.updated_replicas) == (2, 1, 2)


def test_new_revision_is_rolling_out_until_ready() -> None:
    # The Deployment already runs the new template (patched) but pods are not there yet.
    s = compute(deployment(ready=2, updated=1, existing=3), previous={"currentRevision": "oldrev0000"})
    assert cond(s, "Progressing")["reason"] == "RollingOut" and s["phase"] == "Progressing"
    done = compute(deployment(ready=2, updated=2), previous={**s, "currentRevision": "oldrev0000"})
    assert done["phase"] == "Ready"


def test_status_patch_removes_keys_dropped_from_a_nested_object() -> None:
    old = {"rollout": {"phase": "Canary", "step": 0, "stepReadyAt": "t", "analysisUnavailable": "down"}, "x": 1}
    new = {"rollout": {"phase": "Canary", "step": 1}}
    assert st.status_patch(old, new) == {"rollout": {"step": 1, "stepReadyAt": None, "analysisUnavailable": None}}
    assert st.status_patch(old, {"rollout": dict(old["rollout"])}) == {}
    assert st.status_patch(old, {"rollout": None}) == {"rollout": None}
