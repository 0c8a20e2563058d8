"""Reconciler decisions against a fake API client (no HTTP): what it refuses to do."""

from __future__ import annotations

from typing import Any

import pytest
from gptd_operator import handlers, kube
from gptd_operator.settings import Settings

from tests.support.scenario import cr


class Stop(Exception):
    """Raised by the fake at the first write, so a test sees whether one was attempted."""


class FakeKube:
    def __init__(self, cr_answer: dict[str, Any] | None) -> None:
        self.cr_answer = cr_answer
        self.calls: list[tuple[str, Any]] = []

    async def get(self, res: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", res.plural))
        return self.cr_answer if res is kube.GPTDEPLOYMENTS else None

    async def apply(self, desired: dict[str, Any], live: Any) -> Any:
        self.calls.append(("apply", desired["kind"]))
        raise Stop

    async def patch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("patch", args[0].plural))
        raise Stop

    async def delete(self, *args: Any) -> Any:
        self.calls.append(("delete", args[0].plural))
        raise Stop


def body() -> dict[str, Any]:
    b = cr()
    b["metadata"]["namespace"] = "ns1"
    return b


@pytest.mark.parametrize("answer", [None, {"metadata": {"name": "gpt2", "uid": "another-uid"}}],
                         ids=["404", "recreated-with-another-uid"])
async def test_no_children_for_a_cr_that_is_gone(answer: dict[str, Any] | None) -> None:
    """A child's DELETED event (the garbage collector) can arrive before the CR's own: the index still has the
    CR, the API server does not (or has a new CR of that name). Nothing may be created for it."""
    fake = FakeKube(answer)
    rec = handlers.Reconciler(Settings(), fake)  # type: ignore[arg-type]
    await rec.reconcile(body(), {})
    assert ("get", "gptdeployments") in fake.calls
    assert [c for c in fake.calls if c[0] != "get"] == []


async def test_children_are_created_when_the_cr_is_there() -> None:
    """The control: the same reconcile with the CR present goes on to write."""
    fake = FakeKube(body())
    rec = handlers.Reconciler(Settings(), fake)  # type: ignore[arg-type]
    with pytest.raises(Stop):
        await rec.reconcile(body(), {})
    assert fake.calls[-1] == ("apply", "Deployment")


async def test_a_job_just_created_counts_as_observed_until_its_watch_event_arrives() -> None:
    """kopf's Job index lags our own POST: the Job we just created is observed from Reconciler.recent, so the next
    pass does not plan (and announce) it again; another CR's Job and one the index already has are not added."""
    from gptd_operator.api import parse_spec

    rec = handlers.Reconciler(Settings(), FakeKube(None))  # type: ignore[arg-type]
    b = body()
    p = handlers._Pass.of(b, {})
    mine = {"kind": "Job", "metadata": {"name": "gpt2-eval-1", "namespace": "ns1", "labels": {
        "app.kubernetes.io/component": "evaluation"}, "ownerReferences": [
        {"uid": b["metadata"]["uid"], "controller": True}]}, "status": {}}
    theirs = {**mine, "metadata": {**mine["metadata"], "name": "other-eval-1", "ownerReferences": [
        {"uid": "someone-else", "controller": True}]}}
    rec.recent[("Job", "ns1", "gpt2-eval-1")] = mine
    rec.recent[("Job", "ns1", "other-eval-1")] = theirs
    _, obs, _ = await rec._observe(p, parse_spec(b["spec"]), {})
    assert [j.name for j in obs.jobs] == ["gpt2-eval-1"]
    assert obs.jobs[0].purpose == "evaluation"
    indexed = handlers.Children(jobs=(mine,))
    assert rec._recent_jobs(p, indexed) == []  # the index has it now: not twice
