"""End-to-end behaviour of the operator against the emulated API server."""

from __future__ import annotations

from typing import Any

import pytest
from gptd_cluster import Cluster, RunningOperator, eventually

pytestmark = pytest.mark.timeout(60)
NS = "ns1"


def cr(name: str = "gpt2", uid: str = "uid-gpt2", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"uri": "hf://openai-community/gpt2"}, "resources": {"gpus": 1}}
    body.update(spec)
    return {
        "apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment",
        "metadata": {"name": name, "uid": uid, "generation": 1}, "spec": body,
    }


async def test_create_makes_children(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(replicas=2))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-gpt2"
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    svc = await eventually(lambda: cluster.get("services", NS, "gpt2"), what="Service")
    assert svc["spec"]["ports"][0]["name"] == "http"
    pdb = await eventually(lambda: cluster.get("poddisruptionbudgets", NS, "gpt2"), what="PDB")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert await cluster.get("horizontalpodautoscalers", NS, "gpt2") is None
