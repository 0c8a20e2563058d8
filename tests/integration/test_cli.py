"""`python -m gptd_operator` as deployed: a separate process configured only by a kubeconfig and env."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, eventually
from tests.support.scenario import NS, cr

pytestmark = pytest.mark.timeout(90)


async def test_cli_runs_the_operator(cluster: Cluster, kubeconfig: Path, tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GPTD_RUNTIME_IMAGE": "example.org/runtime:test"}
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptd_operator", "--namespace", NS, "--liveness", ""],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        await cluster.create("gptdeployments", NS, cr())
        dep = await eventually(lambda: cluster.get("deployments", NS, "gpt2"), timeout=45, what="Deployment")
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "example.org/runtime:test"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:  # never left behind: it would go on retrying against the emulator this test stops
                proc.kill()
                proc.wait()
            log.close()
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]


def test_cli_without_credentials_says_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "gptd_operator", "--liveness", ""], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("gptd-operator: no Kubernetes credentials: not in a cluster")
    assert str(tmp_path / "missing") in lines[0]
