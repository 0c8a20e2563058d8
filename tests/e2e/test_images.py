"""The Dockerfiles without Docker: one torch pin, dependency layers before the source, the same digest-pinned base
image, and the demo model baked where a pod can see it (checked by really building and serving it read-only)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from gptd_operator import builders
from gptd_operator.api import parse_spec
from gptd_operator.settings import Settings

from tests.support.chart import generate
from tests.support.dockerfile import DIGEST, arg_defaults, env, instructions, runs

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "Dockerfile"
RUNTIME = ROOT / "runtime" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_both_images_use_the_same_base_pinned_by_digest():
    bases = {path.name + path.parent.name: arg_defaults(path)["PYTHON_IMAGE"] for path in (OPERATOR, RUNTIME)}
    assert len(set(bases.values())) == 1, bases
    (base,) = set(bases.values())
    assert DIGEST.match(base), f"{base} is not pinned by digest"
    for path in (OPERATOR, RUNTIME):
        froms = [rest for word, rest in instructions(path) if word == "FROM"]
        assert froms and all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), (path, froms)


def test_torch_is_pinned_only_in_pyproject():
    (pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["runtime"] if d.startswith("torch")]
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin)
    for path in (OPERATOR, RUNTIME):
        text = path.read_text()
        assert "TORCH_VERSION" not in text and not re.search(r"torch==", text), f"{path}: a second torch pin"
    # The runtime installs the export of pyproject (holding the pin) as requirements *and* constraints, from
    # the chosen wheel index, so an override of the index can't make pip resolve another torch from PyPI.
    (dep_run,) = [r for r in runs(RUNTIME) if "/tmp/requirements.txt" in r]
    assert "-r /tmp/requirements.txt" in dep_run and "-c /tmp/requirements.txt" in dep_run
    assert '--index-url "${TORCH_INDEX_URL}"' in dep_run
    assert pin in generate.REQUIREMENTS["runtime"].read_text().splitlines()
    assert arg_defaults(RUNTIME)["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")


@pytest.mark.parametrize("extra", ["operator", "runtime"])
def test_requirements_export_is_fresh(extra):
    path = generate.REQUIREMENTS[extra]
    assert path.read_text() == generate.render_requirements(extra), f"{path} is stale: run `make generate`"


@pytest.mark.parametrize(("path", "extra"), [(OPERATOR, "operator"), (RUNTIME, "runtime")], ids=["operator", "runtime"])
def test_dependencies_are_installed_before_the_source_is_copied(path, extra):
    steps = instructions(path)
    req = f"hack/requirements/{extra}.txt"
    copy_req = next(i for i, (w, r) in enumerate(steps) if w == "COPY" and r.startswith(req + " "))
    install_deps = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "-r /tmp/requirements.txt" in r)
    copy_src = next(i for i, (w, r) in enumerate(steps) if w == "COPY" and r.startswith(f"{extra}/ "))
    install_pkg = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "pip install --no-deps ." in r)
    assert copy_req < install_deps < copy_src < install_pkg
    # Nothing of the source reaches the build before the dependency layer.
    assert not [r for w, r in steps[:install_deps] if w in ("COPY", "ADD") and not r.startswith(req + " ")]
    for word, rest in steps:
        if word == "RUN" and "pip install" in rest:
            assert "--mount=type=cache,target=/root/.cache/pip" in rest, rest
    # The build context carries the export (hack/ is otherwise ignored).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "hack/*" in ignore and "!hack/requirements" in ignore and "!hack/requirements/*.txt" in ignore


def _pod_mounts() -> set[str]:
    """Every path the operator mounts into a runtime pod (a pvc:// model and an API key: the most volumes)."""
    spec = parse_spec({"model": {"uri": "pvc://m/x"}, "runtime": {"apiKeySecretRef": {"name": "k", "key": "k"}}})
    dep = builders.build_deployment("d", "ns", "uid", spec, Settings())
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert not any(e["name"] == "GPTD_CACHE_DIR" for e in c["env"])  # the image's value reaches the runtime
    return {m["mountPath"] for m in c["volumeMounts"]}


def test_demo_model_is_baked_where_no_pod_volume_hides_it():
    cache = env(RUNTIME)["GPTD_CACHE_DIR"]
    assert cache != env(RUNTIME)["HF_HOME"]
    bake = [r for r in runs(RUNTIME) if "build-demo" in r]
    assert len(bake) == 1 and '"$GPTD_CACHE_DIR/demo/$task"' in bake[0]
    for task in ("text-generation", "text-classification", "token-classification"):
        assert task in bake[0]
    # Baked as root before USER: read-only for uid 10001.
    steps = instructions(RUNTIME)
    assert steps.index(("RUN", bake[0])) < next(i for i, (w, _) in enumerate(steps) if w == "USER")
    for mount in _pod_mounts():
        assert not (cache + "/").startswith(mount.rstrip("/") + "/"), f"pod mounts {mount} over {cache}"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_serve_demo_uses_a_read_only_baked_model(tmp_path):
    """As in the image: build-demo into GPTD_CACHE_DIR/demo/<task>, then `--demo` with that GPTD_CACHE_DIR finds
    it and writes nothing there (a read-only path in the pod)."""
    from gptd_runtime.__main__ import main as runtime_main
    from gptd_runtime.config import load_settings
    from gptd_runtime.loading import resolve_model_dir

    cache = tmp_path / "demo-cache"
    target = cache / "demo" / "text-generation"
    # The Dockerfile's bake command line, in-process (saves a torch import).
    runtime_main(["build-demo", str(target), "--task", "text-generation"])
    before = _snapshot(cache)
    settings = load_settings({"demo": True}, env={"GPTD_CACHE_DIR": str(cache), "HF_HOME": str(tmp_path / "hf")})
    assert resolve_model_dir(settings) == target
    assert _snapshot(cache) == before
    assert not (tmp_path / "hf").exists()


def test_operator_image_smoke_import_names_only_what_the_image_installs():
    """The build's `python -c "import ..."` check must import what the image has: its own packages (gptd_operator
    with its handlers, which pull in every runtime dependency, and gptd_common) and the exported requirements. (It
    named `kubernetes` after kube.py moved to lightkube: the build would have failed there.)"""
    (check,) = [r for r in runs(OPERATOR) if 'python -c "import ' in r]
    modules = re.search(r'python -c "import ([^"]+)"', check).group(1)  # type: ignore[union-attr]
    names = {m.strip().split(".")[0] for m in modules.split(",")}
    reqs = generate.REQUIREMENTS["operator"].read_text().splitlines()
    installed = {re.split(r"[<>=\[ ]", r)[0].lower() for r in reqs if r and not r.startswith("#")}
    import_names = {"pyyaml": "yaml"}
    provided = {import_names.get(r, r.replace("-", "_")) for r in installed} | {"gptd_operator", "gptd_common"}
    assert names <= provided, names - provided
    assert "gptd_operator.handlers" in modules and "gptd_common" in names
