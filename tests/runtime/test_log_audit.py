"""Log audit: a real `serve` process at its default log level gets prompts carrying an email address, a phone
number and a card number (completions, chat streamed, embeddings, and requests that fail), and not one line it
writes, nor its metrics, contains any of them; its request lines carry ids, sizes, timings and status only."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

EMAIL, PHONE, CARD = "alice.liddell@example.org", "+1 415 555 0134", "4111 1111 1111 1111"
# How each could appear in a log: as sent, without separators, JSON-escaped.
NEEDLES = (EMAIL, "alice.liddell", "ALICELIDDELL", PHONE, "4155550134", CARD, "4111111111111111", "4111 1111")
PII = f"Contact {EMAIL} or call {PHONE}; card {CARD} exp 12/29."
REQUEST_LINE = re.compile(r"request id=[0-9a-f]{16} (GET|POST|OTHER) (/\S*|other) status=(\d{3}) "
                          r"in=\d+B out=\d+B [\d.]+ms$")


@pytest.mark.timeout(180)
def test_no_prompt_or_output_in_any_log_line(server_factory: Any, models: Any, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("audit-key-1\n")
    server = server_factory("--model", str(models["chat"]), "--served-model-name", "tiny",
                            "--api-key-file", str(key), "--max-body-bytes", "4096", "--max-input-tokens", "200")
    auth = {"Authorization": "Bearer audit-key-1"}
    statuses: set[int] = set()
    with httpx.Client(base_url=server.url, timeout=60, headers=auth) as client:
        def call(method: str, path: str, **kw: Any) -> httpx.Response:
            r = client.request(method, path, **kw)
            statuses.add(r.status_code)
            return r

        assert call("POST", "/v1/completions", json={"prompt": PII, "max_tokens": 8, "echo": True}).status_code == 200
        r = call("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": PII}],
                                                       "max_tokens": 8, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        assert call("POST", "/v1/embeddings", json={"input": PII}).status_code == 200
        # failures, each carrying the personal data somewhere a careless server would echo into its log
        assert call("POST", "/v1/completions", json={"prompt": PII * 40, "max_tokens": 2}).status_code == 400
        assert call("POST", "/v1/completions", json={"prompt": PII, "max_tokens": EMAIL}).status_code == 400
        assert call("POST", "/v1/completions", json={"prompt": PII, "model": EMAIL}).status_code == 404
        assert call("POST", "/v1/completions", content=f'{{"prompt": "{PII}", ').status_code == 400
        assert call("POST", "/v1/completions", json={"prompt": PII * 200}).status_code == 413
        assert call("POST", "/v1/chat/completions", json={"messages": [{"role": EMAIL, "content": PII}]}
                    ).status_code == 400
        assert call("GET", f"/v1/models/{EMAIL}", params={"q": PHONE}).status_code == 404
        assert call("GET", f"/no/such/{CARD}").status_code == 404
        assert call("POST", "/v1/completions", json={"prompt": PII}, headers={"Authorization": f"Bearer {EMAIL}"}
                    ).status_code == 401
        # a made-up method: the HTTP parser refuses it before the app (no request line; nothing of it logged)
        assert client.request("ALICELIDDELL", "/v1/models").status_code == 400
        metrics = client.get("/metrics").text
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    lines = (server.proc.stdout.read() + server.proc.stderr.read()).splitlines()
    assert {400, 401, 404, 413} <= statuses
    for line in lines:
        for needle in NEEDLES:
            assert needle not in line, (needle, line)
    for needle in NEEDLES:
        assert needle not in metrics, needle
    requests = [m for line in lines if (m := REQUEST_LINE.search(line))]
    assert len(requests) == 12, "\n".join(lines)  # one per request above, the metrics scrape excluded
    assert sorted({int(m.group(3)) for m in requests}) == sorted(statuses)
    assert "-" not in {m.group(2) for m in requests} and f"/v1/models/{EMAIL}" not in "\n".join(lines)


async def test_request_line_in_process(app_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """What the HTTP parser in front would refuse still logs no client text (e.g. a made-up method)."""
    caplog.set_level(logging.INFO, logger="gptd_runtime.access")
    async with app_factory() as (client, _app):
        r = await client.request("ALICELIDDELL", f"/v1/models/{EMAIL}", params={"q": PHONE})
        assert r.status_code == 405
        rid = r.headers["x-request-id"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gptd_runtime.access"]
    assert lines == [m for m in lines if REQUEST_LINE.search(m)] and len(lines) == 1
    assert lines[0].startswith(f"request id={rid} OTHER /v1/models/{{id}} status=405 ")


class _LeakyEngine:
    """Fails the way a library might: an exception whose message quotes the prompt."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def submit(self, prompt_ids: list[int], params: Any, *, stream: bool = False) -> Any:
        raise RuntimeError(f"cannot schedule prompt {self._inner.tokenizer.decode(prompt_ids)!r}")


async def test_an_unexpected_error_logs_no_request_text(app_factory: Any, models: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from tests.support.engine import ContractEngine

    caplog.set_level(logging.INFO)
    engine = _LeakyEngine(ContractEngine(AutoTokenizer.from_pretrained(models["plain"])))
    async with app_factory(engine=engine) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": PII, "max_tokens": 2})
        assert r.status_code == 500
        body = r.json()["error"]
        assert body["code"] == "internal_error" and r.headers["x-request-id"] in body["message"]
        assert (await client.get("/health/live")).status_code == 200  # the server carries on
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "failed with RuntimeError" in logged and "submit" in logged  # type and frames are there
    for needle in NEEDLES:
        assert needle not in logged and needle not in r.text, needle
