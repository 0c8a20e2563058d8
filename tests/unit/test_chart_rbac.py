"""The operator's RBAC and settings as the chart renders them (issue 8: OpenShift, least privilege)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.chart import CHART, NAMESPACE, load_docs, one, run_helm, tools


def render(*args: str) -> list[dict[str, Any]]:
    helm = tools.ensure_tools()["helm"]
    return load_docs(run_helm(helm, "template", "gptd", str(CHART), "--namespace", NAMESPACE, *args).stdout)


def rules(docs: list[dict[str, Any]], kind: str = "ClusterRole") -> list[dict[str, Any]]:
    return one(docs, kind)["rules"]


def grants(rule_list: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {v for r in rule_list if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


@pytest.mark.parametrize("args", [(), ("--set", "watchNamespaces={team-a}")])
def test_finalizers_update_granted_and_no_secrets(args: tuple[str, ...]) -> None:
    docs = render(*args)
    kind = "Role" if args else "ClusterRole"
    r = rules(docs, kind)
    # blockOwnerDeletion under OwnerReferencesPermissionEnforcement (OpenShift) needs this.
    assert grants(r, "gptd.io", "gptdeployments/finalizers") == {"update"}
    # The operator never reads Secrets.
    assert grants(r, "", "secrets") == set()


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_runtime_uid_value_reaches_the_operator() -> None:
    assert _env(render())["GPTD_RUNTIME_RUN_AS_USER"] == "10001"
    assert _env(render("--set", "runtime.runAsUser=null"))["GPTD_RUNTIME_RUN_AS_USER"] == ""
    assert _env(render("--set", "runtime.runAsUser=1000680000"))["GPTD_RUNTIME_RUN_AS_USER"] == "1000680000"


@pytest.mark.parametrize("args", [(), ("--set", "watchNamespaces={team-a}")])
def test_security_children_rbac_is_least_privilege(args: tuple[str, ...]) -> None:
    """Issue 12: the NetworkPolicy is watched (list/watch) and owned; the Certificate is read live, never listed."""
    r = rules(render(*args), "Role" if args else "ClusterRole")
    assert grants(r, "networking.k8s.io", "networkpolicies") == {"list", "watch", "get", "create", "patch", "delete"}
    assert grants(r, "cert-manager.io", "certificates") == {"get", "create", "patch", "delete"}
    assert grants(r, "cert-manager.io", "issuers") == grants(r, "cert-manager.io", "clusterissuers") == set()


def test_monitoring_namespace_value_reaches_the_operator() -> None:
    assert _env(render())["GPTD_MONITORING_NAMESPACE"] == "monitoring"
    assert _env(render("--set", "networkPolicy.monitoringNamespace=obs"))["GPTD_MONITORING_NAMESPACE"] == "obs"


@pytest.mark.parametrize("args", [(), ("--set", "watchNamespaces={team-a}")])
def test_jobs_and_claims_rbac(args: tuple[str, ...]) -> None:
    """Issues 10 and 11: Jobs and the cache claim are watched and owned; pods listed and watched, and only
    their logs read (a download's progress lines: docs/model-cache.md)."""
    r = rules(render(*args), "Role" if args else "ClusterRole")
    assert grants(r, "batch", "jobs") == {"get", "list", "watch", "create", "patch", "delete"}
    assert grants(r, "", "persistentvolumeclaims") == {"get", "list", "watch", "create", "patch"}
    assert grants(r, "", "pods") == {"list", "watch"}
    assert grants(r, "", "pods/log") == {"get"}


@pytest.mark.parametrize("args", [(), ("--set", "watchNamespaces={team-a}")])
def test_evaluation_gate_rbac_is_least_privilege(args: tuple[str, ...]) -> None:
    """Issue 11: the operator patches only pod status (the gptd.io/evaluated condition) and only gets ConfigMaps
    (the dataset, by name: never listed or watched)."""
    r = rules(render(*args), "Role" if args else "ClusterRole")
    assert grants(r, "", "pods/status") == {"patch"}
    assert grants(r, "", "configmaps") == {"get"}
