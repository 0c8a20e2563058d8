"""The generated CRD: structural, valid, and the checked-in manifests/crd.yaml is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from gptd_operator import api
from gptd_operator.crd import build_crd, render_crd

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def _schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_every_node_is_structural() -> None:
    nodes = _walk(_schema())
    assert len(nodes) > 50  # the walk really descended
    for path, node in nodes:
        if node.get("x-kubernetes-int-or-string"):
            # The one anyOf Kubernetes allows in a structural schema: int-or-string, with no type of its own.
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
            node = {k: v for k, v in node.items() if k != "anyOf"}
        else:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "examples", "$defs"):
            assert banned not in node, f"{path} has {banned}"
        assert node.get("additionalProperties") is not False, path
        assert node.get("additionalProperties") is not True, path
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_key_fields() -> None:
    spec = _schema()["properties"]["spec"]
    model = spec["properties"]["model"]
    assert model["required"] == ["uri"]
    assert model["properties"]["uri"]["pattern"] == api.MODEL_URI_PATTERN
    assert model["properties"]["revision"]["default"] == "main"
    assert model["properties"]["task"]["enum"] == ["text-generation", "text-classification", "token-classification"]
    assert model["properties"]["hfTokenSecretRef"]["nullable"] is True
    assert model["properties"]["hfTokenSecretRef"]["properties"]["name"]["type"] == "string"
    assert spec["properties"]["replicas"] == {
        "type": "integer", "description": spec["properties"]["replicas"]["description"], "default": 1, "minimum": 0,
    }
    sched = spec["properties"]["scheduling"]["properties"]
    assert sched["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert spec["properties"]["resources"]["properties"]["cpu"]["x-kubernetes-int-or-string"] is True
    for parent in ("resources", "scheduling", "runtime", "service", "rollout"):
        # so the API server fills the nested defaults even when the user omits the parent object
        assert spec["properties"][parent]["default"] == {}, parent
    assert sched["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["properties"]["runtime"]["properties"]["env"]["items"]["properties"]["valueFrom"][
        "x-kubernetes-preserve-unknown-fields"
    ] is True
    status = _schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert "default" not in status["properties"]["conditions"]["items"]["properties"]["reason"]
    assert {"replicas", "selector", "readyDisplay", "conditions", "phase", "url"} <= set(status["properties"])


def test_names_subresources_columns() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "gptdeployments.gptd.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "GPTDeployment", "gptdeployments", ["gptd"], ["gptd", "all"],
    )
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols == {
        "Model": ".spec.model.uri",
        "Revision": ".status.currentRevision",
        "Ready": ".status.readyDisplay",
        "Phase": ".status.phase",
        "Score": ".status.evaluation.score",
        "Download": ".status.model.download.display",  # issue 10: the model cache's download
        "Age": ".metadata.creationTimestamp",
    }


def test_checked_in_crd_is_current() -> None:
    checked_in = (ROOT / "manifests" / "crd.yaml").read_text()
    fix = "run `python -m gptd_operator crd > manifests/crd.yaml`"
    assert checked_in == render_crd(), f"manifests/crd.yaml is stale: {fix}"


def test_cli_prints_the_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gptd_operator", "crd"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert yaml.safe_load(out) == build_crd()


def test_kubernetes_validate_accepts_it() -> None:
    import kubernetes_validate as kv  # a dev dependency: missing it is an error, not a skip
    kv.validate(build_crd(), "1.31", strict=True)


def test_sample_cr_matches_schema_defaults() -> None:
    # Defaults in the CRD must be the pydantic defaults, or the apiserver and the operator would disagree.
    spec = _schema()["properties"]["spec"]["properties"]
    parsed = api.parse_spec({"model": {"uri": "hf://openai-community/gpt2"}})
    assert spec["runtime"]["properties"]["maxBatchSize"]["default"] == parsed.runtime.maxBatchSize
    assert spec["rollout"]["properties"]["maxSurge"]["default"] == parsed.rollout.maxSurge
    assert spec["service"]["properties"]["port"]["default"] == parsed.service.port


def test_cli_parser() -> None:
    from gptd_operator.__main__ import _parser

    args = _parser().parse_args(["run", "--namespace", "a", "-n", "b", "--liveness", "", "--verbose"])
    assert (args.command, args.namespace, args.liveness, args.verbose) == ("run", ["a", "b"], "", True)
    default = _parser().parse_args([])
    assert default.command is None and default.namespace is None
    assert default.liveness == "http://0.0.0.0:8080/healthz"
