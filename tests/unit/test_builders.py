"""builders.py: every field the contract names, GPU on/off, security, probe maths, secrets only via refs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gptd_operator import builders as b
from gptd_operator.api import InvalidSpec, parse_spec
from gptd_operator.settings import DEFAULT_RUNTIME_IMAGE, Settings

from tests.support.specs import spec

S = Settings()
UID = "uid-1"


def dep(**over: Any) -> dict[str, Any]:
    return b.build_deployment("gpt2", "ns1", UID, spec(**over), S)


def container(d: dict[str, Any]) -> dict[str, Any]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return c


def env(d: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(d)["env"]}


def test_revision_template_and_hash_are_stable() -> None:
    t1 = b.revision_template(spec(), S)
    assert t1["runtime"]["image"] == DEFAULT_RUNTIME_IMAGE
    assert t1["model"]["uri"] == "hf://openai-community/gpt2"
    h = b.revision_hash(t1)
    assert len(h) == 10 and int(h, 16) >= 0
    assert b.revision_hash(json.loads(json.dumps(t1))) == h  # key order/copies don't matter
    assert b.revision_hash(b.revision_template(spec(model={"uri": "hf://openai-community/gpt2",
                                                            "revision": "v2"}), S)) != h
    # Non-revisioned fields (replicas, resources) don't change the revision.
    assert b.revision_hash(b.revision_template(spec(replicas=5, resources={"gpus": 2}), S)) == h
    assert b.revision_template(spec(), Settings(runtime_image="img:2"))["runtime"]["image"] == "img:2"
    assert b.revision_template(spec(runtime={"image": "mine:1"}), S)["runtime"]["image"] == "mine:1"


def test_deployment_metadata_labels_selector_owner() -> None:
    d = dep(replicas=3)
    assert d["apiVersion"] == "apps/v1" and d["kind"] == "Deployment"
    md = d["metadata"]
    assert (md["name"], md["namespace"]) == ("gpt2", "ns1")
    assert md["ownerReferences"] == [{
        "apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment", "name": "gpt2", "uid": UID,
        "controller": True, "blockOwnerDeletion": True,
    }]
    template = b.revision_template(spec(), S)
    assert md["annotations"] == {"gptd.io/template": b.canonical_json(template),
                                 "gptd.io/revision": b.revision_hash(template)}
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["selector"] == {"matchLabels": {
        "app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": "gpt2", "gptd.io/track": "stable"}}
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": "gpt2",
        "app.kubernetes.io/managed-by": "gptd-operator", "gptd.io/track": "stable",
        "gptd.io/revision": b.revision_hash(template),
    }
    # The selector must select the pods it creates.
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert d["spec"]["progressDeadlineSeconds"] == 1800
    assert d["spec"]["revisionHistoryLimit"] <= 5


def test_canary_and_template_override() -> None:
    s = spec()
    old = b.revision_template(spec(model={"uri": "hf://org/old"}), S)
    d = b.build_deployment("gpt2", "ns1", UID, s, S, template=old, track="canary", replicas=1,
                           strategy={"type": "Recreate"})
    assert d["metadata"]["name"] == "gpt2-canary"
    assert d["spec"]["selector"]["matchLabels"]["gptd.io/track"] == "canary"
    assert d["spec"]["template"]["metadata"]["labels"]["gptd.io/revision"] == b.revision_hash(old)
    assert env(d)["GPTD_MODEL"] == "hf://org/old"
    assert d["spec"]["strategy"] == {"type": "Recreate"} and d["spec"]["replicas"] == 1


def test_replicas_omitted_with_autoscaling() -> None:
    d = dep(autoscaling={"maxReplicas": 4, "targetInflightRequests": 8})
    assert "replicas" not in d["spec"]
    assert b.build_deployment("x", "ns", UID, spec(), S, replicas=None)["spec"].get("replicas") is None


def test_runtime_env() -> None:
    e = env(dep(model={"uri": "hf://org/m", "revision": "abc", "task": "text-classification", "dtype": "float16"},
                service={"port": 9000}, runtime={"maxBatchSize": 8, "maxInputTokens": 100, "maxNewTokens": 50,
                                                 "maxQueue": 7, "drainTimeoutSeconds": 12}))
    assert e["GPTD_MODEL"] == "hf://org/m"
    assert e["GPTD_REVISION"] == "abc"
    assert e["GPTD_TASK"] == "text-classification"
    assert e["GPTD_DTYPE"] == "float16"
    assert e["GPTD_PORT"] == "9000"
    assert (e["GPTD_MAX_BATCH_SIZE"], e["GPTD_MAX_INPUT_TOKENS"], e["GPTD_MAX_NEW_TOKENS"], e["GPTD_MAX_QUEUE"]) == (
        "8", "100", "50", "7")
    assert e["GPTD_DRAIN_TIMEOUT_SECONDS"] == "12"
    assert e["HF_HOME"] == b.CACHE_DIR
    assert "HF_TOKEN" not in e and "GPTD_API_KEY_FILE" not in e
    c = container(dep(service={"port": 9000}))
    # HOME is set (an image whose passwd lacks uid 10001 would get "/", read-only) and is a writable mount.
    assert e["HOME"] == "/tmp"
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    assert c["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert c["command"] == ["python", "-m", "gptd_runtime", "serve"]
    assert c["image"] == DEFAULT_RUNTIME_IMAGE


def test_user_env_appended_and_overrides() -> None:
    e = container(dep(runtime={"env": [{"name": "FOO", "value": "1"}, {"name": "GPTD_MAX_QUEUE", "value": "3"},
                                       {"name": "TOK", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}))
    names = [x["name"] for x in e["env"]]
    assert names.count("GPTD_MAX_QUEUE") == 1
    assert {"name": "GPTD_MAX_QUEUE", "value": "3"} in e["env"]
    assert e["env"][-1] == {"name": "TOK", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}


def test_secrets_only_through_refs() -> None:
    d = dep(model={"uri": "hf://org/private", "hfTokenSecretRef": {"name": "hf", "key": "token"}},
            runtime={"apiKeySecretRef": {"name": "api", "key": "key"}})
    e = env(d)
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert e["GPTD_API_KEY_FILE"] == b.API_KEY_FILE
    pod = d["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "api-key")
    assert vol["secret"]["secretName"] == "api" and vol["secret"]["items"] == [{"key": "key", "path": "api-key"}]
    mount = next(m for m in container(d)["volumeMounts"] if m["name"] == "api-key")
    assert mount["readOnly"] is True and b.API_KEY_FILE == f"{mount['mountPath']}/api-key"
    # No env entry carries a literal value for a secret-ish name.
    for item in container(d)["env"]:
        if item["name"] in ("HF_TOKEN",):
            assert "value" not in item
    assert b.referenced_secrets(parse_spec({"model": {"uri": "hf://o/m", "hfTokenSecretRef": {
        "name": "hf", "key": "t"}}, "runtime": {"apiKeySecretRef": {"name": "api", "key": "k"}}})) == [
        ("spec.model.hfTokenSecretRef", "hf"), ("spec.runtime.apiKeySecretRef", "api")]


def test_literal_secret_env_rejected() -> None:
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(spec(runtime={"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]}), S)
    assert err.value.field == "spec.runtime.env[0].value"


def test_gpu_on() -> None:
    d = dep(resources={"gpus": 2, "cpu": "4", "memory": "16Gi"})
    assert container(d)["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
    }
    assert d["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    amd = dep(resources={"gpus": 1, "gpuResourceName": "amd.com/gpu"})
    assert container(amd)["resources"] == {"requests": {"amd.com/gpu": "1"}, "limits": {"amd.com/gpu": "1"}}
    assert amd["spec"]["template"]["spec"]["tolerations"][0]["key"] == "amd.com/gpu"


def test_gpu_off() -> None:
    d = dep(resources={"gpus": 0, "cpu": "1"})
    assert container(d)["resources"] == {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}
    assert d["spec"]["template"]["spec"]["tolerations"] is None
    assert container(dep(resources={"gpus": 0}))["resources"] == {}


def test_scheduling_passthrough() -> None:
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    pod = dep(scheduling={
        "nodeSelector": {"gpu": "a100"}, "affinity": aff, "priorityClassName": "high", "runtimeClassName": "nvidia",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    })["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["affinity"] == aff
    assert pod["priorityClassName"] == "high" and pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
    ]
    # Unset: explicit None, so a merge patch removes what a previous spec set.
    plain = dep()["spec"]["template"]["spec"]
    assert plain["nodeSelector"] is None and plain["affinity"] is None and plain["priorityClassName"] is None


def test_security_context_restricted() -> None:
    d = dep()
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(d)["securityContext"]
    assert sc == {
        "runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False


def test_volumes_cache_tmp_shm() -> None:
    d = dep()
    vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(d)["volumeMounts"]}
    assert vols["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}} and mounts["/dev/shm"] == "dshm"
    assert "emptyDir" in vols[mounts["/tmp"]]
    assert "emptyDir" in vols[mounts[b.CACHE_DIR]] and env(d)["HF_HOME"] == b.CACHE_DIR


@pytest.mark.parametrize("timeout", [30, 31, 1800, 86_400])
def test_startup_probe_covers_startup_timeout(timeout: int) -> None:
    c = container(dep(runtime={"startupTimeoutSeconds": timeout}))
    sp = c["startupProbe"]
    assert sp["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert sp["failureThreshold"] * sp["periodSeconds"] >= timeout
    assert sp["failureThreshold"] * sp["periodSeconds"] < timeout + sp["periodSeconds"]  # not wildly longer
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}


@pytest.mark.parametrize("drain", [0, 30, 600])
def test_grace_period_exceeds_prestop_plus_drain(drain: int) -> None:
    d = dep(runtime={"drainTimeoutSeconds": drain})
    c = container(d)
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(cmd[1]) + drain


def test_pvc_model() -> None:
    d = dep(model={"uri": "pvc://models/llama/7b"})
    assert env(d)["GPTD_MODEL"] == "file:///models/models/llama/7b"
    vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in container(d)["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models/models", "readOnly": True}
    assert env(dep(model={"uri": "pvc://weights"}))["GPTD_MODEL"] == "file:///models/weights"


def test_file_model_passed_as_is() -> None:
    assert env(dep(model={"uri": "file:///opt/model"}))["GPTD_MODEL"] == "file:///opt/model"


def test_s3_rejected_without_init_image_and_synced_with_it() -> None:
    s3 = spec(model={"uri": "s3://bucket/pre/fix"})
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(s3, S)
    assert err.value.field == "spec.model.uri" and "GPTD_S3_INIT_IMAGE" in err.value.message
    settings = Settings(s3_init_image="amazon/aws-cli:2.17.0")
    b.check_spec(s3, settings)
    d = b.build_deployment("m", "ns", UID, s3, settings)
    (init,) = d["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == "amazon/aws-cli:2.17.0"
    assert init["command"][-2:] == ["s3://bucket/pre/fix", f"{b.CACHE_DIR}/s3/bucket/pre/fix"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert env(d)["GPTD_MODEL"] == f"file://{b.CACHE_DIR}/s3/bucket/pre/fix"


def test_check_spec_scale_to_zero_and_cpu_target() -> None:
    zero = spec(autoscaling={"minReplicas": 0, "maxReplicas": 3, "targetInflightRequests": 4})
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(zero, S)
    assert err.value.field == "spec.autoscaling.minReplicas"
    b.check_spec(zero, Settings(scale_to_zero_provider="keda", prometheus_url="http://prom:9090"))
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(spec(autoscaling={"maxReplicas": 3, "targetCPUUtilization": 70}), S)
    assert err.value.field == "spec.resources.cpu"
    b.check_spec(spec(), S)


def test_service() -> None:
    svc = b.build_service("gpt2", "ns1", UID, spec(service={"port": 8080, "type": "LoadBalancer"}))
    assert svc["metadata"]["name"] == "gpt2" and svc["metadata"]["ownerReferences"][0]["uid"] == UID
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": "gpt2"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    # The Service selects canary pods too (no track label).
    assert "gptd.io/track" not in svc["spec"]["selector"]


def test_pdb_when_more_than_one_replica() -> None:
    assert not b.wants_pdb(spec(replicas=1))
    assert b.wants_pdb(spec(replicas=2))
    assert b.wants_pdb(spec(replicas=1, autoscaling={"minReplicas": 2, "maxReplicas": 4, "targetInflightRequests": 1}))
    assert not b.wants_pdb(spec(replicas=5, autoscaling={"maxReplicas": 4, "targetInflightRequests": 1}))
    pdb = b.build_pdb("gpt2", "ns1", UID, spec(replicas=3))
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == b.selector_labels("gpt2")
    assert pdb["metadata"]["ownerReferences"][0]["controller"] is True


def test_hpa() -> None:
    s = spec(resources={"cpu": "2"}, autoscaling={
        "minReplicas": 2, "maxReplicas": 6, "targetInflightRequests": 8, "targetCPUUtilization": 75})
    hpa = b.build_hpa("gpt2", "ns1", UID, s)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt2"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "gptd_num_requests_inflight"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}},
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 75}}},
    ]
    with pytest.raises(ValueError):
        b.build_hpa("gpt2", "ns1", UID, spec())


def test_selector_string_and_url() -> None:
    assert b.selector_string("gpt2") == "app.kubernetes.io/instance=gpt2,app.kubernetes.io/name=gptd-runtime"
    assert b.service_url("gpt2", "ns1", spec()) == "http://gpt2.ns1.svc.cluster.local:8000"


def test_deployment_validates_against_kubernetes_schema() -> None:
    import kubernetes_validate as kv  # a dev dependency: missing it is an error, not a skip

    def strip_none(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip_none(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [strip_none(v) for v in x]
        return x

    full = spec(replicas=3, resources={"gpus": 1, "cpu": "2", "memory": "8Gi"},
                model={"uri": "pvc://models/x", "hfTokenSecretRef": {"name": "hf", "key": "t"}},
                runtime={"apiKeySecretRef": {"name": "a", "key": "k"}},
                autoscaling={"maxReplicas": 4, "targetInflightRequests": 2, "targetCPUUtilization": 50})
    for obj in (b.build_deployment("gpt2", "ns1", UID, full, S), b.build_service("gpt2", "ns1", UID, full),
                b.build_pdb("gpt2", "ns1", UID, full), b.build_hpa("gpt2", "ns1", UID, full)):
        kv.validate(strip_none(obj), "1.31", strict=True)


def test_scale_to_zero_uses_a_keda_scaled_object() -> None:
    zero = spec(autoscaling={"minReplicas": 0, "maxReplicas": 3, "targetInflightRequests": 4})
    keda = Settings(scale_to_zero_provider="keda", prometheus_url="http://prom:9090")
    b.check_spec(zero, keda)
    assert not b.wants_hpa(zero, keda) and b.wants_scaled_object(zero, keda)
    assert "replicas" not in b.build_deployment("m", "ns", UID, zero, keda)["spec"]
    so = b.build_scaled_object("m", "ns", UID, zero, keda)
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["spec"]["scaleTargetRef"]["name"] == "m"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 3)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["serverAddress"] == "http://prom:9090"
    assert trigger["metadata"]["threshold"] == "4"
    query = trigger["metadata"]["query"]
    assert 'gptd:num_requests_running{namespace="ns",pod=~"m(-canary)?-[a-z0-9]+-[a-z0-9]+"}' in query
    assert so["metadata"]["ownerReferences"][0]["uid"] == UID
    # minReplicas >= 1 keeps the plain HPA even with KEDA configured.
    assert b.wants_hpa(spec(autoscaling={"maxReplicas": 3, "targetInflightRequests": 4}), keda)
    assert not b.wants_hpa(spec(), S) and not b.wants_scaled_object(spec(), keda)
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(zero, Settings(scale_to_zero_provider="keda"))
    assert err.value.field == "spec.autoscaling.minReplicas" and "GPTD_PROMETHEUS_URL" in err.value.message
    with pytest.raises(InvalidSpec) as err:
        b.check_spec(spec(resources={"cpu": "1"}, autoscaling={"minReplicas": 0, "maxReplicas": 3,
                                                               "targetCPUUtilization": 50}), keda)
    assert err.value.field == "spec.autoscaling.targetInflightRequests"


def test_inflight_query_selects_only_this_crs_pods() -> None:
    import re

    query = b.inflight_query("gpt2", "ns1")
    (pattern,) = set(re.findall(r'pod=~"([^"]+)"', query))
    ours = ("gpt2-5d8f9c7b6-x2x4z", "gpt2-canary-7c9d8f6b5-abcde")
    theirs = ("gpt2-large-5d8f9c7b6-x2x4z", "gpt2-large-canary-7c9d8f6b5-abcde", "gpt2x-5d8f9c7b6-x2x4z")
    assert all(re.fullmatch(pattern, p) for p in ours)  # Prometheus anchors =~ at both ends
    assert not any(re.fullmatch(pattern, p) for p in theirs)
    assert 'namespace="ns1"' in query and "num_requests_waiting" in query


def test_pod_uid_left_to_the_platform_still_non_root() -> None:
    """OpenShift restricted-v2 refuses fixed UIDs: GPTD_RUNTIME_RUN_AS_USER="" leaves them to the platform."""
    settings = Settings.from_env({"GPTD_RUNTIME_RUN_AS_USER": ""})
    assert settings.run_as_user is None
    s3 = Settings(run_as_user=None, s3_init_image="amazon/aws-cli:2.17.0")
    d = b.build_deployment("gpt2", "ns1", "uid", spec(model={"uri": "s3://bucket/m"}), s3)
    pod = d["spec"]["template"]["spec"]
    for ctx in (pod["securityContext"], pod["containers"][0]["securityContext"],
                pod["initContainers"][0]["securityContext"]):
        assert ctx["runAsNonRoot"] is True
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(ctx), ctx
    assert Settings.from_env({}).run_as_user == 10001
    assert Settings.from_env({"GPTD_RUNTIME_RUN_AS_USER": "1000680000"}).run_as_user == 1000680000
    with pytest.raises(ValueError, match="GPTD_RUNTIME_RUN_AS_USER"):
        Settings.from_env({"GPTD_RUNTIME_RUN_AS_USER": "0"})


def test_revision_unchanged_by_a_new_defaulted_field() -> None:
    """An operator release adding a field with a default must not roll every model (issue 8, defect 8)."""
    from gptd_operator.api import ModelSpec, RuntimeSpec

    class NewRuntimeSpec(RuntimeSpec):
        prefixCaching: bool = False  # the "next release" field, at its default

    class NewModelSpec(ModelSpec):
        trustRemoteCode: bool = False

    for raw in ({}, {"runtime": {"maxBatchSize": 8, "env": [{"name": "A", "value": "1"}]},
                     "model": {"uri": "hf://org/m", "revision": "v2"}}):
        old = spec(**raw)
        new = old.model_copy(update={
            "runtime": NewRuntimeSpec.model_validate(old.runtime.model_dump()),
            "model": NewModelSpec.model_validate(old.model.model_dump()),
        })
        assert b.revision_hash(b.revision_template(new, S)) == b.revision_hash(b.revision_template(old, S))
    # A value that differs from the default still is a new revision.
    assert b.revision_hash(b.revision_template(spec(runtime={"maxBatchSize": 8}), S)) != b.revision_hash(
        b.revision_template(spec(), S))


@pytest.mark.parametrize("raw", [
    {},
    {"model": {"uri": "hf://a/b", "revision": "x", "hfTokenSecretRef": {"name": "s", "key": "k"}},
     "runtime": {"image": "i", "apiKeySecretRef": {"name": "a", "key": "b"}, "env": [
         {"name": "A", "value": ""},
         {"name": "B", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y", "o": None}}}]}},
])
def test_revisions_made_by_0_1_0_are_unchanged(raw: dict[str, Any]) -> None:
    """0.1.0 hashed ``model_dump(mode="json", exclude_none=True)``: its revisions must not move on upgrade."""
    sp = spec(**raw)
    # 0.1.0's RuntimeSpec had only the baseline fields (later ones, e.g. redaction, did not exist to be dumped).
    dumped = sp.runtime.model_dump(mode="json", exclude_none=True)
    runtime = {k: v for k, v in dumped.items() if k in b.REVISION_BASELINE["RuntimeSpec"]}
    runtime["image"] = sp.runtime.image or S.runtime_image
    old = {"model": sp.model.model_dump(mode="json", exclude_none=True), "runtime": runtime}
    assert b.revision_template(sp, S) == old


def test_pod_env_is_a_valid_runtime_configuration_listening_on_the_pod_ip() -> None:
    """The contract between the two halves: the runtime parses the pod's literal env (it binds 127.0.0.1 by
    default, which the kubelet's probes and the Service could never reach)."""
    from gptd_runtime.config import load_settings

    literal = {k: v for k, v in env(dep(service={"port": 9000})).items() if isinstance(v, str)}
    settings = load_settings({}, literal)
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)


def test_revision_and_pod_template_unchanged_by_issue_12_fields_at_their_defaults() -> None:
    """spec.service.tls, spec.networkPolicy, spec.runtime.redaction/apiKeysSecretName written out at their defaults
    neither make a new revision nor touch the pod template (no new env, port, volume or probe scheme)."""
    for raw in ({}, {"runtime": {"maxBatchSize": 8, "apiKeySecretRef": {"name": "a", "key": "k"}}}):
        plain = spec(**raw)
        runtime = {**raw.get("runtime", {}), "redaction": {"enabled": False}, "apiKeysSecretName": None}
        explicit = spec(**{**raw, "runtime": runtime, "service": {"tls": None}, "networkPolicy": {"enabled": False}})
        assert b.revision_template(explicit, S) == b.revision_template(plain, S)
        assert "redaction" not in b.revision_template(plain, S)["runtime"]
        assert b.build_deployment("gpt2", "ns1", UID, explicit, S) == b.build_deployment("gpt2", "ns1", UID, plain, S)
    c = container(dep())
    assert [p["name"] for p in c["ports"]] == ["http"]
    assert "scheme" not in c["readinessProbe"]["httpGet"]
    assert not {"GPTD_REDACT", "GPTD_METRICS_PORT", "GPTD_TLS_CERT_FILE"} & set(env(dep()))
    # Enabling redaction is a new revision (the runtime's behaviour changes).
    assert b.revision_hash(b.revision_template(spec(runtime={"redaction": {"enabled": True}}), S)) != b.revision_hash(
        b.revision_template(spec(), S))
