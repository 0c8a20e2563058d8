"""kube.Kube against a scripted HTTP server: bounded retries with backoff and Retry-After, field manager,
strict field validation, User-Agent, pagination; lightkube's auth (exec plugin) and TLS (kubeconfig data, client
certificates) end to end."""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from gptd_operator import kube

from tests.support.tls import CA

Handler = Callable[[web.Request], web.StreamResponse]


@pytest.fixture()
async def server() -> AsyncIterator[Callable[[Handler], Any]]:
    servers: list[TestServer] = []

    async def start(handler: Handler) -> kube.Kube:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        srv = TestServer(app)
        await srv.start_server()
        servers.append(srv)
        return kube.Kube(kube.Config(server=str(srv.make_url("")).rstrip("/")))

    clients: list[kube.Kube] = []

    async def make(handler: Handler) -> kube.Kube:
        client = await start(handler)
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()
    for s in servers:
        await s.close()


async def test_429_is_retried_after_retry_after_then_succeeds(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_SECONDS", 0.01)
    seen: list[tuple[float, web.Request]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((time.monotonic(), request))
        if len(seen) < 3:
            return web.json_response({"kind": "Status", "message": "throttled"}, status=429,
                                     headers={"Retry-After": "0.3"})
        return web.json_response({"metadata": {"name": "x"}})

    client = await server(handler)
    out = await client.patch(kube.DEPLOYMENTS, "ns", "x", {"spec": {}}, strict=True)
    assert out == {"metadata": {"name": "x"}}
    assert len(seen) == 3
    assert seen[1][0] - seen[0][0] >= 0.3 and seen[2][0] - seen[1][0] >= 0.3  # Retry-After honoured
    req = seen[-1][1]
    assert req.query["fieldManager"] == "gptd-operator" and req.query["fieldValidation"] == "Strict"
    assert req.headers["User-Agent"].startswith("gptd-operator/")
    assert req.headers["Content-Type"] == "application/merge-patch+json"


async def test_retries_are_bounded(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_SECONDS", 0.001)
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request)
        return web.json_response({"kind": "Status", "message": "etcd leader changed"}, status=503)

    client = await server(handler)
    with pytest.raises(kube.ApiError) as err:
        await client.get(kube.DEPLOYMENTS, "ns", "x")
    assert err.value.status == 503 and "etcd leader changed" in err.value.message
    assert len(calls) == kube.RETRIES + 1


async def test_client_errors_are_not_retried_and_carry_the_status_message(server: Any) -> None:
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request)
        return web.json_response({"kind": "Status", "message": 'strict decoding error: unknown field "x"'},
                                 status=400)

    client = await server(handler)
    with pytest.raises(kube.ApiError) as err:
        await client.create(kube.SERVICES, {"metadata": {"name": "s", "namespace": "ns"}})
    assert (err.value.status, err.value.message) == (400, 'strict decoding error: unknown field "x"')
    assert len(calls) == 1 and calls[0].query["fieldValidation"] == "Strict"


async def test_list_follows_continue_tokens(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        assert request.query["labelSelector"] == "a=b" and request.query["limit"] == "2"
        token = request.query.get("continue")
        page = {None: (["1", "2"], "t1"), "t1": (["3", "4"], "t2"), "t2": (["5"], None)}[token]
        meta = {"continue": page[1]} if page[1] else {}
        return web.json_response({"metadata": meta, "items": [{"metadata": {"uid": u}} for u in page[0]]})

    client = await server(handler)
    items = await client.list(kube.PODS, None, label_selector="a=b", page=2)
    assert [i["metadata"]["uid"] for i in items] == ["1", "2", "3", "4", "5"]


async def test_connection_reset_is_retried(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_SECONDS", 0.001)
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request)
        if len(calls) == 1:
            assert request.transport is not None
            request.transport.close()  # the apiserver restarts mid-request: no response at all
        return web.json_response({"metadata": {"name": "x"}})

    client = await server(handler)
    assert await client.get(kube.DEPLOYMENTS, "ns", "x") == {"metadata": {"name": "x"}}
    assert len(calls) == 2 and client.counters.reads == 2


async def test_delete_sends_background_propagation(server: Any) -> None:
    bodies = []

    async def handler(request: web.Request) -> web.Response:
        assert request.method == "DELETE" and request.path == "/apis/apps/v1/namespaces/ns/deployments/x"
        bodies.append(await request.json())
        return web.json_response({"kind": "Status", "status": "Success"})

    client = await server(handler)
    assert await client.delete(kube.DEPLOYMENTS, "ns", "x") is True
    assert bodies == [{"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}]


def _kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return str(path)


async def test_exec_plugin_runs_off_the_event_loop_and_its_token_reaches_kopf(tmp_path: Path) -> None:
    """An exec credential plugin (aws eks get-token, gke-gcloud-auth-plugin) may take a while: lightkube runs it as
    an asyncio subprocess, so the operator's loop keeps turning; kopf's login gets the same token."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, time\ntime.sleep(0.5)\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1', 'kind': 'ExecCredential',"
        " 'status': {'token': 'exec-token'}}))\n"
    )
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    srv = TestServer(app)
    await srv.start_server()
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                          "args": [str(plugin)]}}
    cfg = kube.load_config(_kubeconfig(tmp_path / "kc", {"server": str(srv.make_url("")).rstrip("/")}, exec_user))
    client = kube.Kube(cfg)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker is running before the request starts
    try:
        started = time.monotonic()
        assert await client.get(kube.DEPLOYMENTS, "ns", "x") == {"metadata": {"name": "x"}}
        took = time.monotonic() - started
    finally:
        task.cancel()
        await client.close()
        await srv.close()
    assert seen == ["Bearer exec-token"]
    assert took >= 0.5  # the plugin did run during the request
    gap = max(b - a for a, b in itertools.pairwise(ticks))
    assert gap < 0.25, f"the event loop was blocked for {gap:.2f} s while the exec plugin ran"
    info = kube.connection_info(cfg)
    assert (info.scheme, info.token) == ("Bearer", "exec-token")


async def test_mutual_tls_from_kubeconfig_data_and_a_wrong_ca_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """certificate-authority-data / client-certificate-data / client-key-data (what kind and EKS write) over real
    TLS with client-certificate verification; a server certificate from another CA fails, after bounded retries."""
    monkeypatch.setattr(kube, "BACKOFF_SECONDS", 0.001)
    ca, other = CA(), CA("another CA")
    server_cert, client_cert = ca.issue("apiserver"), ca.issue("gptd-operator", server=False)
    (tmp_path / "srv.crt").write_bytes(server_cert.cert_pem)
    (tmp_path / "srv.key").write_bytes(server_cert.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.write(tmp_path / "ca.crt")))
    ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peercert")["subject"])
        return web.json_response({"metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server(ssl=ctx)
    url = str(srv.make_url("")).rstrip("/")
    assert url.startswith("https://")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    user = {"client-certificate-data": b64(client_cert.cert_pem), "client-key-data": b64(client_cert.key_pem)}
    good = kube.Kube(kube.load_config(_kubeconfig(
        tmp_path / "good", {"server": url, "certificate-authority-data": b64(ca.cert_pem)}, user)))
    bad = kube.Kube(kube.load_config(_kubeconfig(
        tmp_path / "bad", {"server": url, "certificate-authority-data": b64(other.cert_pem)}, user)))
    try:
        assert await good.get(kube.DEPLOYMENTS, "ns", "x") == {"metadata": {"name": "x"}}
        assert peers == [((("commonName", "gptd-operator"),),)]
        with pytest.raises(kube.ApiError) as err:
            await bad.get(kube.DEPLOYMENTS, "ns", "x")
        assert err.value.status == 503 and "CERTIFICATE_VERIFY_FAILED" in err.value.message
        assert len(peers) == 1
    finally:
        await good.close()
        await bad.close()
        await srv.close()
