"""Shared helpers for the delivery tests: pinned helm/kubectl (downloaded once into .cache/tools) and helpers
to render the chart. A failed download is an error, never a skip: CI must prove the chart works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack"
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

import generate  # noqa: E402
import tools  # noqa: E402
import version as versions  # noqa: E402  (hack/version.py)

CHART = ROOT / "helm" / "gptd-operator"
NAMESPACE = "gptd-system"
# Two Kubernetes minors the chart must validate against (oldest supported-ish and the kubectl we ship).
K8S_VERSIONS = ("1.33.0", "1.35.0")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def assert_restricted(pod_spec: dict[str, Any], where: str) -> None:
    """Pod Security Standard "restricted" (v1.33+), the fields gptd pods must set explicitly."""
    psc = pod_spec.get("securityContext") or {}
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), where
    for vol in pod_spec.get("volumes") or []:
        assert "hostPath" not in vol, f"{where}: hostPath volume {vol['name']}"
    for c in [*(pod_spec.get("initContainers") or []), *pod_spec["containers"]]:
        sc = c.get("securityContext") or {}
        name = f"{where}/{c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        assert not sc.get("privileged"), name
        assert (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))) is True, name
        assert sc.get("runAsUser", psc.get("runAsUser")) not in (None, 0), name
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), name
        assert "ports" not in c or all("hostPort" not in p for p in c["ports"]), name


__all__ = ["CHART", "K8S_VERSIONS", "NAMESPACE", "ROOT", "assert_restricted", "by_kind", "generate", "load_docs",
           "one", "run_helm", "tools", "versions"]
