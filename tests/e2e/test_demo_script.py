"""hack/demo.sh's logic without a cluster: fake docker/kind/helm/kubectl on PATH record what the script runs and
answer like a cluster whose operator works. The real thing is test_kind.py."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_KUBECTL = r"""#!/usr/bin/env bash
echo "kubectl $*" >> "$FAKE_LOG"
args=" $* "
case "$args" in
  *" apply -f - "*) cat >> "$FAKE_DIR/applied.yaml"; exit 0 ;;
  *" create namespace "*) echo "apiVersion: v1"; echo "kind: Namespace"; exit 0 ;;
  *"{.metadata.generation}"*) echo -n 2; exit 0 ;;
  # A watch never ends by itself; the sleep must not hold the test's pipes open if the script's kill of the
  # watcher races with `timeout` starting it (seen under load), so its output goes nowhere.
  *" --watch "*) printf 'rev-1\n\nrev-1\nrev-2\n'; exec sleep 120 >/dev/null 2>&1 ;;
  *"{.status.currentRevision}"*) echo -n rev-1; exit 0 ;;
  *"{.status.url}"*) echo -n http://demo.default.svc.cluster.local:8000; exit 0 ;;
  *" run gptd-demo-client "*) echo '{"model": "demo", "choices": [{"text": "lorem"}]}'; exit 0 ;;
esac
exit 0
"""

FAKE_SIMPLE = """#!/usr/bin/env bash
echo "{name} $*" >> "$FAKE_LOG"
exit 0
"""


@pytest.fixture
def fake_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    for name in ("docker", "kind", "helm"):
        (bin_dir / name).write_text(FAKE_SIMPLE.format(name=name))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return tmp_path


def run_demo(tmp: Path, *stages: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = tmp / "log"
    log.write_text("")
    full_env = dict(
        os.environ,
        PATH=f"{tmp / 'bin'}:{os.environ['PATH']}",
        FAKE_LOG=str(log),
        FAKE_DIR=str(tmp),
        CLUSTER="t",
        WAIT_TIMEOUT="20s",
        **env,
    )
    proc = subprocess.run([str(ROOT / "hack" / "demo.sh"), *stages], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=60)
    return proc, log.read_text().splitlines()


def test_all_stages_in_order(fake_path):
    proc, calls = run_demo(fake_path, "all", OPERATOR_IMAGE="reg/op:x", RUNTIME_IMAGE="reg/rt:x")
    assert proc.returncode == 0, proc.stderr
    joined = "\n".join(calls)
    expected_in_order = [
        "kind create cluster --name t",
        "docker build -f operator/Dockerfile -t reg/op:x .",
        "docker build -f runtime/Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        " -t reg/rt:x .",
        "kind load docker-image --name t reg/op:x reg/rt:x",
        "label namespace gptd-system --overwrite pod-security.kubernetes.io/enforce=restricted",
        "helm --kube-context kind-t upgrade --install gptd helm/gptd-operator",
        "helm --kube-context kind-t test gptd",
        "wait --for=condition=complete job/demo-model",
        "apply -f manifests/samples/cpu.yaml",
        "wait --for=condition=Ready gptd/demo",
        "run gptd-demo-client --image=reg/rt:x",
        "scale gptd/demo --replicas=2",
        "wait --for=jsonpath={.status.readyReplicas}=2 gptd/demo",
        "patch gptd demo --type merge",
        "get gptd demo --watch",
        "wait --for=condition=Progressing=False gptd/demo",
        "run gptd-demo-client",
    ]
    pos = 0
    for needle in expected_in_order:
        found = joined.find(needle, pos)
        assert found >= 0, f"{needle!r} missing or out of order in:\n{joined}"
        pos = found + len(needle)
    helm_install = next(c for c in calls if "upgrade --install" in c)
    for flag in ("image.repository=reg/op", "image.tag=x", "runtime.image=reg/rt:x", "--wait"):
        assert flag in helm_install
    assert all("--context kind-t" in c for c in calls if c.startswith("kubectl"))
    # The demo model Job runs the freshly built runtime image, not the sample's default tag.
    applied = (fake_path / "applied.yaml").read_text()
    assert "image: reg/rt:x" in applied and "gptd-runtime:0.1.0" not in applied
    assert "new revision rev-2 is Ready" in proc.stderr
    completions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(completions) == 2 and completions[0]["choices"][0]["text"] == "lorem"


def test_existing_cluster_and_skip_build(fake_path):
    (fake_path / "bin" / "kind").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "kind $*" >> "$FAKE_LOG"
        [ "$1 $2" = "get clusters" ] && echo t
        exit 0
        """))
    proc, calls = run_demo(fake_path, "cluster", "images", SKIP_BUILD="1")
    assert proc.returncode == 0, proc.stderr
    assert not any("create cluster" in c for c in calls)
    assert not any(c.startswith("docker build") for c in calls)
    assert any(c.startswith("kind load docker-image") for c in calls)


def test_rollout_fails_when_the_revision_never_changes(fake_path):
    kubectl = fake_path / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace(r"printf 'rev-1\n\nrev-1\nrev-2\n'", r"printf 'rev-1\n'"))
    proc, _ = run_demo(fake_path, "rollout")
    assert proc.returncode != 0
    assert "currentRevision did not change from rev-1" in proc.stderr


def test_clear_errors_without_docker_engine(fake_path):
    (fake_path / "bin" / "docker").write_text("#!/usr/bin/env bash\n[ \"$1\" = info ] && exit 1\nexit 0\n")
    proc, _ = run_demo(fake_path, "cluster")
    assert proc.returncode != 0 and "engine is not reachable" in proc.stderr
    proc, _ = run_demo(fake_path, "nonsense")
    assert proc.returncode != 0 and "unknown stage nonsense" in proc.stderr


AUDIT = r"""
import os, runpy, sys
allowed = tuple(os.path.realpath(p) + os.sep for p in sys.argv[1:3])
bad = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & 0o3)
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.symlink", "shutil.rmtree"):
        path, writing = args[0], True
    else:
        return
    if writing and isinstance(path, (str, bytes)):
        real = os.path.realpath(os.fsdecode(path))
        if not (real + os.sep).startswith(allowed):
            bad.append(f"{event} {real}")
sys.addaudithook(hook)
sys.argv = ["gptd_runtime", "build-demo", sys.argv[1] + "/demo"]
try:
    runpy.run_module("gptd_runtime", run_name="__main__")
finally:
    sys.stderr.write("".join(f"OUTSIDE {b}\n" for b in bad))
"""


def test_build_demo_writes_only_to_the_volume_and_tmp(tmp_path):
    """The demo model Job (manifests/samples/demo-model.yaml) runs `python -m gptd_runtime build-demo /models/demo`
    with a read-only root filesystem, HOME=/tmp and emptyDir /tmp: everything it writes must be below the target
    volume or the temp dir (torch's inductor dir, tempfile probes), never HOME, HF_HOME or the image."""
    out, tmp, home = tmp_path / "models", tmp_path / "tmp", tmp_path / "home"
    for d in (out, tmp, home):
        d.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HOME": str(tmp_path / "ro-hf"), "GPTD_CACHE_DIR": str(tmp_path / "ro-hf")}
    script = tmp_path / "audit.py"
    script.write_text(AUDIT)
    import sys

    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OUTSIDE" not in proc.stderr, proc.stderr
    assert (out / "demo" / "config.json").is_file()
    assert not list(home.iterdir()) and not (tmp_path / "ro-hf").exists()
