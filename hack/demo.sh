#!/usr/bin/env bash
# gptd end-to-end demo on kind: the path a new user takes, on a laptop with Docker and kind.
#
#   hack/demo.sh all        # = cluster images operator model deploy query scale rollout query
#   hack/demo.sh STAGE...   # run some stages (each is idempotent), e.g. `hack/demo.sh deploy query`
#   hack/demo.sh down       # delete the cluster
#
# Needs docker (with a running engine) and kind on PATH. helm (3.x or 4.x) and kubectl are taken from PATH, or
# else the pinned ones from hack/tools.py (downloaded into .cache/tools; linux and macOS, x86-64 and arm64).
# Runs on macOS's /bin/bash 3.2: no bash-4 features (hack/demo.sh is linted for them in tests/e2e) and no GNU
# coreutils (`timeout`); waits are kubectl's own --timeout or a deadline on bash's SECONDS.
# Settings (env): CLUSTER (gptd-demo), TAG (dev), OPERATOR_IMAGE, RUNTIME_IMAGE (the CPU variant, `-cpu`),
# DEMO_NAMESPACE (default), OPERATOR_NAMESPACE (gptd-system), WAIT_TIMEOUT (10m), KIND_NODE_IMAGE (kind's default),
# SKIP_BUILD=1, TORCH_INDEX_URL (the CPU wheels: kind has no GPU, and the CUDA image is several GB bigger).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-gptd-demo}
TAG=${TAG:-dev}
REGISTRY=${REGISTRY:-ghcr.io/gptd-io}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-$REGISTRY/gptd-operator:$TAG}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-$REGISTRY/gptd-runtime:$TAG-cpu}
DEMO_NAMESPACE=${DEMO_NAMESPACE:-default}
OPERATOR_NAMESPACE=${OPERATOR_NAMESPACE:-gptd-system}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-10m}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RELEASE=gptd

log() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

tool() {  # tool NAME: from PATH, else the pinned binary from hack/tools.py
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; else "$PYTHON" hack/tools.py "$1"; fi
}
# Resolved only before a stage that talks to the cluster, so `down` (and a typo'd stage) never downloads anything.
HELM_BIN=${HELM:-}
KUBECTL_BIN=${KUBECTL:-}
resolve_tools() {
  [ -n "$HELM_BIN" ] || HELM_BIN=$(tool helm) || die "no helm on PATH and hack/tools.py could not fetch one"
  [ -n "$KUBECTL_BIN" ] || KUBECTL_BIN=$(tool kubectl) || die "no kubectl on PATH and hack/tools.py could not fetch one"
}
helm_() { "$HELM_BIN" --kube-context "kind-$CLUSTER" "$@"; }
k() { "$KUBECTL_BIN" --context "kind-$CLUSTER" "$@"; }
kd() { k -n "$DEMO_NAMESPACE" "$@"; }

seconds_of() {  # seconds_of 10m|90s|1h|120 -> seconds (kubectl's duration syntax, the common forms)
  case "$1" in
    *h) echo $(( ${1%h} * 3600 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *[!0-9]*|'') die "WAIT_TIMEOUT must look like 10m, 90s, 1h or a number of seconds (got '$1')" ;;
    *) echo "$1" ;;
  esac
}
WAIT_SECONDS=$(seconds_of "$WAIT_TIMEOUT")
POLL_SECONDS=${POLL_SECONDS:-2}

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
    log "creating kind cluster $CLUSTER (one node: the demo model's PVC is ReadWriteOnce)"
    kind create cluster --name "$CLUSTER" --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  fi
}

stage_images() {
  require_docker_kind
  if [ "${SKIP_BUILD:-}" != 1 ]; then
    log "building $OPERATOR_IMAGE and $RUNTIME_IMAGE (CPU torch)"
    # --provenance=false: with Docker's containerd image store a provenance attestation turns the image into an
    # OCI index, which `kind load docker-image` cannot import.
    docker build --provenance=false -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
    docker build --provenance=false -f runtime/Dockerfile --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
      -t "$RUNTIME_IMAGE" .
  fi
  log "loading images into kind"
  kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE"
}

stage_operator() {
  log "installing the operator with helm into $OPERATOR_NAMESPACE"
  k create namespace "$OPERATOR_NAMESPACE" --dry-run=client -o yaml | k apply -f -
  k label namespace "$OPERATOR_NAMESPACE" --overwrite pod-security.kubernetes.io/enforce=restricted
  helm_ upgrade --install "$RELEASE" helm/gptd-operator \
    --namespace "$OPERATOR_NAMESPACE" \
    --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
    --set image.pullPolicy=IfNotPresent \
    --set runtime.image="$RUNTIME_IMAGE" \
    --wait --timeout 5m
  # No `--logs`: the test pod is deleted once it succeeds (hook-succeeded), and Helm 3 and 4.0 fetch the logs
  # after that, failing with "unable to get pod logs". A failed test pod is kept, so print its logs ourselves.
  if ! helm_ test "$RELEASE" --namespace "$OPERATOR_NAMESPACE" --timeout 3m; then
    k -n "$OPERATOR_NAMESPACE" logs -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=test" \
      --tail=50 || true
    k -n "$OPERATOR_NAMESPACE" logs deploy/gptd-operator --tail=50 || true
    die "helm test $RELEASE failed (the test pod's and the operator's logs are above)"
  fi
}

job_state() {  # job_state NAME: Complete, Failed or "" (not finished yet)
  local types
  types=$(kd get job "$1" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
  case " $types " in
    *" Failed "*) echo Failed ;;
    *" Complete "*) echo Complete ;;
    *) echo "" ;;
  esac
}

stage_model() {
  # The Job writes /models/demo on the PVC; the operator serves pvc://demo-model/demo from
  # file:///models/demo-model/demo (the claim mounted read-only at /models/<claim>), model name "demo".
  local state="" deadline
  log "building the tiny demo model into PVC demo-model (Job running: python -m gptd_runtime build-demo)"
  k create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | k apply -f -
  # A Job's pod template is immutable: re-running this stage (e.g. with another TAG) replaces the Job. The PVC
  # stays, and build-demo reuses a model already built there.
  # Foreground: the old pod is gone (no longer writing the PVC) before the new Job starts.
  kd delete job demo-model --ignore-not-found --cascade=foreground --wait
  sed "s|image: ghcr.io/gptd-io/gptd-runtime:.*|image: $RUNTIME_IMAGE|" manifests/samples/demo-model.yaml \
    | kd apply -f -
  # Wait for Complete *or* Failed (`kubectl wait --for=condition=complete` would sit out the whole timeout on a
  # failed Job).
  deadline=$((SECONDS + WAIT_SECONDS))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(job_state demo-model)
    [ -z "$state" ] || break
    sleep "$POLL_SECONDS"
  done
  [ "$state" = Complete ] && return 0
  kd logs job/demo-model --tail=50 || true
  [ "$state" = Failed ] && die "demo model job failed (its logs are above)"
  die "demo model job did not finish within $WAIT_TIMEOUT"
}

stage_deploy() {
  log "applying manifests/samples/cpu.yaml (GPTDeployment demo, CPU, image $RUNTIME_IMAGE)"
  sed "s|image: ghcr.io/gptd-io/gptd-runtime:.*|image: $RUNTIME_IMAGE|" manifests/samples/cpu.yaml | kd apply -f -
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
  # Two replicas on kind's single node share the ReadWriteOnce demo PVC; on a multi-node cluster that needs a
  # ReadWriteMany storage class (docs/delivery.md).
  log "kubectl scale gptd/demo --replicas=2"
  kd scale gptd/demo --replicas=2
  kd wait --for=jsonpath='{.status.readyReplicas}'=2 gptd/demo --timeout="$WAIT_TIMEOUT"
  wait_ready
  kd get gptd demo
}

wait_revision_change() {  # wait_revision_change OLD: print status.currentRevision once it is set and not OLD
  local old=$1 now deadline
  deadline=$((SECONDS + WAIT_SECONDS))
  while [ "$SECONDS" -lt "$deadline" ]; do
    now=$(kd get gptd demo -o jsonpath='{.status.currentRevision}')
    if [ -n "$now" ] && [ "$now" != "$old" ]; then
      printf '%s\n' "$now"
      return 0
    fi
    sleep "$POLL_SECONDS"
  done
  return 1
}

stage_rollout() {
  local before after
  before=$(kd get gptd demo -o jsonpath='{.status.currentRevision}')
  log "rolling out a new revision (spec.runtime.maxNewTokens 64 -> 48); current revision: ${before:-?}"
  kd patch gptd demo --type merge -p '{"spec":{"runtime":{"maxNewTokens":48}}}'
  after=$(wait_revision_change "$before") \
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
    all|operator|model|deploy|query|scale|rollout) resolve_tools ;;
  esac
  case "$stage" in
    all) for s in cluster images operator model deploy query scale rollout query; do "stage_$s"; done
         log "done. Try: kubectl --context kind-$CLUSTER get gptd; tear down with: make demo-down" ;;
    cluster|images|operator|model|deploy|query|scale|rollout|down) "stage_$stage" ;;
    *) die "unknown stage $stage (all cluster images operator model deploy query scale rollout down)" ;;
  esac
done
