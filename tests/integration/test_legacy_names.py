"""Upgrading from the release before names.py: a CR whose children carry its legacy names keeps them.

The release before commit 006c30e named every child after the CR (Deployment and Service ``<name>``, canary
``<name>-canary``, instance label ``<name>``). The emulator is given those children, owned by their CRs, before
the operator starts, as an upgrade finds them. Two CRs that collided under the old scheme are both there:
``foo`` and ``foo-canary``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gptd_operator import api, builders, names
from gptd_operator.settings import Settings

from tests.support.cluster import Cluster, RunningOperator, eventually
from tests.support.scenario import NS, cr, ready_deployment, status_of

LEGACY = {"foo": "uid-foo", "foo-canary": "uid-foo-canary"}  # foo is plain: its names never changed
UIDS = {**LEGACY, "llama-3.1-8b": "uid-llama"}


def legacy_children(name: str, uid: str, plurals: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """The stable Deployment and the Service the legacy release made for CR ``name``. The pod template is today's
    (revision hashes are stable across upgrades); names, labels and owners are checked against the legacy scheme
    written out here, so a broken names.py can't build a fixture that passes for legacy."""
    spec = api.parse_spec(cr(name, uid)["spec"])
    kept = names.LegacyName(name)
    dep = builders.build_deployment(kept, NS, uid, spec, Settings())
    svc = builders.build_service(kept, NS, uid, spec)
    instance = {"app.kubernetes.io/name": "gptd-runtime", "app.kubernetes.io/instance": name}
    made = [(plural, obj) for plural, obj in (("deployments", dep), ("services", svc)) if plural in plurals]
    for _, obj in made:
        meta = obj["metadata"]
        assert meta["name"] == name
        assert meta["labels"]["app.kubernetes.io/instance"] == name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "gptd-operator"
        assert meta["ownerReferences"] == [{"apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment", "name": name,
                                            "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    assert dep["spec"]["selector"]["matchLabels"] == {**instance, "gptd.io/track": "stable"}
    assert svc["spec"]["selector"] == instance
    return made


@pytest.fixture()
def legacy_kinds() -> dict[str, tuple[str, ...]]:
    """What the legacy release left of each CR in LEGACY (a class overrides it for another upgrade)."""
    return dict.fromkeys(LEGACY, ("deployments", "services"))


@pytest.fixture()
async def legacy(cluster: Cluster, kubeconfig: Path, legacy_kinds: dict[str, tuple[str, ...]]
                 ) -> dict[str, dict[str, str]]:
    """The CRs and their legacy children; uids of the children by (plural, name)."""
    uids: dict[str, dict[str, str]] = {"deployments": {}, "services": {}}
    for name, plurals in legacy_kinds.items():
        uid = UIDS[name]
        await cluster.create("gptdeployments", NS, cr(name, uid))
        for plural, obj in legacy_children(name, uid, plurals):
            made = await cluster.create(plural, NS, obj)
            uids[plural][name] = made["metadata"]["uid"]
    for name in legacy_kinds:
        await ready_deployment(cluster, name)
    return uids


@pytest.fixture()
async def operator(legacy: dict[str, dict[str, str]], operator: RunningOperator) -> AsyncIterator[RunningOperator]:
    """The operator, started only once the legacy children exist (an upgrade)."""
    yield operator


async def _names(cluster: Cluster, plural: str) -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["uid"] for o in await cluster.list(plural, NS)}


async def test_an_upgrade_keeps_legacy_children_and_makes_no_second_set(
    cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
) -> None:
    for name in LEGACY:
        await eventually(lambda name=name: _served(cluster, name), what=f"status.service of {name}")
    await operator.resync_passes(2)
    # Exactly the legacy objects, the very same ones (uids): no hashed second Deployment or Service.
    assert await _names(cluster, "deployments") == legacy["deployments"]
    assert await _names(cluster, "services") == legacy["services"]
    assert await cluster.get("deployments", NS, names.base("foo-canary")) is None
    st = await status_of(cluster, "foo-canary")
    assert st["service"] == "foo-canary"
    assert st["url"] == f"http://foo-canary.{NS}.svc.cluster.local:8000"
    assert st["selector"] == "app.kubernetes.io/instance=foo-canary,app.kubernetes.io/name=gptd-runtime"
    assert st["phase"] == "Ready"
    # Each CR still controls its own Deployment: foo's and foo-canary's children never changed hands.
    for name, uid in LEGACY.items():
        dep = await cluster.get("deployments", NS, name)
        assert dep is not None and dep["metadata"]["ownerReferences"][0]["uid"] == uid
    # And the upgrade is a no-op: not one write now that it settled.
    before = len(cluster.requests())
    reconciles = operator.reconciler.reconciles
    await operator.resync_passes(2)
    assert cluster.writes(before) == [], "\n".join(cluster.writes(before))
    # Once per CR per pass, although foo-canary is indexed under two keys (its base and its own name).
    assert operator.reconciler.reconciles - reconciles == 2 * len(LEGACY)


async def _served(cluster: Cluster, name: str) -> bool:
    st = await status_of(cluster, name)
    return st.get("service") == name and st.get("phase") == "Ready"


async def test_a_new_cr_gets_collision_free_names_beside_legacy_ones(
    cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
) -> None:
    # bar-canary is created after the upgrade: nothing of it carries a legacy label, so it gets the hashed base.
    await cluster.create("gptdeployments", NS, cr("bar-canary", "uid-bar-canary"))
    hashed = names.base("bar-canary")
    await eventually(lambda: cluster.get("deployments", NS, hashed), what="the new CR's Deployment")
    await eventually(lambda: cluster.get("services", NS, hashed), what="the new CR's Service")
    assert await cluster.get("deployments", NS, "bar-canary") is None

    async def named() -> bool:
        return (await status_of(cluster, "bar-canary")).get("service") == hashed

    await eventually(named, what="status.service of bar-canary")
    await operator.resync_passes(1)
    assert set(await _names(cluster, "deployments")) == {*LEGACY, hashed}


async def test_two_legacy_crs_still_collide_as_before_and_the_canary_is_refused(
    cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
) -> None:
    # CR foo's canary would be "foo-canary": CR foo-canary's kept stable Deployment. It is neither adopted nor
    # patched; foo is told why (the old release had the same collision; a new CR foo-canary would not).
    for name in LEGACY:
        await eventually(lambda name=name: _served(cluster, name), what=f"{name} Ready")
    theirs = await cluster.get("deployments", NS, "foo-canary")
    assert theirs is not None
    await cluster.patch("gptdeployments", NS, "foo", {"spec": {
        "model": {"revision": "v2"},
        "rollout": {"strategy": "Canary", "canary": {"steps": [{"weight": 25, "pauseSeconds": 0}]}}}})

    async def refused() -> dict[str, Any] | None:
        ready = next((c for c in (await status_of(cluster, "foo")).get("conditions", []) if c["type"] == "Ready"), {})
        return ready if ready.get("reason") == "InvalidSpec" else None

    ready = await eventually(refused, what="foo's canary refused")
    assert "Deployment foo-canary already exists and is not controlled by this GPTDeployment" in ready["message"]
    await operator.resync_passes(2)
    after = await cluster.get("deployments", NS, "foo-canary")
    assert after is not None and after["metadata"]["uid"] == theirs["metadata"]["uid"]
    assert after["metadata"]["ownerReferences"][0]["uid"] == LEGACY["foo-canary"]
    assert after["spec"] == theirs["spec"]  # not patched to foo's canary
    assert (await status_of(cluster, "foo-canary"))["service"] == "foo-canary"


class TestLegacyLabelEvents:
    """With the resync out of the way, only watch events drive reconciles: a legacy child's event (instance label
    <name>, not the CR's base) must still find its CR."""

    @pytest.fixture()
    def operator_settings(self) -> Settings:
        return Settings(resync_seconds=3600)

    async def test_a_legacy_childs_event_reconciles_its_cr(
        self, cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
    ) -> None:
        await eventually(lambda: _served(cluster, "foo-canary"), what="foo-canary Ready")
        # Play the Deployment controller: its pod went away. No resync will come: the event must do it.
        await cluster.patch("deployments", NS, "foo-canary", {"status": {"readyReplicas": 0, "availableReplicas": 0}},
                            sub="status")

        async def not_ready() -> bool:
            return (await status_of(cluster, "foo-canary")).get("phase") not in (None, "Ready")

        await eventually(not_ready, what="foo-canary's status follows its legacy Deployment")


class TestDottedLegacyName:
    """``llama-3.1-8b`` under the legacy release: its Deployment was created, its Service POST refused (dots are no
    DNS-1035 label; the emulator refuses it too). After the upgrade the Deployment is kept and a Service under the
    hashed base selects its pods."""

    @pytest.fixture()
    def legacy_kinds(self) -> dict[str, tuple[str, ...]]:
        return {"llama-3.1-8b": ("deployments",)}

    async def test_the_deployment_is_kept_and_the_service_gets_a_valid_name(
        self, cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
    ) -> None:
        name, hashed = "llama-3.1-8b", names.base("llama-3.1-8b")

        async def served() -> dict[str, Any] | None:
            st = await status_of(cluster, name)
            return st if st.get("service") == hashed and st.get("phase") == "Ready" else None

        st = await eventually(served, what="status.service of llama-3.1-8b")
        assert st["url"] == f"http://{hashed}.{NS}.svc.cluster.local:8000"
        await operator.resync_passes(2)
        assert await _names(cluster, "deployments") == legacy["deployments"]  # the very same one, no second
        svc = await cluster.get("services", NS, hashed)
        assert svc is not None and svc["spec"]["selector"]["app.kubernetes.io/instance"] == name
        assert set(await _names(cluster, "services")) == {hashed}
        before = len(cluster.requests())
        await operator.resync_passes(2)
        assert cluster.writes(before) == [], "\n".join(cluster.writes(before))


LEFTOVER = ("deployments", "services", "poddisruptionbudgets", "horizontalpodautoscalers", "networkpolicies",
            "persistentvolumeclaims", "jobs")  # docs/operator.md's second command, by label


async def _labelled(cluster: Cluster, instance: str) -> list[tuple[str, str]]:
    found = []
    for plural in LEFTOVER:
        found += [(plural, o["metadata"]["name"]) for o in await cluster.list(plural, NS)
                  if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == instance]
    return sorted(found)


async def test_the_documented_migration_moves_a_legacy_cr_to_its_new_names(
    cluster: Cluster, legacy: dict[str, dict[str, str]], operator: RunningOperator
) -> None:
    # docs/operator.md: `kubectl delete deployment <name>`, then the remaining legacy children by label.
    name, hashed = "foo-canary", names.base("foo-canary")
    await eventually(lambda: _served(cluster, name), what="foo-canary Ready under its legacy names")
    # A kept CR's later children carry the legacy labels too (here a NetworkPolicy): they must not keep it legacy.
    await cluster.patch("gptdeployments", NS, name, {"spec": {"networkPolicy": {"enabled": True}}})
    await eventually(lambda: cluster.get("networkpolicies", NS, name), what="the legacy-named NetworkPolicy")

    await cluster.delete("deployments", NS, name)
    await eventually(lambda: cluster.get("deployments", NS, hashed), what="the hashed Deployment")
    await ready_deployment(cluster, hashed)

    async def moved() -> dict[str, Any] | None:
        st = await status_of(cluster, name)
        return st if st.get("service") == hashed and st.get("phase") == "Ready" else None

    st = await eventually(moved, what="status.service names the hashed Service")
    assert st["url"] == f"http://{hashed}.{NS}.svc.cluster.local:8000"
    assert await cluster.get("services", NS, hashed) is not None
    await operator.resync_passes(2)
    assert await cluster.get("deployments", NS, name) is None  # the legacy Deployment is not recreated
    left = await _labelled(cluster, name)
    assert ("services", name) in left and ("networkpolicies", name) in left  # left for the user to delete

    for plural, obj in left:
        await cluster.delete(plural, NS, obj)
    await operator.resync_passes(2)
    assert await _labelled(cluster, name) == []  # nothing legacy recreated
    assert ("networkpolicies", hashed) in await _labelled(cluster, hashed)
    assert (await status_of(cluster, name))["service"] == hashed
    # CR foo kept its own legacy children throughout.
    assert (await cluster.get("deployments", NS, "foo") or {})["metadata"]["uid"] == legacy["deployments"]["foo"]
