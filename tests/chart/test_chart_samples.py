"""manifests/samples: valid for the API server (the CRD's schema, as kubectl --validate=strict sees it) and for the
operator (parse_spec), and GitOps-stable: nothing the operator or the API server writes is in them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartlib import K8S_VERSIONS, ROOT, assert_restricted, load_docs
from gptd_operator.api import API_VERSION, KIND, InvalidSpec, parse_spec

SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
CR_SAMPLES = [p for p in SAMPLES if any(d["kind"] == KIND for d in load_docs(p.read_text()))]
CRD = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text())
(STORAGE_VERSION,) = [v for v in CRD["spec"]["versions"] if v["storage"]]
OPENAPI = STORAGE_VERSION["schema"]["openAPIV3Schema"]


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    """The CRD's structural schema as JSON Schema: unknown fields are errors (the API server prunes them, and
    kubectl's default --validate=strict rejects them), nullable maps to a null type."""
    node = copy.deepcopy(node)

    def walk(n: dict[str, Any]) -> None:
        if n.get("nullable") and isinstance(n.get("type"), str):
            n["type"] = [n["type"], "null"]
        if n.get("type") == "object" and not n.get("x-kubernetes-preserve-unknown-fields"):
            n.setdefault("additionalProperties", False if "properties" in n else n.get("additionalProperties", {}))
        for child in (n.get("properties") or {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(n.get(key), dict):
                walk(n[key])

    walk(node)
    node["properties"]["metadata"] = {"type": "object"}
    return node


VALIDATOR = jsonschema.Draft7Validator(_strict(OPENAPI))


def apply_schema_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: missing properties with a default get it, recursively."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        out = dict(obj)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_schema_defaults(out[key], sub)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_schema_defaults(item, schema["items"]) for item in obj]
    return obj


def _crs(path: Path) -> list[dict[str, Any]]:
    return [d for d in load_docs(path.read_text()) if d["kind"] == KIND]


def test_there_are_the_expected_samples():
    assert {p.name for p in CR_SAMPLES} == {"cpu.yaml", "gpu.yaml", "autoscaling.yaml", "canary.yaml"}


@pytest.mark.parametrize("path", CR_SAMPLES, ids=lambda p: p.name)
def test_sample_is_valid_for_api_server_and_operator(path):
    for cr in _crs(path):
        assert cr["apiVersion"] == API_VERSION
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(cr)]
        assert not errors, errors
        parse_spec(cr["spec"])


@pytest.mark.parametrize("path", CR_SAMPLES, ids=lambda p: p.name)
def test_sample_is_gitops_stable(path):
    """Applying it twice is a no-op: the operator never writes spec, and whatever the API server adds (schema
    defaults) means the same to the operator as leaving it out."""
    for cr in _crs(path):
        assert set(cr) == {"apiVersion", "kind", "metadata", "spec"}, "no status or other written fields"
        assert set(cr["metadata"]) <= {"name", "labels", "annotations"}
        for key in cr["metadata"].get("annotations") or {}:
            assert not key.startswith("kopf.zalando.org"), key
        defaulted = apply_schema_defaults(cr, OPENAPI)
        assert not list(VALIDATOR.iter_errors(defaulted))
        assert parse_spec(defaulted["spec"]) == parse_spec(cr["spec"])


def test_defaulting_helper_really_defaults():
    raw = {"model": {"uri": "pvc://demo-model/demo"}}
    defaulted = apply_schema_defaults({"spec": raw}, OPENAPI)["spec"]
    assert defaulted["model"]["revision"] == "main"
    assert defaulted["replicas"] == 1
    assert "autoscaling" not in defaulted
    nested = apply_schema_defaults({"spec": {**raw, "rollout": {}}}, OPENAPI)["spec"]
    assert nested["rollout"]["strategy"] == "RollingUpdate" and nested["rollout"]["maxSurge"] == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s["model"].update(uri="http://example.com/model"), "spec.model.uri"),
        (lambda s: s.update(replica=2), "spec.replica"),
        (lambda s: s["resources"].update(gpus=-1), "spec.resources.gpus"),
    ],
    ids=["bad-uri", "typo", "negative-gpus"],
)
def test_validators_reject_broken_samples(mutate, field):
    (cr,) = _crs(ROOT / "manifests" / "samples" / "cpu.yaml")
    cr = copy.deepcopy(cr)
    mutate(cr["spec"])
    assert list(VALIDATOR.iter_errors(cr)), "the CRD schema should reject it"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(cr["spec"])
    assert exc.value.field == field


def test_cpu_sample_serves_the_demo_model():
    (cr,) = _crs(ROOT / "manifests" / "samples" / "cpu.yaml")
    spec = parse_spec(cr["spec"])
    assert cr["metadata"]["name"] == "demo"
    assert spec.resources.gpus == 0
    assert spec.model.uri == "pvc://demo-model/demo"
    docs = load_docs((ROOT / "manifests" / "samples" / "demo-model.yaml").read_text())
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in docs if d["kind"] == "Job")
    assert pvc["metadata"]["name"] == "demo-model"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["python", "-m", "gptd_runtime", "build-demo", "/models/demo"]
    assert {"name": "models", "mountPath": "/models"} in pod["containers"][0]["volumeMounts"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "demo-model" for v in pod["volumes"])
    assert_restricted(pod, "demo-model job")
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
