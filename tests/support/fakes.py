"""Fake docker / kind / helm / kubectl binaries for running hack/demo.sh without a cluster.

Each fake appends "NAME ARGS..." to $FAKE_LOG and keeps its state under $FAKE_DIR. They behave like the real
tools where the demo has been bitten:

* helm answers like Helm 3 (GitHub's ubuntu runners ship the latest 3.x): `helm test --logs` fails after a
  passing test pod carrying `hook-succeeded` was deleted (only Helm >= 4.1 fetches the logs first);
  FAKE_HELM_VERSION picks the version, FAKE_HELM_TEST_FAIL=1 makes the test pod fail.
* docker answers like Docker 29 with the containerd image store: `docker build` without `--provenance=false`
  stores an OCI index (image + provenance attestation), and kind's `load docker-image` fails on it the way
  `ctr images import` does.
* kubectl answers like a cluster whose operator works: Jobs complete (FAKE_JOB_STATE=Failed fails them), the
  GPTDeployment's currentRevision moves from rev-1 to rev-2 after a few reads (FAKE_REVISIONS overrides the
  sequence; the last entry repeats).
"""

from __future__ import annotations

import os
from pathlib import Path

FAKE_KUBECTL = r"""#!/usr/bin/env bash
echo "kubectl $*" >> "$FAKE_LOG"
args=" $* "
case "$args" in
  *" apply -f - "*) cat >> "$FAKE_DIR/applied.yaml"; exit 0 ;;
  *" create namespace "*) echo "apiVersion: v1"; echo "kind: Namespace"; exit 0 ;;
  *"{.metadata.generation}"*) printf 2; exit 0 ;;
  *" get job demo-model "*) printf '%s ' "${FAKE_JOB_STATE:-Complete}"; exit 0 ;;
  *" logs "*) echo "fake log line of $*"; exit 0 ;;
  *"{.status.currentRevision}"*)
    n=$(cat "$FAKE_DIR/revision-reads" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$FAKE_DIR/revision-reads"
    set -- ${FAKE_REVISIONS:-rev-1 rev-1 rev-1 rev-2}
    shift $(( n < $# - 1 ? n : $# - 1 ))
    printf '%s' "$1"; exit 0 ;;
  *"{.status.url}"*) printf http://demo.default.svc.cluster.local:8000; exit 0 ;;
  *" run gptd-demo-client "*) echo '{"model": "demo", "choices": [{"text": "lorem"}]}'; exit 0 ;;
esac
exit 0
"""

FAKE_HELM = r"""#!/usr/bin/env bash
echo "helm $*" >> "$FAKE_LOG"
version=${FAKE_HELM_VERSION:-v3.19.0}
args=" $* "
case "$args" in
  *" version"*) echo "$version+g0000000"; exit 0 ;;
  *" test "*)
    echo "NAME: gptd"; echo "TEST SUITE:     gptd-operator-test-liveness"
    if [ "${FAKE_HELM_TEST_FAIL:-}" = 1 ]; then
      echo "Phase:          Failed"
      echo "Error: 1 error occurred:" >&2
      echo "	* pod gptd-operator-test-liveness failed" >&2
      exit 1
    fi
    echo "Phase:          Succeeded"
    case "$args" in
      *" --logs "*)
        case "$version" in
          v3.*|v4.0.*)
            pod=gptd-operator-test-liveness
            echo "Error: unable to get pod logs for $pod: pods \"$pod\" not found" >&2
            exit 1 ;;
        esac
        echo "POD LOGS: gptd-operator-test-liveness" ;;
    esac
    exit 0 ;;
esac
exit 0
"""

FAKE_DOCKER = r"""#!/usr/bin/env bash
echo "docker $*" >> "$FAKE_LOG"
mkdir -p "$FAKE_DIR/images"
case "$1" in
  info) exit 0 ;;
  build)
    kind=index  # Docker 29, containerd store: provenance attestation on by default -> an OCI index
    tag=""
    while [ $# -gt 0 ]; do
      case "$1" in
        --provenance=false) kind=image ;;
        -t) shift; tag=$1 ;;
      esac
      shift
    done
    [ -n "$tag" ] || { echo "fake docker: build without -t" >&2; exit 2; }
    echo "$kind" > "$FAKE_DIR/images/$(printf '%s' "$tag" | tr '/:' '__')"
    exit 0 ;;
esac
exit 0
"""

FAKE_KIND = r"""#!/usr/bin/env bash
echo "kind $*" >> "$FAKE_LOG"
case "$1 $2" in
  "get clusters") cat "$FAKE_DIR/clusters" 2>/dev/null; exit 0 ;;
  "create cluster") exit 0 ;;
  "delete cluster") exit 0 ;;
  "load docker-image")
    shift 2
    while [ $# -gt 0 ]; do
      case "$1" in
        --name) shift ;;
        *)
          state=$(cat "$FAKE_DIR/images/$(printf '%s' "$1" | tr '/:' '__')" 2>/dev/null || echo missing)
          if [ "$state" = missing ]; then
            echo "ERROR: image: \"$1\" not present locally" >&2; exit 1
          fi
          if [ "$state" = index ]; then
            ctr="ctr --namespace=k8s.io images import --all-platforms --digests --snapshotter=overlayfs -"
            echo "ERROR: failed to load image: command \"docker exec --privileged -i t-control-plane $ctr\"" \
              "failed with error: exit status 1" >&2
            echo "ctr: content digest sha256:0123456789abcdef: not found" >&2
            exit 1
          fi ;;
      esac
      shift
    done
    exit 0 ;;
esac
exit 0
"""

# Stands in for `python3 hack/tools.py` (the demo's way to fetch helm/kubectl): records that it was asked.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
echo "fake python: no downloads in this test" >&2
exit 1
"""

# GNU coreutils' `timeout` is not on macOS: any use of it must fail the test.
NO_TIMEOUT = r"""#!/usr/bin/env bash
echo "timeout $*" >> "$FAKE_LOG"
echo "bash: timeout: command not found" >&2
exit 127
"""

FAKES = {"kubectl": FAKE_KUBECTL, "helm": FAKE_HELM, "docker": FAKE_DOCKER, "kind": FAKE_KIND,
         "timeout": NO_TIMEOUT}


def install_fakes(tmp: Path, names: tuple[str, ...] = tuple(FAKES)) -> Path:
    """Write the fakes into tmp/bin (plus a recording fake python at tmp/python); return tmp/bin."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(FAKES[name])
        path.chmod(0o755)
    python = tmp / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return bin_dir


def built_image(tmp: Path, tag: str, kind: str = "image") -> None:
    """Pretend `docker build` made TAG earlier (kind "image" or "index")."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    (images / tag.replace("/", "_").replace(":", "_")).write_text(kind + "\n")


def fake_env(tmp: Path, **env: str) -> dict[str, str]:
    defaults = {"CLUSTER": "t", "WAIT_TIMEOUT": "20s", "POLL_SECONDS": "0"}
    return {
        **os.environ,
        "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp / "log"),
        "FAKE_DIR": str(tmp),
        "PYTHON": str(tmp / "python"),
        **defaults,
        **env,
    }
