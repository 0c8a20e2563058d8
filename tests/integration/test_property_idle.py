"""Property-style: many generated valid specs (names with dots, every optional field, odd quantities, empty
strings) against the emulated real API server → created → idle through two resyncs with zero writes; then every
optional field removed → gone from the children. Seeded and bounded so it stays fast (one operator, 12 CRs)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from gptd_operator import names

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import NS, phase_is, ready_deployment

pytestmark = pytest.mark.timeout(90)
COUNT = 12
SEED = 20261201


def generated_specs(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i in range(COUNT):
        name = rng.choice([f"m{i}", f"llama-3.{i}-8b", f"qwen2.5-{i}b.instruct", f"{i}b-model", "x" * 60 + str(i)])
        gpus = rng.choice([0, 1, 2])
        cpu = rng.choice(["1.5m", "0.5", "2", "2000m", 1, "0.25", "100m"])
        spec: dict[str, Any] = {
            "model": {"uri": rng.choice(["hf://org/m", "file:///models/m", "pvc://models/m"]),
                      "revision": rng.choice(["main", "v1.0", "a" * 40]),
                      "dtype": rng.choice(["auto", "float16"]),
                      "hfTokenSecretRef": {"name": "hf", "key": "token"}},
            "replicas": rng.choice([1, 2, 3]),
            "resources": {"gpus": gpus, "cpu": cpu,
                          "memory": rng.choice(["0.5Gi", "1536Mi", "1G", "1000", 2**30, "16Gi"])},
            "runtime": {
                "maxBatchSize": rng.choice([1, 8, 32]),
                "apiKeySecretRef": {"name": "keys", "key": "k"},
                "env": rng.sample([
                    {"name": "EMPTY", "value": ""},
                    {"name": "PLAIN", "value": "x"},
                    {"name": "LIMIT", "valueFrom": {"resourceFieldRef": {
                        "resource": "limits.memory", "divisor": rng.choice([1, "1Mi", "1"])}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ], k=rng.randint(1, 4)),
            },
            "scheduling": {
                "nodeSelector": rng.choice([{}, {"pool": "gpu"}, {"a.b/c": ""}]),
                "tolerations": [{"key": "dedicated", "operator": rng.choice(["Exists", "Equal"]), "value": "",
                                 "effect": "NoSchedule", **({"tolerationSeconds": 30} if rng.random() < 0.5 else {})}],
                "affinity": {"nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [],
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
                        "matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}],
                        "matchFields": []}]}},
                    "podAntiAffinity": {}},
                "priorityClassName": rng.choice(["", "high"]),
                "runtimeClassName": "nvidia",
            },
            "service": {"type": rng.choice(["ClusterIP", "NodePort"]), "port": rng.choice([8000, 80, 9000])},
            "rollout": {"maxSurge": rng.choice([0, 1]), "maxUnavailable": 1, "progressDeadlineSeconds": 600,
                        "surgeGraceSeconds": 30},
        }
        if rng.random() < 0.5:
            spec["autoscaling"] = {"minReplicas": 2, "maxReplicas": 4,
                                   "targetInflightRequests": rng.choice([1, 1000, 64]),
                                   **({"targetCPUUtilization": 70} if rng.random() < 0.5 else {})}
        # Issue 12's fields, drawn after the older ones so those keep their seeded values.
        tls = rng.choice([None, {"secretName": "chat-tls"}, {"secretName": "t", "clientCASecretName": "ca"},
                          {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}, "clientCASecretName": ""}])
        if tls is not None:
            spec["service"]["tls"] = tls
        if rng.random() < 0.5:
            spec["networkPolicy"] = {"enabled": True, "allowFrom": rng.choice([[], [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
                 "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["gw"]}]}}]])}
        if rng.random() < 0.5:
            spec["runtime"]["redaction"] = {"enabled": True, "entities": rng.sample(
                ["email", "phone", "creditCard", "ipAddress", "iban", "cnResidentId", "secretLike"], k=2)}
        out.append((name, spec))
    # Names must be unique in a namespace.
    seen: set[str] = set()
    return [(n, s) for n, s in out if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]


REMOVE_OPTIONAL = {"spec": {
    "scheduling": None, "autoscaling": None,
    "model": {"hfTokenSecretRef": None},
    "runtime": {"env": None, "apiKeySecretRef": None, "redaction": None},
    "resources": {"cpu": None, "memory": None},
    "service": {"tls": None},
    "networkPolicy": None,
}}


def pod_spec(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]


def leftovers(dep: dict[str, Any], gpus: int) -> list[str]:
    """What of the optional fields is still on the Deployment (empty when all are gone)."""
    pod = pod_spec(dep)
    container = pod["containers"][0]
    found = [k for k in ("nodeSelector", "affinity", "priorityClassName", "runtimeClassName") if k in pod]
    tolerations = [t for t in pod.get("tolerations") or [] if t.get("key") == "dedicated"]
    if tolerations:
        found.append("tolerations")
    env = {e["name"] for e in container.get("env") or []}
    found += sorted(env & {"EMPTY", "PLAIN", "LIMIT", "NODE", "HF_TOKEN", "GPTD_API_KEY_FILE", "GPTD_REDACT",
                           "GPTD_METRICS_PORT", "GPTD_TLS_CERT_FILE", "GPTD_TLS_KEY_FILE", "GPTD_TLS_CLIENT_CA_FILE"})
    secret_volumes = ("api-key", "tls", "tls-client-ca")
    found += [f"{v['name']} volume" for v in pod.get("volumes") or [] if v["name"] in secret_volumes]
    found += [f"port {p['name']}" for p in container.get("ports") or [] if p["name"] != "http"]
    found += [f"{probe} scheme" for probe in ("startupProbe", "readinessProbe", "livenessProbe")
              if "scheme" in container[probe]["httpGet"]]
    for part in ("limits", "requests"):
        found += [f"{part}.{k}" for k in (container.get("resources") or {}).get(part, {}) if k in ("cpu", "memory")]
    return found


async def test_generated_specs_idle_without_writes_and_shed_removed_fields(
    cluster: Cluster, operator: RunningOperator
) -> None:
    specs = generated_specs(random.Random(SEED))
    assert len(specs) >= 8
    for i, (name, spec) in enumerate(specs):
        await cluster.create("gptdeployments", NS, {"apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment",
                                                    "metadata": {"name": name, "uid": f"uid-{i}"}, "spec": spec})
    # Play the Deployment controller for each: all replicas ready.
    for name, spec in specs:
        dep = await eventually(lambda n=name: cluster.get("deployments", NS, names.deployment(n)),
                               what=f"Deployment of {name}")
        assert dep["metadata"]["generation"] == 1
        count = spec["autoscaling"]["minReplicas"] if "autoscaling" in spec else spec["replicas"]
        await ready_deployment(cluster, names.deployment(name), replicas=count)
    for name, _ in specs:
        await eventually(lambda n=name: phase_is(cluster, n, "Ready"), what=f"{name} Ready")
    await operator.resync_passes(2)  # settle
    before = len(cluster.requests())
    await operator.resync_passes(2)
    writes = cluster.writes(before)
    assert writes == [], "\n".join(writes)

    for name, _ in specs:
        await cluster.patch("gptdeployments", NS, name, REMOVE_OPTIONAL)
    for name, spec in specs:
        async def shed(n: str = name, gpus: int = spec["resources"]["gpus"]) -> bool:
            dep = await cluster.get("deployments", NS, names.deployment(n))
            return dep is not None and leftovers(dep, gpus) == []

        try:
            await eventually(shed, what=f"optional fields gone from {name}'s Deployment")
        except AssertionError:
            dep = await cluster.get("deployments", NS, names.deployment(name))
            raise AssertionError(f"{name}: still has {leftovers(dep, spec['resources']['gpus'])}") from None
        # Unwanted children are deleted after the wanted ones are applied: wait, as for the others below.
        await eventually(lambda n=name: _gone(cluster, "horizontalpodautoscalers", names.base(n)),
                         what=f"{name}'s HorizontalPodAutoscaler gone")
        await eventually(lambda n=name: _gone(cluster, "networkpolicies", names.network_policy(n)),
                         what=f"{name}'s NetworkPolicy gone")
        await eventually(lambda n=name: _gone(cluster, "certificates", names.certificate(n)),
                         what=f"{name}'s Certificate gone")


async def _gone(cluster: Cluster, plural: str, name: str) -> bool:
    return await cluster.get(plural, NS, name) is None
