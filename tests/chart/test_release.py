"""Images and a chart that exist: the release workflow builds and pushes exactly what the chart, samples and docs
point at, under one version number (hack/version.py), and that number agrees everywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import HACK, ROOT, versions

RELEASE = ROOT / ".github" / "workflows" / "release.yaml"
VERSION = versions.version()


def _release() -> dict[str, Any]:
    return yaml.safe_load(RELEASE.read_text())


def _step(job: dict[str, Any], uses: str) -> dict[str, Any]:
    (step,) = [s for s in job["steps"] if s.get("uses", "").startswith(uses + "@")]
    return step


def test_everything_names_the_one_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    assert versions.mismatches(VERSION) == []
    proc = subprocess.run([sys.executable, str(HACK / "version.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == VERSION, proc.stderr


def _copy_followers(tmp: Path) -> Path:
    for path, _ in versions.FOLLOWERS:
        target = tmp / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return tmp


@pytest.mark.parametrize(
    ("rel", "old", "new"),
    [
        ("helm/gptd-operator/Chart.yaml", f'appVersion: "{VERSION}"', 'appVersion: "9.9.9"'),
        ("helm/gptd-operator/Chart.yaml", f"version: {VERSION}\n", "version: 9.9.9\n"),
        ("helm/gptd-operator/values.yaml", f"gptd-runtime:{VERSION}", "gptd-runtime:9.9.9"),
        ("helm/gptd-operator/values.yaml", 'tag: ""', 'tag: "9.9.9"'),
        ("manifests/samples/cpu.yaml", f"gptd-runtime:{VERSION}-cpu", "gptd-runtime:9.9.9-cpu"),
        ("operator/gptd_operator/settings.py", f"gptd-runtime:{VERSION}", "gptd-runtime:9.9.9"),
        ("docs/delivery.md", f"targetRevision: {VERSION}", "targetRevision: 9.9.9"),
        ("docs/delivery.md", f"tag: {VERSION}\n", "tag: 9.9.9\n"),
        ("README.md", f"--version {VERSION}", "--version 9.9.9"),
    ],
)
def test_a_follower_that_disagrees_is_reported(tmp_path, rel, old, new):
    root = _copy_followers(tmp_path)
    path = root / rel
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    bad = versions.mismatches(VERSION, root)
    assert bad and any(rel.split("/")[-1] in b for b in bad), bad


def test_set_version_moves_every_follower(tmp_path):
    root = _copy_followers(tmp_path)
    changed = versions.set_version("9.8.7", root)
    assert {p.relative_to(root) for p in changed} >= {Path("pyproject.toml"), Path("helm/gptd-operator/Chart.yaml")}
    assert versions.version(root / "pyproject.toml") == "9.8.7"
    assert versions.mismatches("9.8.7", root) == []
    for path, _ in versions.FOLLOWERS:
        assert f"gptd-runtime:{VERSION}" not in (root / path.relative_to(ROOT)).read_text(), path


def test_release_runs_on_version_tags_and_checks_the_tag():
    wf = _release()
    assert wf[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1: the key `on` loads as True
    run = "\n".join(s.get("run", "") for s in wf["jobs"]["version"]["steps"])
    assert "hack/version.py --check" in run and '"$GITHUB_REF_NAME" != "v$version"' in run
    for name, job in wf["jobs"].items():
        if name != "version":
            assert "version" in (job["needs"] if isinstance(job["needs"], list) else [job["needs"]]), name


def _expand_env(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{\{ env\.(\w+) \}\}", lambda m: env[m.group(1)], value)


def test_release_pushes_the_images_the_chart_and_samples_name():
    wf = _release()
    registry = wf["env"]["REGISTRY"]
    out = "${{ needs.version.outputs.version }}"
    op = _step(wf["jobs"]["operator"], "docker/build-push-action")["with"]
    op["tags"] = _expand_env(op["tags"], wf["env"])
    assert op["file"] == "operator/Dockerfile" and op["push"] is True
    assert set(op["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}  # multi-arch
    assert op["tags"] == f"{registry}/gptd-operator:{out}"
    rt_job = wf["jobs"]["runtime"]
    rt = _step(rt_job, "docker/build-push-action")["with"]
    rt["tags"] = _expand_env(rt["tags"], wf["env"])
    assert rt["file"] == "runtime/Dockerfile" and rt["push"] is True
    assert rt["tags"] == f"{registry}/gptd-runtime:{out}${{{{ matrix.suffix }}}}"
    variants = {v["variant"]: v for v in rt_job["strategy"]["matrix"]["include"]}
    assert variants["cuda"]["suffix"] == "" and "/whl/cu" in variants["cuda"]["torch_index"]
    assert variants["cpu"]["suffix"] == "-cpu" and variants["cpu"]["torch_index"].endswith("/whl/cpu")
    assert rt["build-args"] == "TORCH_INDEX_URL=${{ matrix.torch_index }}"
    for build in (op, rt):  # attestations on every pushed image
        assert build["sbom"] is True and build["provenance"] == "mode=max"
    # What that produces is what the chart, operator and samples default to.
    values = yaml.safe_load((ROOT / "helm" / "gptd-operator" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "gptd-operator" / "Chart.yaml").read_text())
    produced = {f"{registry}/gptd-operator:{VERSION}", f"{registry}/gptd-runtime:{VERSION}",
                f"{registry}/gptd-runtime:{VERSION}-cpu"}
    assert f"{values['image']['repository']}:{chart['appVersion']}" in produced
    assert values["runtime"]["image"] == f"{registry}/gptd-runtime:{VERSION}"
    named = set()
    for path in [*(ROOT / "manifests" / "samples").glob("*.yaml"), ROOT / "README.md", ROOT / "docs" / "delivery.md"]:
        named |= set(re.findall(r"ghcr\.io/gptd-io/gptd-[a-z]+:[0-9][\w.-]*", path.read_text()))
    assert named and named <= produced, named - produced


def test_release_pushes_the_chart_where_the_docs_install_it_from():
    wf = _release()
    job = wf["jobs"]["chart"]
    assert set(job["needs"]) == {"version", "operator", "runtime"}  # the images exist before the chart
    run = "\n".join(s.get("run", "") for s in job["steps"])
    assert 'helm package helm/gptd-operator --destination dist --version "$VERSION" --app-version "$VERSION"' in run
    assert 'helm push "dist/gptd-operator-$VERSION.tgz" "$CHART_REPO"' in run
    repo = wf["env"]["CHART_REPO"]
    assert repo == "oci://ghcr.io/gptd-io/charts"
    readme = (ROOT / "README.md").read_text()
    assert f"helm install gptd {repo}/gptd-operator --version {VERSION}" in readme
    delivery = (ROOT / "docs" / "delivery.md").read_text()
    assert f"url: {repo}/gptd-operator" in delivery  # Flux OCIRepository
    assert f"repoURL: {repo.removeprefix('oci://')}\n" in delivery and "chart: gptd-operator" in delivery  # Argo CD
