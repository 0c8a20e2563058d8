"""kube.Kube against a scripted HTTP server: bounded retries with backoff and Retry-After, field manager,
strict field validation, User-Agent, pagination."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from gptd_operator import kube

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
