"""Scale to zero with GPTD_SCALE_TO_ZERO_PROVIDER=keda: a KEDA ScaledObject replaces the HPA."""

from __future__ import annotations

import pytest
from gptd_cluster import Cluster, RunningOperator, eventually
from gptd_operator.settings import Settings
from test_reconcile import NS, cr

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
