"""The pods of gptd's Jobs (download, evaluation) are watched but never counted as serving pods."""

from __future__ import annotations

import pytest
from gptd_operator import builders, names

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import CRASHLOOP_POD, NS, condition, cr, ready_deployment, status_of

pytestmark = pytest.mark.timeout(60)


async def test_a_failing_job_pod_of_the_current_revision_does_not_degrade_the_cr(
    cluster: Cluster, operator: RunningOperator
) -> None:
    created = await cluster.create("gptdeployments", NS, cr())
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    await ready_deployment(cluster)
    await eventually(lambda: _phase(cluster, "Ready"), what="Ready")
    revision = dep["spec"]["template"]["metadata"]["labels"][builders.LABEL_REVISION]
    labels = builders.job_labels("gpt2", "evaluation", revision)
    job = names.job("gpt2", "eval", revision)
    await cluster.create("jobs", NS, {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job, "labels": labels,
                     "ownerReferences": [builders.owner_reference("gpt2", created["metadata"]["uid"])]},
        "spec": {"template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}},
    })
    # Play the Job controller and the kubelet: its pod crash-loops (the same status that degrades a serving pod).
    await cluster.create("pods", NS, {
        "metadata": {"name": f"{job}-abcde", "labels": {**labels, "batch.kubernetes.io/job-name": job}},
        "status": CRASHLOOP_POD,
    })
    await operator.resync_passes(2)
    st = await status_of(cluster)
    assert st["phase"] == "Ready" and condition(st, "Degraded").get("status") != "True", st
    assert st.get("replicas", 0) <= 1

    # The control: the same pod status on a serving pod does degrade it (so the check above can fail).
    await cluster.create("pods", NS, {
        "metadata": {"name": "gpt2-abc-1", "labels": dep["spec"]["template"]["metadata"]["labels"]},
        "status": CRASHLOOP_POD,
    })
    await eventually(lambda: _reason(cluster, "CrashLoopBackOff"), what="Degraded by the serving pod")


async def _phase(cluster: Cluster, phase: str) -> bool:
    return (await status_of(cluster)).get("phase") == phase


async def _reason(cluster: Cluster, reason: str) -> bool:
    return condition(await status_of(cluster), "Degraded").get("reason") == reason
