"""API keys: several keys, rotation through the mounted Secret without a restart, per-key metrics by key id, and
the per-address brake on wrong keys."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from gptd_runtime import apikeys
from gptd_runtime.__main__ import main
from gptd_runtime.apikeys import FailureLimiter, KeyRing, key_id, parse_keys
from gptd_runtime.config import Settings
from transformers import AutoTokenizer

from tests.support.engine import ContractEngine
from tests.support.runtime import wait_until
from tests.support.tls import SecretVolume

KEY_A, KEY_B, KEY_C = "sk-alpha-0123456789abcdef", "sk-bravo-fedcba9876543210", "sk-charlie-5555aaaa5555aaaa"
REQ = {"prompt": "x", "max_tokens": 1}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def engine(models: Any) -> ContractEngine:
    return ContractEngine(AutoTokenizer.from_pretrained(models["plain"]))


def test_key_file_format() -> None:
    text = f"# rotated 2026-12-01\n\n  {KEY_A}  \n{KEY_B}\n   # old key removed\n{KEY_A}\n"
    assert parse_keys(text) == [KEY_A, KEY_B, KEY_A]
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8]


def test_every_key_is_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first key matching costs as many comparisons as none matching."""
    f = tmp_path / "keys"
    f.write_text(f"{KEY_A}\n{KEY_B}\n{KEY_C}\n")
    ring = KeyRing(f)
    calls: list[int] = []
    real = apikeys.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
    for token in (KEY_A, KEY_C, "wrong", "w" * 500):
        calls.clear()
        assert (ring.authenticate(token) is not None) == (token in (KEY_A, KEY_C))
        assert calls == [64, 64, 64]  # digests: same length whatever the guess


async def test_several_keys_rotation_and_metrics(app_factory: Any, engine: ContractEngine, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    vol = SecretVolume(tmp_path / "secret")
    vol.write({"api-key": f"{KEY_A}\n{KEY_B}\n".encode()})
    caplog.set_level(logging.DEBUG)
    async with app_factory(engine=engine, api_key_file=vol.root / "api-key", api_key_reload_seconds=0.2) as (
            client, _app):
        for key in (KEY_A, KEY_B, KEY_A):
            assert (await client.post("/v1/completions", json=REQ, headers=_bearer(key))).status_code == 200
        assert (await client.post("/v1/completions", json=REQ, headers=_bearer(KEY_C))).status_code == 401
        # rotation: the Secret now holds B and C (A removed); the kubelet swaps the files
        vol.write({"api-key": f"# rotated\n{KEY_B}\n\n{KEY_C}\n".encode()})

        a_accepted = [2]

        async def a_refused() -> bool:
            status = (await client.get("/v1/models", headers=_bearer(KEY_A))).status_code
            a_accepted[0] += status == 200  # until the check interval passes, A still works
            return status == 401

        await wait_until(a_refused, timeout=10, interval=0.1)
        assert (await client.post("/v1/completions", json=REQ, headers=_bearer(KEY_C))).status_code == 200
        assert (await client.post("/v1/completions", json=REQ, headers=_bearer(KEY_B))).status_code == 200
        # an emptied file (a half-done update) keeps the keys loaded before
        vol.write({"api-key": b"\n# nothing yet\n"})
        await asyncio.sleep(0.5)
        assert (await client.get("/v1/models", headers=_bearer(KEY_C))).status_code == 200
        text = (await client.get("/metrics")).text
    assert f'gptd:api_key_requests_total{{key_id="{key_id(KEY_A)}"}} {a_accepted[0]:.1f}' in text
    assert f'gptd:api_key_requests_total{{key_id="{key_id(KEY_C)}"}} 2.0' in text
    assert 'gptd:auth_failures_total{status="401"}' in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "API keys reloaded" in logged and "holds no key" in logged
    for secret in (KEY_A, KEY_B, KEY_C):
        assert secret not in text and secret not in logged


async def test_wrong_keys_are_braked_per_client_address(app_factory: Any, engine: ContractEngine,
                                                        tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(KEY_A + "\n")
    async with app_factory(engine=engine, api_key_file=f, auth_failure_limit=3) as (client, app):
        for _ in range(5):  # no key at all is not a guess: never braked
            assert (await client.get("/v1/models")).status_code == 401
        for guess in ("g1", "g2", "g3"):
            assert (await client.get("/v1/models", headers=_bearer(guess))).status_code == 401
        braked = await client.get("/v1/models", headers=_bearer("g4"))
        assert braked.status_code == 429
        assert braked.json()["error"]["code"] == "auth_rate_limited"
        assert 50 <= int(braked.headers["retry-after"]) <= 60
        # the brake is per address: the right key from it waits too, another address is not affected
        assert (await client.get("/v1/models", headers=_bearer(KEY_A))).status_code == 429
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.9", 4000)),
                                  base_url="http://test")
        async with other:
            assert (await other.get("/v1/models", headers=_bearer(KEY_A))).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200  # probes never braked
        text = (await client.get("/metrics")).text
    assert 'gptd:auth_failures_total{status="429"} 2.0' in text


def test_failure_window_expires() -> None:
    now = [1000.0]
    lim = FailureLimiter(limit=2, window=60, clock=lambda: now[0])
    lim.failed("a")
    now[0] += 30
    lim.failed("a")
    assert lim.retry_after("a") == 30
    assert lim.retry_after("b") is None
    now[0] += 30.5  # the first failure left the window: one more try
    assert lim.retry_after("a") is None
    now[0] += 60
    assert lim.retry_after("a") is None and "a" not in lim._failures


def test_key_file_checked_within_a_minute_by_default() -> None:
    assert Settings().api_key_reload_seconds <= 60


def test_startup_refuses_an_unusable_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    assert main(["serve", "--demo", "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert main(["serve", "--demo", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "not readable" in capsys.readouterr().err


async def test_a_secret_with_several_data_keys_mounted_as_a_directory(app_factory: Any, engine: ContractEngine,
                                                                      tmp_path: Path) -> None:
    vol = SecretVolume(tmp_path / "secret")
    vol.write({"old": f"{KEY_A}\n".encode(), "new": f"{KEY_B}\n".encode()})
    async with app_factory(engine=engine, api_key_file=vol.root, api_key_reload_seconds=0.1) as (client, _app):
        for key in (KEY_A, KEY_B):
            assert (await client.get("/v1/models", headers=_bearer(key))).status_code == 200
        vol.write({"new": f"{KEY_B}\n".encode(), "newer": f"{KEY_C}\n".encode()})  # "old" data key removed

        async def a_refused() -> bool:
            return (await client.get("/v1/models", headers=_bearer(KEY_A))).status_code == 401

        await wait_until(a_refused, timeout=10, interval=0.1)
        for key in (KEY_B, KEY_C):
            assert (await client.get("/v1/models", headers=_bearer(key))).status_code == 200
