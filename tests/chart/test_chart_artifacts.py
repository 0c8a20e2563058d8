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
        (generate.CRD_SOURCE, generate.render_crd_source),
        (generate.CHART_CRD, generate.render_chart_crd),
        (generate.ARGOCD_PATCH, generate.render_argocd_patch),
        (generate.INSTALL, generate.render_install),
    ],
    ids=["crd.yaml", "chart-crd", "argocd-cm-patch", "install.yaml"],
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
    # No CRD: `kubectl delete -f manifests/install.yaml` must not delete the CRD, and with it every GPTDeployment
    # (kubectl ignores helm.sh/resource-policy). The CRD is manifests/crd.yaml, applied first.
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service",
                            "Deployment"])
    for doc in docs[1:]:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
        assert "helm.sh/hook" not in (doc["metadata"].get("annotations") or {}), "helm test pod leaked"
    assert_restricted(one(docs, "Deployment")["spec"]["template"]["spec"], "install.yaml operator")
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_crd_and_install_yaml_together_are_what_the_chart_installs(render):
    """crd.yaml + install.yaml = the chart's default objects (minus the helm-only keep annotation and test pod)."""
    (crd,) = load_docs(CRD_SOURCE.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    plain = {(d["kind"], d["metadata"]["name"]) for d in load_docs(generate.INSTALL.read_text())[1:]}
    plain.add((crd["kind"], crd["metadata"]["name"]))
    chart = {(d["kind"], d["metadata"]["name"]) for d in render() if d["kind"] != "Pod"}
    assert plain == chart


def test_install_instructions_apply_the_crd_first_and_never_delete_it():
    header = generate.INSTALL.read_text().split("---", 1)[0]
    assert header.index("-f manifests/crd.yaml") < header.index("-f manifests/install.yaml")
    for doc in (ROOT / "README.md", ROOT / "docs" / "delivery.md"):
        text = doc.read_text()
        lines = [line for line in text.splitlines() if "kubectl apply" in line and "manifests/install.yaml" in line]
        assert lines, f"{doc.name} shows no plain-manifest install"
        before = text[: text.index(lines[0])]
        assert "kubectl apply --server-side -f manifests/crd.yaml" in before.splitlines()[-1] + lines[0], doc.name
        flat = " ".join(text.lower().replace("*", "").split())
        assert "delete only to remove all models" in flat, f"{doc.name}: say what deleting crd.yaml does"
