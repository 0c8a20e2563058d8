"""hack/demo.sh's logic without a cluster: fake docker/kind/helm/kubectl on PATH (tests/support/fakes.py) record
what the script runs and answer like Helm 3, Docker 29 and a cluster whose operator works. Also: the script stays
within bash 3.2 (macOS's /bin/bash) and needs no GNU coreutils. The real thing is test_kind.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.fakes import built_image, fake_env, install_fakes

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hack" / "demo.sh"


@pytest.fixture
def fake_path(tmp_path):
    install_fakes(tmp_path)
    return tmp_path


def run_demo(tmp: Path, *stages: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = tmp / "log"
    log.write_text("")
    proc = subprocess.run([str(DEMO), *stages], cwd=ROOT, env=fake_env(tmp, **env), capture_output=True,
                          text=True, timeout=60)
    return proc, log.read_text().splitlines()


def assert_in_order(calls: list[str], expected: list[str]) -> None:
    joined = "\n".join(calls)
    pos = 0
    for needle in expected:
        found = joined.find(needle, pos)
        assert found >= 0, f"{needle!r} missing or out of order in:\n{joined}"
        pos = found + len(needle)


def test_all_stages_in_order(fake_path):
    proc, calls = run_demo(fake_path, "all", OPERATOR_IMAGE="reg/op:x", RUNTIME_IMAGE="reg/rt:x-cpu")
    assert proc.returncode == 0, proc.stderr
    assert_in_order(calls, [
        "kind create cluster --name t",
        "docker build --provenance=false -f operator/Dockerfile -t reg/op:x .",
        "docker build --provenance=false -f runtime/Dockerfile --build-arg"
        " TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t reg/rt:x-cpu .",
        "kind load docker-image --name t reg/op:x reg/rt:x-cpu",
        "label namespace gptd-system --overwrite pod-security.kubernetes.io/enforce=restricted",
        "helm --kube-context kind-t upgrade --install gptd helm/gptd-operator",
        "helm --kube-context kind-t test gptd",
        "delete job demo-model --ignore-not-found",
        "get job demo-model",
        "apply -f -",
        "wait --for=condition=Ready gptd/demo",
        "run gptd-demo-client --image=reg/rt:x-cpu",
        "scale gptd/demo --replicas=2",
        "wait --for=jsonpath={.status.readyReplicas}=2 gptd/demo",
        "patch gptd demo --type merge",
        "wait --for=condition=Progressing=False gptd/demo",
        "run gptd-demo-client",
    ])
    helm_install = next(c for c in calls if "upgrade --install" in c)
    for flag in ("image.repository=reg/op", "image.tag=x", "runtime.image=reg/rt:x-cpu", "--wait"):
        assert flag in helm_install
    assert all("--context kind-t" in c for c in calls if c.startswith("kubectl"))
    # Every kubectl wait is bounded.
    assert all("--timeout=20s" in c for c in calls if " wait " in c)
    # The demo model Job and the GPTDeployment run the freshly built CPU runtime image, not the samples' tags.
    applied = (fake_path / "applied.yaml").read_text()
    assert applied.count("image: reg/rt:x-cpu") == 2 and "ghcr.io/gptd-io/gptd-runtime" not in applied
    assert "kind: GPTDeployment" in applied
    assert "new revision rev-2 is Ready" in proc.stderr
    completions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(completions) == 2 and completions[0]["choices"][0]["text"] == "lorem"
    # Only hack/tools.py would need python; helm and kubectl came from PATH.
    assert not any(c.startswith("python") for c in calls)


def test_default_images_are_the_cpu_runtime_variant(fake_path):
    proc, calls = run_demo(fake_path, "images", TAG="t1")
    assert proc.returncode == 0, proc.stderr
    assert "kind load docker-image --name t ghcr.io/gptd-io/gptd-operator:t1 ghcr.io/gptd-io/gptd-runtime:t1-cpu" \
        in calls
    builds = [c for c in calls if c.startswith("docker build")]
    assert len(builds) == 2 and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in builds[1]
    assert "-t ghcr.io/gptd-io/gptd-runtime:t1-cpu ." in builds[1]


def test_images_load_into_kind_under_dockers_containerd_store(fake_path):
    """Docker 29 + containerd store: an image built with provenance is an OCI index kind can't import."""
    proc, _ = run_demo(fake_path, "images", OPERATOR_IMAGE="reg/op:x", RUNTIME_IMAGE="reg/rt:x-cpu")
    assert proc.returncode == 0, proc.stderr
    # The fake really refuses an index (else this test could not fail):
    built_image(fake_path, "reg/op:x", kind="index")
    proc, _ = run_demo(fake_path, "images", SKIP_BUILD="1", OPERATOR_IMAGE="reg/op:x", RUNTIME_IMAGE="reg/rt:x-cpu")
    assert proc.returncode != 0 and "content digest" in proc.stderr


def test_existing_cluster_and_skip_build(fake_path):
    (fake_path / "clusters").write_text("t\n")
    built_image(fake_path, "reg/op:x")
    built_image(fake_path, "reg/rt:x-cpu")
    proc, calls = run_demo(fake_path, "cluster", "images", SKIP_BUILD="1", OPERATOR_IMAGE="reg/op:x",
                           RUNTIME_IMAGE="reg/rt:x-cpu")
    assert proc.returncode == 0, proc.stderr
    assert not any("create cluster" in c for c in calls)
    assert not any(c.startswith("docker build") for c in calls)
    assert any(c.startswith("kind load docker-image") for c in calls)


@pytest.mark.parametrize("version", ["v3.19.0", "v4.0.5", "v4.1.4"])
def test_operator_stage_works_with_helm_3_and_4(fake_path, version):
    proc, calls = run_demo(fake_path, "operator", FAKE_HELM_VERSION=version)
    assert proc.returncode == 0, proc.stderr
    (test_call,) = [c for c in calls if c.startswith("helm") and " test " in c]
    assert "--timeout" in test_call


def test_failed_helm_test_prints_the_test_pods_logs(fake_path):
    proc, calls = run_demo(fake_path, "operator", FAKE_HELM_TEST_FAIL="1")
    assert proc.returncode != 0 and "helm test gptd failed" in proc.stderr
    assert any(" logs -l app.kubernetes.io/instance=gptd,app.kubernetes.io/component=test" in c for c in calls)
    assert "fake log line" in proc.stdout + proc.stderr


def test_demo_model_job_failure_is_reported_at_once(fake_path):
    proc, calls = run_demo(fake_path, "model", FAKE_JOB_STATE="Failed", WAIT_TIMEOUT="30s", POLL_SECONDS="1")
    assert proc.returncode != 0 and "demo model job failed" in proc.stderr
    # Not a 30 s wait for a Job that can never complete: one look was enough.
    assert sum(" get job demo-model " in c for c in calls) == 1
    assert any("logs job/demo-model" in c for c in calls)


def test_demo_model_stage_replaces_the_immutable_job(fake_path):
    proc, calls = run_demo(fake_path, "model", RUNTIME_IMAGE="reg/rt:other-cpu")
    assert proc.returncode == 0, proc.stderr
    assert_in_order(calls, ["delete job demo-model --ignore-not-found", "apply -f -", "get job demo-model"])
    assert "image: reg/rt:other-cpu" in (fake_path / "applied.yaml").read_text()


def test_rollout_fails_when_the_revision_never_changes(fake_path):
    proc, _ = run_demo(fake_path, "rollout", FAKE_REVISIONS="rev-1", WAIT_TIMEOUT="2s", POLL_SECONDS="1")
    assert proc.returncode != 0
    assert "currentRevision did not change from rev-1 within 2s" in proc.stderr


def test_down_downloads_nothing(fake_path):
    """`make demo-down` must not fetch helm/kubectl (hack/tools.py) just to delete a kind cluster."""
    (fake_path / "bin" / "helm").unlink()
    proc, calls = run_demo(fake_path, "down")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["kind delete cluster --name t"]


def test_clear_errors_without_docker_engine(fake_path):
    (fake_path / "bin" / "docker").write_text("#!/usr/bin/env bash\n[ \"$1\" = info ] && exit 1\nexit 0\n")
    proc, _ = run_demo(fake_path, "cluster")
    assert proc.returncode != 0 and "engine is not reachable" in proc.stderr
    proc, _ = run_demo(fake_path, "nonsense")
    assert proc.returncode != 0 and "unknown stage nonsense" in proc.stderr
    proc, _ = run_demo(fake_path, "deploy", WAIT_TIMEOUT="soon")
    assert proc.returncode != 0 and "WAIT_TIMEOUT must look like" in proc.stderr


# ----------------------------------------------------------------------------- macOS: bash 3.2, BSD userland

# Constructs bash 3.2 (macOS's /bin/bash) lacks, and GNU-only tools/flags that macOS lacks.
BASH4_AND_GNU = {
    "{fd} redirection (4.1)": r"\{[A-Za-z_][A-Za-z0-9_]*\}[<>]",
    "associative array (4.0)": r"\b(declare|local|typeset)\s+-[a-zA-Z]*A",
    "nameref (4.3)": r"\b(declare|local|typeset)\s+-[a-zA-Z]*n\b",
    "declare -g (4.2)": r"\b(declare|typeset)\s+-[a-zA-Z]*g",
    "case modification ${x,,} ${x^^} (4.0)": r"\$\{[#!]?[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?(,|\^)",
    "${x@Q} transformations (4.4)": r"\$\{[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?@[QEPAaKkUuL]\}",
    "mapfile/readarray (4.0)": r"\b(mapfile|readarray)\b",
    "|& (4.0)": r"\|&",
    ";& / ;;& case fall-through (4.0)": r";;?&",
    "&>> (4.0)": r"&>>",
    "negative array index (4.3)": r"\[-[0-9]+\]\}",
    "negative substring length (4.2)": r"\$\{[A-Za-z_][A-Za-z0-9_]*:[^}:]*:-[0-9]",
    "coproc (4.0)": r"\bcoproc\b",
    "wait -n (4.3)": r"\bwait\s+-n\b",
    "[[ -v ]] / test -v (4.2)": r"(\[\[|\btest|\[)\s+-v\s",
    "globstar/** (4.0)": r"\bglobstar\b",
    "$EPOCHSECONDS/$EPOCHREALTIME/$BASHPID": r"\$\{?(EPOCHSECONDS|EPOCHREALTIME|BASHPID)\b",
    "printf %(fmt)T (4.2)": r"%\([^)]*\)T",
    "GNU timeout (coreutils, not on macOS)": r"(^|[\s;|&(])timeout\s",
    "sed -i without a suffix argument (BSD sed differs)": r"\bsed\s+(-[a-zA-Z]*\s+)*-i\b",
    "grep -P (not in BSD grep)": r"\bgrep\s+(-[a-zA-Z]*\s+)*-[a-zA-Z]*P",
    "date -d (GNU date)": r"\bdate\s+-d\b",
    "readlink -f (GNU; macOS < 12.3)": r"\breadlink\s+-f\b",
    "stat -c (GNU stat)": r"\bstat\s+-c\b",
}


def bash32_problems(script: str) -> list[str]:
    """Lines using a construct from BASH4_AND_GNU, comments and single-quoted strings ignored (the demo's
    inline Python lives in single quotes)."""
    # Comments first (an apostrophe in "doesn't" must not open a quote), then single-quoted text, which is data
    # and may span lines; newlines inside it are kept so line numbers stay right.
    code = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in script.splitlines())
    code = re.sub(r"'[^']*'", lambda m: "''" + "\n" * m.group(0).count("\n"), code)
    lines = script.splitlines()
    problems = []
    for lineno, line in enumerate(code.splitlines(), 1):
        for what, pattern in BASH4_AND_GNU.items():
            if re.search(pattern, line):
                problems.append(f"line {lineno}: {what}: {lines[lineno - 1].strip()}")
    return problems


@pytest.mark.parametrize(("what", "snippet"), [
    ("{fd} redirection", 'exec {fd}< <(ls)'),
    ("associative array", "declare -A seen"),
    ("nameref", "local -n ref=x"),
    ("case modification", 'echo "${name,,}"'),
    ("case modification", 'echo "${name^^}"'),
    ("transformations", 'echo "${name@Q}"'),
    ("mapfile", "mapfile -t lines < f"),
    ("|&", "make |& tee log"),
    ("fall-through", "  a) echo ;&"),
    ("fall-through", "  a) echo ;;&"),
    ("&>>", "cmd &>> log"),
    ("negative array index", 'echo "${arr[-1]}"'),
    ("negative substring", 'echo "${s:1:-1}"'),
    ("coproc", "coproc cat"),
    ("wait -n", "wait -n"),
    ("-v", "[[ -v FOO ]]"),
    ("globstar", "shopt -s globstar"),
    ("EPOCHSECONDS", "t=$EPOCHSECONDS"),
    ("%(fmt)T", "printf '%s' x; printf \"%(%s)T\" -1"),
    ("GNU timeout", 'x=$(timeout 10m kubectl get x)'),
    ("sed -i", "sed -i 's/a/b/' f"),
    ("grep -P", "grep -qP 'x' f"),
    ("date -d", "date -d yesterday"),
    ("readlink -f", "readlink -f x"),
    ("stat -c", "stat -c %s f"),
])
def test_the_bash32_lint_catches(what, snippet):
    assert bash32_problems(snippet), f"lint misses {what}: {snippet}"


def test_the_bash32_lint_ignores_portable_code():
    portable = ('x=${y:-default}; z=${#arr[@]}; case $a in b) echo ;; esac; echo "${1%h}"  # ${x,,} isn\'t code\n'
                "python -c '\nprint(\"mapfile |& ${x,,}\")\n' arg\n")
    assert bash32_problems(portable) == []
    # A quote inside a comment doesn't hide the code after it.
    assert bash32_problems("# doesn't\nexec {fd}< f\n# it's\n") == ["line 2: {fd} redirection (4.1): exec {fd}< f"]


def test_demo_script_is_bash32_and_bsd_compatible():
    script = DEMO.read_text()
    assert bash32_problems(script) == []
    for flags in (["-n"], ["--posix", "-n"]):
        proc = subprocess.run(["bash", *flags, str(DEMO)], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash {' '.join(flags)}: {proc.stderr}"


def test_demo_runs_without_gnu_timeout(fake_path):
    """The fakes include a `timeout` that fails like a missing command (macOS): no stage may need it."""
    proc, calls = run_demo(fake_path, "all")
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith("timeout") for c in calls)


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
