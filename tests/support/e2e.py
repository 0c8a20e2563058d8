"""Decisions of the kind end-to-end test (tests/e2e/test_kind.py), kept pure so they are tested without a cluster."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping


def requested(env: Mapping[str, str]) -> bool:
    """The kind e2e runs only when asked: `make test` must never start a cluster (GitHub's runners have Docker and
    kind, so "skip when absent" alone would run it in the test job too). CI's e2e-kind job sets GPTD_E2E=1."""
    return env.get("GPTD_E2E") == "1"


def why_not_runnable() -> str | None:
    """None when docker (with an engine) and kind are here, else what is missing."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return "docker is installed but has no reachable engine (`docker info` failed)"
    if shutil.which("kind") is None:
        return "kind is not installed"
    return None


def keep_cluster(failed: bool, env: Mapping[str, str]) -> bool:
    """Whether the fixture leaves the kind cluster behind. GPTD_E2E_KEEP=1: always. After a failure in CI (CI=true,
    which GitHub Actions sets) or with GPTD_E2E_KEEP_ON_FAILURE=1: yes, so the workflow's next steps can run
    `kind export logs` and inspect the cluster (it deletes the cluster itself at the end)."""
    if env.get("GPTD_E2E_KEEP") == "1":
        return True
    return failed and (env.get("CI") == "true" or env.get("GPTD_E2E_KEEP_ON_FAILURE") == "1")
