"""HTTPS, mutual TLS and certificate renewal against the real uvicorn server the runtime runs, with a CA and
certificates made here (tests/support/tls.py) and the official openai client / httpx as clients."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography import x509
from gptd_runtime.__main__ import main
from gptd_runtime.config import Settings
from transformers import AutoTokenizer

from tests.support.engine import ContractEngine
from tests.support.runtime import ThreadedServer, free_port
from tests.support.tls import CA, SecretVolume


@pytest.fixture
def ca(tmp_path: Path) -> tuple[CA, Path]:
    authority = CA()
    return authority, authority.write(tmp_path / "ca.crt")


@pytest.fixture
def volume(tmp_path: Path, ca: tuple[CA, Path]) -> SecretVolume:
    vol = SecretVolume(tmp_path / "tls")
    vol.publish(ca[0].issue("gptd-runtime"))
    return vol


@pytest.fixture
def engine(models: Any) -> ContractEngine:
    return ContractEngine(AutoTokenizer.from_pretrained(models["plain"]))


def _settings(models: Any, volume: SecretVolume | None, client_ca: Path | None = None) -> Settings:
    tls: dict[str, Any] = {}
    if volume is not None:
        tls = {"tls_cert_file": volume.cert_file, "tls_key_file": volume.key_file, "tls_client_ca_file": client_ca}
    return Settings(model=str(models["plain"]), host="127.0.0.1", port=free_port(), tls_reload_seconds=0.1, **tls)


def _client_context(ca_file: Path, client: Any = None, tmp: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        assert tmp is not None
        (tmp / "client.crt").write_bytes(client.cert_pem)
        (tmp / "client.key").write_bytes(client.key_pem)
        ctx.load_cert_chain(str(tmp / "client.crt"), str(tmp / "client.key"))
    return ctx


def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    """Serial number of the certificate a fresh handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_https_with_the_openai_client_and_httpx(models: Any, volume: SecretVolume, ca: tuple[CA, Path],
                                                 engine: ContractEngine) -> None:
    ctx = _client_context(ca[1])
    with ThreadedServer(_settings(models, volume), engine) as srv:
        assert srv.url.startswith("https://")
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", http_client=httpx.Client(verify=ctx))
        out = client.completions.create(model="plain", prompt="hello", max_tokens=3)
        assert out.usage is not None and out.usage.completion_tokens == 3
        r = httpx.get(f"{srv.url}/health/ready", verify=ctx)
        assert r.status_code == 200
        assert "server" not in r.headers  # no banner
        # a client that does not trust the CA refuses the server
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health/live", verify=ssl.create_default_context())


def test_plain_http_to_the_tls_port_fails(models: Any, volume: SecretVolume, engine: ContractEngine) -> None:
    with ThreadedServer(_settings(models, volume), engine) as srv:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{srv.port}/health/live", timeout=5)


def test_without_tls_files_the_server_speaks_http(models: Any, engine: ContractEngine) -> None:
    with ThreadedServer(_settings(models, None), engine) as srv:
        assert srv.server.tls is None
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health/live").status_code == 200


def test_mutual_tls(models: Any, volume: SecretVolume, ca: tuple[CA, Path], engine: ContractEngine,
                    tmp_path: Path) -> None:
    authority, ca_file = ca
    with ThreadedServer(_settings(models, volume, client_ca=ca_file), engine) as srv:
        url = f"{srv.url}/v1/models"
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(url, verify=_client_context(ca_file))
        stranger = CA("another CA").issue("intruder", server=False)
        (tmp_path / "s").mkdir()
        with pytest.raises(httpx.HTTPError):  # a certificate from a CA the server does not trust
            httpx.get(url, verify=_client_context(ca_file, stranger, tmp_path / "s"))
        good = _client_context(ca_file, authority.issue("gateway", server=False), tmp_path)
        assert httpx.get(url, verify=good).status_code == 200
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", http_client=httpx.Client(verify=good))
        assert [m.id for m in client.models.list()] == ["plain"]


def test_renewal_is_served_without_a_restart_while_a_stream_runs(
    models: Any, volume: SecretVolume, ca: tuple[CA, Path], engine: ContractEngine
) -> None:
    authority, ca_file = ca
    ctx = _client_context(ca_file)
    engine.token_delay = 0.05
    with ThreadedServer(_settings(models, volume), engine) as srv:
        first = served_serial(srv.port, ctx)
        body = {"model": "plain", "prompt": "hi", "max_tokens": 40, "stream": True}
        events: list[str] = []
        renewed = None
        with httpx.Client(verify=ctx, timeout=30) as http, \
                http.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if renewed is None:  # mid-stream: cert-manager renews, the kubelet swaps the files
                    renewed = authority.issue("gptd-runtime")
                    volume.publish(renewed)
                    deadline = time.monotonic() + 10
                    while served_serial(srv.port, ctx) != renewed.serial:
                        assert time.monotonic() < deadline, "renewed certificate not served"
                        time.sleep(0.05)
        assert renewed is not None and renewed.serial != first
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) == 40  # every token arrived over the connection made with the old certificate
        assert srv.server.tls.reloads == 1


def test_a_bad_renewal_keeps_the_current_certificate(
    models: Any, volume: SecretVolume, ca: tuple[CA, Path], engine: ContractEngine
) -> None:
    authority, ca_file = ca
    ctx = _client_context(ca_file)
    with ThreadedServer(_settings(models, volume), engine) as srv:
        first = served_serial(srv.port, ctx)
        a, b = authority.issue("gptd-runtime"), authority.issue("gptd-runtime")
        a.key = b.key  # a certificate with someone else's key
        volume.publish(a)
        deadline = time.monotonic() + 10
        while srv.server.tls.failures == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert served_serial(srv.port, ctx) == first
        good = authority.issue("gptd-runtime")
        volume.publish(good)
        while served_serial(srv.port, ctx) != good.serial:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_startup_refuses_unusable_tls_settings(volume: SecretVolume, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--demo", "--tls-cert-file", str(volume.cert_file)]) == 2
    assert "tls_key_file is required" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert main(["serve", "--demo", "--tls-cert-file", str(garbage), "--tls-key-file", str(volume.key_file)]) == 2
    assert "--tls-cert-file" in capsys.readouterr().err
    assert main(["serve", "--demo", "--tls-cert-file", str(volume.cert_file), "--tls-key-file",
                 str(volume.key_file), "--tls-client-ca-file", str(tmp_path / "missing.pem")]) == 2
    assert "--tls-client-ca-file" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_serve_binds_loopback_by_default_without_a_banner(models: Any) -> None:
    """No --host / GPTD_HOST: 127.0.0.1 only (pods pass GPTD_HOST=0.0.0.0)."""
    import os
    import subprocess
    import sys

    import psutil

    from tests.support.runtime import REPO

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GPTD_HOST"}
    proc = subprocess.Popen([sys.executable, "-m", "gptd_runtime", "serve", "--model", str(models["plain"]),
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and "server" not in r.headers
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
    finally:
        proc.kill()
        proc.wait(10)


def test_metrics_port_serves_only_metrics_and_probes_in_plain_http(
    models: Any, volume: SecretVolume, ca: tuple[CA, Path], engine: ContractEngine
) -> None:
    # Under mutual TLS the kubelet (no client certificate) probes this port: the health routes are here too.
    settings = _settings(models, volume).model_copy(update={"metrics_port": free_port()})
    with ThreadedServer(settings, engine) as srv:
        side = f"http://127.0.0.1:{settings.metrics_port}"
        r = httpx.get(f"{side}/metrics")
        assert r.status_code == 200 and "gptd:ready 1.0" in r.text and "server" not in r.headers
        assert httpx.get(f"{side}/health/ready").status_code == 200
        assert httpx.get(f"{side}/health/live").status_code == 200
        for path in ("/v1/models", "/v1/completions", "/docs", "/openapi.json"):
            assert httpx.get(f"{side}{path}").status_code == 404, path
        assert httpx.get(f"{srv.url}/metrics", verify=_client_context(ca[1])).status_code == 200
    with pytest.raises(httpx.ConnectError):  # stopped with the server
        httpx.get(f"{side}/metrics", timeout=2)


def test_a_taken_metrics_port_fails_at_start(models: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(models["plain"]), "--port", str(free_port()),
                     "--metrics-port", str(port)]) == 1
    assert f"--metrics-port {port}" in capsys.readouterr().err
    assert main(["serve", "--demo", "--port", "9000", "--metrics-port", "9000"]) == 2
    assert "metrics_port must differ" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_metrics_port_through_sigterm(server_factory: Any, models: Any) -> None:
    import signal

    metrics_port = free_port()
    server = server_factory("--model", str(models["plain"]), "--metrics-port", str(metrics_port))
    assert "gptd:ready 1.0" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0


def _status_over(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
                 ) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """GET /v1/models over one raw TLS connection to 127.0.0.1 (an IP address: no SNI is sent). Returns the status
    line ('' if the server closed the connection), the session and whether it was resumed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.split(b"\r\n", 1)[0], s.session, s.session_reused


def _refused(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> bool:
    try:
        status, _, _ = _status_over(port, ctx, session)
    except (ssl.SSLError, OSError):
        return True
    return not status.startswith(b"HTTP/1.1 200")


def test_a_rotated_client_ca_is_trusted_and_the_old_one_no_longer_without_a_restart(
    models: Any, volume: SecretVolume, ca: tuple[CA, Path], engine: ContractEngine, tmp_path: Path
) -> None:
    _, ca_file = ca  # signs the server's certificate (what clients verify the server with)
    old_clients, new_clients = CA("client CA 2026"), CA("client CA 2027")
    client_ca = old_clients.write(tmp_path / "client-ca.crt")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = _client_context(ca_file, old_clients.issue("gateway", server=False), tmp_path / "old")
    old12 = _client_context(ca_file, old_clients.issue("gateway", server=False), tmp_path / "old")
    old12.maximum_version = ssl.TLSVersion.TLSv1_2
    new = _client_context(ca_file, new_clients.issue("gateway", server=False), tmp_path / "new")
    for ctx in (old, old12, new):
        ctx.check_hostname = False  # an IP-address URL: no SNI, the servername callback still runs
    with ThreadedServer(_settings(models, volume, client_ca=client_ca), engine) as srv:
        status, session, _ = _status_over(srv.port, old)
        assert status.startswith(b"HTTP/1.1 200")
        # No resumption with mutual TLS (a resumed session would skip the client check after a rotation), and no
        # TLS 1.2, whose session-id resumption cannot be switched off.
        assert _status_over(srv.port, old, session)[2] is False
        assert _refused(srv.port, old12)
        assert _refused(srv.port, new)
        # The CA Secret is rotated: the new CA replaces the old one in the bundle.
        new_clients.write(tmp_path / "client-ca.next")
        (tmp_path / "client-ca.next").replace(client_ca)
        deadline = time.monotonic() + 10
        while srv.server.tls.reloads == 0:
            assert time.monotonic() < deadline, "the rotated client CA was not loaded"
            time.sleep(0.05)
        assert _status_over(srv.port, new)[0].startswith(b"HTTP/1.1 200")
        assert _refused(srv.port, old)  # the removed CA is no longer trusted
        assert _refused(srv.port, old, session)  # not even with a session from before the rotation
