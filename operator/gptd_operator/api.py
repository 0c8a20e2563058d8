"""The GPTDeployment API: pydantic v2 models, the single source of truth.

The CRD's OpenAPI schema is generated from these models (``crd.py``), and the operator validates every
object it sees with the same models (``parse_spec``), so the two can never disagree.
Field names are camelCase because they are the Kubernetes API; Python attributes use the same names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

GROUP = "gptd.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "GPTDeployment"
PLURAL = "gptdeployments"
SINGULAR = "gptdeployment"
SHORT_NAMES = ["gptd"]
CATEGORIES = ["gptd", "all"]

# hf://org/name | pvc://claim[/sub/path] | s3://bucket[/prefix] | file:///abs/path
MODEL_URI_PATTERN = (
    r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/\s]+)*/?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|file:///[^\s]*)$"
)
_MODEL_URI_RE = re.compile(MODEL_URI_PATTERN)

_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


def _quantity(value: Any) -> str:
    # Kubernetes quantities are int-or-string: `cpu: 4` and `cpu: "4"` mean the same.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a quantity such as 4, 500m or 16Gi")
    text = str(value)
    if not _QUANTITY_RE.match(text):
        raise ValueError("must be a quantity such as 4, 500m or 16Gi")
    return text


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": _QUANTITY_RE.pattern}),
]

# A nested object whose fields all have defaults: the CRD defaults it to {} so the API server fills in the
# nested defaults too (kubectl get -o yaml shows what the operator will use).
_OBJECT_DEFAULT = {"default": {}}


class _Model(BaseModel):
    # Unknown fields are errors: a typo such as `replica:` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SecretKeyRef(_Model):
    """A key in a Secret in the same namespace; its value never appears in the pod spec or the logs."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class ModelCacheSpec(_Model):
    """A PersistentVolumeClaim ``<name>-model-cache`` the weights are downloaded into once per revision, by a Job,
    before any pod of that revision is created (docs/model-cache.md). hf:// and s3:// models."""

    size: Quantity = Field(description="The claim's storage request, e.g. 40Gi (room for two or three revisions).")
    storageClassName: str = Field(
        "", max_length=253, description="StorageClass of the claim; empty: the cluster's default class."
    )
    accessMode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        "ReadWriteMany",
        description=(
            "ReadWriteMany: pods on any node share the cache and the download runs on any node. ReadWriteOnce: the "
            "volume attaches to one node, so the download Job gets the pods' nodeSelector, tolerations and affinity "
            "and prefers their node, and every replica must fit on that node."
        ),
    )
    retain: bool = Field(
        False, description="Keep the claim (no ownerReference) when the GPTDeployment is deleted; reused if recreated."
    )


class ModelSpec(_Model):
    """Which model to serve. A change to uri or revision starts a rollout of a new revision."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        description=(
            "Where the weights come from: hf://org/name (Hugging Face Hub), pvc://claim/sub/path "
            "(a PersistentVolumeClaim mounted read-only), s3://bucket/prefix, or file:///abs/path "
            "(already in the image)."
        ),
        examples=["hf://openai-community/gpt2"],
    )
    revision: str = Field(
        "main",
        min_length=1,
        max_length=255,
        description="Model revision: a Hub branch, tag or commit sha. Part of the rollout revision.",
    )
    task: Literal["text-generation", "text-classification", "token-classification"] = Field(
        "text-generation", description="What the runtime serves: OpenAI API, or v2 inference for the others."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto picks float16/bfloat16 on GPU and float32 on CPU."
    )
    hfTokenSecretRef: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token for gated or private models."
    )
    cache: ModelCacheSpec | None = Field(
        None,
        description=(
            "Download each revision once into a PersistentVolumeClaim, before its pods ask for a GPU, with progress "
            "in status.model.download; absent: each pod downloads at start-up (docs/model-cache.md)."
        ),
    )


class ResourcesSpec(_Model):
    """Compute per replica."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs per replica; 0 runs on CPU.")
    gpuResourceName: str = Field(
        "nvidia.com/gpu",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="Extended resource name of the GPU (nvidia.com/gpu, amd.com/gpu, a MIG profile...).",
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit per replica, e.g. '4'.")
    memory: Quantity | None = Field(None, description="Memory request and limit per replica, e.g. '32Gi'.")


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class SchedulingSpec(_Model):
    """Where replicas may run; passed through to the pod spec."""

    nodeSelector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[Toleration] | None = Field(
        None, description="Extra tolerations (a toleration for the GPU resource taint is added by default)."
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="Pod affinity (core/v1 Affinity), passed through unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priorityClassName: str | None = Field(None, description="Pod priorityClassName.")
    runtimeClassName: str | None = Field(None, description="Pod runtimeClassName (e.g. nvidia).")


class EnvVar(_Model):
    """An environment variable for the runtime container. Secrets go through valueFrom.secretKeyRef."""

    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    valueFrom: dict[str, Any] | None = Field(
        None,
        description="core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef...).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


REDACTION_ENTITIES = ("email", "phone", "creditCard", "ipAddress", "iban", "cnResidentId", "secretLike")
RedactionEntity = Literal["email", "phone", "creditCard", "ipAddress", "iban", "cnResidentId", "secretLike"]


class RedactionSpec(_Model):
    """Masking of personal data in prompts (before the model sees them) and outputs (docs/security.md)."""

    enabled: bool = Field(False, description="Mask the listed entities; passed to the runtime as GPTD_REDACT.")
    entities: list[RedactionEntity] = Field(
        default_factory=lambda: list(REDACTION_ENTITIES),
        min_length=1,
        description="Which entities to mask; all of them by default.",
    )


class RuntimeSpec(_Model):
    """The bundled runtime's settings. A change to image or any limit starts a rollout."""

    image: str | None = Field(None, description="Runtime image; defaults to the operator's configured image.")
    maxBatchSize: int = Field(32, ge=1, le=1024, description="Most requests batched in one forward pass.")
    maxInputTokens: int = Field(2048, ge=1, le=1_048_576, description="Longest accepted prompt, in tokens.")
    maxNewTokens: int = Field(512, ge=1, le=1_048_576, description="Largest accepted max_tokens.")
    maxQueue: int = Field(256, ge=1, le=100_000, description="Waiting requests before the runtime answers 429.")
    apiKeySecretRef: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key; when set every /v1 and /v2 route needs a Bearer token."
    )
    apiKeysSecretName: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description=(
            "A Secret whose every data key holds API keys (one per line), mounted whole: add a data key with the "
            "new key, switch clients, remove the old one; the runtime reloads within a minute, no restart. "
            "Not together with apiKeySecretRef."
        ),
    )
    redaction: RedactionSpec = Field(default_factory=RedactionSpec, json_schema_extra=_OBJECT_DEFAULT)
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment for the runtime container.")
    startupTimeoutSeconds: int = Field(
        1800, ge=30, le=86_400, description="How long a replica may take to load and warm up before restart."
    )
    drainTimeoutSeconds: int = Field(
        30, ge=0, le=3600, description="How long in-flight requests may run after SIGTERM."
    )

    @model_validator(mode="after")
    def _check(self) -> RuntimeSpec:
        if self.apiKeySecretRef is not None and self.apiKeysSecretName is not None:
            raise ValueError("set apiKeySecretRef or apiKeysSecretName, not both")
        return self


class IssuerRef(_Model):
    """A cert-manager issuer; gptd then owns a cert-manager.io/v1 Certificate for the Service's DNS names."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Issuer or ClusterIssuer.")
    kind: Literal["Issuer", "ClusterIssuer"] = Field("Issuer", description="Issuer (same namespace) or ClusterIssuer.")
    group: str = Field("cert-manager.io", min_length=1, description="API group of the issuer (external issuers).")


class TLSSpec(_Model):
    """HTTPS only: the runtime serves TLS with a mounted kubernetes.io/tls Secret, renewed without a restart."""

    # The same rule for `kubectl apply` (CEL in the CRD) as for the operator's own check (below).
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.secretName) != has(self.issuerRef)",
         "message": "set exactly one of secretName and issuerRef"}
    ]})

    secretName: str | None = Field(
        None, min_length=1, max_length=253, description="A kubernetes.io/tls Secret (tls.crt, tls.key)."
    )
    issuerRef: IssuerRef | None = Field(None, description="Or: a cert-manager issuer that signs a Certificate.")
    clientCASecretName: str | None = Field(
        None,
        max_length=253,
        description="Mutual TLS: a Secret with ca.crt; clients must present a certificate signed by it.",
    )

    @model_validator(mode="after")
    def _check(self) -> TLSSpec:
        if (self.secretName is None) == (self.issuerRef is None):
            raise ValueError("set exactly one of secretName and issuerRef")
        if self.clientCASecretName == "":
            self.clientCASecretName = None  # the example writes "" for "no mutual TLS"
        return self


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8000, ge=1, le=65535, description="Service and container port (named http).")
    tls: TLSSpec | None = Field(None, description="Serve HTTPS only (probes and status.url follow).")


class LabelSelectorRequirement(_Model):
    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = Field(None, description="For In and NotIn; empty for Exists and DoesNotExist.")

    @model_validator(mode="after")
    def _check(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Model):
    """A meta/v1 LabelSelector, checked here so a typo is InvalidSpec naming it (not a 422 after the Deployment)."""

    matchLabels: dict[str, str] | None = None
    matchExpressions: list[LabelSelectorRequirement] | None = None


class NetworkPolicyPeer(_Model):
    """A networking.k8s.io/v1 NetworkPolicyPeer without ipBlock: pods by namespace and/or pod labels."""

    namespaceSelector: LabelSelector | None = Field(
        None, description="Namespaces by label ({} is every namespace), e.g. kubernetes.io/metadata.name: gateway."
    )
    podSelector: LabelSelector | None = Field(
        None, description="Pods by label (in the CR's namespace unless namespaceSelector is set)."
    )

    @model_validator(mode="after")
    def _check(self) -> NetworkPolicyPeer:
        if self.namespaceSelector is None and self.podSelector is None:
            raise ValueError("set namespaceSelector and/or podSelector")
        return self


class NetworkPolicySpec(_Model):
    """An owned NetworkPolicy: the runtime port only from allowFrom, the metrics port from the monitoring namespace."""

    enabled: bool = Field(False, description="Own a NetworkPolicy for the pods (removed when false).")
    allowFrom: list[NetworkPolicyPeer] = Field(
        default_factory=list, description="Who may reach the runtime port; empty: nobody (metrics only)."
    )


class AutoscalingSpec(_Model):
    """An autoscaling/v2 HorizontalPodAutoscaler owned by the operator; it then owns the replica count."""

    minReplicas: int = Field(
        1, ge=0, description="Lower bound. 0 needs a scale-to-zero provider (KEDA) configured on the operator."
    )
    maxReplicas: int = Field(ge=1, description="Upper bound.")
    targetInflightRequests: int | None = Field(
        None, ge=1, description="Target average gptd:num_requests_inflight (running + waiting) per pod (a Pods metric)."
    )
    targetCPUUtilization: int | None = Field(None, ge=1, le=100, description="Target average CPU utilisation %.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.maxReplicas < self.minReplicas:
            raise ValueError("maxReplicas must be >= minReplicas")
        if self.targetInflightRequests is None and self.targetCPUUtilization is None:
            raise ValueError("set targetInflightRequests and/or targetCPUUtilization")
        return self


class CanaryStep(_Model):
    weight: int = Field(ge=1, le=99, description="Share of traffic (percent) for the new revision at this step.")
    pauseSeconds: int | None = Field(
        None, ge=0, description="Wait this long with the canary Ready; unset waits for gptd.io/promote=true."
    )


class CanaryAnalysis(_Model):
    """Metric checks against Prometheus at every step; a breach aborts and rolls back."""

    prometheusUrl: str = Field(pattern=r"^https?://", description="Prometheus base URL.")
    maxErrorRate: float = Field(0.05, ge=0, le=1, description="Highest allowed share of failed requests.")
    maxTimeToFirstTokenSeconds: float | None = Field(None, gt=0, description="Highest allowed p95 TTFT.")
    intervalSeconds: int = Field(60, ge=10, description="Query window and period.")


class CanarySpec(_Model):
    steps: list[CanaryStep] = Field(min_length=1, description="Traffic steps, in order; then promotion.")
    analysis: CanaryAnalysis | None = None


class RolloutSpec(_Model):
    """How a new revision (model uri/revision, image, runtime args) replaces the old one."""

    strategy: Literal["RollingUpdate", "Canary"] = Field("RollingUpdate", description="Rollout strategy.")
    maxSurge: int = Field(1, ge=0, description="Extra pods during a rolling update.")
    maxUnavailable: int = Field(0, ge=0, description="Pods that may be missing during a rolling update.")
    progressDeadlineSeconds: int = Field(
        1800, ge=10, description="A new revision not Ready by then is rolled back."
    )
    allowCapacityDip: bool | None = Field(
        None,
        description=(
            "When the surge pod can't get a GPU, replace pods in place (one down, one up). "
            "Defaults to true when replicas > 1."
        ),
    )
    surgeGraceSeconds: int = Field(
        120, ge=0, description="How long a surge pod may stay Unschedulable before the fallback applies."
    )
    canary: CanarySpec | None = None

    @model_validator(mode="after")
    def _check(self) -> RolloutSpec:
        if self.strategy == "Canary" and self.canary is None:
            raise ValueError("strategy Canary needs canary.steps")
        if self.maxSurge == 0 and self.maxUnavailable == 0:
            raise ValueError("maxSurge and maxUnavailable can't both be 0")
        return self


class ConfigMapKeyRef(_Model):
    """A key in a ConfigMap in the same namespace (an evaluation dataset is data, not a secret)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key within the ConfigMap (data or binaryData).")


# claim/path/in/the/volume: the claim is a DNS-1123 label, then a relative file path (no '..': checked below,
# RE2 has no look-ahead).
EVAL_PVC_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]*[^\s/]$"


class EvaluationDataset(_Model):
    """Where the held-out JSON Lines set is: exactly one of configMapRef and pvc."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.configMapRef) != has(self.pvc)", "message": "set exactly one of configMapRef and pvc"}
    ]})

    configMapRef: ConfigMapKeyRef | None = Field(
        None, description="A ConfigMap key holding the dataset; the operator reads and checks it before any pod."
    )
    pvc: str | None = Field(
        None,
        pattern=EVAL_PVC_PATTERN,
        description=(
            "claim/path/to/file.jsonl in a PersistentVolumeClaim, mounted read-only into the evaluation Job (the "
            "operator checks the claim exists; the Job checks the rows first and fails naming the line)."
        ),
        examples=["eval-data/sets/sentiment.jsonl"],
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluationDataset:
        if (self.configMapRef is None) == (self.pvc is None):
            raise ValueError("set exactly one of configMapRef and pvc")
        if self.pvc is not None and ".." in self.pvc.split("/"):
            raise ValueError(f"pvc path may not contain '..' (got {self.pvc!r})")
        return self


EVAL_METRICS = ("accuracy", "precision", "recall", "f1", "exactMatch", "contains")
GENERATION_EVAL_METRICS = ("exactMatch", "contains")


class EvaluationSpec(_Model):
    """Score every new revision on a held-out set before it takes traffic (docs/evaluation.md). Not part of the
    revision: changing it rolls no pods; it applies to the next revision rolled out."""

    dataset: EvaluationDataset
    metric: Literal["accuracy", "precision", "recall", "f1", "exactMatch", "contains"] | None = Field(
        None,
        description="accuracy | precision | recall | f1 (classification, NER); exactMatch | contains (generation). "
        "Default: f1, or exactMatch for text-generation.",
    )
    average: Literal["macro", "micro", "weighted"] = Field(
        "macro", description="How per-label precision/recall/F1 are averaged (classification and NER)."
    )
    minScore: float = Field(ge=0, le=1, description="Absolute bar: the new revision needs at least this score.")
    maxRegression: float | None = Field(
        None,
        ge=0,
        le=1,
        description="And at most this much below the current revision on the same data (unset: no baseline run).",
    )
    samples: int | None = Field(None, ge=1, le=1_000_000, description="Score only the first N rows.")
    timeoutSeconds: int = Field(
        900, ge=30, le=86_400, description="An evaluation not finished by then rolls back (EvaluationTimeout)."
    )

    def effective_metric(self, task: str) -> str:
        return self.metric or ("exactMatch" if task == "text-generation" else "f1")


class GPTDeploymentSpec(_Model):
    """Desired state of a GPT-style model behind an OpenAI-compatible API."""

    model: ModelSpec
    replicas: int = Field(1, ge=0, description="Replicas; owned by the autoscaler when autoscaling is set.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra=_OBJECT_DEFAULT)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, json_schema_extra=_OBJECT_DEFAULT)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, json_schema_extra=_OBJECT_DEFAULT)
    service: ServiceSpec = Field(default_factory=ServiceSpec, json_schema_extra=_OBJECT_DEFAULT)
    autoscaling: AutoscalingSpec | None = None
    networkPolicy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec, json_schema_extra=_OBJECT_DEFAULT)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, json_schema_extra=_OBJECT_DEFAULT)
    evaluation: EvaluationSpec | None = Field(
        None, description="Gate each new revision on a score on the user's own data (readiness gate gptd.io/evaluated)."
    )


# ---------------------------------------------------------------------------------------------- status

ConditionType = Literal["Ready", "Progressing", "Degraded", "RolledBack", "Evaluated"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class Condition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class RolloutStatus(BaseModel):
    """status.rollout: owned by rollout.py (docs/rollout.md); every field it writes is declared here."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, description="Revision being rolled out (or that was rolled back).")
    phase: Literal["RollingOut", "Canary", "Promoting", "RolledBack", "Failed"] | None = Field(
        None, description="RollingOut, Canary, Promoting; or RolledBack / Failed, kept while the spec asks for it."
    )
    step: int | None = Field(None, description="Canary step index (0-based), or None.")
    startedAt: str | None = Field(None, description="When the rollout started (RFC 3339).")
    progressAt: str | None = Field(None, description="Last progress; the progress deadline counts from here.")
    stepReadyAt: str | None = Field(None, description="When the current canary step became Ready (its pause).")
    readyPods: int | None = Field(None, description="New-revision pods Ready at the last progress.")
    inPlace: bool | None = Field(None, description="Replacing pods one down, one up (no GPU for a surge pod).")
    gpuWait: str | None = Field(None, description="'blocked' while a surge pod waits for a GPU.")
    canaryReplicas: int | None = Field(None, description="Canary pods kept while promoting.")
    analysisUnavailable: str | None = Field(None, description="Why the canary analysis could not be evaluated.")
    reason: str | None = Field(None, description="Why it was rolled back or failed.")
    message: str | None = Field(None, description="The failure, in the cluster's words.")
    evaluationGate: bool | None = Field(
        None, description="The revision's pods carry the gptd.io/evaluated readiness gate (spec.evaluation was set "
        "when it started)."
    )
    evaluationSpec: str | None = Field(
        None, description="After an evaluation failure: the spec.evaluation hash it failed under (a change retries)."
    )
    promoteDeferred: bool | None = Field(
        None, description="gptd.io/promote was set while the first canary step was being evaluated: honoured once "
        "the evaluation passed."
    )


class EvaluationStatus(BaseModel):
    """status.evaluation: the last evaluation of a new revision (docs/evaluation.md)."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, description="The revision scored.")
    key: str | None = Field(
        None, description="Hash of what was scored (dataset, revision, task, metric, average, samples)."
    )
    dataset: str | None = Field(None, description="Dataset identity: ConfigMap key and content hash, or PVC path.")
    specHash: str | None = Field(None, description="Hash of the spec.evaluation it was judged under.")
    metric: str | None = None
    score: float | None = Field(None, description="The new revision's score (the Score printer column).")
    baseline: float | None = Field(None, description="The current revision's score on the same data, if measured.")
    samples: int | None = Field(None, description="Rows scored.")
    passed: bool | None = Field(None, description="Unset while running.")
    finishedAt: str | None = None
    perLabel: dict[str, Any] | None = Field(
        None,
        description="Per-label precision/recall/f1/support (may be trimmed: the Job's result travels in its "
        "4 KiB termination message).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    message: str | None = Field(None, description="Why it failed or what it waits for.")
    startedAt: str | None = Field(
        None, description="When the evaluator Job was first asked for (its timeout counts from the Job's startTime, "
        "else its creationTimestamp, else from here: a suspended or not yet started Job still times out)."
    )
    failedSeen: dict[str, str] | None = Field(
        None, description="Evaluator Jobs seen Failed before their pod's message, by name: when the operator first "
        "saw each so (the 60 s it waits for that message count from here)."
    )


class EvaluationBaseline(BaseModel):
    """status.evaluationBaseline: the current revision's score, measured once per dataset and revision."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="Hash of dataset identity, revision, task, metric, average, samples.")
    revision: str | None = None
    score: float | None = None
    finishedAt: str | None = None
    error: str | None = Field(
        None, description="Why the baseline could not be measured (its Job failed or timed out): not retried in the "
        "rollout that started at rolloutStartedAt, which is judged on minScore alone."
    )
    rolloutStartedAt: str | None = Field(None, description="status.rollout.startedAt of the rollout that failed it.")


class DatasetCheckStatus(BaseModel):
    """status.datasetCheck: the check of a pvc evaluation dataset by its Job, once per file and revision
    (dataset_check.py)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="Hash of the dataset file, revision and task the check is for.")
    revision: str | None = None
    dataset: str | None = Field(None, description="The dataset's identity (claim and file).")
    specHash: str | None = Field(None, description="Hash of spec.evaluation: a failed check is retried on a change.")
    job: str | None = Field(None, description="The check Job while it runs.")
    startedAt: str | None = None
    failedSeenAt: str | None = Field(
        None, description="When the operator first saw the check Job Failed before its pod's message (the 60 s it "
        "waits for that message count from here)."
    )
    passed: bool | None = None
    rows: int | None = Field(None, description="Valid rows (after spec.evaluation.samples).")
    labels: list[str] | None = Field(None, description="The gold labels found (classification and NER).")
    message: str | None = Field(None, description="Why the dataset was refused (the field and the line).")
    finishedAt: str | None = None


class DownloadStatus(BaseModel):
    """status.model.download: the download Job of spec.model.cache for one revision (model_cache.py)."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, description="The gptd revision (hash) being downloaded.")
    modelRevision: str | None = Field(None, description="spec.model.revision of it (branch, tag or sha).")
    modelKey: str | None = Field(None, description="What was downloaded (uri, revision, token reference), hashed: a "
                                                   "runtime-only change of the revision reuses the download.")
    phase: Literal["Downloading", "Complete", "Failed"] | None = None
    display: str | None = Field(None, description='For the Download printer column, e.g. "42% of 15.2GB".')
    bytesDone: int | None = None
    bytesTotal: int | None = None
    percent: int | None = Field(None, description="0-100, floored (100 only when complete).")
    bytesPerSecond: int | None = Field(None, description="Rate between the last two progress readings.")
    etaSeconds: int | None = None
    filesDone: int | None = None
    filesTotal: int | None = None
    sha: str | None = Field(None, description="The commit the revision resolved to (the pods mount <cache>/<sha>).")
    job: str | None = Field(None, description="The download Job.")
    attempt: int | None = Field(None, description="1 for the first Job, +1 per retry after a failed Job.")
    startedAt: str | None = None
    observedAt: str | None = Field(None, description="When bytesDone was read (the rate is computed from it).")
    finishedAt: str | None = Field(None, description="When it completed or (last) failed.")
    jobEndedAt: str | None = Field(None, description="When the operator first saw the Job finished (its pod's report "
                                                     "may arrive a moment later).")
    reason: str | None = Field(None, description="fetch's reason word on failure (Unauthorized, RevisionNotFound...).")
    message: str | None = Field(None, description="The failure, in the hub's or the Job controller's words.")


class ModelStatus(BaseModel):
    """status.model: owned by model_cache.py."""

    model_config = ConfigDict(extra="forbid")

    download: DownloadStatus | None = None


class AutoscalingStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    currentReplicas: int | None = None
    desiredReplicas: int | None = None


class GPTDeploymentStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    observedGeneration: int | None = None
    phase: Phase | None = None
    replicas: int | None = Field(None, description="Pods that exist (scale subresource).")
    desiredReplicas: int | None = None
    readyReplicas: int | None = None
    readyDisplay: str | None = Field(None, description='"ready/desired", e.g. "1/2" (the Ready printer column).')
    updatedReplicas: int | None = None
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    url: str | None = Field(None, description="The Service's in-cluster URL.")
    service: str | None = Field(
        None, description="Name of the Service (the CR's name, or a DNS-1035 form of it: docs/operator.md)."
    )
    currentRevision: str | None = None
    updateRevision: str | None = None
    lastGoodRevision: str | None = None
    failedRevision: str | None = None
    lastGoodTemplate: dict[str, Any] | None = Field(
        None,
        description="The revisioned part of the spec (model, runtime) of lastGoodRevision, for rollback.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    rollout: RolloutStatus | None = None
    evaluation: EvaluationStatus | None = None
    evaluationBaseline: EvaluationBaseline | None = None
    datasetCheck: DatasetCheckStatus | None = None
    model: ModelStatus | None = Field(None, description="The model cache's download (spec.model.cache).")
    autoscaling: AutoscalingStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)


class GPTDeployment(BaseModel):
    """The whole object, for the CRD generator and for documentation."""

    model_config = ConfigDict(extra="allow")

    apiVersion: str = API_VERSION
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: GPTDeploymentSpec
    status: GPTDeploymentStatus | None = None


# ------------------------------------------------------------------------------------------ validation


class InvalidSpec(Exception):
    """A spec the operator refuses; ``field`` is the dotted path users see (e.g. ``spec.model.uri``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _loc(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_spec(spec: dict[str, Any] | None) -> GPTDeploymentSpec:
    """Validate a raw ``spec`` dict; raise ``InvalidSpec`` naming the first bad field."""
    try:
        return GPTDeploymentSpec.model_validate(spec or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        # Validators on a model report the model's own path; name it so the user knows where to look.
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch" and err["loc"][-1:] == ("uri",):
            msg = "must be hf://org/name, pvc://claim/path, s3://bucket/prefix or file:///abs/path"
        value = err.get("input")
        # Never echo what may be a secret pasted in the wrong place (status and Events are widely readable).
        secretish = any(isinstance(p, str) and (p == "env" or p.endswith("SecretRef")) for p in err["loc"])
        if (
            err["type"] != "missing" and not secretish
            and isinstance(value, str | int | float | bool) and len(str(value)) < 200
        ):
            msg += f" (got {value!r})"
        raise InvalidSpec(_loc(tuple(err["loc"])), msg) from None


def is_valid_model_uri(uri: str) -> bool:
    return bool(_MODEL_URI_RE.match(uri))
