"""Pure builders: (name, spec, settings) → the complete dicts of the children we own. No I/O here.

Every child is named after the CR and carries an ownerReference to it, so deleting the CR lets the
Kubernetes garbage collector remove them (the operator has no finalizer and no delete handler).
Optional pod-spec fields we own are emitted as ``None`` when unset: ``kube.apply`` sends the desired
dict as a JSON merge patch, where ``None`` removes a field a previous spec had set (e.g. affinity).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from . import api, names
from .api import GPTDeploymentSpec, InvalidSpec, ModelSpec, RuntimeSpec
from .settings import Settings

Template = dict[str, Any]

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# The revision hash: a label on the pod template (which revision a pod runs) and an annotation on the Deployment.
LABEL_REVISION = ANN_REVISION = "gptd.io/revision"
LABEL_TRACK = "gptd.io/track"
# On a runtime pod loading from the model cache: the commit directory it mounts (<cache>/<sha>), so the download
# Job's housekeeping keeps it while any pod runs it (an old ReplicaSet's pods too). Only cached templates get it.
LABEL_MODEL_SHA = "gptd.io/model-sha"
ANN_TEMPLATE = "gptd.io/template"  # on the Deployment: the revision template, JSON
RUNTIME_APP = "gptd-runtime"
# The evaluation gate (evaluation.py): a revision template with this key true puts the readiness gate GATE_CONDITION
# in the pod template. Not part of the revision hash: whether a revision is gated never changes the revision.
TEMPLATE_GATE_KEY = "evaluationGate"
GATE_CONDITION = "gptd.io/evaluated"
# Jobs (model download, evaluation) and their pods: app.kubernetes.io/name gptd-job, never gptd-runtime, so the
# Service, the PDB, the NetworkPolicy and the runtime-pod index never select a Job's pod; the component label says
# what the Job is for (the runtime-pod index also skips any pod that has one).
JOB_APP = "gptd-job"
LABEL_COMPONENT = "app.kubernetes.io/component"
EVALUATION_COMPONENT = "evaluation"  # the component label of the evaluation gate's Jobs (evaluation.py)
MANAGER = "gptd-operator"

CONTAINER = "runtime"
PORT_NAME = "http"
CACHE_DIR = "/var/cache/gptd"  # HF_HOME: writable model cache (emptyDir)
MODELS_DIR = "/models"  # pvc:// models are mounted read-only below here
# spec.model.cache: the claim <name>-model-cache, read-write in the download Job, read-only in the pods, which
# load <MODEL_CACHE_DIR>/<sha> (fetch's layout: docs/fetch-and-evaluate.md).
MODEL_CACHE_DIR = "/var/lib/gptd/model-cache"
# In the revision template: the pods load the model from the cache. Only that it is set is revisioned (the pods
# differ); the claim's size, class, access mode and retain change no pod, so they start no rollout or download.
MODEL_CACHE_KEY = "modelCache"
# Facts about a revision found after it was asked for (the commit sha its download resolved to): kept in the
# template the Deployment and lastGoodTemplate carry, never part of the revision hash (which names what the spec
# asked for), so a moving branch never changes the revision of running pods.
RESOLVED = "resolved"
API_KEY_DIR = "/var/run/gptd/api-key"
API_KEY_FILE = f"{API_KEY_DIR}/api-key"
TLS_DIR = "/var/run/gptd/tls"  # the whole TLS Secret: the kubelet updates it on renewal (a subPath never is)
CLIENT_CA_DIR = "/var/run/gptd/client-ca"
METRICS_PORT_NAME = "metrics"
METRICS_PORT = 9090  # /metrics alone, plain HTTP (Prometheus needs no CA or key); only with spec.networkPolicy
# The namespace label every namespace carries (Kubernetes >= 1.22), for "the monitoring namespace".
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
STARTUP_PERIOD_SECONDS = 10
TERMINATION_MARGIN_SECONDS = 10  # between the runtime finishing its drain and the kubelet's SIGKILL
REVISION_HISTORY_LIMIT = 3
# In-flight = running + waiting: running alone is capped by maxBatchSize, so a queue would never scale anything.
HPA_METRIC = "gptd_num_requests_inflight"  # Prometheus `gptd:num_requests_inflight`, renamed by the adapter

# Env names whose literal values would leak a secret into the pod spec; they must use valueFrom.
_SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GPTD_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# ------------------------------------------------------------------------------------------- labels


def selector_labels(name: str) -> dict[str, str]:
    """What the Service (and the PDB, the scale subresource) select: stable and canary pods alike.

    The instance label carries the base name (names.py): a label value is at most 63 characters."""
    return {LABEL_NAME: RUNTIME_APP, LABEL_INSTANCE: names.base(name)}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), LABEL_MANAGED_BY: MANAGER}


def deployment_selector(name: str, track: str) -> dict[str, str]:
    # Immutable in a Deployment, so it carries nothing that changes between revisions.
    return {**selector_labels(name), LABEL_TRACK: track}


def job_labels(name: str, component: str, revision: str) -> dict[str, str]:
    """Labels of a Job of CR ``name`` and of its pod template: ``component`` says what it does ("model-download",
    "evaluation"), ``revision`` which revision it is for. The instance label lets the Job index find the CR."""
    return {
        LABEL_NAME: JOB_APP,
        LABEL_INSTANCE: names.base(name),
        LABEL_MANAGED_BY: MANAGER,
        LABEL_COMPONENT: component,
        LABEL_REVISION: revision,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def deployment_name(name: str, track: str = "stable") -> str:
    return names.deployment(name, track)


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, namespace: str, uid: str, owner: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**common_labels(owner), **extra_labels},
        "ownerReferences": [owner_reference(owner, uid)],
    }


# ----------------------------------------------------------------------------------- validation


def check_spec(spec: GPTDeploymentSpec, settings: Settings) -> None:
    """Checks that depend on the operator's settings or span fields; raise InvalidSpec naming the field."""
    if spec.model.cache is not None and not spec.model.uri.startswith(("hf://", "s3://")):
        scheme = spec.model.uri.split("://", 1)[0]
        raise InvalidSpec("spec.model.cache", f"is for hf:// and s3:// models: a {scheme}:// model is already on a "
                                              "volume or in the image; remove it")
    if spec.autoscaling is not None and spec.autoscaling.minReplicas == 0 and not settings.scale_to_zero_provider:
        raise InvalidSpec(
            "spec.autoscaling.minReplicas",
            "0 needs a scale-to-zero provider configured on the operator (GPTD_SCALE_TO_ZERO_PROVIDER=keda)",
        )
    if spec.autoscaling is not None and spec.autoscaling.minReplicas == 0:
        if not spec.autoscaling.targetInflightRequests:
            raise InvalidSpec(
                "spec.autoscaling.targetInflightRequests",
                "must be set when minReplicas is 0 (CPU alone can't wake a Deployment from zero)",
            )
        if not settings.prometheus_url:
            raise InvalidSpec(
                "spec.autoscaling.minReplicas",
                "0 needs GPTD_PROMETHEUS_URL on the operator (the KEDA ScaledObject queries it)",
            )
    if spec.autoscaling is not None and spec.autoscaling.targetCPUUtilization and not spec.resources.cpu:
        raise InvalidSpec(
            "spec.resources.cpu",
            "must be set when spec.autoscaling.targetCPUUtilization is (utilisation is relative to the request)",
        )
    if spec.model.uri.startswith("s3://") and not settings.s3_init_image:
        raise InvalidSpec(
            "spec.model.uri",
            "s3:// models need the operator setting GPTD_S3_INIT_IMAGE (an AWS CLI image); "
            "use hf://, pvc:// or file:// otherwise",
        )
    if wants_side_port(spec) and spec.service.port == METRICS_PORT:
        raise InvalidSpec(
            "spec.service.port",
            f"{METRICS_PORT} is the metrics and probe port when spec.networkPolicy or mutual TLS is enabled; "
            "pick another",
        )
    for i, env in enumerate(spec.runtime.env):
        if env.name.upper() in _SECRET_ENV_NAMES and env.value is not None:
            raise InvalidSpec(f"spec.runtime.env[{i}].value", f"{env.name} must come from valueFrom.secretKeyRef")


def referenced_secrets(spec: GPTDeploymentSpec) -> list[tuple[str, str]]:
    """(field path, Secret name) of every Secret the pods need (status names the field when one is missing)."""
    refs = []
    if spec.model.hfTokenSecretRef is not None:
        refs.append(("spec.model.hfTokenSecretRef", spec.model.hfTokenSecretRef.name))
    if spec.runtime.apiKeySecretRef is not None:
        refs.append(("spec.runtime.apiKeySecretRef", spec.runtime.apiKeySecretRef.name))
    if spec.runtime.apiKeysSecretName is not None:
        refs.append(("spec.runtime.apiKeysSecretName", spec.runtime.apiKeysSecretName))
    tls = spec.service.tls
    if tls is not None and tls.secretName is not None:
        refs.append(("spec.service.tls.secretName", tls.secretName))
    if tls is not None and tls.clientCASecretName is not None:
        refs.append(("spec.service.tls.clientCASecretName", tls.clientCASecretName))
    return refs


def tls_secret_name(name: str, spec: GPTDeploymentSpec) -> str | None:
    """The Secret the pods serve TLS from: the user's, or the one cert-manager writes for our Certificate."""
    tls = spec.service.tls
    if tls is None:
        return None
    return tls.secretName if tls.secretName is not None else names.certificate_secret(name)


# ------------------------------------------------------------------------------------- revisions


# The fields of the revisioned models as of gptd 0.1.0, by model class. Their values always enter the revision
# template (so every revision hash made by 0.1.0 stays the same); a field added later enters it only when set to
# something other than its default, so an operator upgrade that adds a defaulted field rolls no model.
REVISION_BASELINE: dict[str, frozenset[str]] = {
    "ModelSpec": frozenset({"uri", "revision", "task", "dtype", "hfTokenSecretRef"}),
    "RuntimeSpec": frozenset({
        "image", "maxBatchSize", "maxInputTokens", "maxNewTokens", "maxQueue", "apiKeySecretRef", "env",
        "startupTimeoutSeconds", "drainTimeoutSeconds",
    }),
    "SecretKeyRef": frozenset({"name", "key"}),
    "EnvVar": frozenset({"name", "value", "valueFrom"}),
}


def _revision_dump(value: Any) -> Any:
    """``model_dump(mode="json", exclude_none=True)``, less post-0.1.0 fields at their defaults."""
    if isinstance(value, api.BaseModel):
        baseline = next(
            (REVISION_BASELINE[c.__name__] for c in type(value).__mro__ if c.__name__ in REVISION_BASELINE), frozenset()
        )
        out = {}
        for field, info in type(value).model_fields.items():
            item = getattr(value, field)
            if item is None:
                continue
            if field not in baseline and not info.is_required() and item == info.get_default(call_default_factory=True):
                continue
            out[field] = _revision_dump(item)
        return out
    if isinstance(value, list):
        return [_revision_dump(v) for v in value]
    return value  # scalars, and free-form dicts (valueFrom) as they are


def revision_template(spec: GPTDeploymentSpec, settings: Settings) -> Template:
    """The revisioned part of the spec: a change here is a new revision (and a rollout)."""
    runtime = _revision_dump(spec.runtime)
    runtime["image"] = spec.runtime.image or settings.runtime_image
    model = _revision_dump(spec.model)
    template: Template = {"model": model, "runtime": runtime}
    if model.pop("cache", None) is not None:
        template[MODEL_CACHE_KEY] = True
    return template


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def revision_hash(template: Template) -> str:
    hashed = {k: v for k, v in template.items() if k not in (TEMPLATE_GATE_KEY, RESOLVED)}
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:10]


def with_resolved(template: Template, sha: str | None) -> Template:
    """``template`` carrying the commit its model resolved to (same revision hash); unchanged when ``sha`` is None."""
    if sha is None:
        return template
    return {**template, RESOLVED: {"sha": sha}}


def resolved_sha(template: Template | None) -> str | None:
    value = ((template or {}).get(RESOLVED) or {}).get("sha")
    return str(value) if value else None


def desired_replicas(spec: GPTDeploymentSpec) -> int | None:
    """None while an autoscaler owns the count: the Deployment's live replicas are then left alone."""
    return None if spec.autoscaling is not None else spec.replicas


def rolling_strategy(spec: GPTDeploymentSpec, in_place: bool = False) -> dict[str, Any]:
    """The Deployment strategy; ``in_place`` (no GPU for a surge pod) replaces pods one down, one up."""
    surge, unavailable = (0, 1) if in_place else (spec.rollout.maxSurge, spec.rollout.maxUnavailable)
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}


# ------------------------------------------------------------------------------------------- pods


def _model_source(
    name: str, model: ModelSpec, settings: Settings, cached: bool, sha: str | None
) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(GPTD_MODEL, volumes, runtime volumeMounts, initContainers) for a model URI."""
    uri = model.uri
    if cached:
        if sha is None:  # rollout.py never builds pods for a revision whose download is not complete
            raise ValueError("a model.cache template needs the resolved sha (builders.with_resolved)")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": names.model_cache(name), "readOnly": True}}
        mount = {"name": "model", "mountPath": MODEL_CACHE_DIR, "readOnly": True}
        return f"file://{MODEL_CACHE_DIR}/{sha}", [volume], [mount], []
    if uri.startswith("pvc://"):
        claim, _, sub = uri.removeprefix("pvc://").partition("/")
        mount = f"{MODELS_DIR}/{claim}"
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        path = f"{mount}/{sub}".rstrip("/")
        return f"file://{path}", [volume], [{"name": "model", "mountPath": mount, "readOnly": True}], []
    if uri.startswith("s3://"):
        if not settings.s3_init_image:
            raise InvalidSpec("spec.model.uri", "s3:// models need GPTD_S3_INIT_IMAGE on the operator")
        local = f"{CACHE_DIR}/s3/{uri.removeprefix('s3://')}".rstrip("/")
        init = {
            "name": "model-sync",
            "image": settings.s3_init_image,
            "command": ["aws", "s3", "sync", "--only-show-errors", uri, local],
            # Credentials: the pod's identity (IRSA / workload identity) or AWS_* env from spec.runtime.env.
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
            "securityContext": container_security_context(settings),
        }
        return f"file://{local}", [], [], [init]
    return uri, [], [], []  # hf:// and file:// go to the runtime as they are


def pod_security_context(settings: Settings) -> dict[str, Any]:
    """Pod Security "restricted". With ``settings.run_as_user`` None the UID/GID/fsGroup are left to the platform
    (OpenShift's restricted-v2 assigns them from the namespace's range and refuses fixed ones); still non-root."""
    ids: dict[str, Any] = {}
    if settings.run_as_user is not None:
        uid = settings.run_as_user
        ids = {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}  # fsGroup: PVC-mounted models stay readable
    return {"runAsNonRoot": True, **ids, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(settings: Settings) -> dict[str, Any]:
    ids = {"runAsUser": settings.run_as_user} if settings.run_as_user is not None else {}
    return {
        "runAsNonRoot": True,
        **ids,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def verdict_job(
    name: str, namespace: str, uid: str, settings: Settings, *, job_name: str, labels: dict[str, str],
    annotations: dict[str, str], container: dict[str, Any], volumes: list[dict[str, Any]], deadline_seconds: int,
    result_file: str,
) -> dict[str, Any]:
    """A one-shot Job whose pod's termination message (``result_file``) is a verdict the operator reads: the
    evaluator and the dataset check. ``container`` gives name, image, command, volumeMounts and resources; the
    rest (restricted security, no service-account token, HOME on the writable /tmp) is the same for both."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "backoffLimit": 0,  # a verdict is not retried: a failure is the result...
            # ...but a pod evicted or preempted (a node drain) says nothing about the model or the data: recreated.
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [
                {"type": "DisruptionTarget", "status": "True"}]}]},
            "activeDeadlineSeconds": deadline_seconds,
            "ttlSecondsAfterFinished": 3600,  # the operator deletes it once the verdict is in status
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        **container,
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "terminationMessagePath": result_file,
                        "terminationMessagePolicy": "File",
                        "securityContext": container_security_context(settings),
                    }],
                    "volumes": volumes,
                    "securityContext": pod_security_context(settings),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                },
            },
        },
    }


def _resources(spec: GPTDeploymentSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus > 0:
        # Extended resources need request == limit; the API server would copy it anyway, say it ourselves
        # so the live object equals what we build (no patch on every resync).
        requests[res.gpuResourceName] = limits[res.gpuResourceName] = str(res.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def same_node_term(name: str) -> dict[str, Any]:
    """A pod affinity term: the node of a pod of this CR (stable or canary)."""
    return {"labelSelector": {"matchLabels": selector_labels(name)}, "topologyKey": "kubernetes.io/hostname"}


def _affinity(name: str, spec: GPTDeploymentSpec, cached: bool) -> dict[str, Any] | None:
    """spec.scheduling.affinity; with a ReadWriteOnce model cache also a *required* pod affinity to the CR's own
    pods on kubernetes.io/hostname: the volume attaches to one node, so every replica (and the download Job) runs
    there. The first pod matches its own term, which the scheduler accepts when no other pod matches."""
    affinity = dict(spec.scheduling.affinity or {})
    cache = spec.model.cache
    if cached and cache is not None and cache.accessMode == "ReadWriteOnce":
        pod_affinity = dict(affinity.get("podAffinity") or {})
        required = list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
        pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [*required, same_node_term(name)]
        affinity["podAffinity"] = pod_affinity
    return affinity or None


def _tolerations(spec: GPTDeploymentSpec) -> list[dict[str, Any]] | None:
    out = []
    if spec.resources.gpus > 0:
        out.append({"key": spec.resources.gpuResourceName, "operator": "Exists", "effect": "NoSchedule"})
    for tol in spec.scheduling.tolerations or []:
        item = tol.model_dump(mode="json", exclude_none=True)
        if item not in out:
            out.append(item)
    return out or None


def _env(
    model: ModelSpec, runtime: RuntimeSpec, port: int, model_ref: str, spec: GPTDeploymentSpec
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "GPTD_MODEL", "value": model_ref},
        {"name": "GPTD_REVISION", "value": model.revision},
        {"name": "GPTD_TASK", "value": model.task},
        {"name": "GPTD_DTYPE", "value": model.dtype},
        # The runtime binds 127.0.0.1 unless told otherwise; in a pod the kubelet's probes and the Service
        # reach it on the pod IP.
        {"name": "GPTD_HOST", "value": "0.0.0.0"},
        {"name": "GPTD_PORT", "value": str(port)},
        {"name": "GPTD_MAX_BATCH_SIZE", "value": str(runtime.maxBatchSize)},
        {"name": "GPTD_MAX_INPUT_TOKENS", "value": str(runtime.maxInputTokens)},
        {"name": "GPTD_MAX_NEW_TOKENS", "value": str(runtime.maxNewTokens)},
        {"name": "GPTD_MAX_QUEUE", "value": str(runtime.maxQueue)},
        {"name": "GPTD_DRAIN_TIMEOUT_SECONDS", "value": str(runtime.drainTimeoutSeconds)},
        {"name": "HF_HOME", "value": CACHE_DIR},
        # A custom spec.runtime.image without uid 10001 in its /etc/passwd would get HOME=/ on a read-only
        # root filesystem; /tmp is the pod's writable emptyDir.
        {"name": "HOME", "value": "/tmp"},
    ]
    if runtime.apiKeySecretRef is not None:
        env.append({"name": "GPTD_API_KEY_FILE", "value": API_KEY_FILE})
    if runtime.apiKeysSecretName is not None:
        # A directory: the runtime reads every non-dot file in it, one key per line (docs/security.md).
        env.append({"name": "GPTD_API_KEY_FILE", "value": API_KEY_DIR})
    if runtime.redaction.enabled:
        env.append({"name": "GPTD_REDACT", "value": ",".join(runtime.redaction.entities)})
    if spec.service.tls is not None:
        env.append({"name": "GPTD_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"})
        env.append({"name": "GPTD_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"})
        if spec.service.tls.clientCASecretName is not None:
            env.append({"name": "GPTD_TLS_CLIENT_CA_FILE", "value": f"{CLIENT_CA_DIR}/ca.crt"})
    if wants_side_port(spec):
        env.append({"name": "GPTD_METRICS_PORT", "value": str(METRICS_PORT)})
    # With the model cache only the download Job needs the token.
    if model.hfTokenSecretRef is not None and not model_ref.startswith(f"file://{MODEL_CACHE_DIR}/"):
        ref = model.hfTokenSecretRef
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    # User entries come last and replace ours of the same name (kubelet takes the last duplicate anyway).
    for extra in runtime.env:
        item = extra.model_dump(mode="json", exclude_none=True)
        env = [e for e in env if e["name"] != extra.name]
        env.append(item)
    return env


def wants_side_port(spec: GPTDeploymentSpec) -> bool:
    """The plain-HTTP side listener (/metrics and /health/*): for the NetworkPolicy's metrics rule, and under
    mutual TLS, where the kubelet's probes (which present no client certificate) could never pass the handshake
    on the serving port."""
    mtls = spec.service.tls is not None and spec.service.tls.clientCASecretName is not None
    return spec.networkPolicy.enabled or mtls


def _probe(path: str, period: int, failures: int, https: bool, side_port: bool = False) -> dict[str, Any]:
    if side_port:
        get: dict[str, Any] = {"path": path, "port": METRICS_PORT_NAME}
    else:
        get = {"path": path, "port": PORT_NAME}
    if https and not side_port:
        # Only then: `scheme: HTTP` (the default) in every template would restart every pod on an upgrade. The
        # kubelet does not verify the serving certificate, so HTTPS probes need no CA.
        get["scheme"] = "HTTPS"
    return {
        "httpGet": get,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def startup_failure_threshold(startup_timeout_seconds: int) -> int:
    # failureThreshold * periodSeconds must cover the whole load + warm-up time.
    return max(1, math.ceil(startup_timeout_seconds / STARTUP_PERIOD_SECONDS))


def termination_grace_seconds(runtime: RuntimeSpec, settings: Settings) -> int:
    return settings.prestop_sleep_seconds + runtime.drainTimeoutSeconds + TERMINATION_MARGIN_SECONDS


def build_pod_template(
    name: str, spec: GPTDeploymentSpec, settings: Settings, template: Template, track: str
) -> dict[str, Any]:
    model = ModelSpec.model_validate(template["model"])
    runtime = RuntimeSpec.model_validate(template["runtime"])
    image = runtime.image or settings.runtime_image
    port = spec.service.port
    model_ref, volumes, mounts, init_containers = _model_source(
        name, model, settings, bool(template.get(MODEL_CACHE_KEY)), resolved_sha(template))
    volumes = [
        *volumes,
        {"name": "model-cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        *mounts,
        {"name": "model-cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    # Group-readable where fsGroup makes the runtime's group own the files; with the UID left to the platform
    # there may be no fsGroup (only OpenShift fills one in), and root-owned 0440 files would be unreadable.
    secret_mode = 0o440 if settings.run_as_user is not None else 0o444
    if runtime.apiKeySecretRef is not None:
        ref = runtime.apiKeySecretRef
        volumes.append(
            {
                "name": "api-key",
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": "api-key"}],
                    "defaultMode": secret_mode,
                },
            }
        )
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    if runtime.apiKeysSecretName is not None:
        # Every data key is a file: adding or removing one adds or removes keys (the kubelet updates the mount).
        volumes.append(
            {"name": "api-key", "secret": {"secretName": runtime.apiKeysSecretName, "defaultMode": secret_mode}}
        )
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    tls_secret = tls_secret_name(name, spec)
    if tls_secret is not None:
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret, "defaultMode": secret_mode}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    client_ca = spec.service.tls.clientCASecretName if spec.service.tls is not None else None
    if client_ca is not None:
        volumes.append({"name": "tls-client-ca", "secret": {"secretName": client_ca, "defaultMode": secret_mode}})
        mounts.append({"name": "tls-client-ca", "mountPath": CLIENT_CA_DIR, "readOnly": True})
    ports = [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}]
    if wants_side_port(spec):
        # Only with a NetworkPolicy (its metrics rule names this port) or mutual TLS (the probes use it): a new
        # port and env change the pod template, which would roll every existing model on an operator upgrade.
        ports.append({"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"})
    https = spec.service.tls is not None
    # Under mutual TLS the kubelet (no client certificate) probes the plain side port instead.
    side = https and spec.service.tls.clientCASecretName is not None
    if init_containers:
        # The sync container can use the same credentials (AWS_* via valueFrom) as the runtime.
        for init in init_containers:
            init["env"] += [e.model_dump(mode="json", exclude_none=True) for e in runtime.env]
    container = {
        "name": CONTAINER,
        "image": image,
        "command": ["python", "-m", "gptd_runtime", "serve"],
        "ports": ports,
        "env": _env(model, runtime, port, model_ref, spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "startupProbe": _probe(
            "/health/ready", STARTUP_PERIOD_SECONDS, startup_failure_threshold(runtime.startupTimeoutSeconds), https,
            side,
        ),
        "readinessProbe": _probe("/health/ready", 5, 3, https, side),
        "livenessProbe": _probe("/health/live", 10, 3, https, side),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.prestop_sleep_seconds)]}}},
        "securityContext": container_security_context(settings),
    }
    sched = spec.scheduling
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "initContainers": init_containers or None,
        "volumes": volumes,
        "securityContext": pod_security_context(settings),
        "terminationGracePeriodSeconds": termination_grace_seconds(runtime, settings),
        "enableServiceLinks": False,  # no *_SERVICE_HOST env noise in the runtime
        "automountServiceAccountToken": False,  # the runtime never talks to the API server
        "nodeSelector": sched.nodeSelector or None,
        "tolerations": _tolerations(spec),
        "affinity": _affinity(name, spec, bool(template.get(MODEL_CACHE_KEY))),
        "priorityClassName": sched.priorityClassName,
        "runtimeClassName": sched.runtimeClassName,
        # Only in a gated revision's template (evaluation.py), so adding spec.evaluation changes no live pod.
        "readinessGates": [{"conditionType": GATE_CONDITION}] if template.get(TEMPLATE_GATE_KEY) else None,
    }
    revision = revision_hash(template)
    labels = {**common_labels(name), LABEL_TRACK: track, LABEL_REVISION: revision}
    if template.get(MODEL_CACHE_KEY) and resolved_sha(template):
        labels[LABEL_MODEL_SHA] = str(resolved_sha(template))
    return {"metadata": {"labels": labels}, "spec": pod_spec}


# -------------------------------------------------------------------------------------- children


_DEFAULT = object()


def build_deployment(
    name: str,
    namespace: str,
    uid: str,
    spec: GPTDeploymentSpec,
    settings: Settings,
    *,
    template: Template | None = None,
    track: str = "stable",
    replicas: int | object | None = _DEFAULT,
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Deployment ``<name>`` (track stable) or ``<name>-canary`` running ``template``.

    ``replicas=None`` omits spec.replicas, so a patch never overwrites what an autoscaler set.
    """
    template = template if template is not None else revision_template(spec, settings)
    revision = revision_hash(template)
    count = desired_replicas(spec) if replicas is _DEFAULT else replicas
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": deployment_selector(name, track)},
        "strategy": strategy if strategy is not None else rolling_strategy(spec),
        "progressDeadlineSeconds": spec.rollout.progressDeadlineSeconds,
        "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
        "template": build_pod_template(name, spec, settings, template, track),
    }
    if count is not None:
        dep_spec = {"replicas": count, **dep_spec}
    metadata = _metadata(deployment_name(name, track), namespace, uid, name, **{LABEL_TRACK: track})
    metadata["annotations"] = {ANN_TEMPLATE: canonical_json(template), ANN_REVISION: revision}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": dep_spec}


def build_service(name: str, namespace: str, uid: str, spec: GPTDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(names.service(name), namespace, uid, name),
        "spec": {
            "type": spec.service.type,
            # name + instance only: a canary Deployment's pods get traffic in proportion to their count.
            "selector": selector_labels(name),
            "ports": [{"name": PORT_NAME, "port": spec.service.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def wants_pdb(spec: GPTDeploymentSpec) -> bool:
    floor = spec.autoscaling.minReplicas if spec.autoscaling is not None else spec.replicas
    return floor > 1


def build_pdb(name: str, namespace: str, uid: str, spec: GPTDeploymentSpec) -> dict[str, Any]:
    # maxUnavailable 1 (not minAvailable 1): a node drain takes one GPU replica at a time, whatever the
    # count; AlwaysAllow so crash-looping pods never block a drain.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(names.base(name), namespace, uid, name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def wants_scaled_object(spec: GPTDeploymentSpec, settings: Settings) -> bool:
    """An HPA can't scale to zero: with minReplicas 0 a KEDA ScaledObject replaces it."""
    return (
        spec.autoscaling is not None
        and spec.autoscaling.minReplicas == 0
        and settings.scale_to_zero_provider == "keda"
    )


def wants_hpa(spec: GPTDeploymentSpec, settings: Settings) -> bool:
    return spec.autoscaling is not None and not wants_scaled_object(spec, settings)


def inflight_query(name: str, namespace: str) -> str:
    # Running + waiting, so queued requests count; `pod` is the label kubernetes service discovery sets.
    # Pods of <name> and <name>-canary only (`<deployment>-<hash>-<suffix>`, anchored by Prometheus), not those
    # of another CR whose name starts with <name>-. A base holds no regex metacharacter but the '.' of a kept
    # legacy base (names.LegacyName).
    pods = names.base(name).replace(".", "[.]") + "(-canary)?-[a-z0-9]+-[a-z0-9]+"
    sel = f'namespace="{namespace}",pod=~"{pods}"'
    running = f"sum(gptd:num_requests_running{{{sel}}} or vector(0))"
    return f"{running} + sum(gptd:num_requests_waiting{{{sel}}} or vector(0))"


def build_scaled_object(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings
) -> dict[str, Any]:
    """KEDA ScaledObject for minReplicas 0 (KEDA then owns an HPA of its own for 1..max)."""
    auto = spec.autoscaling
    if auto is None or not auto.targetInflightRequests:
        raise ValueError("build_scaled_object needs spec.autoscaling.targetInflightRequests")
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "metadata": {
                "serverAddress": settings.prometheus_url or "",
                "query": inflight_query(name, namespace),
                "threshold": str(auto.targetInflightRequests),
                "activationThreshold": "0",
            },
        }
    ]
    if auto.targetCPUUtilization is not None:
        triggers.append({"type": "cpu", "metricType": "Utilization",
                         "metadata": {"value": str(auto.targetCPUUtilization)}})
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(names.base(name), namespace, uid, name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.deployment(name)},
            "minReplicaCount": 0,
            "maxReplicaCount": auto.maxReplicas,
            "triggers": triggers,
        },
    }


def build_hpa(name: str, namespace: str, uid: str, spec: GPTDeploymentSpec) -> dict[str, Any]:
    auto = spec.autoscaling
    if auto is None:
        raise ValueError("build_hpa needs spec.autoscaling")
    metrics: list[dict[str, Any]] = []
    if auto.targetInflightRequests is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": HPA_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(auto.targetInflightRequests)},
                },
            }
        )
    if auto.targetCPUUtilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": auto.targetCPUUtilization},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(names.base(name), namespace, uid, name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.deployment(name)},
            "minReplicas": auto.minReplicas,
            "maxReplicas": auto.maxReplicas,
            "metrics": metrics,
        },
    }


def service_url(name: str, namespace: str, spec: GPTDeploymentSpec) -> str:
    scheme = "https" if spec.service.tls is not None else "http"
    return f"{scheme}://{names.service(name)}.{namespace}.svc.cluster.local:{spec.service.port}"


def service_dns_names(name: str, namespace: str) -> list[str]:
    """Every in-cluster name of the Service a client may use (the Certificate covers them all)."""
    svc = names.service(name)
    return [svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local"]


def wants_certificate(spec: GPTDeploymentSpec) -> bool:
    return spec.service.tls is not None and spec.service.tls.issuerRef is not None


def build_certificate(name: str, namespace: str, uid: str, spec: GPTDeploymentSpec) -> dict[str, Any]:
    """cert-manager.io/v1 Certificate for the Service's names; cert-manager writes and renews its Secret."""
    tls = spec.service.tls
    if tls is None or tls.issuerRef is None:
        raise ValueError("build_certificate needs spec.service.tls.issuerRef")
    ref = tls.issuerRef
    dns = service_dns_names(name, namespace)
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": _metadata(names.certificate(name), namespace, uid, name),
        # No commonName: clients check dnsNames (SANs), and a CN is limited to 64 bytes, which
        # <svc>.<namespace>.svc.cluster.local can exceed.
        "spec": {
            "secretName": names.certificate_secret(name),
            "dnsNames": dns,
            "usages": ["server auth", "digital signature", "key encipherment"],
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": {"name": ref.name, "kind": ref.kind, "group": ref.group},
        },
    }


def build_network_policy(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings
) -> dict[str, Any]:
    """Ingress to the CR's pods: the runtime port from ``allowFrom`` only, the metrics port from the monitoring
    namespace only, nothing else (egress is left alone: the runtime downloads models)."""
    ingress: list[dict[str, Any]] = []
    peers = [p.model_dump(mode="json", exclude_none=True) for p in spec.networkPolicy.allowFrom]
    if peers:
        # An ingress rule without `from` would admit everyone: with no peers there is no rule for this port.
        ingress.append({"from": peers, "ports": [{"port": PORT_NAME, "protocol": "TCP"}]})
    if spec.evaluation is not None:
        # The evaluation Jobs score a new pod over the runtime port (this CR's Jobs only, by their labels).
        evaluator = {LABEL_NAME: JOB_APP, LABEL_INSTANCE: names.base(name), LABEL_COMPONENT: EVALUATION_COMPONENT}
        ingress.append({"from": [{"podSelector": {"matchLabels": evaluator}}],
                        "ports": [{"port": PORT_NAME, "protocol": "TCP"}]})
    ingress.append({
        "from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.monitoring_namespace}}}],
        "ports": [{"port": METRICS_PORT_NAME, "protocol": "TCP"}],
    })
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(names.network_policy(name), namespace, uid, name),
        "spec": {"podSelector": {"matchLabels": selector_labels(name)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }
