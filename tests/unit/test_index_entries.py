"""What the operator's kopf indices keep of a child, and what a reconcile gets back from them (handlers.snapshot)."""

from __future__ import annotations

import copy
from typing import Any

from gptd_operator import builders, handlers

NS = "ns1"


def _deployment(name: str = "gpt2", uid: str = "d1") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": builders.common_labels("gpt2"),
                     "ownerReferences": [builders.owner_reference("gpt2", "uid-gpt2")],
                     "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}},
                 "template": {"metadata": {"labels": {"app": "x"}},
                              "spec": {"containers": [{"name": "runtime", "image": "gptd:1",
                                                       "env": [{"name": "A", "value": "ü ☃"}]}]}}},
        "status": {"replicas": 2, "readyReplicas": 1, "collisionCount": 3},
    }


async def test_a_deployments_spec_is_stored_packed_and_observed_whole() -> None:
    body = _deployment()
    entry = await handlers.index_deployments(namespace=NS, labels=body["metadata"]["labels"], body=body)
    (key, stored), = entry.items()
    assert key == (NS, "gpt2")
    assert "spec" not in stored and isinstance(stored[handlers.PACKED_SPEC], bytes)
    assert "managedFields" not in stored["metadata"] and "collisionCount" not in stored["status"]

    indices = {"gptd_deployments": {key: [stored]}}
    stable = handlers.snapshot(indices, NS, "gpt2", "uid-gpt2").stable
    assert stable is not None and handlers.PACKED_SPEC not in stable
    assert stable["spec"] == body["spec"]  # unicode and nesting survive the round trip
    assert stable["metadata"]["uid"] == "d1" and stable["status"] == {"replicas": 2, "readyReplicas": 1}


async def test_what_a_reconcile_observes_is_its_own_copy() -> None:
    body = _deployment()
    (key, stored), = (await handlers.index_deployments(
        namespace=NS, labels=body["metadata"]["labels"], body=body)).items()
    before = copy.deepcopy(stored)
    indices = {"gptd_deployments": {key: [stored]}}
    first = handlers.snapshot(indices, NS, "gpt2", "uid-gpt2").stable
    assert first is not None
    first["spec"]["replicas"] = 7
    first["spec"]["template"]["spec"]["containers"].clear()
    assert stored == before  # the index entry is untouched
    again = handlers.snapshot(indices, NS, "gpt2", "uid-gpt2").stable
    assert again is not None and again["spec"] == body["spec"]


def test_an_entry_that_was_never_packed_is_returned_as_it_is() -> None:
    # Indices built by hand (tests) or by a kind whose spec is small are not packed.
    service = {"metadata": {"name": "gpt2", "uid": "s1", "labels": builders.common_labels("gpt2")},
               "spec": {"ports": [{"port": 80}]}}
    assert handlers.unpacked(service) is service and handlers.unpacked(None) is None
