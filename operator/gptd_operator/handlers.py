"""kopf handlers: thin glue. Each reconcile is validate → observe → plan → build → apply → report.

Level-based: every trigger (CR create/update/resume, a child's or a pod's watch event, the resync timer)
runs the same ``Reconciler.reconcile`` for the owning GPTDeployment, which reads the cluster from kopf
indices (kept current by the watch streams) rather than with GETs, so a no-op resync makes no writes
and almost no requests. The handlers are module-level functions attached by ``register(registry)`` (not at
import); their shared state (the Reconciler, the borrowed indices, timers) is an ``OperatorState`` on kopf's
``memo``, so tests can run several operators with their own registries and settings.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from . import analysis, api, builders, dataset_check, evaluation, kube, model_cache, names, observe, rollout
from . import status as st
from .api import GPTDeploymentSpec, InvalidSpec
from .observe import Observations
from .rollout import DeploymentPlan, Plan
from .settings import Settings

log = logging.getLogger(__name__)

ANN_PROMOTE = rollout.PROMOTE_ANNOTATION
ANN_ABORT = rollout.ABORT_ANNOTATION
MANAGED = {builders.LABEL_MANAGED_BY: builders.MANAGER}
RUNTIME_PODS = {builders.LABEL_NAME: builders.RUNTIME_APP}
JOB_PODS = {builders.LABEL_NAME: builders.JOB_APP}  # the pods of gptd's Jobs (never counted as serving pods)
GC_REQUEUE_SECONDS = 5.0  # while a recreated CR waits for the garbage collector
# The security children (issue 12). Declared here, not in kube.py, while that module's client work is in
# flight; kube.apply finds a kind's resource in kube.BY_KIND, so they are registered there.
NETWORKPOLICIES = kube.Resource("networking.k8s.io/v1", "networkpolicies")
CERTIFICATES = kube.Resource("cert-manager.io/v1", "certificates")
kube.BY_KIND.setdefault("NetworkPolicy", NETWORKPOLICIES)
kube.BY_KIND.setdefault("Certificate", CERTIFICATES)
def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# What relist() LISTs: every watched child kind (by the managed-by label) and the runtime pods.
LISTED = (
    (kube.DEPLOYMENTS, _selector(MANAGED)),
    (kube.SERVICES, _selector(MANAGED)),
    (kube.PDBS, _selector(MANAGED)),
    (kube.HPAS, _selector(MANAGED)),
    (NETWORKPOLICIES, _selector(MANAGED)),
    (kube.PVCS, _selector(MANAGED)),
    (kube.JOBS, _selector(MANAGED)),
    (kube.PODS, _selector(RUNTIME_PODS)),
    (kube.PODS, _selector(JOB_PODS)),
)
# Child resource → its index id, for the event handlers and the snapshot.
CHILD_INDICES = {
    "Deployment": "gptd_deployments",
    "Service": "gptd_services",
    "PodDisruptionBudget": "gptd_pdbs",
    "HorizontalPodAutoscaler": "gptd_hpas",
    "NetworkPolicy": "gptd_netpols",
    "PersistentVolumeClaim": "gptd_pvcs",
    "Job": "gptd_jobs",
}
POD_INDICES = ("gptd_pods", "gptd_job_pods")


# ------------------------------------------------------------------------------------------ plan


def make_plan(spec: GPTDeploymentSpec, status: Mapping[str, Any], obs: Observations) -> Plan:
    """THE one place a plan is made: the rollout state machine."""
    return rollout.decide(spec, dict(status), obs)


# Pod-spec paths in an API server's 422 message → the GPTDeployment field they come from.
_REJECTED_FIELDS = (
    ("affinity", "spec.scheduling.affinity"),
    ("nodeSelector", "spec.scheduling.nodeSelector"),
    ("tolerations", "spec.scheduling.tolerations"),
    ("priorityClassName", "spec.scheduling.priorityClassName"),
    ("runtimeClassName", "spec.scheduling.runtimeClassName"),
    (".env", "spec.runtime.env"),
    (".image", "spec.runtime.image"),
    ("PersistentVolumeClaim", "spec.model.cache"),
)


def rejected_field(message: str) -> str:
    """The spec field an API server's validation message points at ("spec" when it can't tell)."""
    for needle, spec_field in _REJECTED_FIELDS:
        if needle in message:
            return spec_field
    return "spec"


# -------------------------------------------------------------------------------------- snapshot


@dataclass
class Children:
    """What the watch streams last showed us of one GPTDeployment's children."""

    stable: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    pdb: dict[str, Any] | None = None
    hpa: dict[str, Any] | None = None
    netpol: dict[str, Any] | None = None
    pvc: dict[str, Any] | None = None  # the model cache's claim (owned, or retained: see snapshot())
    pods: tuple[dict[str, Any], ...] = ()
    jobs: tuple[dict[str, Any], ...] = ()  # every Job of the CR (download, evaluation), by name
    job_pods: tuple[dict[str, Any], ...] = ()  # the pods of those Jobs, by name

    def by_kind(self, kind: str, name: str, owner: str) -> dict[str, Any] | None:
        if kind == "Deployment":
            return self.stable if name == names.deployment(owner) else self.canary
        if kind == "Job":
            return next((j for j in self.jobs if j["metadata"]["name"] == name), None)
        if kind == "PersistentVolumeClaim":
            return self.pvc if self.pvc is not None and self.pvc["metadata"]["name"] == name else None
        return {"Service": self.service, "PodDisruptionBudget": self.pdb, "HorizontalPodAutoscaler": self.hpa,
                "NetworkPolicy": self.netpol}[kind]


def _values(index: Any, key: tuple[str, str]) -> list[dict[str, Any]]:
    """An index's entries under ``key``, as stored (a Deployment's spec still packed: see unpacked())."""
    if index is None or key not in index:
        return []
    return list(index[key])


# A Deployment's spec (its pod template: ~18 KB of Python objects each, ~60 % of the index memory at 500 CRs) is
# kept in the index as compact JSON (~3 KB) under this key, and decoded only for the objects a reconcile observes.
PACKED_SPEC = "gptd.io/packed-spec"


def packed(summary: dict[str, Any]) -> dict[str, Any]:
    if "spec" in summary:
        summary[PACKED_SPEC] = json.dumps(summary.pop("spec"), separators=(",", ":")).encode()
    return summary


def unpacked(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """An index entry with its spec decoded: a new top-level dict and spec; metadata and status are still the index's
    own objects, read-only as every index entry is (nothing writes to what snapshot() returns)."""
    if entry is None or PACKED_SPEC not in entry:
        return entry
    out = {k: v for k, v in entry.items() if k != PACKED_SPEC}
    out["spec"] = json.loads(entry[PACKED_SPEC])
    return out


def snapshot(
    indices: Mapping[str, Any], namespace: str, name: str, uid: str | None, phantoms: frozenset[str] = frozenset()
) -> Children:
    """The CR's children as the indices show them, less ``phantoms``: uids the last authoritative LIST did not
    return although the index had them before it (deleted during a watch gap; kopf's re-list keeps them)."""
    key = (namespace, names.base(name))  # children and pods are indexed by their instance label

    def live(objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [o for o in objs if (o.get("metadata") or {}).get("uid") not in phantoms]

    def owned(objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        # Only children controlled by *this* CR (a recreated CR with the same name has a new uid).
        out = []
        for obj in live(objs):
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if uid is None or any(r.get("uid") == uid for r in refs):
                out.append(obj)
        return out

    def one(index_id: str, obj_name: str) -> dict[str, Any] | None:
        for obj in owned(_values(indices.get(index_id), key)):
            if obj["metadata"]["name"] == obj_name:
                return unpacked(obj)
        return None

    def unowned_or_owned(index_id: str, obj_name: str) -> dict[str, Any] | None:
        # A retained claim (spec.model.cache.retain) carries no ownerReference; one controlled by another uid
        # (a deleted CR of the same name) is left to apply()'s conflict handling.
        for obj in live(_values(indices.get(index_id), key)):
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            mine = uid is None or any(r.get("uid") == uid for r in refs)
            if obj["metadata"]["name"] == obj_name and (mine or not any(r.get("controller") for r in refs)):
                return obj
        return None

    def by_name(objs: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
        return tuple(sorted(objs, key=lambda o: o["metadata"]["name"]))

    pods = by_name(live(_values(indices.get("gptd_pods"), key)))
    jobs = by_name(owned(_values(indices.get("gptd_jobs"), key)))
    job_names = {j["metadata"]["name"] for j in jobs}
    job_pods = by_name(p for p in live(_values(indices.get("gptd_job_pods"), key))
                       if observe.job_of_pod(p) in job_names)
    return Children(
        stable=one("gptd_deployments", builders.deployment_name(name)),
        canary=one("gptd_deployments", builders.deployment_name(name, "canary")),
        service=one("gptd_services", names.service(name)),
        pdb=one("gptd_pdbs", names.base(name)),
        hpa=one("gptd_hpas", names.base(name)),
        netpol=one("gptd_netpols", names.network_policy(name)),
        pvc=unowned_or_owned("gptd_pvcs", names.model_cache(name)),
        pods=pods,
        jobs=jobs,
        job_pods=job_pods,
    )


def children_name(
    indices: Mapping[str, Any], namespace: str, name: str, uid: str, phantoms: frozenset[str] = frozenset()
) -> str:
    """CR ``name`` as the builders get it: a ``names.LegacyName`` while it controls the stable Deployment the
    release before names.py left under its legacy name (names.keeps_legacy; no other kind counts). A plain name is
    returned at once: it has no other base, so nothing is looked at; the others look in the Deployment index only
    (no request)."""
    if not names.may_have_legacy_children(name):
        return name
    key = (namespace, name)  # the legacy instance label: the CR name itself
    deployments = [o for o in _values(indices.get(CHILD_INDICES["Deployment"]), key)
                   if (o.get("metadata") or {}).get("uid") not in phantoms]
    return names.children_name(name, uid, deployments)


@dataclass(frozen=True)
class _Pass:
    """One reconcile of one CR: who it is and what it looked like when the pass started."""

    body: Mapping[str, Any]
    meta: Mapping[str, Any]
    namespace: str
    name: str
    uid: str
    generation: int | None
    previous: dict[str, Any]  # the CR's status, overlaid with what we wrote last (the index may lag)
    now: datetime

    @classmethod
    def of(cls, body: Mapping[str, Any], written: Mapping[str, Any]) -> _Pass:
        meta = body["metadata"]
        return cls(body, meta, meta["namespace"], meta["name"], meta.get("uid", ""), meta.get("generation"),
                   {**(body.get("status") or {}), **written}, _now())


@dataclass
class _Built:
    """What the builders produced for this pass: children to apply, children to delete."""

    desired: list[dict[str, Any]] = field(default_factory=list)
    unwanted: list[tuple[kube.Resource, dict[str, Any] | None]] = field(default_factory=list)
    scaled_object: dict[str, Any] | None = None  # read live (not watched)
    certificate: dict[str, Any] | None = None  # read live (not watched: the cert-manager CRD may be absent)


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------ reconciler


class Reconciler:
    def __init__(self, settings: Settings, client: kube.Kube) -> None:
        self.settings = settings
        self.kube = client
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Status we last wrote, by CR uid: fresher than a CR body from an index that lags our own write.
        self._written: dict[str, dict[str, Any]] = {}
        # Children we just wrote, until their watch event reaches the index (kopf's watch lags our
        # writes; without this a reconcile triggered meanwhile would POST again and get a 409).
        self.recent: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.reconciles = 0
        # Set by register(): schedules one more reconcile of (namespace, name) after N seconds, for the
        # rollout's pauses and deadlines that no watch event would announce.
        self.requeue: Callable[[str, str, float], None] | None = None
        self.resync_passes = 0  # completed passes of the periodic resync (tests and the benchmark wait on it)
        # Canary analysis against Prometheus, at most once per intervalSeconds per canary (analysis.py).
        self.analyzer = analysis.Analyzer()
        # Index entries the last authoritative LIST showed to be gone (see relist()).
        self.phantoms: frozenset[str] = frozenset()

    async def relist(self, indices: Mapping[str, Any]) -> None:
        """An authoritative, label-selected, paginated LIST of every watched child kind and the runtime pods.

        kopf re-lists after a watch gap (410 Gone) but keeps index entries of objects deleted during the gap, so
        a deleted child would never be recreated and a vanished crash-looping pod could trigger a rollback. An
        object the index held *before* this LIST started and the LIST does not return is gone: its uid is a
        phantom, which snapshot() ignores until kopf drops the entry (objects created meanwhile are not in
        ``before``, so they are never mistaken for phantoms)."""
        before = {
            (obj.get("metadata") or {}).get("uid")
            for index_id in (*CHILD_INDICES.values(), *POD_INDICES)
            for key in list(indices.get(index_id) or {})
            for obj in _values(indices.get(index_id), key)
        }
        listed: set[str | None] = set()
        scopes: tuple[str | None, ...] = self.settings.namespaces or (None,)
        for res, selector in LISTED:
            for namespace in scopes:
                for obj in await self.kube.list(res, namespace, label_selector=selector):
                    listed.add((obj.get("metadata") or {}).get("uid"))
        self.phantoms = frozenset(uid for uid in before - listed if uid)
        if self.phantoms:
            log.info("relist: %d indexed objects are gone (missed watch events)", len(self.phantoms))

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        self._locks.pop((namespace, name), None)
        if uid:
            self._written.pop(uid, None)
            self.analyzer.forget(uid)

    async def reconcile(self, body: Mapping[str, Any], indices: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return  # being deleted: the garbage collector removes the children
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            self.reconciles += 1
            await self._reconcile(body, indices)

    async def _reconcile(self, body: Mapping[str, Any], indices: Mapping[str, Any]) -> None:
        """validate → observe → plan → build → apply → report; a step that ends the pass returns None."""
        p = _Pass.of(body, self._written.get(body["metadata"].get("uid", ""), {}))
        # Legacy child names (names.py): decided once, here, from the indices; every later step builds from p.name.
        p = dataclasses.replace(p, name=children_name(indices, p.namespace, p.name, p.uid, self.phantoms))
        spec = await self._validate(p)
        if spec is None:
            return
        children, obs, analysis_due = await self._observe(p, spec, indices)
        # spec.model.cache: the download before the rollout (the plan waits while it is not complete).
        cache = await self._cache(p, spec, children, obs)
        # The evaluation dataset only once the gate could start: not while the revision downloads (no GET every
        # few seconds, and a ConfigMap still missing does not keep the download from starting).
        checked, dataset, dataset_wait, read = await self._check_dataset(
            p, spec, indices, downloading=cache.wait is not None
        )
        if not checked:
            # Refused (a missing or bad dataset), but pods of revisions already passed or rolled out keep getting
            # their condition: a restart or scale-up of them must not lose traffic over the dataset.
            await self._mark_evaluated(p, rollout.evaluated_revisions(p.previous), children)
            return
        if read:
            # The dataset's GET took a round trip: the Jobs and pods the gate judges are taken from the indices
            # again, after it. (A Job's Failed status and its pod's termination message come by separate watches;
            # a snapshot older than the GET more often holds the one without the other.)
            children, obs, analysis_due = await self._observe(p, spec, indices)
            cache = await self._cache(p, spec, children, obs)
        obs = dataclasses.replace(obs, desired_template=builders.with_resolved(obs.desired_template, cache.sha),
                                  download_wait=cache.wait or dataset_wait, evaluation_dataset=dataset)
        plan = make_plan(spec, p.previous, obs)
        built = await self._build(p, spec, plan, children)
        if built is None:
            return
        # The claim before the pods that mount it, but outside _apply's all-or-nothing loop: a resize the server
        # refuses (403 without allowVolumeExpansion, 422) is Degraded InvalidCache, not the end of every pass.
        cache = await self._apply_claim(p, cache, children)
        if cache is None:
            return
        applied = await self._apply(p, plan, children, built)
        if applied is None:
            return
        await self._apply_cache(p, cache, children)
        await self._report(p, spec, obs, plan, children, applied, analysis_due, cache)

    async def _validate(self, p: _Pass) -> GPTDeploymentSpec | None:
        """The parsed spec, or None after reporting InvalidSpec (one status write, one Warning)."""
        try:
            spec = api.parse_spec(p.body.get("spec"))
            builders.check_spec(spec, self.settings)
            evaluation.check_evaluation(spec)
        except InvalidSpec as exc:
            new = st.invalid_status(
                p.name, p.namespace, p.previous, exc.field, exc.message, generation=p.generation, now=p.now
            )
            if await self._write_status(p.body, p.previous, new):
                kopf.event(p.body, type="Warning", reason="InvalidSpec", message=str(exc))
            return None
        return spec

    async def _check_dataset(
        self, p: _Pass, spec: GPTDeploymentSpec, indices: Mapping[str, Any], *, downloading: bool = False
    ) -> tuple[bool, str | None, tuple[str, str] | None, bool]:
        """The evaluation dataset's identity when a gated rollout is in flight or about to start (None otherwise),
        checked before any pod of the new revision exists; (False, None, None) after InvalidSpec naming the field
        (and the line), the old revision untouched. A configMapRef is read by name only when needed (a GET per such
        pass; not watched: a fixed dataset is seen at the next trigger or resync); a pvc file is checked by a Job
        (dataset_check.py), while which the third element holds the rollout (reason, message). The fourth: the API
        server was asked (the caller then takes the children from the indices again)."""
        if spec.evaluation is None:
            return True, None, None, False
        revision = builders.revision_hash(builders.revision_template(spec, self.settings))
        if not rollout.needs_dataset(spec, p.previous, revision, downloading=downloading):
            # settled, ungated, held under the same spec.evaluation, or back to the served one
            return True, None, None, False
        judged = evaluation.judged_dataset(spec, p.previous, revision)
        if judged is not None:
            return True, judged, None, False  # the verdict is in: its pods are marked whatever happens to the dataset
        try:
            ds = spec.evaluation.dataset
            if ds.configMapRef is not None:
                configmap = await self.kube.get(kube.CONFIGMAPS, p.namespace, ds.configMapRef.name)
                return True, evaluation.check_dataset(spec, evaluation.configmap_text(spec, configmap)), None, True
            claim, _ = evaluation.pvc_claim(spec)
            if await self.kube.get(kube.PVCS, p.namespace, claim) is None:
                raise InvalidSpec("spec.evaluation.dataset.pvc", f"PersistentVolumeClaim {claim} not found")
        except InvalidSpec as exc:
            await self._invalid(p, exc.field, exc.message)
            return False, None, None, True
        check = await self._pvc_check(p, spec, indices, revision)
        if check.invalid is not None:
            await self._invalid(p, dataset_check.FIELD, check.invalid, {dataset_check.STATUS_KEY: check.record}
                                if check.record is not None else None)
            return False, None, None, True
        if check.record is not None:
            await self._write_status(p.body, p.previous, {dataset_check.STATUS_KEY: check.record})
        return True, check.identity, check.wait, True

    async def _pvc_check(
        self, p: _Pass, spec: GPTDeploymentSpec, indices: Mapping[str, Any], revision: str
    ) -> dataset_check.CheckPlan:
        """dataset_check's plan for the pvc file, with its Jobs created and deleted."""
        children = snapshot(indices, p.namespace, p.name, p.uid or None, self.phantoms)
        jobs = [observe.observe_job(j, children.job_pods) for j in (*children.jobs, *self._recent_jobs(p, children))]
        image = spec.runtime.image or self.settings.runtime_image
        check = dataset_check.plan_check(spec, p.name, p.namespace, p.uid, self.settings, image, p.previous, revision,
                                         jobs, p.now)
        if check.requeue_after is not None and self.requeue is not None:
            # A check Job seen Failed before its pod: judged when the grace ends even if no watch event comes. Asked
            # here, not through _report's delays: a pass refused after _build/_apply never reaches _report.
            self.requeue(p.namespace, p.name, check.requeue_after)
        for job_name in check.delete:
            if children.by_kind("Job", job_name, p.name) is not None:
                await self.kube.delete(kube.JOBS, p.namespace, job_name)
            self.recent.pop(("Job", p.namespace, job_name), None)
        if check.create is not None:
            made = await self._create_job(p, children, check.create)
            if made is None:
                return dataclasses.replace(check, events=())
            if made:
                for type_, reason, message in check.events:
                    kopf.event(p.body, type=type_, reason=reason, message=message)
        elif check.events:
            for type_, reason, message in check.events:
                kopf.event(p.body, type=type_, reason=reason, message=message)
        return check

    async def _observe(
        self, p: _Pass, spec: GPTDeploymentSpec, indices: Mapping[str, Any]
    ) -> tuple[Children, Observations, float | None]:
        """The children from the indices and the Observations the plan is made from (plus when analysis is due)."""
        template = builders.revision_template(spec, self.settings)
        revision = builders.revision_hash(template)
        children = snapshot(indices, p.namespace, p.name, p.uid or None, self.phantoms)
        annotations = p.meta.get("annotations") or {}
        canary_obs = observe.observe_deployment(children.canary) if children.canary else None
        outcome, analysis_due = await self._analyse(p.uid, p.name, p.namespace, spec, p.previous, revision, canary_obs)
        jobs = (*children.jobs, *self._recent_jobs(p, children))
        obs = Observations(
            now=p.now,
            desired_template=template,
            desired_revision=revision,
            stable=observe.observe_deployment(children.stable) if children.stable else None,
            canary=canary_obs,
            pods=tuple(observe.observe_pod(pod) for pod in children.pods),
            promote=annotations.get(ANN_PROMOTE) == "true",
            abort=annotations.get(ANN_ABORT) == "true",
            analysis_breach=outcome.breach,
            analysis_unavailable=outcome.unavailable,
            jobs=tuple(observe.observe_job(job, children.job_pods) for job in jobs),
            name=p.name,
        )
        return children, obs, analysis_due

    async def _cache(
        self, p: _Pass, spec: GPTDeploymentSpec, children: Children, obs: Observations
    ) -> model_cache.DownloadPlan:
        """The model cache's plan (model_cache.py); reads the running download pod's last progress line."""
        progress = None
        running = next((j for j in obs.jobs if j.purpose == model_cache.COMPONENT and j.running and j.pod_name
                        and j.revision == obs.desired_revision), None)
        if spec.model.cache is not None and running is not None and running.pod_name:
            text = await self.kube.pod_log(p.namespace, running.pod_name, tail_lines=model_cache.LOG_TAIL_LINES)
            progress = model_cache.parse_progress(text)
        live = [d.template for d in (obs.stable, obs.canary) if d is not None]
        return model_cache.plan_download(
            p.name, p.namespace, p.uid, spec, self.settings, revision=obs.desired_revision,
            template=obs.desired_template, previous_status=p.previous, jobs=obs.jobs, progress=progress,
            templates=[*live, p.previous.get("lastGoodTemplate")], claim=children.pvc, now=p.now,
            mounted=[pod.model_sha for pod in obs.pods if pod.model_sha],
            # A pod affinity only matches pods on a node: pods all Unschedulable are no node to follow.
            pods_exist=any(pod.unschedulable_since is None for pod in obs.pods),
        )

    async def _apply_claim(
        self, p: _Pass, cache: model_cache.DownloadPlan, children: Children
    ) -> model_cache.DownloadPlan | None:
        """Create or patch the model cache's claim; the plan, with Degraded InvalidCache when the server refused it
        (and no download Job when there is no claim to download into); None when the pass ends (the CR is gone)."""
        if cache.pvc is None:
            return cache
        claim = cache.pvc["metadata"]["name"]
        live = self._live("PersistentVolumeClaim", p.namespace, claim, p.uid, p.name, children, _Built())
        if live is None and ("PersistentVolumeClaim", p.namespace, claim) not in self.recent:
            fresh = await self.kube.get(kube.GPTDEPLOYMENTS, p.namespace, p.name)
            if fresh is None or (p.uid and (fresh.get("metadata") or {}).get("uid") != p.uid):
                return None
        try:
            action, result = await self.kube.apply(cache.pvc, live)
        except kube.OwnerGone as exc:
            await self._wait_for_gc(p.body, p.previous, p.generation, p.now, exc)
            return None
        except kube.ApiError as exc:
            if exc.status not in (400, 403, 422) and not isinstance(exc, kube.NotOwned):
                raise
            refused = model_cache.claim_refused(claim, exc.status, exc.message)
            return dataclasses.replace(cache, degraded=refused, create=None if live is None else cache.create)
        if action != "unchanged" and result is not None:
            self.recent[("PersistentVolumeClaim", p.namespace, claim)] = result
            kopf.event(p.body, type="Normal", reason=f"PersistentVolumeClaim{action.capitalize()}",
                       message=f"PersistentVolumeClaim {claim}")
        return cache

    async def _apply_cache(self, p: _Pass, cache: model_cache.DownloadPlan, children: Children) -> None:
        """Delete the download Jobs the plan let go, create the one it wants (Jobs are never patched: a Job's pod
        template is immutable, and a new revision or attempt is a new Job)."""
        for job in children.jobs:
            if job["metadata"]["name"] in cache.delete:
                await self.kube.delete(kube.JOBS, p.namespace, job["metadata"]["name"])
                self.recent.pop(("Job", p.namespace, job["metadata"]["name"]), None)
        if cache.create is not None and await self._create_job(p, children, cache.create):
            job_name = cache.create["metadata"]["name"]
            kopf.event(p.body, type="Normal", reason="JobCreated", message=f"Job {job_name}")

    async def _create_job(self, p: _Pass, children: Children, job: dict[str, Any]) -> bool | None:
        """Create a one-off Job (download, dataset check) unless the index or a write of ours not yet in it has it.
        True: created; False: it exists (also a 409 while the watch lags behind); None: the CR is gone (deleted,
        or recreated with another uid) although our index still shows it, so nothing was created."""
        job_name = job["metadata"]["name"]
        if children.by_kind("Job", job_name, p.name) is not None or ("Job", p.namespace, job_name) in self.recent:
            return False
        fresh = await self.kube.get(kube.GPTDEPLOYMENTS, p.namespace, p.name)
        if fresh is None or (p.uid and (fresh.get("metadata") or {}).get("uid") != p.uid):
            return None
        try:
            created = await self.kube.create(kube.JOBS, job)
        except kube.ApiError as exc:
            if exc.status != 409:
                raise
            return False
        self.recent[("Job", p.namespace, job_name)] = created
        return True

    async def _build(self, p: _Pass, spec: GPTDeploymentSpec, plan: Plan, children: Children) -> _Built | None:
        """The children the plan wants (pure builders) and those to delete; None after a refusal."""
        name, namespace, uid = p.name, p.namespace, p.uid
        built = _Built()
        if builders.wants_certificate(spec):
            # First: without cert-manager the pass ends at this child, before a pod that could never start.
            certificate = await self.kube.get(CERTIFICATES, namespace, names.certificate(name))
            if certificate is not None and not kube.controlled_by(certificate, uid or None):
                await self._reject(p.body, p.previous, p.generation, p.now,
                                   kube.NotOwned("Certificate", names.certificate(name)))
                return None
            built.certificate = certificate
            built.desired.append(builders.build_certificate(name, namespace, uid, spec))
        elif _mounts_issued_certificate(children.stable, name):
            # issuerRef was removed since the live Deployment was built: our Certificate goes too. (Not watched,
            # so this is how we know it exists without a GET on every pass of every CR.)
            certificate = await self.kube.get(CERTIFICATES, namespace, names.certificate(name))
            if kube.controlled_by(certificate, uid or None) and certificate is not None:
                built.unwanted.append((CERTIFICATES, certificate))
        if plan.stable is not None:  # None while a first revision downloads into the model cache
            built.desired.append(self._deployment(name, namespace, uid, spec, plan.stable, "stable"))
        built.desired.append(builders.build_service(name, namespace, uid, spec))
        if plan.canary is not None:
            built.desired.append(self._deployment(name, namespace, uid, spec, plan.canary, "canary"))
        else:
            built.unwanted.append((kube.DEPLOYMENTS, children.canary))
        if builders.wants_pdb(spec):
            built.desired.append(builders.build_pdb(name, namespace, uid, spec))
        else:
            built.unwanted.append((kube.PDBS, children.pdb))
        if builders.wants_hpa(spec, self.settings):
            built.desired.append(builders.build_hpa(name, namespace, uid, spec))
        else:
            built.unwanted.append((kube.HPAS, children.hpa))
        self._evaluation_jobs(p, spec, plan, children, built)
        if spec.networkPolicy.enabled:
            built.desired.append(builders.build_network_policy(name, namespace, uid, spec, self.settings))
        else:
            built.unwanted.append((NETWORKPOLICIES, children.netpol))
        if self.settings.scale_to_zero_provider == "keda":
            # Not watched (the KEDA CRD may be absent): read live, only where scale-to-zero is configured.
            scaled_object = await self.kube.get(kube.SCALEDOBJECTS, namespace, names.base(name))
            if scaled_object is not None and not kube.controlled_by(scaled_object, uid or None):
                # Someone else's ScaledObject of the same name: neither patched nor deleted.
                if builders.wants_scaled_object(spec, self.settings):
                    await self._reject(p.body, p.previous, p.generation, p.now,
                                       kube.NotOwned("ScaledObject", names.base(name)))
                    return None
                scaled_object = None
            built.scaled_object = scaled_object
            if builders.wants_scaled_object(spec, self.settings):
                built.desired.append(builders.build_scaled_object(name, namespace, uid, spec, self.settings))
            else:
                built.unwanted.append((kube.SCALEDOBJECTS, scaled_object))
        return built

    async def _apply(
        self, p: _Pass, plan: Plan, children: Children, built: _Built
    ) -> dict[tuple[str, str], dict[str, Any] | None] | None:
        """Create / patch (only what differs) / delete; the applied objects, or None when the pass ends here."""
        name, namespace, uid, body = p.name, p.namespace, p.uid, p.body
        if any(
            (built.scaled_object if o["kind"] == "ScaledObject"
             else built.certificate if o["kind"] == "Certificate"
             else children.by_kind(o["kind"], o["metadata"]["name"], name)) is None
            and (o["kind"], namespace, o["metadata"]["name"]) not in self.recent
            for o in built.desired
        ):
            # About to create: make sure the CR still exists. A child's DELETED event (the garbage
            # collector at work) can arrive before the CR's own DELETED event reaches our index.
            fresh = await self.kube.get(kube.GPTDEPLOYMENTS, namespace, name)
            if fresh is None or (uid and fresh.get("metadata", {}).get("uid") != uid):
                return None
        applied: dict[tuple[str, str], dict[str, Any] | None] = {}
        for obj in built.desired:
            kind, obj_name = obj["kind"], obj["metadata"]["name"]
            live = self._live(kind, namespace, obj_name, uid, name, children, built)
            try:
                action, result = await self.kube.apply(obj, live)
            except kube.OwnerGone as exc:
                await self._wait_for_gc(body, p.previous, p.generation, p.now, exc)
                return None
            except kube.ApiError as exc:
                if kind == "Certificate" and exc.status == 404:
                    # POST to a resource the API server does not serve: the cert-manager CRD is not installed.
                    await self._invalid(p, "spec.service.tls.issuerRef",
                                        "needs cert-manager (the cert-manager.io/v1 Certificate resource is not "
                                        "installed); install it or use spec.service.tls.secretName")
                    return None
                # 422 Invalid and 400 (strict field validation: an unknown field) are the spec's fault.
                if exc.status not in (400, 422) and not isinstance(exc, kube.NotOwned):
                    raise
                await self._reject(body, p.previous, p.generation, p.now, exc, f"{kind} {obj_name}")
                return None
            applied[(kind, obj_name)] = result
            if action != "unchanged" and result is not None:
                self.recent[(kind, namespace, obj_name)] = result
            if action != "unchanged":
                kopf.event(body, type="Normal", reason=f"{kind}{action.capitalize()}", message=f"{kind} {obj_name}")
        for res, live in built.unwanted:
            if live is not None:
                await self.kube.delete(res, namespace, live["metadata"]["name"])
                self.recent.pop((live.get("kind", ""), namespace, live["metadata"]["name"]), None)
                kopf.event(body, type="Normal", reason="Deleted", message=f"{res.plural} {live['metadata']['name']}")
        await self._mark_evaluated(p, plan.evaluated_revisions, children)
        annotations = p.meta.get("annotations") or {}
        present = [a for a in plan.annotations_to_clear if a in annotations]
        if present:
            await self.kube.patch(
                kube.GPTDEPLOYMENTS, namespace, name, {"metadata": {"annotations": dict.fromkeys(present)}}
            )
        return applied

    def _recent_jobs(self, p: _Pass, children: Children) -> list[dict[str, Any]]:
        """Jobs of this CR we created whose watch event has not reached the index yet: without them the next pass
        would plan (and announce) the same Job again."""
        indexed = {j["metadata"]["name"] for j in children.jobs}
        return [obj for (kind, namespace, obj_name), obj in sorted(self.recent.items())
                if kind == "Job" and namespace == p.namespace and obj_name not in indexed
                and kube.controlled_by(obj, p.uid or None)]

    def _evaluation_jobs(self, p: _Pass, spec: GPTDeploymentSpec, plan: Plan, children: Children,
                         built: _Built) -> None:
        """The evaluator Jobs the gate wants are created (never patched: a Job's spec is immutable, each is named
        after what it scores); this CR's other evaluation Jobs are deleted (done, or superseded)."""
        live = [j for j in children.jobs
                if ((j.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_COMPONENT)
                == builders.EVALUATION_COMPONENT]
        existing = {j["metadata"]["name"] for j in live}
        wanted = {job.name for job in plan.evaluation_jobs}
        image = spec.runtime.image or self.settings.runtime_image
        for job in plan.evaluation_jobs:
            if job.name not in existing and job.ip and ("Job", p.namespace, job.name) not in self.recent:
                built.desired.append(evaluation.build_job(p.name, p.namespace, p.uid, spec, self.settings, job, image))
        for obj in live:
            if obj["metadata"]["name"] not in wanted:
                built.unwanted.append((kube.JOBS, obj))

    async def _mark_evaluated(self, p: _Pass, revisions: tuple[str, ...], children: Children) -> None:
        """The gptd.io/evaluated condition on every gated pod of a revision that passed (or was rolled out):
        the readiness gate lets it take Service traffic."""
        for pod in children.pods:
            po = observe.observe_pod(pod)
            if po.gated and not po.evaluated and po.revision in revisions and po.name:
                condition = {
                    "type": builders.GATE_CONDITION, "status": "True", "reason": "EvaluationPassed",
                    "message": f"revision {po.revision} passed its evaluation",
                    "lastTransitionTime": observe.format_time(p.now),
                }
                await self.kube.set_pod_condition(p.namespace, po.name, condition)

    async def _report(
        self, p: _Pass, spec: GPTDeploymentSpec, obs: Observations, plan: Plan, children: Children,
        applied: Mapping[tuple[str, str], dict[str, Any] | None], analysis_due: float | None,
        cache: model_cache.DownloadPlan | None = None,
    ) -> None:
        """Status (status.py's fields, then the plan's), Events, and the next wake-up."""
        name, previous, generation, now = p.name, p.previous, p.generation, p.now
        new = st.compute_status(
            name=name,
            namespace=p.namespace,
            spec=spec,
            generation=generation,
            desired_revision=(plan.stable.revision if plan.canary is None and plan.stable is not None
                              else obs.desired_revision),
            stable=applied.get(("Deployment", builders.deployment_name(name))),
            canary=applied.get(("Deployment", builders.deployment_name(name, "canary"))),
            pods=children.pods,
            hpa=applied.get(("HorizontalPodAutoscaler", names.base(name))),
            previous=previous,
            now=now,
        )
        # The rollout plan owns its status fields (revisions, rollout; status.py computes none of them) and has
        # the last word on conditions.
        new.update(plan.status)
        if plan.conditions_to_drop:
            new["conditions"] = [c for c in new["conditions"] if c.get("type") not in plan.conditions_to_drop]
        if plan.conditions:
            new["conditions"] = st.merge_conditions(
                new["conditions"],
                [
                    st.set_condition(
                        previous.get("conditions") or [], c.type, c.status, c.reason, c.message,
                        generation=generation, now=now,
                    )
                    for c in plan.conditions
                ],
            )
        if cache is not None:  # status.model and, on a failed download, Degraded (model_cache.py owns both)
            new["model"] = cache.status
            if cache.degraded is not None:
                reason, message = cache.degraded
                new["conditions"] = st.merge_conditions(new["conditions"], [st.set_condition(
                    previous.get("conditions") or [], "Degraded", "True", reason, message,
                    generation=generation, now=now)])
                new["phase"] = "Degraded"
        if await self._write_status(p.body, previous, new):
            old_phase, new_phase = previous.get("phase"), new.get("phase")
            if old_phase != new_phase:
                etype = "Warning" if new_phase in ("Degraded", "Failed") else "Normal"
                degraded = next((c for c in new["conditions"] if c["type"] == "Degraded"), {})
                msg = f"phase {old_phase} -> {new_phase}"
                if new_phase in ("Degraded", "Failed") and degraded.get("message"):
                    msg += f": {degraded['message']}"
                kopf.event(p.body, type=etype, reason=new_phase or "Unknown", message=msg)
        for ev in plan.events:
            kopf.event(p.body, type=ev.type, reason=ev.reason, message=ev.message)
        for type_, reason, message in cache.events if cache is not None else ():
            kopf.event(p.body, type=type_, reason=reason, message=message)
        # Re-run due analysis even when nothing else happens (no watch event announces new metrics); a download's
        # progress is read again every few seconds.
        delays = [d for d in (plan.requeue_after, analysis_due, cache.requeue_after if cache else None)
                  if d is not None]
        if delays and self.requeue is not None:
            self.requeue(p.namespace, name, max(1.0, min(delays)))

    def _live(
        self, kind: str, namespace: str, obj_name: str, uid: str, name: str, children: Children,
        built: _Built,
    ) -> dict[str, Any] | None:
        """What the child looks like now, as far as we know without a request."""
        if kind == "ScaledObject":
            return built.scaled_object  # not watched: read live this very reconcile, fresher than anything we wrote
        if kind == "Certificate":
            return built.certificate  # likewise
        # What we wrote last wins over the index until the watch event for it arrives (then popped), but only
        # while it is still this CR's (a CR recreated under the same name has a new uid).
        recent = self.recent.get((kind, namespace, obj_name))
        if recent is not None and kube.controlled_by(recent, uid or None):
            return recent
        return children.by_kind(kind, obj_name, name)

    async def _reject(
        self, body: Mapping[str, Any], previous: Mapping[str, Any], generation: int | None, now: datetime,
        exc: kube.ApiError, what: str = "",
    ) -> None:
        """InvalidSpec for what the API server refused (a pass-through affinity or env valueFrom that is not
        valid core/v1...) or a child name someone else holds: retrying can't fix either, so no exception
        (kopf would retry forever), one status write and one Warning."""
        meta = body["metadata"]
        if isinstance(exc, kube.NotOwned):
            field, text = "metadata.name", exc.message
        else:
            field, text = rejected_field(exc.message), f"the API server rejected {what}: {exc.message}"
        new = st.invalid_status(
            meta["name"], meta["namespace"], previous, field, text, generation=generation, now=now
        )
        if await self._write_status(body, previous, new):
            kopf.event(body, type="Warning", reason="InvalidSpec", message=f"{field}: {text}")

    async def _invalid(self, p: _Pass, field: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        """InvalidSpec found only by talking to the cluster: one status write (with ``extra`` status keys) and one
        Warning, no exception (a retry can't fix it; the next trigger or resync looks again)."""
        new = {**st.invalid_status(p.name, p.namespace, p.previous, field, message, generation=p.generation,
                                   now=p.now), **(extra or {})}
        if await self._write_status(p.body, p.previous, new):
            kopf.event(p.body, type="Warning", reason="InvalidSpec", message=f"{field}: {message}")

    async def _wait_for_gc(
        self, body: Mapping[str, Any], previous: Mapping[str, Any], generation: int | None, now: datetime,
        exc: kube.OwnerGone,
    ) -> None:
        """The CR was recreated before the garbage collector removed the old one's children: say so and look again
        soon (the child's DELETED event also triggers a reconcile); not Failed, nothing to fix."""
        meta = body["metadata"]
        new = st.waiting_status(previous, exc.message, generation=generation, now=now)
        await self._write_status(body, previous, new)
        if self.requeue is not None:
            self.requeue(meta["namespace"], meta["name"], GC_REQUEUE_SECONDS)

    async def _analyse(
        self, uid: str, name: str, namespace: str, spec: GPTDeploymentSpec, previous: Mapping[str, Any],
        revision: str, canary: observe.DeploymentObs | None,
    ) -> tuple[analysis.Outcome, float | None]:
        """The canary analysis outcome for this reconcile (memoised per interval), and when it is next due."""
        ready = canary.ready_replicas if canary is not None and canary.revision == revision else 0
        key = analysis.analysis_key(spec, previous, revision, ready)
        if key is None:
            self.analyzer.forget(uid)
            return analysis.Outcome(), None
        config = spec.rollout.canary.analysis  # type: ignore[union-attr]  # analysis_key checked it
        return await self.analyzer.analyse(uid, key, name, namespace, config)  # type: ignore[arg-type]

    def _deployment(
        self, name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, plan: DeploymentPlan, track: str
    ) -> dict[str, Any]:
        return builders.build_deployment(
            name, namespace, uid, spec, self.settings,
            template=plan.template, track=track, replicas=plan.replicas, strategy=plan.strategy,
        )

    async def _write_status(self, body: Mapping[str, Any], previous: Mapping[str, Any], new: dict[str, Any]) -> bool:
        """Patch the status subresource with what changed; False (no request) when nothing did."""
        patch = st.status_patch(previous, new)
        meta = body["metadata"]
        if not patch:
            return False
        await self.kube.patch(
            kube.GPTDEPLOYMENTS, meta["namespace"], meta["name"], {"status": patch}, subresource="status"
        )
        uid = meta.get("uid", "")
        self._written[uid] = {**self._written.get(uid, {}), **{k: v for k, v in new.items()}}
        return True


def _mounts_issued_certificate(deployment: Mapping[str, Any] | None, name: str) -> bool:
    """Whether a live Deployment's pods mount the Secret of the Certificate gptd owns for CR ``name``."""
    pod = ((deployment or {}).get("spec") or {}).get("template") or {}
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return any((v.get("secret") or {}).get("secretName") == names.certificate_secret(name) for v in volumes)


# ------------------------------------------------------------------------------------- registration


def _summary(body: Mapping[str, Any], keep_status: Iterable[str]) -> dict[str, Any]:
    """What an index keeps of an object: enough to compare and observe, not managedFields and such."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "generation")
            if k in meta
        },
    }
    if "spec" in body:
        out["spec"] = body["spec"]
    status = body.get("status") or {}
    out["status"] = {k: status[k] for k in keep_status if k in status}
    return out


def _owner_key(namespace: str | None, labels: Mapping[str, str]) -> tuple[str, str] | None:
    instance = labels.get(builders.LABEL_INSTANCE)
    return (namespace or "", instance) if instance else None


@dataclass
class OperatorState:
    """Everything the handlers share, kept on kopf's ``memo`` (``memo.gptd``): one per running operator, so tests
    can run several operators with their own registries and settings."""

    settings: Settings
    reconciler: Reconciler
    # kopf hands the (live, long-lived) index objects only to handlers; the resync loop borrows them.
    indices: Mapping[str, Any] | None = None
    # kopf.event() needs context variables kopf sets only in the tasks that run handlers; reconciles started
    # by the resync loop or a requeue timer run in a copy of a handler's context, or they could not post Events.
    context: contextvars.Context | None = None
    tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    timers: dict[tuple[str, str], asyncio.TimerHandle] = field(default_factory=dict)

    def remember(self, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        indices = {k: kwargs[k] for k in (*CHILD_INDICES.values(), *POD_INDICES, "gptd_crs") if k in kwargs}
        if self.indices is None:
            self.indices = indices
        if self.context is None:
            self.context = contextvars.copy_context()
        return indices

    def in_handler_context(self, coro: Any) -> asyncio.Task[Any]:
        context = None if self.context is None else self.context.copy()
        return asyncio.get_running_loop().create_task(coro, context=context)

    def requeue(self, namespace: str, name: str, delay: float) -> None:
        """One pending wake-up per CR; the earliest wins (a later reconcile may ask again)."""
        loop = asyncio.get_running_loop()
        key = (namespace, name)
        due = loop.time() + delay
        old = self.timers.get(key)
        if old is not None and not old.cancelled() and old.when() <= due:
            return
        if old is not None:
            old.cancel()

        def fire() -> None:
            self.timers.pop(key, None)
            task = self.in_handler_context(_reconcile_owner(self, key, self.indices or {}))
            self.tasks[f"requeue-{id(task)}"] = task
            task.add_done_callback(lambda t: self.tasks.pop(f"requeue-{id(t)}", None))

        self.timers[key] = loop.call_later(delay, fire)


def memo_for(settings: Settings, reconciler: Reconciler | None = None) -> kopf.Memo:
    """The ``memo`` to pass to ``kopf.operator``: the handlers find their state on it."""
    state = OperatorState(settings, reconciler if reconciler is not None else Reconciler(settings, kube.Kube()))
    state.reconciler.requeue = state.requeue
    return kopf.Memo(gptd=state)


def _state(memo: Any) -> OperatorState:
    return memo.gptd  # type: ignore[no-any-return]


# --- lifecycle (handlers are async on purpose: kopf runs sync handlers in a thread pool, a hop per event)


def configure_kopf(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress and the diff base live in annotations under our own prefix.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gptd.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="gptd.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "gptd.io/finalizer"  # unused: no delete handlers, GC does it
    # kopf posts handler log lines of this level as Events; INFO would post "Timer succeeded"
    # on every resync. Our own Events go through kopf.event() and are not affected.
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True  # no CRD/namespace watching: less RBAC, CRD installed first
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 4


def login(**_: Any) -> Any:
    return kube.connection_info(kube.get_config())


async def start_resync(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    state.tasks["resync"] = asyncio.create_task(_resync_loop(state), name="gptd-resync")


async def close_client(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    for handle in state.timers.values():
        handle.cancel()
    tasks = list(state.tasks.values())
    state.tasks.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await state.reconciler.kube.close()
    await state.reconciler.analyzer.close()


async def _resync_loop(state: OperatorState) -> None:
    # A plain task instead of @kopf.timer: kopf timers put a finalizer on every CR, which would
    # block `kubectl delete` whenever the operator is down. Restores children that no watch event
    # reported (e.g. missed while disconnected).
    rec = state.reconciler
    first = True
    while True:
        # The first pass runs at once (it finds no CRs yet and marks the loop as running), then every period.
        if not first:
            await asyncio.sleep(state.settings.resync_seconds)
        first = False
        indices = state.indices
        crs = indices.get("gptd_crs") if indices else None
        if indices is None or crs is None:
            rec.resync_passes += 1
            continue
        started = time.monotonic()
        try:
            await rec.relist(indices)
        except Exception:  # the pass still runs on the indices; the next pass lists again
            log.exception("relist failed")
        seen: set[tuple[str, str]] = set()  # a CR whose name is not plain is indexed under two keys (index_crs)
        for key in list(crs):
            for body in list(crs.get(key, [])):
                meta = body.get("metadata") or {}
                who = (meta.get("namespace") or "", meta.get("uid") or meta.get("name") or "")
                if who in seen:
                    continue
                seen.add(who)
                try:
                    await state.in_handler_context(rec.reconcile(body, indices))
                except Exception:  # one broken CR must not stop the resync of the others
                    log.exception("resync of %s/%s failed", *key)
        rec.resync_passes += 1
        log.info("resync pass done: %d GPTDeployments in %.2f s", len(seen), time.monotonic() - started)


# --- indices: the cluster as the watch streams show it, keyed by (namespace, base name)


async def index_crs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
    # Keyed like the children's instance label (names.base), so a child's event finds its CR; a name that is not
    # plain also under itself: the instance label of its legacy children (names.py), and the key requeue() uses.
    keys = {(namespace, names.base(name)), (namespace, name)}
    return {key: _plain(body) for key in keys}


def _index_child(namespace: str | None, labels: Mapping[str, str], body: Mapping[str, Any],
                 keep: tuple[str, ...]) -> Any:
    key = _owner_key(namespace, labels)
    return {key: _summary(body, keep)} if key else None


DEPLOYMENT_STATUS = ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas", "observedGeneration",
                     "conditions")
HPA_STATUS = ("currentReplicas", "desiredReplicas")


async def index_deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    entry = _index_child(namespace, labels, body, DEPLOYMENT_STATUS)
    return None if entry is None else {key: packed(summary) for key, summary in entry.items()}


async def index_services(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _index_child(namespace, labels, body, ())


async def index_pdbs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _index_child(namespace, labels, body, ())


async def index_hpas(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _index_child(namespace, labels, body, HPA_STATUS)


async def index_netpols(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _index_child(namespace, labels, body, ())


async def index_pvcs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _index_child(namespace, labels, body, ("phase", "capacity"))


JOB_STATUS = ("active", "succeeded", "failed", "conditions", "startTime", "completionTime")


async def index_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    job = _index_child(namespace, labels, body, JOB_STATUS)
    for summary in (job or {}).values():
        summary.pop("spec", None)  # never compared: a Job's spec is immutable, a new revision is a new Job
    return job


def _pod_summary(namespace: str | None, labels: Mapping[str, str], body: Mapping[str, Any]) -> Any:
    key = _owner_key(namespace, labels)
    if not key:
        return None
    # reason/message: a pod Failed without a container state (rejected at admission, evicted) says why only there
    pod = _summary(body, ("phase", "reason", "message", "conditions", "containerStatuses", "initContainerStatuses",
                          "podIP"))
    pod["metadata"]["creationTimestamp"] = (body.get("metadata") or {}).get("creationTimestamp")
    gates = (pod.pop("spec", None) or {}).get("readinessGates")  # pod specs are big: only the gates are kept
    if gates:
        pod["spec"] = {"readinessGates": gates}
    return {key: pod}


async def index_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    if builders.LABEL_COMPONENT in labels:
        return None  # a Job's pod (download, evaluation) that somehow carries the runtime's name: never serving
    return _pod_summary(namespace, labels, body)


async def index_job_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return _pod_summary(namespace, labels, body)


# --- events: every child or pod event reconciles its owner (level-based)


async def child_event(
    type: str | None, namespace: str, name: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    state = _state(memo)
    # From now on the index is authoritative for this object.
    state.reconciler.recent.pop((body.get("kind", ""), namespace, name), None)
    if type is None:
        return  # the initial listing: the CR's resume handler covers it
    await _reconcile_owner(state, _owner_key(namespace, labels), state.remember(kwargs))


async def pod_event(type: str | None, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    if type is None:
        return
    state = _state(memo)
    await _reconcile_owner(state, _owner_key(namespace, labels), state.remember(kwargs))


async def _reconcile_owner(state: OperatorState, key: tuple[str, str] | None, indices: Mapping[str, Any]) -> None:
    crs = indices.get("gptd_crs")
    if key is None or crs is None or key not in crs:
        return
    for body in list(crs[key]):
        await state.reconciler.reconcile(body, indices)


# --- the CR itself


async def reconcile_cr(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    state = _state(memo)
    await state.reconciler.reconcile(_plain(body), state.remember(kwargs))


async def forget(type: str | None, namespace: str, name: str, uid: str | None, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        _state(memo).reconciler.forget(namespace, name, uid)


def register(
    registry: kopf.OperatorRegistry, settings: Settings | None = None, reconciler: Reconciler | None = None
) -> kopf.Memo | None:
    """Attach the module-level handlers to ``registry`` (kopf's default one for the CLI, a fresh one per test);
    with ``settings``, also return the memo to run them with (``kopf.operator(memo=...)``)."""
    group, version, plural = api.GROUP, api.VERSION, api.PLURAL
    kopf.on.startup(id="configure_kopf", registry=registry)(configure_kopf)
    kopf.on.login(id="login", registry=registry)(login)
    kopf.on.startup(id="gptd_start_resync", registry=registry)(start_resync)
    kopf.on.cleanup(id="close_client", registry=registry)(close_client)
    kopf.index(group, version, plural, id="gptd_crs", registry=registry)(index_crs)
    for index_id, (group_version, plural_), fn in (
        ("gptd_deployments", ("apps/v1", "deployments"), index_deployments),
        ("gptd_services", ("v1", "services"), index_services),
        ("gptd_pdbs", ("policy/v1", "poddisruptionbudgets"), index_pdbs),
        ("gptd_hpas", ("autoscaling/v2", "horizontalpodautoscalers"), index_hpas),
        ("gptd_netpols", ("networking.k8s.io/v1", "networkpolicies"), index_netpols),
        ("gptd_pvcs", ("v1", "persistentvolumeclaims"), index_pvcs),
        ("gptd_jobs", ("batch/v1", "jobs"), index_jobs),
    ):
        kopf.index(group_version, plural_, id=index_id, labels=MANAGED, registry=registry)(fn)
        kopf.on.event(group_version, plural_, id=f"{index_id}_event", labels=MANAGED, registry=registry)(child_event)
    kopf.index("v1", "pods", id="gptd_pods", labels=RUNTIME_PODS, registry=registry)(index_pods)
    kopf.on.event("v1", "pods", id="gptd_pods_event", labels=RUNTIME_PODS, registry=registry)(pod_event)
    kopf.index("v1", "pods", id="gptd_job_pods", labels=JOB_PODS, registry=registry)(index_job_pods)
    kopf.on.event("v1", "pods", id="gptd_job_pods_event", labels=JOB_PODS, registry=registry)(pod_event)
    # Explicit ids: kopf keeps handler progress in annotations named after them (gptd.io/reconcile).
    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(group, version, plural, id="reconcile", backoff=10, registry=registry)(reconcile_cr)
    kopf.on.event(group, version, plural, id="gptd_forget", registry=registry)(forget)
    return memo_for(settings, reconciler) if settings is not None else None


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


def configure(settings: Settings) -> kopf.Memo:
    """For ``python -m gptd_operator``: handlers on kopf's default registry; returns the memo for kopf.operator."""
    register(kopf.get_default_registry())
    return memo_for(settings)
