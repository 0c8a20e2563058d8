"""The GitHub workflows as GitHub would run them: which job runs the kind e2e, what happens when it fails, and the
actions they use. Also that `make test`'s pytest skips the kind e2e on a machine that *has* docker and kind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.e2e import keep_cluster, requested
from tests.support.fakes import fake_env, install_fakes

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
FAILED = "failure() || cancelled()"

# Current major versions (late 2026) of the actions the workflows use; older majors run on deprecated Node
# runtimes. Raise these when a new major comes out.
CURRENT_MAJORS = {
    "actions/checkout": 7,
    "actions/setup-python": 7,
    "actions/cache": 6,
    "actions/upload-artifact": 7,
    "docker/setup-qemu-action": 4,
    "docker/setup-buildx-action": 4,
    "docker/login-action": 4,
    "docker/metadata-action": 6,
    "docker/build-push-action": 7,
    "helm/kind-action": 1,
    "azure/setup-helm": 5,
}


def workflow(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job["steps"]


def all_env(wf: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
    env = {**(wf.get("env") or {}), **(job.get("env") or {})}
    for step in steps(job):
        env.update(step.get("env") or {})
    return env


def test_only_the_e2e_kind_job_asks_for_the_kind_e2e():
    wf = workflow("ci.yaml")
    jobs = wf["jobs"]
    assert any("make test" in s.get("run", "") for s in steps(jobs["test"]))
    for name, job in jobs.items():
        env = all_env(wf, job)
        if name == "e2e-kind":
            assert requested(env), "the e2e-kind job must set GPTD_E2E=1"
            assert any("tests/e2e/test_kind.py" in s.get("run", "") for s in steps(job))
        else:
            assert not requested(env), f"job {name} would run the kind e2e"
            assert not any("GPTD_E2E=" in s.get("run", "") for s in steps(job)), f"job {name} sets GPTD_E2E inline"


def test_failed_e2e_keeps_the_cluster_exports_its_logs_and_uploads_them():
    job = workflow("ci.yaml")["jobs"]["e2e-kind"]
    names = [s.get("name", s.get("uses", s.get("run", ""))) for s in steps(job)]
    run_at = next(i for i, s in enumerate(steps(job)) if "tests/e2e/test_kind.py" in s.get("run", ""))
    export_at = next(i for i, s in enumerate(steps(job)) if "kind export logs" in s.get("run", ""))
    upload_at = next(i for i, s in enumerate(steps(job)) if s.get("uses", "").startswith("actions/upload-artifact@"))
    delete_at = next(i for i, s in enumerate(steps(job)) if "kind delete cluster" in s.get("run", ""))
    assert run_at < export_at < upload_at < delete_at, names
    export, upload, delete = steps(job)[export_at], steps(job)[upload_at], steps(job)[delete_at]
    assert export["if"] == FAILED and upload["if"] == FAILED and delete["if"] == "always()"
    out_dir = re.search(r"kind export logs (\S+)", export["run"]).group(1)
    assert out_dir.startswith(upload["with"]["path"].rstrip("/"))
    # The fixture leaves the cluster for those steps: GitHub sets CI=true on every runner.
    assert keep_cluster(True, {"CI": "true", **all_env(workflow("ci.yaml"), job)})
    assert not keep_cluster(False, {"CI": "true"})


def test_keep_cluster_rules():
    assert not keep_cluster(True, {})  # a laptop run cleans up after itself...
    assert keep_cluster(True, {"GPTD_E2E_KEEP_ON_FAILURE": "1"})  # ...unless asked
    assert keep_cluster(False, {"GPTD_E2E_KEEP": "1"})
    assert keep_cluster(True, {"CI": "true"}) and not keep_cluster(False, {"CI": "true"})


def test_the_cuda_runtime_image_is_built_in_ci_after_freeing_disk():
    job = workflow("ci.yaml")["jobs"]["image-cuda"]
    build_at = next(i for i, s in enumerate(steps(job)) if s.get("uses", "").startswith("docker/build-push-action@"))
    build = steps(job)[build_at]["with"]
    assert build["file"] == "runtime/Dockerfile" and build["push"] is False
    # The CUDA variant is the Dockerfile's default: no CPU wheel index passed.
    assert "TORCH_INDEX_URL" not in str(build.get("build-args", ""))
    free_at = next(i for i, s in enumerate(steps(job)) if "rm -rf" in s.get("run", ""))
    assert free_at < build_at


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_actions_are_on_their_current_major(path):
    uses = re.findall(r"uses:\s*([\w.-]+/[\w.-]+)@(\S+)", path.read_text())
    assert uses
    for action, ref in uses:
        assert action in CURRENT_MAJORS, f"{path.name}: {action} not in CURRENT_MAJORS (add its current major)"
        m = re.fullmatch(r"v(\d+)(\.\d+)*", ref)
        assert m, f"{path.name}: {action}@{ref} is not a version tag"
        assert int(m.group(1)) >= CURRENT_MAJORS[action], f"{path.name}: {action}@{ref} is an old major"


def _pytest_kind(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in fake_env(tmp_path, **env).items() if k not in ("GPTD_E2E", "CI")} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "e2e" / "test_kind.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_make_test_skips_the_kind_e2e_on_a_runner_with_docker_and_kind(tmp_path):
    """GitHub's runners have docker (with an engine) and kind: the fakes answer `docker info` like them."""
    install_fakes(tmp_path)
    proc = _pytest_kind(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout and "GPTD_E2E=1" in proc.stdout
    assert not (tmp_path / "log").exists() or "kind" not in (tmp_path / "log").read_text()


def test_asking_for_the_kind_e2e_without_docker_fails_instead_of_skipping(tmp_path):
    install_fakes(tmp_path)
    (tmp_path / "bin" / "docker").write_text("#!/usr/bin/env bash\nexit 1\n")
    proc = _pytest_kind(tmp_path, GPTD_E2E="1", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert proc.returncode != 0
    assert "GPTD_E2E=1 but docker is installed but has no reachable engine" in proc.stdout
