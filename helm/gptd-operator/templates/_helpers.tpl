{{/* Chart name. */}}
{{- define "gptd-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart; the release name when it contains the chart name; the chart name when the
chart name starts with the release name (release "gptd" -> "gptd-operator"). */}}
{{- define "gptd-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else if hasPrefix .Release.Name $name -}}
{{- $name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gptd-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gptd-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gptd-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gptd-operator.labels" -}}
helm.sh/chart: {{ include "gptd-operator.chart" . }}
{{ include "gptd-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gptd
{{- end -}}

{{/* The `helm test` pod's labels: not the operator's selector labels, so the Service it probes never routes to
the test pod itself, and component=test lets scripts find it (hack/demo.sh prints its logs on failure). */}}
{{- define "gptd-operator.testLabels" -}}
helm.sh/chart: {{ include "gptd-operator.chart" . }}
app.kubernetes.io/name: {{ include "gptd-operator.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gptd
{{- end -}}

{{- define "gptd-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gptd-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gptd-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Pod- and container-level security context: Pod Security Standard "restricted". */}}
{{- define "gptd-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gptd-operator.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
RBAC rules: exactly the API calls in docs/operator.md ("RBAC needs"). "kopf": the framework's own calls;
"gptd": the operator's handlers (kube.py). All writes are merge patches: no `update` anywhere. They go into
the ClusterRole when watching all namespaces, or into one Role per watched namespace.
*/}}
{{- define "gptd-operator.namespacedRules" -}}
# kopf + gptd: Events on GPTDeployments (POST core/v1 events; never patched).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# kopf: list/watch the CRs and patch its progress/diff-base annotations; gptd: get (does the CR still exist
# before creating a child) and patch (clearing the gptd.io/promote and gptd.io/abort annotations).
- apiGroups: ["gptd.io"]
  resources: ["gptdeployments"]
  verbs: ["list", "watch", "get", "patch"]
- apiGroups: ["gptd.io"]
  resources: ["gptdeployments/status"]
  verbs: ["patch"]
# The children's ownerReferences set blockOwnerDeletion: where the OwnerReferencesPermissionEnforcement admission
# plugin is on (OpenShift), that needs update on the owner's finalizers subresource (gptd never sets finalizers).
- apiGroups: ["gptd.io"]
  resources: ["gptdeployments/finalizers"]
  verbs: ["update"]
# gptd: the children (watched through kopf indices; get only after a create conflict; delete for the canary
# Deployment, a PDB when replicas drop to 1, an HPA when autoscaling is removed).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
# gptd: the NetworkPolicy of spec.networkPolicy (watched; deleted when networkPolicy.enabled turns false).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
# gptd: the cert-manager Certificate of spec.service.tls.issuerRef (read live, not watched: the cert-manager CRD
# may be absent, and then this rule grants nothing). Not the Secret cert-manager writes: the pods mount it.
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["get", "create", "patch", "delete"]
# gptd: the Service is never deleted by the operator (garbage collection does it with the CR).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "get", "create", "patch"]
# gptd: runtime pods (watched) for Degraded detection: scheduling failures, crash loops; and the pods of its
# Jobs (watched) for their exit code and termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# gptd: the evaluation gate sets the gptd.io/evaluated condition (a readiness gate) on runtime pods that passed.
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
# gptd: the evaluation dataset of spec.evaluation.dataset.configMapRef, read (and checked) before a gated rollout
# starts; a dataset is data, not a secret (no Secrets are read).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# gptd: the last lines of a running download Job's pod log: fetch's JSON progress lines (status.model.download).
# Scope as every rule here: cluster-wide by default (any pod's log), per namespace with watchNamespaces; see
# docs/operator.md.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# gptd: one-off Jobs (the model download of spec.model.cache, the evaluation), watched; deleted when cancelled
# (a spec change) or superseded.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# gptd: the model cache's PersistentVolumeClaim (watched). No delete: gptd never deletes a claim (the garbage
# collector does, with the CR, through the ownerReference; a retained one is the user's).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# No Secrets: the pods read them by reference; a missing one is reported from the pod's status.
{{- if eq .Values.scaleToZeroProvider "keda" }}
# gptd, only with scaleToZeroProvider=keda: the ScaledObject that replaces the HPA for minReplicas 0
# (read live, not watched: the KEDA CRD may be absent).
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
{{- end -}}
