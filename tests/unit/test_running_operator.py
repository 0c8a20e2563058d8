"""tests/support/cluster.RunningOperator: the waits the emulator tests start from."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.cluster import RunningOperator


def running(passes: int) -> RunningOperator:
    reconciler: Any = SimpleNamespace(resync_passes=passes)
    return RunningOperator(reconciler, threading.current_thread())


async def test_started_does_not_wait_for_a_second_pass_when_the_first_is_already_done() -> None:
    # The operator's thread can finish its first resync pass before the fixture looks; with a long resync period
    # (3600 s in some tests) no other pass comes, and the fixture's start-up wait used to time out.
    op = running(passes=1)
    await op.started(timeout=0.2)
    with pytest.raises(AssertionError, match="1 resync passes"):
        await op.resync_passes(1, timeout=0.2)  # counts from now: the next pass, which never comes here


async def test_started_waits_for_the_first_pass() -> None:
    with pytest.raises(AssertionError, match="the first resync pass"):
        await running(passes=0).started(timeout=0.2)


async def test_started_gives_up_at_once_when_the_operators_thread_has_ended() -> None:
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    reconciler: Any = SimpleNamespace(resync_passes=0)
    # RuntimeError at once: waiting out the deadline would end in eventually()'s AssertionError instead
    with pytest.raises(RuntimeError, match="ended during start-up"):
        await RunningOperator(reconciler, dead).started(timeout=0.5)
