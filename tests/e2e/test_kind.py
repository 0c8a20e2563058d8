"""End to end on a kind cluster: the `make demo` path (hack/demo.sh stages), asserted step by step.

Runs only with GPTD_E2E=1 (CI's e2e-kind job; `make test` skips it, saying so), and then needs docker with a
reachable engine and kind: missing either is a failure, not a skip. GPTD_E2E_KEEP=1 keeps the cluster afterwards;
after a failure it is kept in CI (CI=true) or with GPTD_E2E_KEEP_ON_FAILURE=1, for `kind export logs`.
GPTD_E2E_SKIP_BUILD=1 reuses images already built and tagged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.e2e import keep_cluster, requested, why_not_runnable

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hack" / "demo.sh"
CLUSTER = os.environ.get("GPTD_E2E_CLUSTER", "gptd-e2e")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        not requested(os.environ),
        reason="kind e2e runs only with GPTD_E2E=1 (it creates a kind cluster; the e2e-kind job sets it)"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ, CLUSTER=CLUSTER, TAG=os.environ.get("GPTD_E2E_TAG", "e2e"))
    if os.environ.get("GPTD_E2E_SKIP_BUILD") == "1":
        env["SKIP_BUILD"] = "1"
    return env


def demo(*stages: str) -> str:
    proc = subprocess.run([str(DEMO), *stages], cwd=ROOT, env=_env(), capture_output=True, text=True)
    print(proc.stderr)
    assert proc.returncode == 0, f"hack/demo.sh {' '.join(stages)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def kubectl(*args: str) -> str:
    kubectl_bin = shutil.which("kubectl") or subprocess.run(
        [os.environ.get("PYTHON", "python3"), str(ROOT / "hack" / "tools.py"), "kubectl"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    proc = subprocess.run([kubectl_bin, "--context", f"kind-{CLUSTER}", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(request):
    reason = why_not_runnable()
    if reason is not None:
        pytest.fail(f"GPTD_E2E=1 but {reason}")
    failed_before = request.session.testsfailed
    demo("cluster", "images")
    yield
    if not keep_cluster(request.session.testsfailed > failed_before, os.environ):
        demo("down")


def _completion(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no completion JSON in output:\n{stdout}"
    out = json.loads(lines[-1])
    assert out["choices"] and isinstance(out["choices"][0]["text"], str)
    return out


def test_demo_end_to_end(cluster):
    demo("operator")  # helm install --wait + helm test
    demo("model")
    demo("deploy")  # kubectl wait --for=condition=Ready gptd/demo
    gptd = json.loads(kubectl("get", "gptd", "demo", "-o", "json"))
    assert gptd["status"]["phase"] == "Ready"
    assert gptd["status"]["observedGeneration"] == gptd["metadata"]["generation"]
    first = _completion(demo("query"))
    assert first["model"] == "demo"

    demo("scale")
    gptd = json.loads(kubectl("get", "gptd", "demo", "-o", "json"))
    assert gptd["spec"]["replicas"] == 2 and gptd["status"]["readyReplicas"] == 2
    before = gptd["status"]["currentRevision"]

    demo("rollout")  # asserts currentRevision changed and Ready again
    gptd = json.loads(kubectl("get", "gptd", "demo", "-o", "json"))
    assert gptd["status"]["currentRevision"] != before
    assert gptd["status"]["readyReplicas"] == 2
    _completion(demo("query"))

