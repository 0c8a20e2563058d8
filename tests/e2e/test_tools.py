"""hack/tools.py picks helm/kubectl for the machine it runs on (a Mac running `make demo` too), and verifies what
it downloads. The download path runs for real against a local HTTP server holding release-shaped files."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chart import tools


@pytest.mark.parametrize(
    ("system", "machine", "helm", "member", "kubectl"),
    [
        ("Darwin", "arm64", "helm-v4.1.4-darwin-arm64.tar.gz", "darwin-arm64/helm", "v1.35.2/bin/darwin/arm64/kubectl"),
        ("Darwin", "x86_64", "helm-v4.1.4-darwin-amd64.tar.gz", "darwin-amd64/helm",
         "v1.35.2/bin/darwin/amd64/kubectl"),
        ("Linux", "aarch64", "helm-v4.1.4-linux-arm64.tar.gz", "linux-arm64/helm", "v1.35.2/bin/linux/arm64/kubectl"),
    ],
)
def test_official_asset_names_per_platform(system, machine, helm, member, kubectl):
    found = tools.assets(system, machine)
    assert found["helm"].url == f"https://get.helm.sh/{helm}"
    assert found["helm"].sha256_url == f"https://get.helm.sh/{helm}.sha256sum"
    assert found["helm"].member == member
    assert found["kubectl"].url == f"https://dl.k8s.io/release/{kubectl}"
    assert found["kubectl"].sha256_url == f"https://dl.k8s.io/release/{kubectl}.sha256"
    assert found["kubectl"].member is None


def test_linux_x86_64_uses_the_pypi_wheel_and_other_platforms_fail_clearly():
    assert tools.assets("Linux", "x86_64") is None
    with pytest.raises(RuntimeError, match=r"windows/amd64.*install helm"):
        tools.assets("Windows", "AMD64")


@pytest.fixture
def release_server(tmp_path) -> Iterator[tuple[str, Path]]:
    """A local server laid out like get.helm.sh and dl.k8s.io for darwin/arm64, with fake binaries."""
    root = tmp_path / "www"
    helm_dir, kubectl_dir = root / "helm", root / "k8s" / "v1.35.2" / "bin" / "darwin" / "arm64"
    helm_dir.mkdir(parents=True)
    kubectl_dir.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tgz:
        body = b"#!/bin/sh\necho fake-helm\n"
        info = tarfile.TarInfo("darwin-arm64/helm")
        info.size, info.mode = len(body), 0o755
        tgz.addfile(info, io.BytesIO(body))
    tgz_name = "helm-v4.1.4-darwin-arm64.tar.gz"
    (helm_dir / tgz_name).write_bytes(buf.getvalue())
    (helm_dir / f"{tgz_name}.sha256sum").write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {tgz_name}\n")
    kubectl = b"#!/bin/sh\necho fake-kubectl\n"
    (kubectl_dir / "kubectl").write_bytes(kubectl)
    (kubectl_dir / "kubectl.sha256").write_text(hashlib.sha256(kubectl).hexdigest())

    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _fetch(dest: Path, url: str) -> dict[str, Path]:
    return tools.ensure_tools(dest, system="Darwin", machine="arm64", helm_base=f"{url}/helm",
                              kubectl_base=f"{url}/k8s")


def test_macos_download_is_verified_extracted_and_cached(tmp_path, release_server):
    url, root = release_server
    dest = tmp_path / "tools"
    paths = _fetch(dest, url)
    assert paths["helm"].read_bytes() == b"#!/bin/sh\necho fake-helm\n"
    assert paths["kubectl"].read_bytes() == b"#!/bin/sh\necho fake-kubectl\n"
    assert all(os.access(p, os.X_OK) for p in paths.values())
    # Cached: a second call downloads nothing (the server's files are gone).
    for f in root.rglob("*"):
        if f.is_file():
            f.unlink()
    assert _fetch(dest, url) == paths


def test_a_checksum_mismatch_is_an_error_and_installs_nothing(tmp_path, release_server):
    url, root = release_server
    (root / "k8s" / "v1.35.2" / "bin" / "darwin" / "arm64" / "kubectl.sha256").write_text("0" * 64)
    dest = tmp_path / "tools"
    with pytest.raises(RuntimeError, match=r"SHA-256 .* does not match"):
        _fetch(dest, url)
    assert not (dest / "kubectl").exists()
