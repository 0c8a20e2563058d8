"""The Makefile's delivery targets, as `make -n` prints them (no Docker needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_n(*args: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    # Join continuation lines: one command per entry.
    return [" ".join(c.split()) for c in proc.stdout.replace("\\\n", " ").splitlines() if c.strip()]


def test_images_builds_operator_cuda_and_cpu_runtime_for_any_registry():
    builds = [c for c in make_n("images", "REGISTRY=registry.example/me", "TAG=1.2.3") if "docker build" in c]
    assert len(builds) == 3
    by_tag = {c.split(" -t ")[1].split()[0]: c for c in builds}
    assert set(by_tag) == {"registry.example/me/gptd-operator:1.2.3", "registry.example/me/gptd-runtime:1.2.3",
                           "registry.example/me/gptd-runtime:1.2.3-cpu"}
    # kind can load them (no provenance index), and only the -cpu variant uses the CPU wheels.
    assert all("--provenance=false" in c for c in builds)
    assert "whl/cpu" in by_tag["registry.example/me/gptd-runtime:1.2.3-cpu"]
    assert "TORCH_INDEX_URL" not in by_tag["registry.example/me/gptd-runtime:1.2.3"]


def test_demo_uses_the_cpu_runtime_image_and_down_downloads_nothing():
    (demo,) = make_n("demo", "TAG=x")
    assert "RUNTIME_IMAGE=ghcr.io/gptd-io/gptd-runtime:x-cpu" in demo and demo.endswith("hack/demo.sh all")
    assert make_n("demo-down") == ["hack/demo.sh down"]
