"""Scale to zero with GPTD_SCALE_TO_ZERO_PROVIDER=keda: a KEDA ScaledObject replaces the HPA."""

from __future__ import annotations

import pytest
from gptd_operator.settings import Settings

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import NS, cr

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def operator_settings() -> Settings:
    return Settings(resync_seconds=0.5, scale_to_zero_provider="keda", prometheus_url="http://prom:9090")


async def test_min_zero_makes_scaled_object_and_back(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(autoscaling={
        "minReplicas": 0, "maxReplicas": 3, "targetInflightRequests": 4}))
    so = await eventually(lambda: cluster.get("scaledobjects", NS, "gpt2"), what="ScaledObject")
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["scaleTargetRef"]["name"] == "gpt2"
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert "replicas" not in dep["spec"]
    assert await cluster.get("horizontalpodautoscalers", NS, "gpt2") is None
    # minReplicas 1: the plain HPA again, the ScaledObject goes.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"autoscaling": {"minReplicas": 1}}})
    await eventually(lambda: cluster.get("horizontalpodautoscalers", NS, "gpt2"), what="HPA")

    async def so_gone() -> bool:
        return await cluster.get("scaledobjects", NS, "gpt2") is None

    await eventually(so_gone, what="ScaledObject deleted")


async def test_a_foreign_scaled_object_is_neither_deleted_nor_patched(
    cluster: Cluster, operator: RunningOperator
) -> None:
    foreign = {"metadata": {"name": "gpt2"}, "spec": {"scaleTargetRef": {"name": "someone-else"}, "maxReplicaCount": 9}}
    await cluster.create("scaledobjects", NS, foreign)
    # No scale to zero wanted: the operator would delete *its own* ScaledObject of this name, not this one.
    await cluster.create("gptdeployments", NS, cr(autoscaling={"maxReplicas": 3, "targetInflightRequests": 4}))
    await eventually(lambda: cluster.get("horizontalpodautoscalers", NS, "gpt2"), what="HPA")
    await operator.resync_passes(2)
    so = await cluster.get("scaledobjects", NS, "gpt2")
    assert so is not None and so["spec"] == foreign["spec"]
    # Scale to zero wanted: the name is taken, so InvalidSpec rather than overwriting it.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"autoscaling": {"minReplicas": 0}}})

    async def invalid() -> str | None:
        st = ((await cluster.get("gptdeployments", NS, "gpt2")) or {}).get("status") or {}
        ready = next((c for c in st.get("conditions", []) if c["type"] == "Ready"), {})
        return ready.get("message") if ready.get("reason") == "InvalidSpec" else None

    assert (await eventually(invalid, what="InvalidSpec")).startswith("metadata.name: ScaledObject gpt2")
    so = await cluster.get("scaledobjects", NS, "gpt2")
    assert so["spec"] == foreign["spec"] and not so["metadata"].get("ownerReferences")
