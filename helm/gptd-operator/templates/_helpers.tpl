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
RBAC rules. "framework": what kopf itself needs; "application": what gptd's handlers do.
Namespaced rules (events + application) go into the ClusterRole when watching all namespaces, or into one
Role per watched namespace.
*/}}
{{- define "gptd-operator.namespacedRules" -}}
# framework: kopf posts k8s events about handler progress and errors.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# application: the custom resource; patch covers kopf's finalizer and last-handled-configuration annotation.
- apiGroups: ["gptd.io"]
  resources: ["gptdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["gptd.io"]
  resources: ["gptdeployments/status"]
  verbs: ["patch"]
# application: the children the operator owns.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- if eq .Values.scaleToZeroProvider "keda" }}
# application: KEDA ScaledObjects replace the HPA when autoscaling.minReplicas is 0.
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
# application: pod state (scheduling failures, readiness) for status and rollout decisions.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# application: only checks that referenced Secrets (hfTokenSecretRef, apiKeySecretRef) exist.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}
