"""The rollout state machine, transition by transition: pure functions, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from gptd_operator import api
from gptd_operator.observe import DeploymentObs, Observations, PodObs, observe_deployment, observe_pod
from gptd_operator.rollout import (
    ABORT_ANNOTATION,
    PROMOTE_ANNOTATION,
    STATUS_KEYS,
    ConditionPlan,
    Plan,
    canary_replicas,
    decide,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TA: dict[str, Any] = {"model": {"uri": "hf://org/a", "revision": "main"}, "runtime": {"image": "rt:1"}}
TB: dict[str, Any] = {"model": {"uri": "hf://org/b", "revision": "main"}, "runtime": {"image": "rt:1"}}
TC: dict[str, Any] = {"model": {"uri": "hf://org/c", "revision": "main"}, "runtime": {"image": "rt:1"}}
RA, RB, RC = "rev-a", "rev-b", "rev-c"
TEMPLATES = {RA: TA, RB: TB, RC: TC}
SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
IN_PLACE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
NO_GPU = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_spec(replicas: int = 3, autoscaling: dict[str, Any] | None = None, **rollout: Any) -> api.GPTDeploymentSpec:
    raw: dict[str, Any] = {"model": {"uri": "hf://org/a"}, "replicas": replicas, "rollout": rollout}
    if autoscaling:
        raw["autoscaling"] = autoscaling
    return api.parse_spec(raw)


def canary_spec(replicas: int = 4, steps: list[dict[str, Any]] | None = None, **rollout: Any) -> api.GPTDeploymentSpec:
    steps = steps if steps is not None else [{"weight": 10, "pauseSeconds": 60}, {"weight": 50}]
    return make_spec(replicas, strategy="Canary", canary={"steps": steps}, **rollout)


def dep(
    rev: str, n: int, ready: int | None = None, updated: int | None = None, total: int | None = None
) -> DeploymentObs:
    """A Deployment at ``rev`` with ``n`` replicas asked for; by default fully rolled out and Ready."""
    ready = n if ready is None else ready
    updated = n if updated is None else updated
    return DeploymentObs(
        revision=rev,
        template=TEMPLATES[rev],
        spec_replicas=n,
        replicas=max(n, updated) if total is None else total,
        ready_replicas=ready,
        updated_replicas=updated,
        available_replicas=ready,
    )


def pods(rev: str, n: int, ready: bool = True, **kw: Any) -> tuple[PodObs, ...]:
    return tuple(PodObs(revision=rev, ready=ready, **kw) for _ in range(n))


def unschedulable(rev: str, since: float) -> PodObs:
    return PodObs(revision=rev, ready=False, unschedulable_since=at(since), unschedulable_message=NO_GPU)


def obs(
    t: float,
    rev: str = RB,
    stable: DeploymentObs | None = None,
    canary: DeploymentObs | None = None,
    pods: tuple[PodObs, ...] = (),
    **kw: Any,
) -> Observations:
    return Observations(
        now=at(t), desired_template=TEMPLATES[rev], desired_revision=rev, stable=stable, canary=canary, pods=pods, **kw
    )


def good(rev: str = RA) -> dict[str, Any]:
    """The status of a CR fully rolled out at ``rev``."""
    return {"currentRevision": rev, "updateRevision": rev, "lastGoodRevision": rev, "lastGoodTemplate": TEMPLATES[rev]}


def cond(plan: Plan, type_: str) -> ConditionPlan:
    return next(c for c in plan.conditions if c.type == type_)


def events(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def merged(status: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """What the CR status becomes after a merge patch with plan.status (None deletes)."""
    out = {**status, **plan.status}
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------ first deploy


def test_first_deploy_starts_then_completes() -> None:
    spec = make_spec(replicas=2)
    plan = decide(spec, {}, obs(0, RA))
    assert plan.stable.template == TA and plan.stable.revision == RA
    assert plan.stable.replicas == 2 and plan.stable.strategy == SURGE
    assert plan.canary is None
    assert plan.status["updateRevision"] == RA and "currentRevision" not in plan.status
    assert plan.status["rollout"]["revision"] == RA and plan.status["rollout"]["phase"] == "RollingOut"
    assert cond(plan, "Progressing").status == "True" and cond(plan, "Progressing").reason == "RollingOut"
    assert cond(plan, "RolledBack").status == "False"
    assert events(plan) == ["RolloutStarted"]

    status = merged({}, plan)
    plan = decide(spec, status, obs(30, RA, stable=dep(RA, 2, ready=1), pods=pods(RA, 1) + pods(RA, 1, ready=False)))
    assert events(plan) == [] and cond(plan, "Progressing").reason == "RollingOut"
    assert "1 Ready" in cond(plan, "Progressing").message

    status = merged(status, plan)
    plan = decide(spec, status, obs(60, RA, stable=dep(RA, 2), pods=pods(RA, 2)))
    assert events(plan) == ["RolloutComplete"]
    assert plan.status["currentRevision"] == plan.status["lastGoodRevision"] == RA
    assert plan.status["lastGoodTemplate"] == TA
    assert plan.status["rollout"] is None  # cleared in the CR
    assert (cond(plan, "Progressing").status, cond(plan, "Progressing").reason) == ("False", "RolloutComplete")


def test_existing_ready_deployment_is_adopted_in_one_step() -> None:
    plan = decide(make_spec(replicas=2), {}, obs(0, RA, stable=dep(RA, 2), pods=pods(RA, 2)))
    assert plan.status["currentRevision"] == RA and "rollout" not in plan.status
    assert events(plan) == ["RolloutStarted", "RolloutComplete"]


# ----------------------------------------------------------------------------------------- steady state


def test_steady_state_is_a_fixed_point() -> None:
    spec = make_spec()
    status = good(RA)
    o = obs(0, RA, stable=dep(RA, 3), pods=pods(RA, 3))
    first = decide(spec, status, o)
    assert first.status == status
    assert first.events == () and first.annotations_to_clear == () and first.requeue_after is None
    assert first.stable.template == TA and first.stable.replicas == 3 and first.stable.strategy == SURGE
    assert first.canary is None
    second = decide(spec, first.status, obs(500, RA, stable=dep(RA, 3), pods=pods(RA, 3)))
    assert second == first
    assert (cond(first, "Progressing").status, cond(first, "Progressing").reason) == ("False", "RolloutComplete")
    assert (cond(first, "RolledBack").status, cond(first, "RolledBack").reason) == ("False", "NoRollback")


def test_steady_state_ignores_unrelated_status_keys_and_does_not_touch_them() -> None:
    status = {**good(RA), "phase": "Ready", "readyReplicas": 3, "conditions": []}
    plan = decide(make_spec(), status, obs(0, RA, stable=dep(RA, 3)))
    assert set(plan.status) <= set(STATUS_KEYS)
    assert plan.status == good(RA)


def test_stray_annotations_with_nothing_in_flight_are_cleared_without_status_changes() -> None:
    plan = decide(make_spec(), good(RA), obs(0, RA, stable=dep(RA, 3), promote=True, abort=True))
    assert set(plan.annotations_to_clear) == {PROMOTE_ANNOTATION, ABORT_ANNOTATION}
    assert plan.status == good(RA) and plan.events == ()


# ---------------------------------------------------------------------------------------- rolling update


def test_rolling_update_progresses_then_completes_and_updates_last_good() -> None:
    spec = make_spec(replicas=3)
    plan = decide(spec, good(RA), obs(0, RB, stable=dep(RA, 3), pods=pods(RA, 3)))
    assert plan.stable.template == TB and plan.stable.revision == RB and plan.stable.strategy == SURGE
    assert plan.status["currentRevision"] == RA and plan.status["updateRevision"] == RB
    assert events(plan) == ["RolloutStarted"]
    status = merged(good(RA), plan)

    mid = obs(100, RB, stable=dep(RB, 3, ready=3, updated=2, total=4), pods=pods(RA, 2) + pods(RB, 2))
    plan = decide(spec, status, mid)
    assert cond(plan, "Progressing").reason == "RollingOut" and "2/3 pods updated" in cond(plan, "Progressing").message
    assert plan.events == ()
    status = merged(status, plan)
    # A reconcile with nothing new changes nothing.
    again = decide(spec, status, mid)
    assert again.status == plan.status and again.events == ()

    plan = decide(spec, status, obs(200, RB, stable=dep(RB, 3), pods=pods(RB, 3)))
    assert events(plan) == ["RolloutComplete"]
    status = merged(status, plan)
    assert status == {**good(RB), "updateRevision": RB}
    # ...and is then steady.
    steady = decide(spec, status, obs(300, RB, stable=dep(RB, 3), pods=pods(RB, 3)))
    assert steady.status == status
    assert steady.events == ()


def test_not_complete_while_old_pods_remain_or_controller_lags() -> None:
    spec = make_spec(replicas=2)
    status = merged(good(RA), decide(spec, good(RA), obs(0, RB, stable=dep(RA, 2))))
    # All updated and Ready, but an old pod still exists.
    plan = decide(spec, status, obs(10, RB, stable=dep(RB, 2, total=3)))
    assert plan.status["currentRevision"] == RA
    lagging = DeploymentObs(RB, TB, 2, 2, 2, 2, 2, up_to_date=False)
    plan = decide(spec, status, obs(10, RB, stable=lagging))
    assert plan.status["currentRevision"] == RA
    # The lagging controller's counts are the old template's: not reported as the new revision's progress.
    assert "0/2 pods updated" in cond(plan, "Progressing").message


def test_autoscaling_leaves_replicas_to_the_hpa() -> None:
    spec = make_spec(replicas=1, autoscaling={"maxReplicas": 5, "targetInflightRequests": 4})
    plan = decide(spec, good(RA), obs(0, RB, stable=dep(RA, 4)))
    assert plan.stable.replicas is None
    status = merged(good(RA), plan)
    # Completion is judged against the live (HPA-chosen) count.
    plan = decide(spec, status, obs(10, RB, stable=dep(RB, 4, ready=3)))
    assert plan.status["currentRevision"] == RA
    plan = decide(spec, status, obs(20, RB, stable=dep(RB, 4), pods=pods(RB, 4)))
    assert plan.status["currentRevision"] == RB and plan.stable.replicas is None
    steady = decide(spec, merged(status, plan), obs(30, RB, stable=dep(RB, 5)))
    assert steady.stable.replicas is None


def test_spec_reverted_mid_rollout_rolls_back_to_current_as_a_new_rollout() -> None:
    spec = make_spec()
    status = merged(good(RA), decide(spec, good(RA), obs(0, RB, stable=dep(RA, 3))))
    plan = decide(spec, status, obs(10, RA, stable=dep(RB, 3, ready=2, updated=1, total=4)))
    assert plan.stable.template == TA and plan.status["rollout"]["revision"] == RA
    assert events(plan) == ["RolloutStarted"]
    plan = decide(spec, merged(status, plan), obs(20, RA, stable=dep(RA, 3), pods=pods(RA, 3)))
    assert plan.status["currentRevision"] == RA and events(plan) == ["RolloutComplete"]


# ------------------------------------------------------------------------------------- GPU-aware surge


def _start_b(spec: api.GPTDeploymentSpec) -> dict[str, Any]:
    return merged(good(RA), decide(spec, good(RA), obs(0, RB, stable=dep(RA, spec.replicas))))


def test_surge_unschedulable_within_grace_keeps_waiting() -> None:
    spec = make_spec(replicas=3)
    status = _start_b(spec)
    plan = decide(
        spec, status, obs(60, RB, stable=dep(RB, 3, updated=1, ready=3, total=4), pods=(unschedulable(RB, 10),))
    )
    c = cond(plan, "Progressing")
    assert (c.status, c.reason) == ("True", "RollingOut")
    assert "waiting up to 120s for a GPU" in c.message and NO_GPU in c.message
    assert plan.stable.strategy == SURGE and plan.events == ()
    assert plan.requeue_after == 70  # when the grace ends


@pytest.mark.parametrize("replicas,allow", [(3, None), (1, True), (3, True)])
def test_surge_unschedulable_after_grace_switches_to_in_place(replicas: int, allow: bool | None) -> None:
    spec = make_spec(replicas=replicas, allowCapacityDip=allow) if allow is not None else make_spec(replicas=replicas)
    status = _start_b(spec)
    stuck = obs(200, RB, stable=dep(RB, replicas, updated=1, total=replicas + 1), pods=(unschedulable(RB, 10),))
    plan = decide(spec, status, stuck)
    assert plan.stable.strategy == IN_PLACE and plan.stable.template == TB
    assert (cond(plan, "Progressing").status, cond(plan, "Progressing").reason) == ("True", "CapacityDip")
    assert events(plan) == ["CapacityDip"] and plan.events[0].type == "Warning"
    assert plan.status["rollout"]["inPlace"] is True
    if replicas == 1:
        assert "downtime" in plan.events[0].message
    # Sticky for this rollout, without repeating the Event, once the pods get GPUs.
    status = merged(status, plan)
    plan = decide(spec, status, obs(260, RB, stable=dep(RB, replicas, ready=replicas - 1), pods=pods(RB, 1)))
    assert plan.stable.strategy == IN_PLACE and plan.events == ()
    assert cond(plan, "Progressing").reason == "CapacityDip"
    # Completion goes back to the normal strategy.
    plan = decide(spec, merged(status, plan), obs(300, RB, stable=dep(RB, replicas), pods=pods(RB, replicas)))
    assert plan.stable.strategy == SURGE and events(plan) == ["RolloutComplete"]


@pytest.mark.parametrize("replicas,allow", [(1, None), (3, False)])
def test_surge_unschedulable_without_dip_reports_insufficient_gpu(replicas: int, allow: bool | None) -> None:
    spec = make_spec(replicas=replicas, allowCapacityDip=allow) if allow is not None else make_spec(replicas=replicas)
    status = _start_b(spec)
    plan = decide(
        spec,
        status,
        obs(200, RB, stable=dep(RB, replicas, updated=1, total=replicas + 1), pods=(unschedulable(RB, 10),)),
    )
    c = cond(plan, "Progressing")
    assert (c.status, c.reason) == ("False", "InsufficientGPUForSurge") and NO_GPU in c.message
    assert plan.stable.strategy == SURGE
    assert events(plan) == ["InsufficientGPUForSurge"]
    status = merged(status, plan)
    # Keeps waiting, well past the progress deadline, without repeating the Event or rolling back.
    plan = decide(
        spec,
        status,
        obs(5000, RB, stable=dep(RB, replicas, updated=1, total=replicas + 1), pods=(unschedulable(RB, 10),)),
    )
    assert plan.events == () and merged(status, plan) == status
    assert cond(plan, "Progressing").reason == "InsufficientGPUForSurge"
    assert plan.status.get("failedRevision") is None


def test_gpu_wait_does_not_count_against_the_deadline() -> None:
    spec = make_spec(replicas=1)
    status = _start_b(spec)
    status = merged(
        status, decide(spec, status, obs(200, RB, stable=dep(RB, 1, updated=1, total=2), pods=(unschedulable(RB, 0),)))
    )
    # The GPU frees up at t=5000: the deadline (1800s) counts from there.
    plan = decide(
        spec, status, obs(5000, RB, stable=dep(RB, 1, updated=1, ready=1, total=2), pods=pods(RB, 1, ready=False))
    )
    assert plan.status["rollout"]["progressAt"] == "2026-01-01T01:23:20Z" and "gpuWait" not in plan.status["rollout"]
    status = merged(status, plan)
    assert decide(spec, status, obs(6000, RB, stable=dep(RB, 1, ready=0))).status.get("failedRevision") is None
    assert decide(spec, status, obs(6801, RB, stable=dep(RB, 1, ready=0))).status["failedRevision"] == RB


def test_allowing_capacity_dip_later_unblocks_a_waiting_rollout() -> None:
    spec = make_spec(replicas=1)
    status = _start_b(spec)
    blocked = obs(200, RB, stable=dep(RB, 1, updated=1, total=2), pods=(unschedulable(RB, 10),))
    status = merged(status, decide(spec, status, blocked))
    plan = decide(make_spec(replicas=1, allowCapacityDip=True), status, blocked)
    assert plan.stable.strategy == IN_PLACE and events(plan) == ["CapacityDip"]


# ------------------------------------------------------------------------------------------- rollbacks


def test_deadline_exceeded_rolls_back_and_does_not_retry_until_the_spec_changes() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    slow = obs(1801, RB, stable=dep(RB, 2, ready=2, updated=1, total=3), pods=pods(RA, 2) + pods(RB, 1, ready=False))
    plan = decide(spec, status, slow)
    assert plan.stable.template == TA and plan.stable.revision == RA and plan.canary is None
    rb = cond(plan, "RolledBack")
    assert (rb.status, rb.reason) == ("True", "ProgressDeadlineExceeded") and RB in rb.message and RA in rb.message
    assert (cond(plan, "Progressing").status, cond(plan, "Progressing").reason) == ("False", "RolledBack")
    assert events(plan) == ["RolledBack"] and plan.events[0].type == "Warning"
    assert plan.status["failedRevision"] == RB and plan.status["currentRevision"] == RA
    assert plan.status["rollout"]["phase"] == "RolledBack"

    # Same spec: keep serving A, no retry, no new Events, status unchanged (a fixed point).
    status = merged(status, plan)
    held = decide(spec, status, obs(5000, RB, stable=dep(RA, 2), pods=pods(RA, 2)))
    assert held.stable.template == TA and held.events == ()
    assert merged(status, held) == status
    assert cond(held, "RolledBack").status == "True" and cond(held, "Progressing").reason == "RolledBack"

    # A new revision starts a fresh rollout and RolledBack goes False.
    plan = decide(spec, status, obs(6000, RC, stable=dep(RA, 2), pods=pods(RA, 2)))
    assert plan.stable.template == TC and events(plan) == ["RolloutStarted"]
    assert plan.status["rollout"]["revision"] == RC and plan.status["rollout"]["phase"] == "RollingOut"
    rb = cond(plan, "RolledBack")
    assert (rb.status, rb.reason) == ("False", "NewRevision") and RB in rb.message


def test_going_back_to_the_failed_revision_after_another_one_retries_it() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    status = merged(status, decide(spec, status, obs(1801, RB, stable=dep(RB, 2, ready=0))))
    status = merged(status, decide(spec, status, obs(1900, RC, stable=dep(RA, 2))))
    plan = decide(spec, status, obs(2000, RB, stable=dep(RC, 2, ready=0)))
    assert plan.status["rollout"]["revision"] == RB and plan.stable.template == TB


def test_reverting_the_spec_to_the_last_good_revision_after_a_rollback_is_steady() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    status = merged(status, decide(spec, status, obs(1801, RB, stable=dep(RB, 2, ready=0))))
    plan = decide(spec, status, obs(1900, RA, stable=dep(RA, 2)))
    assert plan.status["rollout"] is None and plan.events == () and plan.stable.template == TA
    status = merged(status, plan)
    again = decide(spec, status, obs(2000, RA, stable=dep(RA, 2)))
    assert merged(status, again) == status and again.events == ()


def test_progress_restarts_the_deadline() -> None:
    spec = make_spec(replicas=3)
    status = _start_b(spec)
    plan = decide(spec, status, obs(1500, RB, stable=dep(RB, 3, updated=2, ready=3, total=4), pods=pods(RB, 1)))
    assert plan.status["rollout"]["readyPods"] == 1
    status = merged(status, plan)
    plan = decide(spec, status, obs(3000, RB, stable=dep(RB, 3, updated=2, ready=3, total=4), pods=pods(RB, 1)))
    assert plan.status.get("failedRevision") is None and plan.requeue_after == 300
    plan = decide(spec, status, obs(3301, RB, stable=dep(RB, 3, updated=2, ready=3, total=4), pods=pods(RB, 1)))
    assert plan.status["failedRevision"] == RB


def test_crashloop_rolls_back() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    msg = "CrashLoopBackOff: container runtime last exited OOMKilled code 137"
    few = obs(60, RB, pods=(PodObs(RB, False, crashloop_message=msg, restarts=2, waiting_reason="CrashLoopBackOff"),))
    assert decide(spec, status, few).status.get("failedRevision") is None
    many = obs(90, RB, pods=(PodObs(RB, False, crashloop_message=msg, restarts=3, waiting_reason="CrashLoopBackOff"),))
    plan = decide(spec, status, many)
    rb = cond(plan, "RolledBack")
    assert (rb.status, rb.reason) == ("True", "CrashLoop") and "OOMKilled" in rb.message and RB in rb.message
    assert plan.stable.template == TA and events(plan) == ["RolledBack"]
    # Old-revision pods crash-looping are not the new revision's fault.
    old = obs(90, RB, pods=(PodObs(RA, False, crashloop_message=msg, restarts=9),))
    assert decide(spec, status, old).status.get("failedRevision") is None


def test_image_pull_backoff_rolls_back_without_waiting_for_restarts() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    pod = PodObs(RB, False, crashloop_message="ImagePullBackOff: container runtime", waiting_reason="ImagePullBackOff")
    plan = decide(spec, status, obs(60, RB, pods=(pod,)))
    assert cond(plan, "RolledBack").reason == "CrashLoop"


def test_abort_annotation_rolls_back_a_rolling_update() -> None:
    spec = make_spec(replicas=2)
    status = _start_b(spec)
    plan = decide(spec, status, obs(60, RB, abort=True))
    assert cond(plan, "RolledBack").reason == "Aborted" and ABORT_ANNOTATION in plan.annotations_to_clear
    assert plan.stable.template == TA


def test_first_revision_failing_has_nothing_to_roll_back_to() -> None:
    spec = make_spec(replicas=1)
    status = merged({}, decide(spec, {}, obs(0, RA)))
    plan = decide(spec, status, obs(1801, RA, stable=dep(RA, 1, ready=0), pods=pods(RA, 1, ready=False)))
    assert plan.stable.template == TA  # keeps trying the only revision there is
    p = cond(plan, "Progressing")
    assert (p.status, p.reason) == ("False", "FirstRevisionFailed") and "ProgressDeadlineExceeded" not in p.message
    assert "no earlier good revision" in p.message
    assert cond(plan, "RolledBack").status == "False"
    assert events(plan) == ["RolloutFailed"] and plan.status["failedRevision"] == RA
    assert "currentRevision" not in plan.status
    status = merged(status, plan)
    held = decide(spec, status, obs(3000, RA, stable=dep(RA, 1, ready=0)))
    assert held.events == () and merged(status, held) == status
    # If it recovers on its own, it becomes the last good revision.
    plan = decide(spec, status, obs(4000, RA, stable=dep(RA, 1), pods=pods(RA, 1)))
    assert plan.status["currentRevision"] == plan.status["lastGoodRevision"] == RA
    assert events(plan) == ["RolloutComplete"]


# ---------------------------------------------------------------------------------------------- canary


def test_canary_replica_granularity() -> None:
    assert canary_replicas(4, 10) == 1  # 1 of 5 pods: 20% of traffic, not 10%
    assert canary_replicas(10, 25) == 3  # 2.5 rounds up
    assert canary_replicas(1, 50) == 1
    assert canary_replicas(20, 10) == 2


def _canary_started(spec: api.GPTDeploymentSpec) -> dict[str, Any]:
    plan = decide(spec, good(RA), obs(0, RB, stable=dep(RA, spec.replicas), pods=pods(RA, spec.replicas)))
    assert plan.status["rollout"]["phase"] == "Canary" and plan.status["rollout"]["step"] == 0
    return merged(good(RA), plan)


def test_canary_steps_pauses_promote_and_promotion() -> None:
    spec = canary_spec(replicas=4)
    plan = decide(spec, good(RA), obs(0, RB, stable=dep(RA, 4)))
    assert plan.stable.template == TA and plan.stable.revision == RA and plan.stable.replicas == 4
    assert plan.canary is not None and plan.canary.template == TB and plan.canary.replicas == 1
    assert cond(plan, "Progressing").reason == "CanaryStep1of2"
    assert "waiting for the canary" in cond(plan, "Progressing").message
    status = merged(good(RA), plan)

    # Not Ready yet: no pause running, no advance.
    plan = decide(spec, status, obs(100, RB, stable=dep(RA, 4), canary=dep(RB, 1, ready=0)))
    assert plan.status["rollout"]["step"] == 0 and "stepReadyAt" not in plan.status["rollout"]
    # Ready at t=200: the 60s pause starts.
    ready1 = {"stable": dep(RA, 4), "canary": dep(RB, 1), "pods": pods(RA, 4) + pods(RB, 1)}
    plan = decide(spec, status, obs(200, RB, **ready1))
    assert plan.status["rollout"]["stepReadyAt"] == "2026-01-01T00:03:20Z" and plan.requeue_after == 60
    assert "pausing 60s" in cond(plan, "Progressing").message and plan.events == ()
    status = merged(status, plan)
    assert decide(spec, status, obs(259, RB, **ready1)).status["rollout"]["step"] == 0
    # Pause over: step 2 (weight 50 → 2 canary pods), the stable keeps all 4.
    plan = decide(spec, status, obs(260, RB, **ready1))
    assert plan.status["rollout"]["step"] == 1 and events(plan) == ["CanaryStep"]
    assert plan.canary.replicas == 2 and plan.stable.replicas == 4 and plan.stable.template == TA
    assert cond(plan, "Progressing").reason == "CanaryStep2of2"
    status = merged(status, plan)

    # Last step has no pause: Ready waits for the promote annotation, for as long as it takes (no deadline).
    ready2 = {"stable": dep(RA, 4), "canary": dep(RB, 2), "pods": pods(RA, 4) + pods(RB, 2)}
    plan = decide(spec, status, obs(300, RB, **ready2))
    assert "gptd.io/promote=true" in cond(plan, "Progressing").message and plan.requeue_after is None
    status = merged(status, plan)
    plan = decide(spec, status, obs(99999, RB, **ready2))
    assert plan.status["rollout"]["step"] == 1 and plan.status.get("failedRevision") is None and plan.events == ()

    # Promote: the stable rolls to B with the normal strategy; the canary stays until that is done.
    plan = decide(spec, status, obs(100000, RB, promote=True, **ready2))
    assert PROMOTE_ANNOTATION in plan.annotations_to_clear and events(plan) == ["Promoting"]
    assert plan.status["rollout"]["phase"] == "Promoting"
    assert plan.stable.template == TB and plan.stable.strategy == SURGE and plan.stable.replicas == 4
    assert plan.canary is not None and plan.canary.replicas == 2
    assert cond(plan, "Progressing").reason == "Promoting"
    status = merged(status, plan)
    plan = decide(spec, status, obs(100100, RB, stable=dep(RB, 4, updated=2, total=5), canary=dep(RB, 2)))
    assert plan.canary is not None and plan.events == ()
    plan = decide(spec, status, obs(100200, RB, stable=dep(RB, 4), canary=dep(RB, 2), pods=pods(RB, 6)))
    assert plan.canary is None and events(plan) == ["Promoted"]
    assert plan.status["currentRevision"] == plan.status["lastGoodRevision"] == RB
    assert plan.status["lastGoodTemplate"] == TB and plan.status["rollout"] is None
    assert cond(plan, "Progressing").reason == "RolloutComplete"


def test_canary_promotes_by_itself_after_the_last_pause() -> None:
    spec = canary_spec(replicas=4, steps=[{"weight": 25, "pauseSeconds": 0}])
    status = _canary_started(spec)
    plan = decide(spec, status, obs(10, RB, stable=dep(RA, 4), canary=dep(RB, 1)))
    assert plan.status["rollout"]["phase"] == "Promoting" and events(plan) == ["Promoting"]
    assert plan.stable.template == TB and plan.canary is not None


def test_promote_skips_remaining_steps_even_before_ready() -> None:
    spec = canary_spec(replicas=4, steps=[{"weight": 10, "pauseSeconds": 600}, {"weight": 50, "pauseSeconds": 600}])
    status = _canary_started(spec)
    plan = decide(spec, status, obs(10, RB, stable=dep(RA, 4), promote=True))
    assert plan.status["rollout"]["phase"] == "Promoting" and plan.stable.template == TB


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"abort": True}, "Aborted"),
        ({"analysis_breach": "error rate 0.12 > 0.05"}, "AnalysisFailed"),
        (
            {"pods": (PodObs(RB, False, crashloop_message="CrashLoopBackOff: container runtime", restarts=5),)},
            "CrashLoop",
        ),
    ],
)
def test_canary_failure_rolls_back_and_removes_the_canary(kw: dict[str, Any], reason: str) -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    plan = decide(spec, status, obs(100, RB, stable=dep(RA, 4), canary=dep(RB, 1), **kw))
    assert plan.canary is None and plan.stable.template == TA
    rb = cond(plan, "RolledBack")
    assert (rb.status, rb.reason) == ("True", reason) and RB in rb.message
    assert events(plan) == ["RolledBack"] and plan.status["failedRevision"] == RB
    if reason == "Aborted":
        assert ABORT_ANNOTATION in plan.annotations_to_clear
    if reason == "AnalysisFailed":
        assert "0.12" in rb.message
    # Held: no retry of the failed revision.
    held = decide(spec, merged(status, plan), obs(200, RB, stable=dep(RA, 4)))
    assert held.canary is None and held.events == ()


def test_canary_deadline_rolls_back() -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    plan = decide(spec, status, obs(1801, RB, stable=dep(RA, 4), canary=dep(RB, 1, ready=0)))
    assert cond(plan, "RolledBack").reason == "ProgressDeadlineExceeded" and plan.canary is None


def test_abort_during_promotion_restores_the_stable() -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    status = merged(status, decide(spec, status, obs(10, RB, stable=dep(RA, 4), promote=True)))
    plan = decide(spec, status, obs(20, RB, stable=dep(RB, 4, updated=1, total=5), canary=dep(RB, 1), abort=True))
    assert plan.stable.template == TA and plan.canary is None and cond(plan, "RolledBack").reason == "Aborted"


def test_spec_change_mid_canary_restarts_at_step_zero() -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    status = merged(status, decide(spec, status, obs(100, RB, stable=dep(RA, 4), canary=dep(RB, 1))))
    status = merged(status, decide(spec, status, obs(200, RB, stable=dep(RA, 4), canary=dep(RB, 1))))
    assert status["rollout"]["step"] == 1
    plan = decide(spec, status, obs(300, RC, stable=dep(RA, 4), canary=dep(RB, 2)))
    assert plan.status["rollout"] == {
        "revision": RC,
        "step": 0,
        "startedAt": "2026-01-01T00:05:00Z",
        "phase": "Canary",
        "progressAt": "2026-01-01T00:05:00Z",
        "readyPods": 0,
    }
    assert plan.canary is not None and plan.canary.template == TC and plan.canary.replicas == 1
    assert plan.stable.template == TA and events(plan) == ["RolloutStarted"]


def test_canary_first_revision_is_rolled_out_directly() -> None:
    plan = decide(canary_spec(), {}, obs(0, RA))
    assert plan.status["rollout"]["phase"] == "RollingOut" and plan.canary is None and plan.stable.template == TA


def test_canary_with_autoscaling_sizes_from_the_live_count_and_leaves_stable_replicas_alone() -> None:
    spec = make_spec(
        replicas=1,
        autoscaling={"minReplicas": 2, "maxReplicas": 20, "targetInflightRequests": 8},
        strategy="Canary",
        canary={"steps": [{"weight": 20, "pauseSeconds": 60}]},
    )
    plan = decide(spec, good(RA), obs(0, RB, stable=dep(RA, 10)))
    assert plan.stable.replicas is None and plan.canary is not None and plan.canary.replicas == 2


def test_canary_unschedulable_dips_the_stable_when_allowed() -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    plan = decide(
        spec, status, obs(200, RB, stable=dep(RA, 4), canary=dep(RB, 1, ready=0), pods=(unschedulable(RB, 0),))
    )
    assert plan.status["rollout"]["inPlace"] is True and events(plan) == ["CapacityDip"]
    assert plan.stable.replicas == 3 and plan.canary.replicas == 1
    spec1 = canary_spec(replicas=4, allowCapacityDip=False)
    status = _canary_started(spec1)
    plan = decide(
        spec1, status, obs(200, RB, stable=dep(RA, 4), canary=dep(RB, 1, ready=0), pods=(unschedulable(RB, 0),))
    )
    assert cond(plan, "Progressing").reason == "InsufficientGPUForSurge" and plan.stable.replicas == 4


# --------------------------------------------------------------------------------------- observations


def test_observe_deployment() -> None:
    raw = {
        "metadata": {"generation": 3, "annotations": {"gptd.io/template": '{"model": {"uri": "hf://org/b"}}'}},
        "spec": {"replicas": 4, "template": {"metadata": {"labels": {"gptd.io/revision": RB}}}},
        "status": {"observedGeneration": 3, "replicas": 5, "readyReplicas": 4, "updatedReplicas": 2},
    }
    d = observe_deployment(raw)
    assert d == DeploymentObs(RB, {"model": {"uri": "hf://org/b"}}, 4, 5, 4, 2, 0, True)
    raw["status"]["observedGeneration"] = 2
    assert observe_deployment(raw).up_to_date is False
    bare = observe_deployment({"metadata": {"annotations": {"gptd.io/template": "not json"}}, "spec": {}})
    assert bare.template is None and bare.spec_replicas == 1 and bare.revision is None


def test_observe_pod() -> None:
    pending = observe_pod(
        {
            "metadata": {"labels": {"gptd.io/revision": RB}},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": NO_GPU,
                        "lastTransitionTime": "2026-01-01T00:00:10Z",
                    },
                ]
            },
        }
    )
    assert pending == PodObs(RB, False, at(10), NO_GPU)
    crashing = observe_pod(
        {
            "metadata": {"labels": {"gptd.io/revision": RB}},
            "status": {
                "conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": "runtime",
                        "restartCount": 4,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ],
            },
        }
    )
    assert crashing.restarts == 4 and crashing.waiting_reason == "CrashLoopBackOff"
    assert crashing.crashloop_message.startswith("CrashLoopBackOff: container runtime")
    assert "OOMKilled" in crashing.crashloop_message and "137" in crashing.crashloop_message
    ready = observe_pod(
        {
            "metadata": {"labels": {"gptd.io/revision": RA}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert ready == PodObs(RA, True)


def test_canary_analysis_unavailable_holds_the_step_then_recovers() -> None:
    spec = canary_spec(replicas=4)  # step 1: weight 10 (1 pod), pause 60 s
    status = _canary_started(spec)
    down = "Prometheus unavailable: HTTP 500"
    plan = decide(spec, status, obs(10, RB, stable=dep(RA, 4), canary=dep(RB, 1), analysis_unavailable=down))
    status = merged(status, plan)
    assert plan.canary is not None and plan.stable.template == TA  # no rollback
    assert events(plan) == ["AnalysisUnavailable"] and plan.events[0].type == "Warning"
    assert status["rollout"]["analysisUnavailable"] == down
    # Long past the pause, still down: held at step 1, no further Event, no rollback, no deadline.
    for t in (100, 5000):
        plan = decide(spec, status, obs(t, RB, stable=dep(RA, 4), canary=dep(RB, 1), analysis_unavailable=down))
        status = merged(status, plan)
        assert plan.events == () and status["rollout"]["step"] == 0 and plan.canary is not None
        c = cond(plan, "Progressing")
        assert c.reason == "CanaryStep1of2" and "not advancing: canary analysis unavailable" in c.message
        assert cond(plan, "RolledBack").status == "False"
    # Prometheus is back: one Normal Event, and the overdue step advances.
    plan = decide(spec, status, obs(5010, RB, stable=dep(RA, 4), canary=dep(RB, 1)))
    assert events(plan) == ["AnalysisRecovered", "CanaryStep"]
    assert plan.status["rollout"]["step"] == 1 and "analysisUnavailable" not in plan.status["rollout"]


def test_canary_analysis_unavailable_does_not_block_a_manual_promote() -> None:
    spec = canary_spec(replicas=4)
    status = _canary_started(spec)
    plan = decide(spec, status, obs(10, RB, stable=dep(RA, 4), canary=dep(RB, 1), promote=True,
                                    analysis_unavailable="Prometheus unavailable"))
    assert plan.status["rollout"]["phase"] == "Promoting" and plan.stable.template == TB


def test_every_status_rollout_key_is_declared_in_the_typed_model() -> None:
    """status.rollout is typed (api.RolloutStatus, extra=forbid): a key rollout.py writes but the model (and so
    the CRD schema) lacks would be pruned by a real API server."""
    import re
    from pathlib import Path

    from gptd_operator import api, rollout

    source = Path(rollout.__file__).read_text()
    written = set(re.findall(r'\bro\["(\w+)"\]\s*=', source))
    written |= set(re.findall(r'd\.ro\["(\w+)"\]\s*=', source))
    for block in re.findall(r'(?:state\["rollout"\]|record: dict\[str, Any\]) = \{([^}]*)\}', source):
        written |= set(re.findall(r'"(\w+)":', block))
    written |= set(re.findall(r'record\["(\w+)"\]\s*=', source))
    assert {"revision", "phase", "step", "progressAt"} <= written  # the scan found the writes
    assert written <= set(api.RolloutStatus.model_fields), written - set(api.RolloutStatus.model_fields)
