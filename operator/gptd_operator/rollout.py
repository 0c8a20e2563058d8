"""Rollout of a new revision: a pure state machine.

``decide(spec, status, obs)`` takes the parsed spec, the CR's current status and what the operator
observed in the cluster, and returns a ``Plan``: which revision template each Deployment should run,
with which replica count and update strategy, plus the status fields, conditions and Events to emit.
It does no I/O and reads no clock (``obs.now``), so every transition is unit-testable.

INTERFACE CONTRACT (handlers.py depends on these names):
  - ``Template``: the revisioned part of the spec, ``{"model": {...}, "runtime": {...}}`` with the runtime
    image already resolved; ``builders.revision_hash(template)`` names it.
  - ``DeploymentObs`` / ``PodObs`` / ``Observations``: built once per reconcile from the API objects by
    ``observe.py`` (purely) and shared with ``status.py``.
  - ``Plan``: handlers build the stable Deployment ``<name>`` from ``plan.stable`` and, when
    ``plan.canary`` is set, the Deployment ``<name>-canary`` from it (deleting it when None); they merge
    ``plan.status`` into the CR status, set ``plan.conditions`` and post ``plan.events``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from . import evaluation
from .api import GPTDeploymentSpec
from .builders import TEMPLATE_GATE_KEY, desired_replicas, revision_hash, rolling_strategy
from .evaluation import EvalJob
from .observe import Observations, PodObs, Template, format_time, parse_time


@dataclass(frozen=True)
class DeploymentPlan:
    template: Template
    revision: str
    replicas: int | None  # None: leave the replica count alone (the HPA owns it)
    strategy: dict[str, Any]  # Deployment .spec.strategy


@dataclass(frozen=True)
class ConditionPlan:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


@dataclass(frozen=True)
class EventPlan:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    stable: DeploymentPlan | None  # None only while a first revision downloads (model cache): no Deployment yet
    canary: DeploymentPlan | None
    status: dict[str, Any] = field(default_factory=dict)  # merged into CR .status
    conditions: tuple[ConditionPlan, ...] = ()
    events: tuple[EventPlan, ...] = ()
    annotations_to_clear: tuple[str, ...] = ()  # e.g. gptd.io/promote after it was honoured
    # Reconcile again after this many seconds even if nothing changes (a pause, grace or deadline ends).
    requeue_after: float | None = None
    # The evaluation gate (evaluation.py): the evaluator Jobs that must exist (others of this CR are deleted), and
    # the revisions whose gated pods get the gptd.io/evaluated condition (passed, or rolled out before).
    evaluation_jobs: tuple[EvalJob, ...] = ()
    evaluated_revisions: tuple[str, ...] = ()
    # Condition types to remove from the CR (e.g. Evaluated once there is neither spec.evaluation nor a record).
    conditions_to_drop: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- constants

PROMOTE_ANNOTATION = "gptd.io/promote"
ABORT_ANNOTATION = "gptd.io/abort"

# A new-revision pod counts as crash-looping once it restarted this often with a waiting reason set...
CRASHLOOP_RESTARTS = 3
# ...or at once for waiting reasons that restarting never fixes.
FATAL_WAITING_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# The keys of the CR status this module owns; plan.status holds exactly these.
STATUS_KEYS = (
    "currentRevision", "updateRevision", "lastGoodRevision", "lastGoodTemplate", "failedRevision", "rollout",
    "evaluation", "evaluationBaseline",  # the evaluation gate's record (evaluation.gate computes them)
)

# status.rollout.phase: an in-flight rollout...
ROLLING_OUT, CANARY, PROMOTING = "RollingOut", "Canary", "Promoting"
ACTIVE_PHASES = (ROLLING_OUT, CANARY, PROMOTING)
# ...or a finished one that failed; kept while the spec still asks for that revision so it is not retried.
ROLLED_BACK, FAILED = "RolledBack", "Failed"
HOLD_PHASES = (ROLLED_BACK, FAILED)


# ---------------------------------------------------------------------------------------------- decide


def decide(spec: GPTDeploymentSpec, status: dict[str, Any], obs: Observations) -> Plan:
    """Next plan for the Deployments and the rollout status; pure (see the module docstring)."""
    d = _Ctx(spec, obs, status or {})
    d.state["updateRevision"] = obs.desired_revision
    # Annotations are one-shot requests: honoured or not, they are cleared so they can't fire later by surprise.
    if obs.promote:
        d.clear.append(PROMOTE_ANNOTATION)
    if obs.abort:
        d.clear.append(ABORT_ANNOTATION)
    if obs.download_wait is not None:  # spec.model.cache: the revision is not in the cache yet
        return _downloading(d)
    ro = d.ro
    phase = ro.get("phase") if ro else None
    same_revision = bool(ro) and ro.get("revision") == obs.desired_revision
    if phase in ACTIVE_PHASES and same_revision:
        return _advance(d)
    if phase in HOLD_PHASES and same_revision:
        if ro.get("evaluationSpec") and ro["evaluationSpec"] != evaluation.evaluation_hash(spec):
            # Failed its evaluation, and spec.evaluation changed since: a spec change, so it is tried again.
            return _start(d)
        return _hold(d)
    if phase not in ACTIVE_PHASES and obs.desired_revision == d.state.get("currentRevision"):
        return _steady(d)
    # A new revision, or the spec changed mid-rollout (even back to the current one): start over.
    return _start(d)


def needs_dataset(spec: GPTDeploymentSpec, status: dict[str, Any], revision: str, *, downloading: bool = False) -> bool:
    """Whether ``decide`` may gate ``revision`` on this pass, so the handlers must read and check the evaluation
    dataset first (before any pod of it is rolled). Mirrors decide's dispatch: a gated rollout in flight, one about
    to start, or a held failure that a changed spec.evaluation retries; not a settled CR, an ungated rollout, a
    held failure under the same spec.evaluation, or a return to the serving revision. ``downloading``: the revision
    is still downloading into the model cache (``Observations.download_wait``): decide starts no gate then."""
    if spec.evaluation is None or downloading:
        return False
    ro = status.get("rollout") or {}
    phase = ro.get("phase")
    if ro.get("revision") == revision:
        if phase in HOLD_PHASES:
            return bool(ro.get("evaluationSpec")) and ro["evaluationSpec"] != evaluation.evaluation_hash(spec)
        if phase in ACTIVE_PHASES:
            return bool(ro.get("evaluationGate"))
    return revision not in (status.get("currentRevision"), status.get("lastGoodRevision"))


@dataclass
class _Ctx:
    """The working state of one ``decide`` call."""

    spec: GPTDeploymentSpec
    obs: Observations
    original: dict[str, Any]
    state: dict[str, Any] = field(init=False)
    events: list[EventPlan] = field(default_factory=list)
    clear: list[str] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)
    jobs: tuple[EvalJob, ...] = ()
    gate: tuple[evaluation.Gate | None] | None = None  # _gate's answer, computed once per call

    def __post_init__(self) -> None:
        self.original = {k: self.original[k] for k in STATUS_KEYS if k in self.original}
        self.state = copy.deepcopy(self.original)

    @property
    def ro(self) -> dict[str, Any] | None:
        return self.state.get("rollout")

    @property
    def rev(self) -> str:
        return self.obs.desired_revision

    @property
    def template(self) -> Template:
        """The desired revision's template, with the readiness gate when this rollout is gated."""
        if self.ro and self.ro.get("evaluationGate"):
            return {**self.obs.desired_template, TEMPLATE_GATE_KEY: True}
        return _served_template(self)  # the last good revision keeps the gate it was rolled out with

    @property
    def now_s(self) -> str:
        return format_time(self.obs.now)

    def since(self, stamp: str | datetime | None) -> float:
        """Seconds from ``stamp`` to now (0 when unknown)."""
        when = parse_time(stamp) if isinstance(stamp, str | None) else stamp
        if when is None:
            return 0.0
        now = self.obs.now if self.obs.now.tzinfo else self.obs.now.replace(tzinfo=UTC)
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        return (now - when).total_seconds()

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(EventPlan(type_, reason, message))


# --- the phases ---------------------------------------------------------------------------------------


def _steady(d: _Ctx) -> Plan:
    """Nothing in flight and the spec's revision is the one served: the plan changes nothing."""
    d.state.pop("rollout", None)  # a finished RolledBack/Failed record once the spec moved on
    stable = DeploymentPlan(_served_template(d), d.rev, desired_replicas(d.spec), rolling_strategy(d.spec, False))
    return _finish(d, stable, None, _cond("Progressing", False, "RolloutComplete", f"revision {d.rev} is rolled out"))


def _downloading(d: _Ctx) -> Plan:
    """The desired revision is still downloading into the model cache (or its download failed): every Deployment
    keeps the template it runs (old pods keep serving); a first revision gets no Deployment yet. The rollout
    state is left as it is: the rollout starts once the download is complete. A rollout of another revision still
    in flight stays supervised (abort, crash loop, analysis breach, progress deadline roll it back); the promote
    annotation, and abort with nothing in flight, stay on the CR for when the new revision's rollout starts."""
    reason, message = d.obs.download_wait or ("Downloading", "")
    s, c = d.obs.stable, d.obs.canary
    ro = d.ro
    inflight = bool(ro) and ro.get("phase") in ACTIVE_PHASES and ro.get("revision") != d.rev
    if inflight:
        failed = _inflight_failure(d)
        if failed is not None:
            return failed
    for annotation in (PROMOTE_ANNOTATION, ABORT_ANNOTATION):
        if annotation in d.clear:
            d.clear.remove(annotation)  # not honoured yet: not dropped either
    live = s.template if s is not None else d.state.get("lastGoodTemplate")
    stable = None
    if live:
        # Mid-rollout (an in-place canary shrank the stable Deployment) the live count stays; otherwise the spec's.
        replicas = s.spec_replicas if inflight and s is not None else desired_replicas(d.spec)
        stable = DeploymentPlan(live, revision_hash(live), replicas, rolling_strategy(d.spec, False))
    canary = None
    if c is not None and c.template:
        canary = DeploymentPlan(c.template, revision_hash(c.template), c.spec_replicas, rolling_strategy(d.spec, False))
    # Downloading, or CheckingDataset (handlers: a pvc evaluation dataset's check Job, dataset_check.py): progressing.
    return _finish(d, stable, canary, _cond("Progressing", reason in ("Downloading", "CheckingDataset"), reason,
                                            message))


def _inflight_failure(d: _Ctx) -> Plan | None:
    """The rollout of ``rollout.revision`` (not the desired one, which downloads) checked as ``_failure`` checks
    any rollout, on the Deployment that runs it: its rollback plan, or None (its progress kept in ``d``)."""
    ro = d.ro or {}
    s, c = d.obs.stable, d.obs.canary
    template = next((o.template for o in (c, s) if o is not None and o.template and o.revision == ro["revision"]),
                    None)
    if template is None:
        return None
    sub = _Ctx(d.spec, replace(d.obs, desired_template=template, desired_revision=ro["revision"],
                               download_wait=None), d.state)
    sub.clear.extend(a for a in d.clear if a == ABORT_ANNOTATION)  # honoured here; promote waits
    _track_progress(sub)
    failure = _failure(sub, s.spec_replicas if s is not None else None, deadline=not ro.get("evaluationGate"))
    if failure is not None:
        return _fail(sub, *failure)
    d.state["rollout"] = sub.state["rollout"]
    d.requeue.extend(sub.requeue)
    return None


def _start(d: _Ctx) -> Plan:
    lg, lgt = d.state.get("lastGoodRevision"), d.state.get("lastGoodTemplate")
    # A canary needs something to compare against; the first revision (or a return to the last good one)
    # is rolled out directly.
    canary = d.spec.rollout.strategy == "Canary" and d.spec.rollout.canary is not None and bool(lgt) and lg != d.rev
    d.state["rollout"] = {
        "revision": d.rev,
        "step": 0 if canary else None,
        "startedAt": d.now_s,
        "phase": CANARY if canary else ROLLING_OUT,
        "progressAt": d.now_s,
        "readyPods": 0,
    }
    # Decided now, for this revision: a later spec.evaluation edit rolls nothing. A revision that already served
    # (back to it mid-rollout) passed or predates the gate: it is not scored again.
    served = d.rev in (d.state.get("currentRevision"), d.state.get("lastGoodRevision"))
    if (d.state.get("evaluation") or {}).get("revision") != d.rev:
        d.state.pop("evaluation", None)  # another revision's score: the Score column must not show it for this one
    if d.spec.evaluation is not None and not served:
        d.state["rollout"]["evaluationGate"] = True
    current = d.state.get("currentRevision")
    how = "canary" if canary else "rolling update"
    d.event("Normal", "RolloutStarted", f"rolling out revision {d.rev} (from {current or 'nothing'}) by {how}")
    return _advance(d)


def _advance(d: _Ctx) -> Plan:
    _track_progress(d)
    phase = d.ro["phase"]
    if phase in (CANARY, PROMOTING):
        _analysis_health(d)
    if phase == CANARY:
        return _canary(d)
    if phase == PROMOTING:
        return _promoting(d)
    return _rolling(d)


def _rolling(d: _Ctx) -> Plan:
    want = desired_replicas(d.spec)
    # The gate first: a gated rollout is complete only once its evaluation passed, even with no pods to wait for
    # (replicas 0, scaled to zero), or a later scale-up would mark unscored pods at once.
    gate = _gate(d)
    if gate is not None and gate.verdict in ("failed", "timeout"):
        d.ro["evaluationSpec"] = evaluation.evaluation_hash(d.spec)
        return _fail(d, _GATE_REASONS[gate.verdict], gate.message)
    if _stable_done(d, want) and _gate_open(d):
        return _complete(d, "RolloutComplete", f"revision {d.rev} is rolled out")
    gpu = _gpu(d, can_dip=True, waiting_reason="RollingOut")
    zero = _zero_replicas(d, want)
    failure = _failure(d, want, deadline=(gate is None or not gate.running) and not zero)
    if failure:
        return _fail(d, *failure)
    stable = DeploymentPlan(d.template, d.rev, want, rolling_strategy(d.spec, bool(d.ro.get("inPlace"))))
    if gate is not None and gate.verdict == "pending":
        why = gate.message
        if zero:
            why = (f"revision {d.rev} runs 0 replicas: its rollout stays open until a pod of it is evaluated "
                   f"(the first pod is scored when it scales up)")
        cond = gpu or _cond("Progressing", True, "Evaluating", why)
    else:
        cond = gpu or _rolling_cond(d, want)
    return _finish(d, stable, None, cond)


def _zero_replicas(d: _Ctx, want: int | None) -> bool:
    """No pod of the revision is wanted now (replicas 0, or an autoscaler scaled it to zero): nothing can make
    progress, so the progress deadline does not run."""
    if want is None:
        return d.obs.stable is not None and d.obs.stable.spec_replicas == 0
    return want == 0


def _canary(d: _Ctx) -> Plan:
    canary_spec = d.spec.rollout.canary
    step = int(d.ro.get("step") or 0)
    if d.spec.rollout.strategy != "Canary" or canary_spec is None or step >= len(canary_spec.steps):
        return _to_promoting(d, "the spec no longer has canary steps left")
    if not d.state.get("lastGoodTemplate"):  # status lost: no baseline to keep serving, so just promote
        return _to_promoting(d, "there is no last good revision to compare against")
    gate = _gate(d)  # the first step's canary pods are scored before they take traffic
    if gate is not None and gate.verdict in ("failed", "timeout"):
        d.ro["evaluationSpec"] = evaluation.evaluation_hash(d.spec)
        return _fail(d, _GATE_REASONS[gate.verdict], gate.message)
    deferred = ""
    if d.obs.promote:
        if _gate_open(d):
            d.ro.pop("promoteDeferred", None)
            return _to_promoting(d, f"promoted by {PROMOTE_ANNOTATION}=true")
        # Promoting now would abandon the score the canary waits for: the annotation stays and is honoured once
        # the evaluation passed (a failed one rolls back as usual).
        d.clear.remove(PROMOTE_ANNOTATION)
        deferred = f"; {PROMOTE_ANNOTATION}=true waits for the evaluation to pass"
        if not d.ro.get("promoteDeferred"):
            d.ro["promoteDeferred"] = True
            d.event("Normal", "PromoteDeferred", f"revision {d.rev}: {PROMOTE_ANNOTATION}=true is honoured once its "
                                                 "evaluation passed")
    steps = canary_spec.steps
    n, weight, pause = len(steps), steps[step].weight, steps[step].pauseSeconds
    count = _canary_replicas(d, weight)
    ready = _canary_ready(d, count)
    if ready and not d.ro.get("stepReadyAt"):
        d.ro["stepReadyAt"] = d.now_s
    gpu = _gpu(d, can_dip=d.spec.autoscaling is None, waiting_reason=f"CanaryStep{step + 1}of{n}")
    failure = _failure(d, count, deadline=gate is None or not gate.running)
    if failure:
        return _fail(d, *failure)
    where = f"step {step + 1}/{n}: weight {weight}% = {count} canary pod(s) beside {_share(d, count)}"
    reason = f"CanaryStep{step + 1}of{n}"
    if ready:
        if d.obs.analysis_unavailable:  # can't judge the canary: don't advance it (handlers re-run the analysis)
            hold = f"Ready, not advancing: canary analysis unavailable: {d.obs.analysis_unavailable}"
            cond = _cond("Progressing", True, reason, f"{where}; {hold}")
        elif pause is None:
            cond = _cond("Progressing", True, reason, f"{where}; Ready, paused until {PROMOTE_ANNOTATION}=true")
        else:
            left = pause - d.since(d.ro["stepReadyAt"])
            if left <= 0:
                return _next_step(d, step, n)
            d.requeue.append(left)
            cond = _cond("Progressing", True, reason, f"{where}; Ready since {d.ro['stepReadyAt']}, pausing {pause}s")
    elif gate is not None and gate.verdict == "pending":
        cond = gpu or _cond("Progressing", True, reason, f"{where}; {gate.message}{deferred}")
    else:
        cond = gpu or _cond("Progressing", True, reason, f"{where}; waiting for the canary to be Ready")
    return _finish(d, _baseline_plan(d, count), _canary_plan(d, count), cond)


def _analysis_health(d: _Ctx) -> None:
    """An analysis outage is recorded in status.rollout.analysisUnavailable, with one Warning Event when it
    starts and one Normal Event when it ends; it never fails the rollout."""
    ro = d.ro
    if d.obs.analysis_unavailable:
        if not ro.get("analysisUnavailable"):
            ro["analysisUnavailable"] = d.obs.analysis_unavailable
            msg = f"revision {d.rev}: canary analysis unavailable, holding the canary: {d.obs.analysis_unavailable}"
            d.event("Warning", "AnalysisUnavailable", msg)
    elif ro.pop("analysisUnavailable", None):
        d.event("Normal", "AnalysisRecovered", f"revision {d.rev}: canary analysis available again")


def _next_step(d: _Ctx, step: int, n: int) -> Plan:
    if step + 1 >= n:
        return _to_promoting(d, "all canary steps passed")
    d.ro["step"] = step + 1
    d.ro.pop("stepReadyAt", None)
    d.ro["progressAt"] = d.now_s  # the deadline restarts for the bigger canary
    weight = d.spec.rollout.canary.steps[step + 1].weight  # type: ignore[union-attr]
    d.event("Normal", "CanaryStep", f"revision {d.rev}: canary step {step + 2}/{n}, weight {weight}%")
    return _canary(d)


def _to_promoting(d: _Ctx, why: str) -> Plan:
    d.ro["phase"] = PROMOTING
    d.ro["progressAt"] = d.now_s
    d.ro.pop("stepReadyAt", None)
    d.ro["canaryReplicas"] = _promoting_canary_replicas(d)  # frozen: the canary keeps serving as it was
    d.event("Normal", "Promoting", f"promoting revision {d.rev} to all replicas: {why}")
    return _promoting(d)


def _promoting(d: _Ctx) -> Plan:
    count = int(d.ro.get("canaryReplicas") or 0)
    want = _stable_replicas(d, count)
    # Promoted before the gate passed (no canary steps left, no last good template): still scored first.
    gate = _gate(d)
    if gate is not None and gate.verdict in ("failed", "timeout"):
        d.ro["evaluationSpec"] = evaluation.evaluation_hash(d.spec)
        return _fail(d, _GATE_REASONS[gate.verdict], gate.message)
    if _stable_done(d, want) and _gate_open(d):
        return _complete(d, "Promoted", f"revision {d.rev} is promoted to all replicas")
    gpu = _gpu(d, can_dip=True, waiting_reason="Promoting")
    failure = _failure(d, want, deadline=(gate is None or not gate.running) and not _zero_replicas(d, want))
    if failure:
        return _fail(d, *failure)
    stable = DeploymentPlan(d.template, d.rev, want, rolling_strategy(d.spec, bool(d.ro.get("inPlace"))))
    canary = _canary_plan(d, count) if count else None
    s = d.obs.stable
    updated = _updated(d)
    target = want if want is not None else (s.spec_replicas if s else "?")
    msg = f"promoting revision {d.rev}: {updated}/{target} stable pods updated; the canary stays until they are Ready"
    if gate is not None and gate.verdict == "pending":
        msg += f"; {gate.message}"
    return _finish(d, stable, canary, gpu or _cond("Progressing", True, "Promoting", msg))


def _complete(d: _Ctx, event_reason: str, message: str) -> Plan:
    template = d.template  # with the gate if this rollout had one (before the rollout record goes)
    d.state["currentRevision"] = d.state["lastGoodRevision"] = d.rev
    d.state["lastGoodTemplate"] = copy.deepcopy(template)
    d.state.pop("rollout", None)
    d.event("Normal", event_reason, message)
    stable = DeploymentPlan(template, d.rev, desired_replicas(d.spec), rolling_strategy(d.spec, False))
    return _finish(d, stable, None, _cond("Progressing", False, "RolloutComplete", f"revision {d.rev} is rolled out"))


def _fail(d: _Ctx, reason: str, message: str) -> Plan:
    """The new revision failed: restore the last good one, or with none keep trying the only one there is."""
    ro = d.ro
    lg, lgt = d.state.get("lastGoodRevision"), d.state.get("lastGoodTemplate")
    in_place = bool(ro.get("inPlace"))  # a GPU-starved rollout must roll back in place too
    d.state["failedRevision"] = d.rev
    record: dict[str, Any] = {"revision": d.rev, "step": ro.get("step"), "startedAt": ro.get("startedAt")}
    if in_place:
        record["inPlace"] = True
    if ro.get("evaluationSpec"):
        record["evaluationSpec"] = ro["evaluationSpec"]
    if ro.get("evaluationGate"):  # a held first revision keeps its gate: its pods must not take traffic
        record["evaluationGate"] = True
    if lgt and lg and lg != d.rev:
        message = f"revision {d.rev} rolled back to {lg}: {message}"
        d.state["rollout"] = {**record, "phase": ROLLED_BACK, "reason": reason, "message": message}
        d.event("Warning", "RolledBack", message)
        return _hold(d)
    message = f"revision {d.rev} failed and there is no earlier good revision to roll back to: {message}"
    d.state["rollout"] = {**record, "phase": FAILED, "reason": reason, "message": message}
    d.event("Warning", "RolloutFailed", message)
    return _hold(d)


def _hold(d: _Ctx) -> Plan:
    """After a failure, while the spec still asks for the failed revision: don't retry it."""
    ro = d.ro
    in_place = bool(ro.get("inPlace"))
    lg, lgt = d.state.get("lastGoodRevision"), d.state.get("lastGoodTemplate")
    if ro["phase"] == ROLLED_BACK and lgt and lg:
        stable = DeploymentPlan(lgt, lg, desired_replicas(d.spec), rolling_strategy(d.spec, in_place))
        return _finish(d, stable, None, _cond("Progressing", False, "RolledBack", ro.get("message", "")))
    # Nothing to roll back to: keep the desired template (the Deployment keeps retrying it), and accept it
    # if it recovers on its own (a slow download, a GPU that freed up).
    want = desired_replicas(d.spec)
    if _stable_done(d, want) and _gate_open(d):
        return _complete(d, "RolloutComplete", f"revision {d.rev} is rolled out after an earlier failure")
    stable = DeploymentPlan(d.template, d.rev, want, rolling_strategy(d.spec, in_place))
    return _finish(d, stable, None, _cond("Progressing", False, "FirstRevisionFailed", ro.get("message", "")))


# --- checks -------------------------------------------------------------------------------------------


def _track_progress(d: _Ctx) -> None:
    """Each new-revision pod that becomes Ready is progress and restarts the deadline (as Kubernetes does)."""
    ready = sum(1 for p in d.obs.pods if p.revision == d.rev and p.ready)
    if ready > int(d.ro.get("readyPods") or 0):
        d.ro["readyPods"] = ready
        d.ro["progressAt"] = d.now_s


def _failure(d: _Ctx, want: int | None, *, deadline: bool = True) -> tuple[str, str] | None:
    """Why the in-flight rollout must be abandoned, as (RolledBack reason, message), or None. ``deadline`` False:
    an evaluator Job is running (it has its own timeout), so the progress deadline waits."""
    ro = d.ro
    if d.obs.abort:
        return "Aborted", f"aborted by {ABORT_ANNOTATION}=true"
    if d.obs.analysis_breach and ro["phase"] in (CANARY, PROMOTING):
        return "AnalysisFailed", f"canary analysis failed: {d.obs.analysis_breach}"
    for pod in d.obs.pods:
        if pod.revision == d.rev and _crashlooping(pod):
            return "CrashLoop", f"a pod is crash-looping ({pod.restarts} restarts): {pod.crashloop_message}"
    # Waiting for a GPU is not the revision's fault, and a canary pausing on purpose is not stuck.
    if ro.get("gpuWait") or (ro["phase"] == CANARY and ro.get("stepReadyAt")) or not deadline:
        return None
    deadline = d.spec.rollout.progressDeadlineSeconds
    left = deadline - d.since(ro.get("progressAt") or ro.get("startedAt"))
    if left <= 0:
        ready = sum(1 for p in d.obs.pods if p.revision == d.rev and p.ready)
        of = f" of {want}" if want is not None else ""
        return "ProgressDeadlineExceeded", f"no progress for {deadline}s ({ready}{of} new pods Ready)"
    d.requeue.append(left)
    return None


def _crashlooping(pod: PodObs) -> bool:
    if not pod.crashloop_message:
        return False
    return pod.restarts >= CRASHLOOP_RESTARTS or pod.waiting_reason in FATAL_WAITING_REASONS


def _gpu(d: _Ctx, *, can_dip: bool, waiting_reason: str) -> ConditionPlan | None:
    """New-revision pods stuck Unschedulable: wait out the grace, then dip capacity or say why we're stuck."""
    ro = d.ro
    pending = [p for p in d.obs.pods if p.revision == d.rev and not p.ready and p.unschedulable_since]
    if not pending:
        if ro.pop("gpuWait", None):
            ro["progressAt"] = d.now_s  # the pods got their GPUs: the deadline counts from now
        return None
    oldest = min(pending, key=lambda p: p.unschedulable_since)  # type: ignore[arg-type,return-value]
    scheduler = oldest.unschedulable_message or "Unschedulable"
    ro.setdefault("gpuWait", "pending")
    if ro.get("inPlace"):
        return _cond("Progressing", True, "CapacityDip", f"{_dip_text(d)}; waiting for a freed GPU: {scheduler}")
    grace = d.spec.rollout.surgeGraceSeconds
    allowed = can_dip and _allow_dip(d)
    left = grace - d.since(oldest.unschedulable_since)
    if left > 0:
        d.requeue.append(left)
        then = "replacing pods in place" if allowed else "reporting InsufficientGPUForSurge"
        msg = f"waiting up to {grace}s for a GPU for a new pod of revision {d.rev}, then {then}: {scheduler}"
        return _cond("Progressing", True, waiting_reason, msg)
    if allowed:
        ro["inPlace"] = True
        msg = f"no GPU for an extra pod of revision {d.rev} after {grace}s: {_dip_text(d)}: {scheduler}"
        d.event("Warning", "CapacityDip", msg)
        return _cond("Progressing", True, "CapacityDip", msg)
    msg = (
        f"no GPU for an extra pod of revision {d.rev} after {grace}s and capacity may not dip "
        f"(set spec.rollout.allowCapacityDip: true or free a GPU); still waiting: {scheduler}"
    )
    if ro.get("gpuWait") != "blocked":
        ro["gpuWait"] = "blocked"
        d.event("Warning", "InsufficientGPUForSurge", msg)
    return _cond("Progressing", False, "InsufficientGPUForSurge", msg)


def _dip_text(d: _Ctx) -> str:
    if d.ro.get("phase") == CANARY:
        return "the stable Deployment gives up GPUs to the canary (capacity dips)"
    if (desired_replicas(d.spec) or 0) <= 1:
        return "replacing the only pod in place (downtime until the new pod is Ready)"
    return "replacing pods in place, one at a time (capacity dips by one pod)"


def _allow_dip(d: _Ctx) -> bool:
    explicit = d.spec.rollout.allowCapacityDip
    if explicit is not None:
        return explicit
    total = desired_replicas(d.spec)
    if total is None:  # autoscaled: judge by what runs now
        total = d.obs.stable.spec_replicas if d.obs.stable else d.spec.autoscaling.minReplicas  # type: ignore[union-attr]
    return total > 1


def _stable_done(d: _Ctx, want: int | None) -> bool:
    """The stable Deployment runs the desired revision on every pod, all Ready, and the controller saw it."""
    s = d.obs.stable
    if s is None or s.revision != d.rev or not s.up_to_date:
        return False
    if want is None:  # the HPA owns the count
        want = s.spec_replicas
    elif s.spec_replicas != want:
        return False
    return s.updated_replicas >= want and s.ready_replicas >= want and s.replicas <= s.updated_replicas


def _canary_ready(d: _Ctx, count: int) -> bool:
    c = d.obs.canary
    if c is None or c.revision != d.rev or not c.up_to_date or c.spec_replicas != count:
        return False
    return c.updated_replicas >= count and c.ready_replicas >= count


# --- plan pieces --------------------------------------------------------------------------------------




def _live_total(d: _Ctx) -> int:
    total = desired_replicas(d.spec)
    if total is not None:
        return total
    if d.obs.stable is not None:
        return d.obs.stable.spec_replicas
    return d.spec.autoscaling.minReplicas  # type: ignore[union-attr]


def _stable_replicas(d: _Ctx, canary_count: int) -> int | None:
    """Stable keeps its count; only a canary that dipped capacity takes its pods' GPUs from the stable."""
    total = desired_replicas(d.spec)
    if total is not None and d.ro and d.ro.get("inPlace") and d.ro.get("phase") in (CANARY, PROMOTING):
        return max(0, total - canary_count)
    return total


def canary_replicas(total: int, weight: int) -> int:
    """Canary pods for a step: max(1, round(total * weight / 100)), rounding halves up."""
    return max(1, math.floor(total * weight / 100 + 0.5))


def _canary_replicas(d: _Ctx, weight: int) -> int:
    return canary_replicas(_live_total(d), weight)


def _promoting_canary_replicas(d: _Ctx) -> int:
    canary_spec = d.spec.rollout.canary
    if d.spec.rollout.strategy == "Canary" and canary_spec is not None and canary_spec.steps:
        step = min(int(d.ro.get("step") or 0), len(canary_spec.steps) - 1)
        return _canary_replicas(d, canary_spec.steps[step].weight)
    return d.obs.canary.spec_replicas if d.obs.canary is not None else 0


def _share(d: _Ctx, count: int) -> str:
    stable = _stable_replicas(d, count)
    stable_n = stable if stable is not None else _live_total(d)
    pct = round(100 * count / (count + stable_n)) if count + stable_n else 100
    return f"{stable_n} stable (~{pct}% of traffic)"


def _baseline_plan(d: _Ctx, canary_count: int) -> DeploymentPlan:
    return DeploymentPlan(
        d.state["lastGoodTemplate"],
        d.state["lastGoodRevision"],
        _stable_replicas(d, canary_count),
        rolling_strategy(d.spec, False),
    )


def _canary_plan(d: _Ctx, count: int) -> DeploymentPlan:
    return DeploymentPlan(d.template, d.rev, count, rolling_strategy(d.spec, False))


# --- the evaluation gate (evaluation.py) ------------------------------------------------------------------

_GATE_REASONS = {"failed": "EvaluationFailed", "timeout": "EvaluationTimeout"}


def _gate(d: _Ctx) -> evaluation.Gate | None:
    """The gate of a gated rollout (None when it has none); records status.evaluation and the Jobs it needs."""
    if not (d.ro and d.ro.get("evaluationGate")):
        return None
    if d.gate is not None:  # once per decide: a phase change within one call must not start or report it twice
        return d.gate[0]
    current = d.state.get("currentRevision") or d.state.get("lastGoodRevision")
    g = evaluation.gate(d.spec, d.obs.name, d.state, d.rev, current, d.obs.pods, d.obs.evaluation_dataset,
                        d.obs.jobs, d.obs.now)
    if g.evaluation is not None:
        d.state["evaluation"] = g.evaluation
    if g.baseline is not None:
        d.state["evaluationBaseline"] = g.baseline
    d.jobs = g.jobs
    for type_, reason, message in g.events:
        d.event(type_, reason, message)
    if g.requeue is not None:
        d.requeue.append(g.requeue)
    d.gate = (g,)
    return g


def _gate_open(d: _Ctx) -> bool:
    """The rollout may complete: it is not gated, or this revision's evaluation passed. A gated revision whose
    evaluation failed, timed out or has not finished is never made current, whatever its pods say."""
    if not (d.ro and d.ro.get("evaluationGate")):
        return True
    ev = d.state.get("evaluation") or {}
    return ev.get("revision") == d.rev and ev.get("passed") is True


def _served_template(d: _Ctx) -> Template:
    """The template of the revision being served, with the readiness gate it was rolled out with (kept in
    lastGoodTemplate): adding or removing spec.evaluation must not change a live pod template."""
    lgt = d.state.get("lastGoodTemplate")
    if d.state.get("lastGoodRevision") == d.rev and lgt and lgt.get(TEMPLATE_GATE_KEY):
        return {**d.obs.desired_template, TEMPLATE_GATE_KEY: True}
    return d.obs.desired_template


def _evaluated_revisions(d: _Ctx) -> tuple[str, ...]:
    return evaluated_revisions(d.state)


def evaluated_revisions(status: dict[str, Any]) -> tuple[str, ...]:
    """Revisions whose gated pods get the gptd.io/evaluated condition: the served and last good ones (rolled out,
    so passed or never gated) and one whose evaluation passed."""
    revs = {status.get("currentRevision"), status.get("lastGoodRevision")}
    ev = status.get("evaluation") or {}
    if ev.get("passed") is True:
        revs.add(ev.get("revision"))
    return tuple(sorted(r for r in revs if r))


def _rolling_cond(d: _Ctx, want: int | None) -> ConditionPlan:
    s = d.obs.stable
    updated = _updated(d)
    ready = sum(1 for p in d.obs.pods if p.revision == d.rev and p.ready)
    target = want if want is not None else (s.spec_replicas if s else "?")
    msg = f"rolling out revision {d.rev}: {updated}/{target} pods updated, {ready} Ready"
    if d.ro.get("inPlace"):
        return _cond("Progressing", True, "CapacityDip", f"{msg}; {_dip_text(d)}")
    return _cond("Progressing", True, "RollingOut", msg)


def _updated(d: _Ctx) -> int:
    """Stable pods on the desired revision; 0 until the controller has seen the new template (its counts
    until then are the previous template's)."""
    s = d.obs.stable
    return s.updated_replicas if s and s.revision == d.rev and s.up_to_date else 0


def _cond(type_: str, status: bool, reason: str, message: str) -> ConditionPlan:
    return ConditionPlan(type_, "True" if status else "False", reason, message)


def _rolled_back_cond(d: _Ctx) -> ConditionPlan:
    ro = d.ro
    if ro and ro.get("phase") == ROLLED_BACK and ro.get("revision") == d.rev:
        return _cond("RolledBack", True, ro.get("reason") or "RolledBack", ro.get("message") or "")
    failed = d.state.get("failedRevision")
    if failed and failed != d.rev:
        return _cond("RolledBack", False, "NewRevision", f"revision {failed} failed earlier; now on {d.rev}")
    return _cond("RolledBack", False, "NoRollback", "")


def _finish(d: _Ctx, stable: DeploymentPlan | None, canary: DeploymentPlan | None, progressing: ConditionPlan) -> Plan:
    status = copy.deepcopy(d.state)
    for key in d.original:  # a key this call dropped is cleared in the CR (merge-patch null)
        status.setdefault(key, None)
    requeue = min(d.requeue) if d.requeue else None
    conditions = [progressing, _rolled_back_cond(d)]
    evaluated = evaluation.condition(d.spec, d.state.get("evaluation"), d.rev)
    if evaluated is not None:
        conditions.append(ConditionPlan("Evaluated", *evaluated))
    return Plan(
        stable=stable,
        canary=canary,
        status=status,
        conditions=tuple(conditions),
        events=tuple(d.events),
        annotations_to_clear=tuple(d.clear),
        requeue_after=None if requeue is None else max(1.0, math.ceil(requeue)),
        evaluation_jobs=d.jobs,
        evaluated_revisions=_evaluated_revisions(d),
        conditions_to_drop=("Evaluated",) if evaluated is None else (),
    )
