"""Rollouts of a new revision with the real operator (docs/rollout.md), against the emulated API server.

The test plays the controllers the emulator lacks: the Deployment controller (status counts and
observedGeneration), the ReplicaSet controller and the scheduler/kubelet (pods of a revision, Ready,
Unschedulable for want of a GPU, crash-looping). It asserts what the operator writes: the Deployments'
templates, replica counts and strategies, the CR's status and conditions, and the Events it posts.
Synchronisation is by polling with deadlines (``eventually``) and by counting the operator's resync passes.
"""

from __future__ import annotations

import pytest

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import (
    CRASHLOOP_POD,
    GPU_MESSAGE,
    NS,
    READY_POD,
    REV,
    UNSCHEDULABLE_POD,
    add_pod,
    change_revision,
    condition,
    cr,
    deployment_where,
    env_of,
    event,
    events,
    labels_of,
    model,
    progressing,
    ready_deployment,
    started,
    status_of,
    status_where,
    strategy_of,
)

pytestmark = pytest.mark.timeout(30)
# --------------------------------------------------------------------------------------------- tests


async def test_rolling_update_completes_then_resync_is_silent(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=2)
    dep = await change_revision(cluster, "v2", old)
    new = labels_of(dep)[REV]
    assert env_of(dep)["GPTD_REVISION"] == "v2"
    assert strategy_of(dep) == {"maxSurge": 1, "maxUnavailable": 0}  # capacity never drops
    assert dep["spec"]["replicas"] == 2
    st = await status_where(cluster, "RollingOut", progressing("RollingOut"))
    assert st["updateRevision"] == new and st["currentRevision"] == old and st["lastGoodRevision"] == old
    assert condition(st, "Progressing")["status"] == "True"
    assert condition(st, "Ready")["status"] == "False"
    assert st["phase"] == "Progressing" and st["rollout"]["revision"] == new
    assert (await event(cluster, "RolloutStarted"))["type"] == "Normal"

    # Play the Deployment controller to the end of the rolling update: two new pods, both Ready.
    await add_pod(cluster, dep, "gpt2-new-1", READY_POD)
    await add_pod(cluster, dep, "gpt2-new-2", READY_POD)
    await ready_deployment(cluster, replicas=2)
    st = await status_where(cluster, "RolloutComplete", lambda s: progressing("RolloutComplete")(s)
                            and s.get("currentRevision") == new)
    assert st["lastGoodRevision"] == new and st["updateRevision"] == new
    assert condition(st, "Progressing")["status"] == "False"
    assert condition(st, "Ready")["status"] == "True" and st["phase"] == "Ready"
    assert condition(st, "RolledBack")["status"] == "False"
    assert st.get("rollout") is None
    assert (await event(cluster, "RolloutComplete"))["type"] == "Normal"

    # A finished rollout is a steady state: resyncs that observe nothing new write nothing.
    await operator.resync_passes(2)  # settle: every reaction to our own writes is done
    before = len(cluster.requests())
    reconciles = operator.reconciler.reconciles
    await operator.resync_passes(3)
    assert operator.reconciler.reconciles >= reconciles + 3
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))


async def test_rolling_update_under_hpa_keeps_its_replica_count(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(model=model("v1"), autoscaling={
        "minReplicas": 1, "maxReplicas": 5, "targetInflightRequests": 4}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    old = labels_of(dep)[REV]
    # Play the HPA: it scales the Deployment to 3; the controller brings them up.
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"replicas": 3}})
    await ready_deployment(cluster, replicas=3)
    await status_where(cluster, "Ready at 3", lambda s: s.get("phase") == "Ready" and s.get("readyDisplay") == "3/3")
    dep = await change_revision(cluster, "v2", old)
    new = labels_of(dep)[REV]
    assert dep["spec"]["replicas"] == 3  # the rollout did not touch the HPA's choice
    st = await status_where(cluster, "RollingOut", progressing("RollingOut"))
    assert "0/3 pods updated" in condition(st, "Progressing")["message"]
    await ready_deployment(cluster, replicas=3)
    st = await status_where(cluster, "RolloutComplete", lambda s: s.get("currentRevision") == new)
    assert progressing("RolloutComplete")(st) and st["phase"] == "Ready" and st["readyDisplay"] == "3/3"
    assert (await cluster.get("deployments", NS, "gpt2"))["spec"]["replicas"] == 3


async def test_surge_blocked_dips_capacity(cluster: Cluster, operator: RunningOperator) -> None:
    # replicas 2 and no allowCapacityDip: the dip is allowed by default.
    old = await started(cluster, replicas=2, rollout={"surgeGraceSeconds": 30})
    dep = await change_revision(cluster, "v2", old)
    assert strategy_of(dep) == {"maxSurge": 1, "maxUnavailable": 0}
    # The scheduler: the surge pod of the new revision has had no GPU for longer than the grace.
    await add_pod(cluster, dep, "gpt2-new-1", UNSCHEDULABLE_POD)
    dep = await deployment_where(cluster, "gpt2", "in-place strategy",
                                 lambda d: strategy_of(d) == {"maxSurge": 0, "maxUnavailable": 1})
    assert labels_of(dep)[REV] != old and dep["spec"]["replicas"] == 2
    st = await status_where(cluster, "CapacityDip", progressing("CapacityDip"))
    cond = condition(st, "Progressing")
    assert cond["status"] == "True" and "capacity dips by one pod" in cond["message"]
    ev = await event(cluster, "CapacityDip")
    assert ev["type"] == "Warning" and GPU_MESSAGE in ev["message"]
    assert st["rollout"]["inPlace"] is True and st["currentRevision"] == old
    # The scheduler's words are on the CR (phase Degraded while a pod can't be scheduled: docs/operator.md).
    degraded = condition(st, "Degraded")
    assert degraded["reason"] == "Unschedulable" and GPU_MESSAGE in degraded["message"]

    # Play the Deployment controller with the new strategy: an old pod stops, the new one gets its GPU...
    await cluster.patch("pods", NS, "gpt2-new-1", {"status": READY_POD}, sub="status")
    await add_pod(cluster, dep, "gpt2-new-2", READY_POD)
    await ready_deployment(cluster, replicas=2)
    # ...and the rollout completes; the next one surges again.
    dep = await deployment_where(cluster, "gpt2", "surge strategy restored",
                                 lambda d: strategy_of(d) == {"maxSurge": 1, "maxUnavailable": 0})
    assert labels_of(dep)[REV] != old
    st = await status_where(cluster, "RolloutComplete", progressing("RolloutComplete"))
    assert st["currentRevision"] == labels_of(dep)[REV] and "rollout" not in st
    await ready_deployment(cluster, replicas=2)  # the controller observed the strategy change
    st = await status_where(cluster, "Ready", lambda s: s.get("phase") == "Ready")
    assert condition(st, "Degraded")["status"] == "False" and condition(st, "Ready")["status"] == "True"


async def test_surge_blocked_without_dip_says_why(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=2, rollout={"allowCapacityDip": False, "surgeGraceSeconds": 0})
    dep = await change_revision(cluster, "v2", old)
    await add_pod(cluster, dep, "gpt2-new-1", UNSCHEDULABLE_POD)
    st = await status_where(cluster, "InsufficientGPUForSurge", progressing("InsufficientGPUForSurge"))
    cond = condition(st, "Progressing")
    assert cond["status"] == "False" and GPU_MESSAGE in cond["message"]
    assert "allowCapacityDip" in cond["message"]
    ev = await event(cluster, "InsufficientGPUForSurge")
    assert ev["type"] == "Warning" and GPU_MESSAGE in ev["message"]
    await operator.resync_passes(2)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert strategy_of(dep) == {"maxSurge": 1, "maxUnavailable": 0}  # no dip
    assert labels_of(dep)[REV] != old  # still rolling out the new revision, waiting for a GPU
    assert len(await events(cluster, "InsufficientGPUForSurge")) == 1  # once, not once per resync
    st = await status_of(cluster)
    assert condition(st, "RolledBack")["status"] == "False"  # lack of GPUs is not the revision's fault

    # The Deployment controller's own deadline (the same progressDeadlineSeconds) passes while the surge pod
    # waits: it reports ProgressDeadlineExceeded. Waiting for a GPU is not a failed revision (docs/rollout.md):
    # the CR stays Degraded with the scheduler's words, not Failed, and nothing is rolled back.
    await cluster.patch("deployments", NS, "gpt2", {"status": {"conditions": [{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "gpt2-new" has timed out progressing.'}]}}, sub="status")
    await operator.resync_passes(2)
    st = await status_of(cluster)
    assert st["phase"] == "Degraded", st["phase"]
    degraded = condition(st, "Degraded")
    assert degraded["reason"] == "Unschedulable" and GPU_MESSAGE in degraded["message"]
    assert progressing("InsufficientGPUForSurge")(st) and condition(st, "RolledBack")["status"] == "False"
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] != old

    # A GPU frees up: the surge pod is scheduled and becomes Ready, and the rollout goes on.
    await cluster.patch("pods", NS, "gpt2-new-1", {"status": {
        "phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"},
                                           {"type": "Ready", "status": "True"}]}}, sub="status")
    st = await status_where(cluster, "RollingOut again", progressing("RollingOut"))
    assert condition(st, "Progressing")["status"] == "True" and "1 Ready" in condition(st, "Progressing")["message"]
    assert strategy_of(await cluster.get("deployments", NS, "gpt2")) == {"maxSurge": 1, "maxUnavailable": 0}


async def test_crashloop_rolls_back_and_does_not_retry(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=2)
    dep = await change_revision(cluster, "v2", old)
    new = labels_of(dep)[REV]
    await add_pod(cluster, dep, "gpt2-new-1", CRASHLOOP_POD)

    # The operator restores the last good revision's template...
    dep = await deployment_where(cluster, "gpt2", "rolled back template", lambda d: labels_of(d).get(REV) == old)
    env = env_of(dep)
    assert env["GPTD_REVISION"] == "v1" and env["GPTD_MODEL"] == "hf://openai-community/gpt2"
    assert dep["metadata"]["annotations"][REV] == old
    # ...says so in the status...
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "CrashLoop"
    assert new in rb["message"] and old in rb["message"] and "OOMKilled" in rb["message"]
    assert st["failedRevision"] == new and st["updateRevision"] == new and st["lastGoodRevision"] == old
    assert condition(st, "Progressing")["status"] == "False" and condition(st, "Progressing")["reason"] == "RolledBack"
    # ...and with a Warning Event on the CR.
    ev = await event(cluster, "RolledBack")
    assert ev["type"] == "Warning" and new in ev["message"]
    assert ev["involvedObject"]["kind"] == "GPTDeployment"

    # Play the Deployment controller: the old ReplicaSet is back at full strength, the crashing pod is gone.
    await cluster.delete("pods", NS, "gpt2-new-1")
    await ready_deployment(cluster, replicas=2)
    st = await status_where(cluster, "Ready on the last good revision",
                            lambda s: condition(s, "Ready").get("status") == "True")
    assert st["phase"] == "Ready"  # serving the last good revision (docs/rollout.md)
    assert st["currentRevision"] == old and condition(st, "RolledBack")["status"] == "True"

    # Not retried: resyncs while rolled back write nothing at all...
    await operator.resync_passes(2)
    before = len(cluster.requests())
    await operator.resync_passes(3)
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))
    # ...and a CR update (an annotation: kopf records it, the operator reconciles) keeps the old template.
    before = len(cluster.requests())
    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"annotations": {"example.com/touched": "1"}}})
    await operator.resync_passes(3)
    dep = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(dep)[REV] == old
    assert cluster.writes(before, path_part="/deployments") == []
    assert len(await events(cluster, "RolledBack")) == 1

    # A new revision in the spec is a fresh rollout.
    dep = await change_revision(cluster, "v3", old)
    assert env_of(dep)["GPTD_REVISION"] == "v3" and labels_of(dep)[REV] != new
    st = await status_where(cluster, "fresh rollout", progressing("RollingOut"))
    rb = condition(st, "RolledBack")
    assert rb["status"] == "False" and rb["reason"] == "NewRevision"
    assert st["rollout"]["revision"] == labels_of(dep)[REV] and st["currentRevision"] == old


@pytest.mark.timeout(40)
async def test_progress_deadline_rolls_back(cluster: Cluster, operator: RunningOperator) -> None:
    # The one slow test: progressDeadlineSeconds can't go below 10 and the operator stamps the rollout's
    # start itself (it can't be backdated), so this waits out a real 10 s deadline. Finer cases (progress
    # restarting the clock, GPU waits not counting) are unit tests of rollout.decide.
    old = await started(cluster, replicas=1, rollout={"progressDeadlineSeconds": 10})
    dep = await change_revision(cluster, "v2", old)
    new = labels_of(dep)[REV]
    await add_pod(cluster, dep, "gpt2-new-1", {"phase": "Pending"})  # never becomes Ready
    st = await status_where(cluster, "deadline rollback", lambda s: condition(s, "RolledBack").get("status") == "True",
                            timeout=20)
    rb = condition(st, "RolledBack")
    assert rb["reason"] == "ProgressDeadlineExceeded" and new in rb["message"]
    assert "no progress for 10s" in rb["message"]
    assert st["failedRevision"] == new
    dep = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(dep)[REV] == old
    # Play the Deployment controller: its own deadline (the same 10 s) passed too, and it still says so while
    # the old ReplicaSet takes over again. The CR is not "Failed": the rollout has handled it.
    await cluster.patch("deployments", NS, "gpt2", {"status": {"conditions": [{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "gpt2-new" has timed out progressing.'}]}}, sub="status")
    st = await status_where(cluster, "Degraded",
                            lambda s: condition(s, "Degraded").get("reason") == "ProgressDeadlineExceeded")
    assert st["phase"] == "Degraded"
    # The old revision serves again (the controller clears its condition once complete): Ready, RolledBack=True.
    await cluster.delete("pods", NS, "gpt2-new-1")
    dep = await cluster.get("deployments", NS, "gpt2")
    await cluster.patch("deployments", NS, "gpt2", {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
        "availableReplicas": 1, "conditions": [{"type": "Progressing", "status": "True",
                                                "reason": "NewReplicaSetAvailable", "message": "complete"}]}},
        sub="status")
    st = await status_where(cluster, "Ready", lambda s: s.get("phase") == "Ready")
    assert condition(st, "Ready")["status"] == "True" and condition(st, "Degraded")["status"] == "False"
    assert condition(st, "RolledBack")["status"] == "True" and st["currentRevision"] == old


async def test_canary_steps_and_promotion(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=4, rollout={"strategy": "Canary", "canary": {"steps": [
        {"weight": 25, "pauseSeconds": 0}, {"weight": 50}]}})
    canary = await change_revision(cluster, "v2", old, name="gpt2-canary")
    new = labels_of(canary)[REV]
    assert canary["spec"]["replicas"] == 1  # 25% of 4
    assert env_of(canary)["GPTD_REVISION"] == "v2" and labels_of(canary)["gptd.io/track"] == "canary"
    stable = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(stable)[REV] == old and stable["spec"]["replicas"] == 4  # full capacity kept
    st = await status_where(cluster, "step 1", progressing("CanaryStep1of2"))
    assert st["rollout"]["phase"] == "Canary" and st["currentRevision"] == old

    # The canary is Ready; step 1 pauses 0 s, so step 2 follows: 50% of 4 = 2 canary pods.
    await ready_deployment(cluster, "gpt2-canary", replicas=1)
    canary = await deployment_where(cluster, "gpt2-canary", "2 canary replicas", lambda d: d["spec"]["replicas"] == 2)
    st = await status_where(cluster, "step 2", progressing("CanaryStep2of2"))
    assert st["rollout"]["step"] == 1
    assert (await event(cluster, "CanaryStep"))["type"] == "Normal"
    await ready_deployment(cluster, "gpt2-canary", replicas=2)
    st = await status_where(cluster, "step 2 paused", lambda s: "paused until gptd.io/promote=true" in
                            condition(s, "Progressing").get("message", ""))
    assert st["readyDisplay"] == "6/6" and st["phase"] == "Progressing"  # READY counts both tracks
    # Step 2 has no pause: it waits for the promote annotation, however many resyncs pass.
    await operator.resync_passes(2)
    assert labels_of(await cluster.get("deployments", NS, "gpt2"))[REV] == old
    assert progressing("CanaryStep2of2")(await status_of(cluster))

    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"annotations": {"gptd.io/promote": "true"}}})
    stable = await deployment_where(cluster, "gpt2", "stable promoted", lambda d: labels_of(d).get(REV) == new)
    assert stable["spec"]["replicas"] == 4
    st = await status_where(cluster, "Promoting", progressing("Promoting"))
    assert await cluster.get("deployments", NS, "gpt2-canary") is not None  # serves until stable is Ready
    assert st["currentRevision"] == old

    async def promote_cleared() -> bool:
        cr_ = await cluster.get("gptdeployments", NS, "gpt2")
        return "gptd.io/promote" not in (cr_["metadata"].get("annotations") or {})

    await eventually(promote_cleared, what="promote annotation removed")

    await ready_deployment(cluster, replicas=4)  # the Deployment controller finished the stable's update

    async def canary_gone() -> bool:
        return await cluster.get("deployments", NS, "gpt2-canary") is None

    await eventually(canary_gone, what="canary Deployment deleted")
    st = await status_where(cluster, "promoted", lambda s: s.get("currentRevision") == new)
    assert st["lastGoodRevision"] == new and progressing("RolloutComplete")(st)
    assert st["phase"] == "Ready" and condition(st, "Ready")["status"] == "True"
    assert (await event(cluster, "Promoted"))["type"] == "Normal"


async def test_canary_abort_rolls_back(cluster: Cluster, operator: RunningOperator) -> None:
    old = await started(cluster, replicas=4, rollout={"strategy": "Canary", "canary": {"steps": [
        {"weight": 25, "pauseSeconds": 0}, {"weight": 50}]}})
    canary = await change_revision(cluster, "v2", old, name="gpt2-canary")
    new = labels_of(canary)[REV]
    await status_where(cluster, "step 1", progressing("CanaryStep1of2"))
    before = len(cluster.requests())
    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"annotations": {"gptd.io/abort": "true"}}})

    async def canary_gone() -> bool:
        return await cluster.get("deployments", NS, "gpt2-canary") is None

    await eventually(canary_gone, what="canary Deployment deleted")
    st = await status_where(cluster, "Aborted", lambda s: condition(s, "RolledBack").get("reason") == "Aborted")
    rb = condition(st, "RolledBack")
    assert rb["status"] == "True" and new in rb["message"]
    assert st["failedRevision"] == new and st["currentRevision"] == old
    assert (await event(cluster, "RolledBack"))["type"] == "Warning"
    stable = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(stable)[REV] == old and stable["spec"]["replicas"] == 4
    # The stable Deployment was never written to during the abort.
    assert not [w for w in cluster.writes(before) if w.endswith("/deployments/gpt2")]
    cr_ = await cluster.get("gptdeployments", NS, "gpt2")
    assert "gptd.io/abort" not in (cr_["metadata"].get("annotations") or {})
    st = await status_where(cluster, "Ready on the old revision", lambda s: s.get("phase") == "Ready")
    assert condition(st, "Ready")["status"] == "True" and condition(st, "RolledBack")["status"] == "True"
    await operator.resync_passes(2)
    assert await cluster.get("deployments", NS, "gpt2-canary") is None  # not recreated: no retry


CANARY = {"strategy": "Canary", "canary": {"steps": [{"weight": 25, "pauseSeconds": 0}, {"weight": 50}]}}


async def test_canary_crashloop_rolls_back_and_gpu_starved_canary_dips_the_stable(
    cluster: Cluster, operator: RunningOperator
) -> None:
    old = await started(cluster, replicas=4, rollout={**CANARY, "surgeGraceSeconds": 30})
    canary = await change_revision(cluster, "v2", old, name="gpt2-canary")
    # The canary pod gets no GPU: after the grace the stable gives one up (allowCapacityDip defaults to true).
    await add_pod(cluster, canary, "gpt2-canary-1", UNSCHEDULABLE_POD)
    stable = await deployment_where(cluster, "gpt2", "stable 3", lambda d: d["spec"]["replicas"] == 3)
    assert labels_of(stable)[REV] == old
    st = await status_where(cluster, "CapacityDip", progressing("CapacityDip"))
    assert "gives up GPUs to the canary" in condition(st, "Progressing")["message"]
    # A revision change mid-canary restarts it at step 1 with the newest revision.
    canary = await change_revision(cluster, "v3", labels_of(canary)[REV], name="gpt2-canary")
    v3 = labels_of(canary)[REV]
    assert env_of(canary)["GPTD_REVISION"] == "v3" and canary["spec"]["replicas"] == 1
    st = await status_where(cluster, "v3 step 1", lambda s: s.get("rollout", {}).get("revision") == v3)
    assert st["rollout"]["step"] == 0 and st["currentRevision"] == old
    await cluster.delete("pods", NS, "gpt2-canary-1")  # the v2 pod goes with the old canary template
    stable = await deployment_where(cluster, "gpt2", "stable back to 4", lambda d: d["spec"]["replicas"] == 4)
    # The v3 canary crash-loops: rolled back, canary gone, stable on the old revision at full count.
    await add_pod(cluster, canary, "gpt2-canary-2", CRASHLOOP_POD)

    async def canary_gone() -> bool:
        return await cluster.get("deployments", NS, "gpt2-canary") is None

    await eventually(canary_gone, what="canary deleted")
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    assert condition(st, "RolledBack")["reason"] == "CrashLoop" and st["failedRevision"] == v3
    stable = await cluster.get("deployments", NS, "gpt2")
    assert labels_of(stable)[REV] == old and stable["spec"]["replicas"] == 4


async def test_canary_under_hpa_is_sized_from_the_live_count_and_rolls_back_while_promoting(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(model=model("v1"), rollout=CANARY, autoscaling={
        "minReplicas": 1, "maxReplicas": 8, "targetInflightRequests": 4}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    old = labels_of(dep)[REV]
    await cluster.patch("deployments", NS, "gpt2", {"spec": {"replicas": 6}})  # the HPA's choice
    await ready_deployment(cluster, replicas=6)
    await status_where(cluster, "Ready", lambda s: s.get("phase") == "Ready")
    canary = await change_revision(cluster, "v2", old, name="gpt2-canary")
    assert canary["spec"]["replicas"] == 2  # 25% of the live 6, rounded
    assert "replicas" in (await cluster.get("deployments", NS, "gpt2"))["spec"]
    assert (await cluster.get("deployments", NS, "gpt2"))["spec"]["replicas"] == 6
    await cluster.patch("gptdeployments", NS, "gpt2", {"metadata": {"annotations": {"gptd.io/promote": "true"}}})
    stable = await deployment_where(cluster, "gpt2", "promoting", lambda d: labels_of(d).get(REV) != old)
    assert stable["spec"]["replicas"] == 6
    await status_where(cluster, "Promoting", progressing("Promoting"))
    await add_pod(cluster, stable, "gpt2-new-1", CRASHLOOP_POD)
    stable = await deployment_where(cluster, "gpt2", "rolled back", lambda d: labels_of(d).get(REV) == old)
    assert stable["spec"]["replicas"] == 6

    async def canary_gone() -> bool:
        return await cluster.get("deployments", NS, "gpt2-canary") is None

    await eventually(canary_gone, what="canary deleted")
    st = await status_where(cluster, "RolledBack", lambda s: condition(s, "RolledBack").get("status") == "True")
    assert condition(st, "RolledBack")["reason"] == "CrashLoop"
