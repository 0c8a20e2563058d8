"""The README's quick start matches what the files do: its Python example runs against `serve --demo`, every
`kubectl wait` it (or the delivery docs, samples and demo script) shows is bounded, and the make targets and
files it names exist."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.support.runtime import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SHOWN = [ROOT / "README.md", ROOT / "docs" / "delivery.md", ROOT / "hack" / "demo.sh",
         ROOT / "helm" / "gptd-operator" / "templates" / "NOTES.txt",
         *sorted((ROOT / "manifests" / "samples").glob("*.yaml"))]


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("path", SHOWN, ids=lambda p: p.name)
def test_every_kubectl_wait_shown_has_a_timeout(path):
    text = path.read_text().replace("\\\n", " ")
    lines = text.splitlines()
    if path.suffix == ".sh":  # the script's comments explain; its commands are what runs
        lines = [line for line in lines if not line.lstrip().startswith("#")]
    waits = [line for line in lines if re.search(r"\b(kubectl|kd|k) wait\b", line)]
    for line in waits:
        for cmd in re.split(r"&&|;|\|", line):
            if re.search(r"\b(kubectl|kd|k) wait\b", cmd):
                assert "--timeout" in cmd, f"{path.name}: {cmd.strip()}"


def test_python_example_works_against_serve_demo(tmp_path):
    (block,) = [b for b in _code_blocks(README, "python") if "OpenAI(" in b]
    assert 'base_url="http://localhost:8000/v1"' in block
    server = ServerProcess(["--demo", "--cache-dir", str(tmp_path)])
    try:
        server.wait_ready()
        code = block.replace("http://localhost:8000/v1", f"{server.url}/v1")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md python example", "exec"), {})
        assert out.getvalue().strip(), "the example printed no reply"
    finally:
        server.stop()


def test_make_targets_and_paths_named_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README)) | set(re.findall(r"^make ([a-z][\w-]*)", README, re.M))
    assert {"demo", "test", "images", "images-cpu", "demo-down", "venv", "generate"} <= named
    assert named <= targets, named - targets
    for rel in set(re.findall(r"\b((?:manifests|hack|helm|docs|benchmarks)/[\w./-]+\.(?:yaml|py|sh|md|lua))", README)):
        assert (ROOT / rel).exists(), rel


def test_readme_says_how_to_build_load_and_get_helm():
    assert re.search(r"make images(-cpu)? REGISTRY=\S+", README)
    assert "kind load docker-image" in README
    assert "get-helm" in README and "brew install helm" in README
    for image in ("gptd-operator", "gptd-runtime"):
        assert f"ghcr.io/gptd-io/{image}:" in README
