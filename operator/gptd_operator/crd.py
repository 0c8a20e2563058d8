"""The GPTDeployment CRD, generated from ``api.py`` so the schema and the operator's validation agree.

``python -m gptd_operator crd`` prints it; ``manifests/crd.yaml`` is that output, checked in (a unit test
fails when it is stale). The pydantic JSON schema is turned into a Kubernetes *structural* schema:
every ``$ref`` inlined, ``anyOf [X, null]`` turned into ``X`` + ``nullable: true``, ``title``/``examples``
dropped, ``additionalProperties: true`` (free-form dicts, ``extra="allow"`` models) turned into
``x-kubernetes-preserve-unknown-fields: true``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import api

# Keys a structural schema may carry; anything else pydantic emits (title, examples, const...) is dropped.
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "nullable",
    "format",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",  # CEL rules a model declares (api.TLSSpec), checked by the API server on apply
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]])
    # Keys next to a $ref (description, default) override the referenced definition's.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def to_structural(node: dict[str, Any], defs: dict[str, Any], *, keep_defaults: bool = True) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (recursively) into a structural OpenAPI v3 schema node."""
    node = _resolve(node, defs)
    nullable = False
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            raise ValueError(f"can't express anyOf with {len(options)} non-null options structurally: {node}")
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        merged.update(_resolve(options[0], defs))
        merged.update({k: v for k, v in node.items() if k in ("description", "default") and k in node})
        node = merged

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "default" and (value is None or not keep_defaults):
            continue
        out[key] = value
    if nullable:
        out["nullable"] = True
    # JSON Schema 2020-12 (pydantic) has numeric exclusive bounds; OpenAPI v3.0 (Kubernetes) has booleans.
    for excl, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if excl in out and not isinstance(out[excl], bool):
            out[bound] = out[excl]
            out[excl] = True

    if "properties" in node:
        out["properties"] = {
            name: to_structural(sub, defs, keep_defaults=keep_defaults) for name, sub in node["properties"].items()
        }
    if "items" in node:
        out["items"] = to_structural(node["items"], defs, keep_defaults=keep_defaults)

    extra = node.get("additionalProperties")
    if extra is True:
        # Free-form objects (affinity, valueFrom) and extra="allow" models keep unknown fields.
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):
        out["additionalProperties"] = to_structural(extra, defs, keep_defaults=keep_defaults)
    # additionalProperties: false (extra="forbid") is the structural default: unknown fields are pruned,
    # and the operator's own parse_spec rejects them in objects it sees before pruning (e.g. in tests).
    if out.get("x-kubernetes-int-or-string"):
        # Quantities: the only anyOf a structural schema allows, and it must carry no type of its own.
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    return out


def _schema(model: type[Any], *, keep_defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema()
    return to_structural(raw, raw.get("$defs", {}), keep_defaults=keep_defaults)


def spec_schema() -> dict[str, Any]:
    return _schema(api.GPTDeploymentSpec, keep_defaults=True)


def status_schema() -> dict[str, Any]:
    # The operator writes status; server-side defaults there would only fight it. kopf keeps its own
    # bookkeeping in status too, hence preserve-unknown-fields at the root.
    schema = _schema(api.GPTDeploymentStatus, keep_defaults=False)
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def build_crd() -> dict[str, Any]:
    spec_desc = api.GPTDeploymentSpec.__doc__ or ""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "gptd-operator", "app.kubernetes.io/part-of": "gptd"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
                        {"name": "Revision", "type": "string", "jsonPath": ".status.currentRevision"},
                        {"name": "Ready", "type": "string", "jsonPath": ".status.readyDisplay"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Score", "type": "number", "jsonPath": ".status.evaluation.score"},
                        {"name": "Download", "type": "string", "jsonPath": ".status.model.download.display"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "GPTDeployment serves a GPT-style model behind an OpenAI-compatible API.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": {**spec_schema(), "description": spec_desc.strip()},
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as YAML, byte-stable (sorted keys off: field order follows api.py, which reads better)."""
    header = "# Generated by `python -m gptd_operator crd` from operator/gptd_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)
