"""Child names: deterministic DNS-1035 labels, the CR's own name where possible, never colliding."""

from __future__ import annotations

import re
from typing import Any

import pytest
from gptd_operator import builders, handlers, names
from gptd_operator.settings import Settings

from tests.support.specs import spec

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("name", ["gpt2", "llama3-8b", "a" * 56])
def test_plain_names_are_kept(name: str) -> None:
    assert names.base(name) == name == names.service(name) == names.deployment(name)
    assert names.deployment(name, "canary") == f"{name}-canary"


@pytest.mark.parametrize("name", [
    "llama-3.1-8b", "7b", "3.1", "a" * 57, "m" * 253, "x-canary", "x--y", "a.b.c-canary", "qwen2.5-72b-instruct",
])
def test_other_names_become_dns1035_labels(name: str) -> None:
    for child in (names.base(name), names.deployment(name, "canary")):
        assert DNS1035.match(child) and len(child) <= 63, child
    assert names.base(name) == names.base(name)  # deterministic
    assert names.base(name) != name


def test_no_collisions_between_stable_and_canary_names() -> None:
    crs = ["x", "x-canary", "x-canary-canary", "x.canary", "x--canary", "x-y", "x.y", "x--y", "llama-3.1-8b",
           "llama-3-1-8b", "a" * 56, "a" * 57, "a" * 58]
    children = [names.deployment(n, t) for n in crs for t in ("stable", "canary")]
    assert len(children) == len(set(children)), sorted(children)
    assert names.base("llama-3.1-8b").startswith("llama-3-1-8b--")


# --- upgrading from the release before names.py (commit 006c30e): sticky legacy names

UID = "uid-legacy"


def legacy_child(cr: str, *, name: str | None = None, uid: str = UID, instance: str | None = None,
                 controller: bool = True, managed: bool = True) -> dict[str, Any]:
    """A child as the legacy release left it: named after CR ``cr``, instance label ``cr``, controlled by it."""
    labels = {"app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": instance or cr}
    if managed:
        labels["app.kubernetes.io/managed-by"] = "gptd-operator"
    return {"kind": "Deployment", "metadata": {
        "name": name or cr, "labels": labels,
        "ownerReferences": [{"kind": "GPTDeployment", "name": cr, "uid": uid, "controller": controller}],
    }}


def test_the_legacy_labels_are_the_builders_labels() -> None:
    # names.py can't import builders (builders imports it): the copy must not drift.
    assert names._MANAGED_BY == (builders.LABEL_MANAGED_BY, builders.MANAGER)
    assert names._INSTANCE == builders.LABEL_INSTANCE


@pytest.mark.parametrize("cr", ["x-canary", "x--y", "a" * 57, "a" * 63, "llama-3.1-8b", "7b"])
def test_a_cr_controlling_a_legacy_child_keeps_its_name_as_base(cr: str) -> None:
    assert names.keeps_legacy(cr, UID, [legacy_child(cr)])
    kept = names.children_name(cr, UID, [legacy_child(cr)])
    assert isinstance(kept, names.LegacyName) and kept == cr
    assert names.base(kept) == cr == names.deployment(kept)
    assert names.deployment(kept, "canary") == f"{cr}-canary"
    assert names.base(cr) != cr  # without legacy children: the collision-free base


def test_only_this_crs_gptd_children_count() -> None:
    cr = "foo-canary"
    assert not names.keeps_legacy(cr, UID, [])
    assert not names.keeps_legacy(cr, UID, [legacy_child(cr, uid="uid-other")])  # another CR's (same name earlier)
    assert not names.keeps_legacy(cr, UID, [legacy_child(cr, controller=False)])  # not its controller
    assert not names.keeps_legacy(cr, UID, [legacy_child(cr, managed=False)])  # not gptd's
    # CR foo's canary Deployment "foo-canary": instance foo (and foo's uid): never makes CR foo-canary legacy.
    assert not names.keeps_legacy(cr, UID, [legacy_child("foo", name="foo-canary", instance="foo")])
    assert not names.keeps_legacy(cr, "", [legacy_child(cr, uid="")])
    plain = names.children_name(cr, UID, [legacy_child(cr, uid="uid-other")])
    assert type(plain) is str and names.base(plain) != cr


def test_only_the_legacy_stable_deployment_is_evidence() -> None:
    # A kept CR's other children carry the same labels and owner: counting them would keep it legacy forever (the
    # documented migration deletes the Deployment first). Its canary carries instance <name> too: not the GPU holder.
    cr = "foo-canary"
    for kind, name in (("Service", cr), ("NetworkPolicy", cr), ("PersistentVolumeClaim", f"{cr}-model-cache"),
                       ("Job", f"{cr}-eval-0123456789"), ("Deployment", f"{cr}-canary")):
        other = {**legacy_child(cr, name=name), "kind": kind}
        assert not names.keeps_legacy(cr, UID, [other]), (kind, name)
    assert names.keeps_legacy(cr, UID, [{**legacy_child(cr), "kind": "Service"}, legacy_child(cr)])


@pytest.mark.parametrize("cr", ["gpt2", "a" * 56, "m" * 64, "a.b" * 30])
def test_plain_and_over_long_names_never_keep_a_legacy_base(cr: str) -> None:
    # Plain: the legacy name is the base already. Over 63: the legacy release's instance label was refused.
    assert not names.may_have_legacy_children(cr)
    assert not names.keeps_legacy(cr, UID, [legacy_child(cr)])


def test_a_kept_dotted_base_still_gets_a_dns1035_service_name() -> None:
    kept = names.LegacyName("llama-3.1-8b")
    assert names.deployment(kept) == "llama-3.1-8b"  # the legacy Deployment (DNS-1123 subdomain) is kept
    assert names.service(kept) == names.base("llama-3.1-8b") and DNS1035.match(names.service(kept))
    assert names.service(names.LegacyName("x-canary")) == "x-canary"


def test_builders_build_the_legacy_children_from_a_kept_name() -> None:
    kept = names.LegacyName("x-canary")
    dep = builders.build_deployment(kept, "ns1", UID, spec(), Settings())
    svc = builders.build_service(kept, "ns1", UID, spec())
    assert dep["metadata"]["name"] == "x-canary" and svc["metadata"]["name"] == "x-canary"
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": "x-canary", "gptd.io/track": "stable"}
    assert dep["metadata"]["ownerReferences"][0]["name"] == "x-canary"
    assert svc["spec"]["selector"]["app.kubernetes.io/instance"] == "x-canary"
    assert 'pod=~"llama-3[.]1-8b(-canary)?-' in builders.inflight_query(names.LegacyName("llama-3.1-8b"), "ns1")


class _Untouchable(dict):  # type: ignore[type-arg]
    def get(self, *_: Any) -> Any:
        raise AssertionError("a plain name must not look at the indices")


def test_the_reconciler_decides_from_the_indices_once_and_not_at_all_for_plain_names() -> None:
    assert handlers.children_name(_Untouchable(), "ns1", "gpt2", UID) == "gpt2"
    child = {**legacy_child("x-canary"), "metadata": {**legacy_child("x-canary")["metadata"], "uid": "u1"}}
    # Only the Deployment index is evidence: the very same Deployment under any other index is not (what a
    # reconciler reading every index, as before, would have taken for evidence).
    others = {index_id: {("ns1", "x-canary"): [child]}
              for kind, index_id in handlers.CHILD_INDICES.items() if kind != "Deployment"}
    assert type(handlers.children_name(others, "ns1", "x-canary", UID)) is str
    indices = {"gptd_deployments": {("ns1", "x-canary"): [child]}}
    assert isinstance(handlers.children_name(indices, "ns1", "x-canary", UID), names.LegacyName)
    assert not isinstance(handlers.children_name(indices, "ns2", "x-canary", UID), names.LegacyName)
    # A phantom (gone in the last LIST) is no evidence.
    assert not isinstance(handlers.children_name(indices, "ns1", "x-canary", UID, frozenset({"u1"})),
                          names.LegacyName)


async def test_a_cr_whose_name_is_not_plain_is_found_by_its_own_name_too() -> None:
    # Its legacy children's events carry instance=<name>, and requeue() wakes (namespace, <name>): both must find it.
    body = {"metadata": {"name": "x-canary", "namespace": "ns1", "uid": UID}}
    assert set(await handlers.index_crs("ns1", "x-canary", body)) == {("ns1", names.base("x-canary")),
                                                                       ("ns1", "x-canary")}
    assert set(await handlers.index_crs("ns1", "gpt2", {**body, "metadata": {"name": "gpt2"}})) == {("ns1", "gpt2")}

    class Reconciler:
        seen: list[Any] = []

        async def reconcile(self, body: Any, indices: Any) -> None:
            self.seen.append(body)

    state = handlers.OperatorState(Settings(), Reconciler())  # type: ignore[arg-type]
    crs = {k: [v] for k, v in (await handlers.index_crs("ns1", "x-canary", body)).items()}
    await handlers._reconcile_owner(state, ("ns1", "x-canary"), {"gptd_crs": crs})  # what requeue() passes
    assert Reconciler.seen == [body]
