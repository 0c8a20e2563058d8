"""Issue 12, operator half: TLS mounts/env/probes, the Certificate, the NetworkPolicy, redaction, API key dirs."""

from __future__ import annotations

from typing import Any

import pytest
from gptd_operator import builders as b
from gptd_operator import names
from gptd_operator.api import InvalidSpec, parse_spec
from gptd_operator.settings import Settings

from tests.support.specs import spec

S = Settings()
UID = "uid-1"


def pod(**over: Any) -> dict[str, Any]:
    return b.build_deployment("chat", "team", UID, spec(**over), S)["spec"]["template"]["spec"]


def runtime_container(p: dict[str, Any]) -> dict[str, Any]:
    (c,) = p["containers"]
    return c


def env(p: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in runtime_container(p)["env"]}


def mounted(p: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at ``path`` (asserting the mount is read-only and whole: no subPath)."""
    (mount,) = [m for m in runtime_container(p)["volumeMounts"] if m["mountPath"] == path]
    assert mount.get("readOnly") is True and "subPath" not in mount
    (vol,) = [v for v in p["volumes"] if v["name"] == mount["name"]]
    return vol


# ------------------------------------------------------------------------------------------------ TLS


def test_tls_secret_is_mounted_whole_and_the_runtime_told_where() -> None:
    p = pod(service={"tls": {"secretName": "chat-tls"}})
    vol = mounted(p, b.TLS_DIR)
    assert vol["secret"]["secretName"] == "chat-tls" and "items" not in vol["secret"]  # every key, kubelet-updated
    e = env(p)
    assert e["GPTD_TLS_CERT_FILE"] == f"{b.TLS_DIR}/tls.crt" and e["GPTD_TLS_KEY_FILE"] == f"{b.TLS_DIR}/tls.key"
    assert "GPTD_TLS_CLIENT_CA_FILE" not in e
    c = runtime_container(p)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"


def test_client_ca_is_mounted_and_set() -> None:
    p = pod(service={"tls": {"secretName": "chat-tls", "clientCASecretName": "clients"}})
    assert mounted(p, b.CLIENT_CA_DIR)["secret"]["secretName"] == "clients"
    assert env(p)["GPTD_TLS_CLIENT_CA_FILE"] == f"{b.CLIENT_CA_DIR}/ca.crt"
    # The issue's example writes "" for "no mutual TLS".
    assert "GPTD_TLS_CLIENT_CA_FILE" not in env(pod(service={"tls": {"secretName": "t", "clientCASecretName": ""}}))


def test_under_mutual_tls_no_probe_needs_a_client_certificate() -> None:
    """The kubelet presents no client certificate: under mTLS it probes the plain side port (which the runtime
    opens with GPTD_METRICS_PORT and which serves /health/*), never the mTLS serving port."""
    from gptd_runtime.config import load_settings

    p = pod(service={"tls": {"secretName": "chat-tls", "clientCASecretName": "clients"}})
    c = runtime_container(p)
    assert {"name": b.METRICS_PORT_NAME, "containerPort": b.METRICS_PORT, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == b.METRICS_PORT_NAME and get.get("scheme", "HTTP") == "HTTP", (probe, get)
    assert load_settings({}, {k: v for k, v in env(p).items() if isinstance(v, str)}).metrics_port == b.METRICS_PORT
    with pytest.raises(InvalidSpec) as exc:
        b.check_spec(spec(service={"port": b.METRICS_PORT,
                                   "tls": {"secretName": "t", "clientCASecretName": "c"}}), S)
    assert exc.value.field == "spec.service.port"


def test_status_url_is_https_with_tls() -> None:
    assert b.service_url("chat", "team", spec(service={"tls": {"secretName": "t"}})).startswith("https://chat.team.")
    assert b.service_url("chat", "team", spec()).startswith("http://chat.team.")


@pytest.mark.parametrize("tls", [{}, {"secretName": "a", "issuerRef": {"name": "ca"}}, {"clientCASecretName": "c"}])
def test_tls_needs_exactly_one_source(tls: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpec) as exc:
        spec(service={"tls": tls})
    assert exc.value.field == "spec.service.tls"
    assert "exactly one of secretName and issuerRef" in exc.value.message


def test_issuer_ref_kind_is_checked_by_name() -> None:
    with pytest.raises(InvalidSpec) as exc:
        spec(service={"tls": {"issuerRef": {"name": "ca", "kind": "Bogus"}}})
    assert exc.value.field == "spec.service.tls.issuerRef.kind"


def test_issuer_ref_makes_an_owned_certificate_for_the_service_names_and_mounts_its_secret() -> None:
    sp = spec(service={"tls": {"issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}}})
    assert b.wants_certificate(sp) and not b.wants_certificate(spec(service={"tls": {"secretName": "t"}}))
    cert = b.build_certificate("chat", "team", UID, sp)
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["kind"] == "Certificate"
    assert cert["metadata"]["name"] == names.certificate("chat") == "chat"
    assert cert["metadata"]["ownerReferences"][0]["uid"] == UID
    assert cert["spec"]["secretName"] == names.certificate_secret("chat") == "chat-tls"
    assert cert["spec"]["dnsNames"] == ["chat", "chat.team", "chat.team.svc", "chat.team.svc.cluster.local"]
    assert cert["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "commonName" not in cert["spec"]  # at most 64 bytes in cert-manager; the long DNS name may exceed it
    p = b.build_deployment("chat", "team", UID, sp, S)["spec"]["template"]["spec"]
    assert mounted(p, b.TLS_DIR)["secret"]["secretName"] == "chat-tls"


def test_certificate_of_a_hashed_name_follows_the_service_name() -> None:
    sp = spec(service={"tls": {"issuerRef": {"name": "ca"}}})
    cert = b.build_certificate("llama-3.1-8b", "team", UID, sp)
    svc = names.service("llama-3.1-8b")
    assert cert["spec"]["dnsNames"][0] == svc and cert["spec"]["secretName"] == f"{svc}-tls"


def test_tls_secrets_are_referenced_for_the_missing_secret_report() -> None:
    sp = spec(service={"tls": {"secretName": "t", "clientCASecretName": "c"}}, runtime={"apiKeysSecretName": "k"})
    assert b.referenced_secrets(sp) == [
        ("spec.runtime.apiKeysSecretName", "k"), ("spec.service.tls.secretName", "t"),
        ("spec.service.tls.clientCASecretName", "c")]


# ------------------------------------------------------------------------------------- network policy

GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}


def test_network_policy_admits_allow_from_to_the_runtime_port_and_monitoring_to_metrics_only() -> None:
    sp = spec(networkPolicy={"enabled": True, "allowFrom": [GATEWAY, {"podSelector": {"matchLabels": {"a": "b"}}}]})
    np = b.build_network_policy("chat", "team", UID, sp, Settings(monitoring_namespace="mon"))
    assert np["apiVersion"] == "networking.k8s.io/v1" and np["metadata"]["name"] == names.network_policy("chat")
    assert np["metadata"]["ownerReferences"][0]["uid"] == UID
    assert np["spec"]["podSelector"] == {"matchLabels": b.selector_labels("chat")}
    assert np["spec"]["policyTypes"] == ["Ingress"]
    runtime_rule, metrics_rule = np["spec"]["ingress"]
    assert runtime_rule == {"from": [GATEWAY, {"podSelector": {"matchLabels": {"a": "b"}}}],
                            "ports": [{"port": "http", "protocol": "TCP"}]}
    assert metrics_rule == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}],
                            "ports": [{"port": "metrics", "protocol": "TCP"}]}


def test_network_policy_without_peers_admits_nobody_to_the_runtime_port() -> None:
    # A rule without `from` would admit every source: no peers must mean no rule at all.
    np = b.build_network_policy("chat", "team", UID, spec(networkPolicy={"enabled": True}), S)
    assert [r["ports"] for r in np["spec"]["ingress"]] == [[{"port": "metrics", "protocol": "TCP"}]]
    assert all(r.get("from") for r in np["spec"]["ingress"])


def test_network_policy_opens_the_named_metrics_port_on_the_pod() -> None:
    p = pod(networkPolicy={"enabled": True})
    assert {"name": "metrics", "containerPort": b.METRICS_PORT, "protocol": "TCP"} in runtime_container(p)["ports"]
    assert env(p)["GPTD_METRICS_PORT"] == str(b.METRICS_PORT)


def test_a_peer_needs_a_selector() -> None:
    with pytest.raises(InvalidSpec) as exc:
        spec(networkPolicy={"enabled": True, "allowFrom": [GATEWAY, {}]})
    assert exc.value.field == "spec.networkPolicy.allowFrom[1]"


def test_monitoring_namespace_setting() -> None:
    assert Settings.from_env({}).monitoring_namespace == "monitoring"
    assert Settings.from_env({"GPTD_MONITORING_NAMESPACE": "obs"}).monitoring_namespace == "obs"
    for bad in ("Monitoring", "a.b", "x" * 64):
        with pytest.raises(ValueError, match="GPTD_MONITORING_NAMESPACE"):
            Settings.from_env({"GPTD_MONITORING_NAMESPACE": bad})


# ------------------------------------------------------------------------------------ redaction, keys


def test_redaction_passes_the_entities() -> None:
    assert env(pod(runtime={"redaction": {"enabled": True, "entities": ["email", "iban"]}}))["GPTD_REDACT"] == (
        "email,iban")
    everything = env(pod(runtime={"redaction": {"enabled": True}}))["GPTD_REDACT"]
    assert everything == "email,phone,creditCard,ipAddress,iban,cnResidentId,secretLike"
    assert "GPTD_REDACT" not in env(pod(runtime={"redaction": {"enabled": False, "entities": ["email"]}}))
    with pytest.raises(InvalidSpec) as exc:
        spec(runtime={"redaction": {"enabled": True, "entities": ["email", "ssn"]}})
    assert exc.value.field == "spec.runtime.redaction.entities[1]"


def test_redaction_entities_are_the_runtimes() -> None:
    from gptd_runtime.redaction import ENTITIES

    assert tuple(b.api.REDACTION_ENTITIES) == tuple(ENTITIES)


def test_a_multi_key_secret_is_mounted_whole_as_the_key_directory() -> None:
    p = pod(runtime={"apiKeysSecretName": "keys"})
    vol = mounted(p, b.API_KEY_DIR)
    assert vol["secret"]["secretName"] == "keys" and "items" not in vol["secret"]
    assert env(p)["GPTD_API_KEY_FILE"] == b.API_KEY_DIR
    # The single-key form is unchanged: one projected file.
    single = pod(runtime={"apiKeySecretRef": {"name": "api", "key": "k"}})
    assert mounted(single, b.API_KEY_DIR)["secret"]["items"] == [{"key": "k", "path": "api-key"}]
    assert env(single)["GPTD_API_KEY_FILE"] == b.API_KEY_FILE
    with pytest.raises(InvalidSpec) as exc:
        spec(runtime={"apiKeysSecretName": "keys", "apiKeySecretRef": {"name": "api", "key": "k"}})
    assert exc.value.field == "spec.runtime" and "not both" in exc.value.message


def test_pod_env_with_tls_redaction_keys_and_metrics_is_a_valid_runtime_configuration() -> None:
    """The runtime parses the pod's literal env: TLS, mTLS, redaction, a key directory and the metrics port."""
    from gptd_runtime.config import load_settings

    p = pod(service={"tls": {"secretName": "t", "clientCASecretName": "c"}}, networkPolicy={"enabled": True},
            runtime={"redaction": {"enabled": True, "entities": ["email", "creditCard"]}, "apiKeysSecretName": "k"})
    settings = load_settings({}, {k: v for k, v in env(p).items() if isinstance(v, str)})
    assert settings.tls and str(settings.tls_cert_file) == f"{b.TLS_DIR}/tls.crt"
    assert str(settings.tls_key_file) == f"{b.TLS_DIR}/tls.key"
    assert str(settings.tls_client_ca_file) == f"{b.CLIENT_CA_DIR}/ca.crt"
    assert settings.redact == ("email", "creditCard")
    assert settings.metrics_port == b.METRICS_PORT and str(settings.api_key_file) == b.API_KEY_DIR


def test_the_service_port_may_not_be_the_metrics_port() -> None:
    with pytest.raises(InvalidSpec) as exc:
        b.check_spec(spec(service={"port": b.METRICS_PORT}, networkPolicy={"enabled": True}), S)
    assert exc.value.field == "spec.service.port"
    b.check_spec(spec(service={"port": b.METRICS_PORT}), S)  # without the metrics port it is free


def test_the_gateway_example_in_the_docs_is_a_valid_spec() -> None:
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    block = text.split("**Example: only the gateway namespace.**", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    sp = parse_spec(yaml.safe_load(block)["spec"])
    np = b.build_network_policy("chat", "llm", UID, sp, S)
    assert np["spec"]["ingress"][0]["from"] == [GATEWAY]
    assert b.wants_certificate(sp) and env(b.build_deployment("chat", "llm", UID, sp, S)["spec"]["template"]["spec"])[
        "GPTD_REDACT"] == "email,phone,creditCard"


@pytest.mark.parametrize(("peer", "field"), [
    ({"namespaceSelector": {"matchLabel": {"a": "b"}}}, "spec.networkPolicy.allowFrom[0].namespaceSelector.matchLabel"),
    ({"podSelector": {"matchExpressions": [{"key": "app", "operator": "in", "values": ["x"]}]}},
     "spec.networkPolicy.allowFrom[0].podSelector.matchExpressions[0].operator"),
    ({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
     "spec.networkPolicy.allowFrom[0].podSelector.matchExpressions[0]"),
])
def test_a_bad_selector_is_invalid_spec_naming_it(peer: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        spec(networkPolicy={"enabled": True, "allowFrom": [peer]})
    assert exc.value.field == field


def test_every_namespace_and_expressions_pass_through() -> None:
    peer = {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}
    np = b.build_network_policy("chat", "team", UID, spec(networkPolicy={"enabled": True, "allowFrom": [peer]}), S)
    assert np["spec"]["ingress"][0]["from"] == [peer]


def test_secret_files_stay_readable_when_the_platform_picks_the_uid() -> None:
    """0440 relies on fsGroup owning the files; with runAsUser left to the platform there may be no fsGroup."""
    over = {"service": {"tls": {"secretName": "t", "clientCASecretName": "c"}}, "runtime": {"apiKeysSecretName": "k"}}
    fixed = b.build_deployment("chat", "team", UID, spec(**over), S)["spec"]["template"]["spec"]
    free = b.build_deployment("chat", "team", UID, spec(**over), Settings(run_as_user=None))["spec"]["template"]["spec"]
    modes = {v["name"]: v["secret"]["defaultMode"] for v in fixed["volumes"] if "secret" in v}
    assert modes == {"api-key": 0o440, "tls": 0o440, "tls-client-ca": 0o440} and fixed["securityContext"]["fsGroup"]
    assert "fsGroup" not in free["securityContext"]
    free_modes = {v["name"]: v["secret"]["defaultMode"] for v in free["volumes"] if "secret" in v}
    assert free_modes == dict.fromkeys(modes, 0o444)
