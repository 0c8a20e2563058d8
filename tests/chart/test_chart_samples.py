"""manifests/samples: valid for the API server (the CRD's schema, as kubectl --validate=strict sees it) and for the
operator (parse_spec, and the checks only its handlers make: builders.check_spec with the settings the chart's
default values give), the children the operator would build from them valid for Kubernetes, and GitOps-stable:
nothing the operator or the API server writes is in them. Also the demo's PVC path and the prometheus-adapter
rule that the HPA's metric name depends on."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from gptd_operator import builders
from gptd_operator.api import API_VERSION, KIND, InvalidSpec, parse_spec
from gptd_operator.settings import Settings

from tests.support.chart import K8S_VERSIONS, ROOT, assert_restricted, load_docs

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
    assert {p.name for p in CR_SAMPLES} == {"cpu.yaml", "gpu.yaml", "autoscaling.yaml", "canary.yaml",
                                            "evaluation.yaml", "model-cache.yaml"}


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


# The chart's default values give exactly these settings (test_chart_render checks Settings.from_env on the
# rendered env): no scale-to-zero provider, no Prometheus, no s3 init image.
DEFAULT_SETTINGS = Settings()


def _children(cr: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """What the operator's handlers would create for this CR (steady state, no canary in flight)."""
    name, ns, uid = cr["metadata"]["name"], "default", "00000000-0000-0000-0000-000000000000"
    spec = parse_spec(cr["spec"])
    builders.check_spec(spec, settings)  # raises InvalidSpec (phase Failed) for what the CRD can't express
    template = builders.revision_template(spec, settings)
    out = []
    if spec.model.cache is not None:  # issue 10: the claim and the download Job first; the pods mount the commit
        from gptd_operator import model_cache

        revision = builders.revision_hash(template)
        out += [model_cache.build_pvc(name, ns, uid, spec),
                model_cache.build_job(name, ns, uid, spec, settings, revision=revision, template=template, attempt=1,
                                      keep=["0" * 40])]
        template = builders.with_resolved(template, "1" * 40)
    out += [builders.build_deployment(name, ns, uid, spec, settings, template=template),
            builders.build_service(name, ns, uid, spec)]
    if builders.wants_pdb(spec):
        out.append(builders.build_pdb(name, ns, uid, spec))
    if builders.wants_hpa(spec, settings):
        out.append(builders.build_hpa(name, ns, uid, spec))
    # KEDA ScaledObjects only exist with scaleToZeroProvider=keda (not the default): no CRD schema to check here.
    assert not builders.wants_scaled_object(spec, settings)
    return out


@pytest.mark.parametrize("path", CR_SAMPLES, ids=lambda p: p.name)
def test_sample_passes_the_operators_own_checks_with_default_settings(path):
    for cr in _crs(path):
        for child in _children(cr, DEFAULT_SETTINGS):
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(child, version, strict=True)
            if child["kind"] in ("Deployment", "Job"):  # Job: the model cache's download (issue 10)
                assert_restricted(child["spec"]["template"]["spec"], f"{path.name} {child['kind']} pods")


def test_evaluation_sample_dataset_job_and_gated_pods_are_valid():
    """Issue 11: the sample's ConfigMap is a valid dataset for its CR's task (the operator's own check), and the
    evaluator Job and the gated pod template the operator would build from it are valid Kubernetes, restricted."""
    from gptd_operator import evaluation

    path = ROOT / "manifests" / "samples" / "evaluation.yaml"
    docs = load_docs(path.read_text())
    (cr,) = _crs(path)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    spec = parse_spec(cr["spec"])
    evaluation.check_evaluation(spec)
    assert spec.evaluation is not None and spec.evaluation.dataset.configMapRef is not None
    assert configmap["metadata"]["name"] == spec.evaluation.dataset.configMapRef.name
    identity = evaluation.check_dataset(spec, evaluation.configmap_text(spec, configmap))
    assert identity.startswith("configmap sentiment-eval/eval.jsonl sha256:")
    assert spec.evaluation.metric in ("accuracy", "precision", "recall", "f1")  # fits text-classification
    name, ns, uid = cr["metadata"]["name"], "default", "00000000-0000-0000-0000-000000000000"
    job = evaluation.build_job(name, ns, uid, spec, DEFAULT_SETTINGS,
                               evaluation.EvalJob("candidate", "sentiment-eval-0123456789", "k" * 16, "abc",
                                                  "sentiment-abc-1", "10.0.0.9"), DEFAULT_SETTINGS.runtime_image)
    template = {**builders.revision_template(spec, DEFAULT_SETTINGS), builders.TEMPLATE_GATE_KEY: True}
    gated = builders.build_deployment(name, ns, uid, spec, DEFAULT_SETTINGS, template=template)
    assert gated["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": "gptd.io/evaluated"}]
    for version in K8S_VERSIONS:
        for doc in (configmap, job, gated):  # the CR itself: its CRD schema (test_sample_is_valid_for_api_server...)
            kubernetes_validate.validate(doc, version, strict=True)
    assert_restricted(job["spec"]["template"]["spec"], "evaluation Job")


def test_operator_check_catches_cpu_utilisation_without_cpu_request():
    """The mistake autoscaling.yaml once had: the CRD accepts it, the operator answers InvalidSpec."""
    (cr,) = _crs(ROOT / "manifests" / "samples" / "autoscaling.yaml")
    cr = copy.deepcopy(cr)
    del cr["spec"]["resources"]["cpu"]
    assert not list(VALIDATOR.iter_errors(cr))
    with pytest.raises(InvalidSpec) as exc:
        _children(cr, DEFAULT_SETTINGS)
    assert exc.value.field == "spec.resources.cpu"


def _hpa_pods_metric() -> str:
    (cr,) = _crs(ROOT / "manifests" / "samples" / "autoscaling.yaml")
    hpa = next(c for c in _children(cr, DEFAULT_SETTINGS) if c["kind"] == "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    return metrics["Pods"]["pods"]["metric"]["name"]


def test_autoscaling_sample_hpa_scales_on_in_flight_requests():
    """Running requests are capped by maxBatchSize: the HPA must see the queue too (running + waiting)."""
    name = _hpa_pods_metric()
    assert name == "gptd_num_requests_inflight"
    assert name in (ROOT / "manifests" / "samples" / "autoscaling.yaml").read_text()


def _exported_series() -> dict[str, float]:
    """The series the runtime really exports (its Metrics registry, read as Prometheus would), 3 running + 5
    waiting."""
    from gptd_runtime.api.metrics import Metrics
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.bind(lambda: 3.0, lambda: 5.0, lambda: 1.0)
    text = generate_latest(m.registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_prometheus_adapter_rule_yields_exactly_the_hpa_metric():
    doc = yaml.safe_load((ROOT / "manifests" / "prometheus-adapter" / "rules.yaml").read_text())
    (rule,) = doc["rules"]["custom"]
    series = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{namespace!="",pod!=""\}', rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    exported = series.group(1)
    # The series exists in the runtime's exposition and carries running + waiting (not running alone).
    assert _exported_series()[exported] == 8.0
    # The adapter's `as` uses Go's regexp expansion (${1}); the same rename in Python:
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), exported)
    assert renamed == builders.HPA_METRIC == _hpa_pods_metric()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_podmonitor_scrapes_the_runtime_pods_the_rule_reads():
    """The PodMonitor the rule assumes: selects the operator-built runtime pods in any namespace, on their named
    metrics port; the Prometheus Operator then adds the namespace and pod labels the rule's overrides map."""
    (pm,) = load_docs((ROOT / "manifests" / "prometheus-adapter" / "podmonitor.yaml").read_text())
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    spec = pm["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    (cr,) = _crs(ROOT / "manifests" / "samples" / "autoscaling.yaml")
    dep = _children(cr, DEFAULT_SETTINGS)[0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert set(spec["selector"]) == {"matchLabels"}
    (endpoint,) = spec["podMetricsEndpoints"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in c["ports"]}
    assert endpoint["path"] == "/metrics"
    # No relabelling that would drop or rename the namespace/pod labels the adapter rule maps.
    assert not endpoint.get("relabelings") and not endpoint.get("metricRelabelings")


def test_demo_model_path_matches_the_operators_pvc_mapping():
    """The Job writes build-demo's output to <PVC>/demo; the operator serves pvc://demo-model/demo from the same
    place, and the served model name (the directory name) is what hack/demo.sh asks for."""
    (cr,) = _crs(ROOT / "manifests" / "samples" / "cpu.yaml")
    dep = _children(cr, DEFAULT_SETTINGS)[0]
    pod = dep["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    (c,) = pod["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    model = next(e["value"] for e in c["env"] if e["name"] == "GPTD_MODEL")
    assert vol["persistentVolumeClaim"] == {"claimName": "demo-model", "readOnly": True}
    in_pvc = model.removeprefix("file://").removeprefix(mount["mountPath"] + "/")
    assert model.startswith("file://" + mount["mountPath"] + "/") and in_pvc == "demo"

    job = next(d for d in load_docs((ROOT / "manifests" / "samples" / "demo-model.yaml").read_text())
               if d["kind"] == "Job")
    jpod = job["spec"]["template"]["spec"]
    (jc,) = jpod["containers"]
    (jvol,) = [v for v in jpod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "demo-model"]
    (jmount,) = [m for m in jc["volumeMounts"] if m["name"] == jvol["name"]]
    target = jc["command"][-1]
    assert target.startswith(jmount["mountPath"] + "/") and target.removeprefix(jmount["mountPath"] + "/") == in_pvc
    assert Path(in_pvc).name == "demo"
    assert '"model": "demo"' in (ROOT / "hack" / "demo.sh").read_text()


def test_demo_model_job_writes_only_to_its_volumes():
    """Read-only root filesystem: build-demo (torch, tokenizers, transformers) writes temp files below /tmp and
    nothing else outside the PVC (measured with an audit hook); HOME points there too."""
    job = next(d for d in load_docs((ROOT / "manifests" / "samples" / "demo-model.yaml").read_text())
               if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts and {"name": mounts["/tmp"], "emptyDir": {}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env["HOME"] == "/tmp"
    assert pod["securityContext"]["runAsUser"] == 10001
