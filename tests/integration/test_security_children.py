"""Issue 12 against the emulated API server: the TLS mounts and probes, the cert-manager Certificate (and its
absence), the NetworkPolicy (created, restored, removed) and quiet resyncs with all of them."""

from __future__ import annotations

from typing import Any

import kmock
from gptd_operator import builders

from tests.support.cluster import CERT_MANAGER, Cluster, RunningOperator, eventually
from tests.support.scenario import NS, condition, cr, phase_is, ready_deployment, status_of

ISSUER = {"tls": {"issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}}}
GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}


def pod_spec(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]


def secret_volumes(dep: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["secret"]["secretName"] for v in pod_spec(dep)["volumes"] if "secret" in v}


async def test_tls_secret_mounted_probes_https_and_status_url(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(service={"tls": {"secretName": "chat-tls"}}))
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert secret_volumes(dep) == {"tls": "chat-tls"}
    (c,) = pod_spec(dep)["containers"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    await ready_deployment(cluster)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    assert (await status_of(cluster))["url"] == f"https://gpt2.{NS}.svc.cluster.local:8000"


async def test_issuer_ref_owns_a_certificate_and_removes_it_with_the_field(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await cluster.create("gptdeployments", NS, cr(service=ISSUER))
    cert = await eventually(lambda: cluster.get("certificates", NS, "gpt2"), what="Certificate")
    assert cert["metadata"]["ownerReferences"][0]["uid"] == "uid-gpt2"
    assert cert["spec"]["dnsNames"][-1] == f"gpt2.{NS}.svc.cluster.local"
    assert cert["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), what="Deployment")
    assert secret_volumes(dep) == {"tls": cert["spec"]["secretName"]}
    await ready_deployment(cluster)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    await operator.resync_passes(2)  # settle
    before = len(cluster.requests())
    await operator.resync_passes(3)
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))  # the live Certificate equals ours
    # A hand-edited Certificate is put back on the next pass.
    await cluster.patch("certificates", NS, "gpt2", {"spec": {"dnsNames": ["evil.example"]}})
    await eventually(
        lambda: _where(cluster, "certificates", "gpt2", lambda c: c["spec"]["dnsNames"][0] == "gpt2"),
        what="Certificate restored")
    # Switching to a Secret of one's own: the Certificate goes, the pods mount the new Secret.
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"service": {"tls": {
        "issuerRef": None, "secretName": "mine"}}}})
    await eventually(lambda: _where(cluster, "deployments", "gpt2", lambda d: secret_volumes(d) == {"tls": "mine"}),
                     what="Deployment on the new Secret")
    await eventually(lambda: _gone(cluster, "certificates", "gpt2"), what="Certificate deleted")


async def test_issuer_ref_without_cert_manager_is_invalid_spec_and_creates_no_pods(
    emulator: tuple[kmock.KubernetesEmulator, str], cluster: Cluster, operator: RunningOperator
) -> None:
    k, _ = emulator
    k.resources.pop(CERT_MANAGER)  # a cluster without cert-manager: its CRD is not installed
    await cluster.create("gptdeployments", NS, cr(service=ISSUER))

    async def invalid() -> dict[str, Any] | None:
        st = await status_of(cluster)
        return st if condition(st, "Ready").get("reason") == "InvalidSpec" else None

    st = await eventually(invalid, what="InvalidSpec")
    assert "spec.service.tls.issuerRef" in condition(st, "Ready")["message"]
    assert "cert-manager" in condition(st, "Ready")["message"]
    await operator.resync_passes(2)
    assert await cluster.list("deployments", NS) == []
    warnings = [r for r in cluster.requests() if "/events" in str(r.url) and (r.data or {}).get("type") == "Warning"]
    assert len(warnings) == 1 and warnings[0].data["reason"] == "InvalidSpec"


async def test_network_policy_created_restored_removed_and_quiet(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.create("gptdeployments", NS, cr(
        service={"tls": {"secretName": "chat-tls", "clientCASecretName": "clients"}},
        runtime={"redaction": {"enabled": True}, "apiKeysSecretName": "keys"},
        networkPolicy={"enabled": True, "allowFrom": [GATEWAY]}))
    np = await eventually(lambda: cluster.get("networkpolicies", NS, "gpt2"), what="NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == builders.selector_labels("gpt2")
    assert np["spec"]["ingress"][0]["from"] == [GATEWAY]
    assert np["spec"]["ingress"][1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    await ready_deployment(cluster)
    await eventually(lambda: phase_is(cluster, "gpt2", "Ready"), what="Ready")
    await operator.resync_passes(2)  # settle
    before = len(cluster.requests())
    await operator.resync_passes(3)
    # What we build is what the API server stores (schema-walked): no patch on every pass.
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))
    await cluster.delete("networkpolicies", NS, "gpt2")
    await eventually(lambda: cluster.get("networkpolicies", NS, "gpt2"), what="NetworkPolicy restored")
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"networkPolicy": {"enabled": False}}})
    await eventually(lambda: _gone(cluster, "networkpolicies", "gpt2"), what="NetworkPolicy deleted")
    # Mutual TLS still needs the side port (the kubelet probes it without a client certificate).
    dep = await cluster.get("deployments", NS, "gpt2")
    assert {p["readinessProbe"]["httpGet"]["port"] for p in pod_spec(dep)["containers"]} == {"metrics"}
    await cluster.patch("gptdeployments", NS, "gpt2", {"spec": {"service": {"tls": {"clientCASecretName": ""}}}})
    dep = await eventually(
        lambda: _where(cluster, "deployments", "gpt2",
                       lambda d: [p["name"] for p in pod_spec(d)["containers"][0]["ports"]] == ["http"]),
        what="metrics port closed")
    assert "GPTD_METRICS_PORT" not in {e["name"] for e in pod_spec(dep)["containers"][0]["env"]}


async def _where(cluster: Cluster, plural: str, name: str, pred: Any) -> dict[str, Any] | None:
    obj = await cluster.get(plural, NS, name)
    return obj if obj is not None and pred(obj) else None


async def _gone(cluster: Cluster, plural: str, name: str) -> bool:
    return await cluster.get(plural, NS, name) is None
