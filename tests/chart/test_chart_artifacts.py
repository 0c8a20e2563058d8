"""Generated artefacts are fresh, and the chart ships the operator's CRD unchanged."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.support.chart import K8S_VERSIONS, NAMESPACE, ROOT, assert_restricted, by_kind, generate, load_docs, one

CRD_SOURCE = ROOT / "manifests" / "crd.yaml"


def _stale_message(path) -> str:
    return f"{path.relative_to(ROOT)} is stale: run `make generate` and commit the result"


@pytest.mark.parametrize(
    ("path", "render"),
    [
        (generate.CHART_CRD, generate.render_chart_crd),
        (generate.ARGOCD_PATCH, generate.render_argocd_patch),
        (generate.INSTALL, generate.render_install),
    ],
    ids=["chart-crd", "argocd-cm-patch", "install.yaml"],
)
def test_generated_file_is_fresh(helm_bin, path, render):
    assert path.read_text() == render(), _stale_message(path)


def test_check_mode_detects_a_stale_file(tmp_path, monkeypatch, helm_bin):
    stale = tmp_path / "install.yaml"
    stale.write_text("# old\n")
    monkeypatch.setattr(generate, "INSTALL", stale)
    monkeypatch.setattr(generate, "ROOT", tmp_path.parent)
    assert generate.main(["--check"]) == 1
    assert stale.read_text() == "# old\n"  # --check never writes


def test_chart_ships_the_crd_unchanged(render):
    source = yaml.safe_load(CRD_SOURCE.read_text())
    crd = one(render(), "CustomResourceDefinition")
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]
    assert source["metadata"].get("labels", {}).items() <= crd["metadata"]["labels"].items()
    assert crd["metadata"]["annotations"] == {
        **source["metadata"].get("annotations", {}),
        "helm.sh/resource-policy": "keep",
    }


def test_crd_toggles(render):
    assert not by_kind(render("--set", "crds.enabled=false"), "CustomResourceDefinition")
    crd = one(render("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    docs = render("--set", "crds.annotations.argocd\\.argoproj\\.io/sync-options=Prune=false")
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Prune=false",
    }
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(one(render("--set", "crds.keep=false"), "CustomResourceDefinition"), version,
                                     strict=True)


def test_install_yaml():
    docs = load_docs(generate.INSTALL.read_text())
    ns = docs[0]
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
         "Service", "Deployment"]
    )
    for doc in docs[1:]:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
        assert "helm.sh/hook" not in (doc["metadata"].get("annotations") or {}), "helm test pod leaked"
    assert_restricted(one(docs, "Deployment")["spec"]["template"]["spec"], "install.yaml operator")
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
