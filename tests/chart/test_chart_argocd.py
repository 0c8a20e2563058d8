"""The Argo CD health check (manifests/argocd/health.lua), run the way Argo CD runs it: `obj` is the resource as a
Lua table, the script returns {status=..., message=...}."""

from __future__ import annotations

from typing import Any

import lupa
import pytest
import yaml

from tests.support.chart import ROOT, generate

SCRIPT = (ROOT / "manifests" / "argocd" / "health.lua").read_text()


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return result["status"], result["message"]


def cond(ctype: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 3,
    }


def gptd(status: dict[str, Any] | None, generation: int = 3) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "gptd.io/v1alpha1",
        "kind": "GPTDeployment",
        "metadata": {"name": "demo", "namespace": "default", "generation": generation},
        "spec": {"model": {"uri": "pvc://demo-model/demo"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


READY = cond("Ready", "True", "Ready", "2/2 replicas ready")
NOT_PROGRESSING = cond("Progressing", "False", "Complete")
CASES = {
    "no-status": (gptd(None), "Progressing", "Waiting for the operator"),
    "generation-behind": (
        gptd({"observedGeneration": 2, "phase": "Ready", "conditions": [READY]}),
        "Progressing",
        "generation 3",
    ),
    "observed-generation-missing": (gptd({"phase": "Ready", "conditions": [READY]}), "Progressing", "generation"),
    "ready": (
        gptd({"observedGeneration": 3, "phase": "Ready", "conditions": [READY, NOT_PROGRESSING]}),
        "Healthy",
        "2/2 replicas ready",
    ),
    "rolling-out": (
        gptd({
            "observedGeneration": 3,
            "phase": "Progressing",
            "conditions": [READY, cond("Progressing", "True", "RollingOut", "1/2 updated")],
        }),
        "Progressing",
        "RollingOut: 1/2 updated",
    ),
    "starting": (
        gptd({"observedGeneration": 3, "phase": "Pending", "conditions": [cond("Ready", "False", "Starting", "")]}),
        "Progressing",
        "Starting",
    ),
    "conditions-empty": (gptd({"observedGeneration": 3, "conditions": []}), "Progressing", "Waiting for Ready"),
    "degraded": (
        gptd({
            "observedGeneration": 3,
            "phase": "Degraded",
            "conditions": [READY, cond("Degraded", "True", "Unschedulable", "0/3 nodes have nvidia.com/gpu")],
        }),
        "Degraded",
        "Unschedulable: 0/3 nodes",
    ),
    "rolled-back": (
        gptd({
            "observedGeneration": 3,
            "phase": "Ready",
            "conditions": [READY, NOT_PROGRESSING, cond("RolledBack", "True", "ProgressDeadlineExceeded", "r2")],
        }),
        "Degraded",
        "ProgressDeadlineExceeded",
    ),
    "invalid-spec": (
        gptd({
            "observedGeneration": 3,
            "phase": "Failed",
            "conditions": [cond("Ready", "False", "InvalidSpec", "spec.model.uri: must be hf://...")],
        }),
        "Degraded",
        "InvalidSpec: spec.model.uri",
    ),
    "failed-phase": (
        gptd({"observedGeneration": 3, "phase": "Failed", "conditions": [cond("Ready", "False", "CrashLoop", "x")]}),
        "Degraded",
        "CrashLoop",
    ),
    "degraded-false-is-not-degraded": (
        gptd({
            "observedGeneration": 3,
            "phase": "Ready",
            "conditions": [READY, cond("Degraded", "False"), cond("RolledBack", "False")],
        }),
        "Healthy",
        "Ready",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_health(case):
    obj, want_status, want_in_message = CASES[case]
    status, message = health(obj)
    assert status == want_status, message
    assert want_in_message in message


def test_argocd_cm_patch_carries_the_script():
    patch = yaml.safe_load(generate.ARGOCD_PATCH.read_text())
    assert patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"]["resource.customizations.health.gptd.io_GPTDeployment"] == SCRIPT
