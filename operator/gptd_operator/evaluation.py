"""The evaluation gate (docs/evaluation.md): pure, no I/O, no clock.

A revision rolled out while ``spec.evaluation`` is set has the readiness gate ``gptd.io/evaluated`` in its pod
template, so its pods take no Service traffic until the operator sets that pod condition. ``gate()`` decides,
from what the handlers observed (the dataset's identity, the evaluator Jobs and their results), which Jobs must
exist, whether the revision passed, failed or timed out, and what ``status.evaluation`` says. ``rollout.py``
calls it while a gated rollout is in flight and turns a failure into its usual rollback.

- The gate is not part of the revision: ``spec.evaluation`` never enters the revision hash, and whether a
  revision is gated is decided when its rollout starts (kept in ``status.rollout.evaluationGate`` and, once
  rolled out, in ``status.lastGoodTemplate``). Adding or removing ``spec.evaluation`` on a settled CR rolls
  nothing; it applies to the next revision.
- The evaluator is ``python -m gptd_runtime evaluate`` in a Job (runtime image, dataset mounted read-only)
  against the first new-revision pod whose containers are ready, by IP. It writes its JSON result to
  ``/dev/termination-log``, which the kubelet turns into the container's ``state.terminated.message`` (at most
  4 KiB: the evaluator trims perLabel to fit), read by the handlers from the Job's pod.
- The baseline (the current revision on the same data) is measured once per dataset identity and current
  revision, kept in ``status.evaluationBaseline``, against a Ready current-revision pod.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from gptd_common.eval_dataset import DatasetError, parse_dataset

from . import builders, names
from .api import GPTDeploymentSpec, InvalidSpec
from .observe import ANN_EVAL_TARGET_IP, ANN_EVAL_TARGET_UID, JobObs, PodObs, format_time, parse_own_time, parse_time
from .settings import Settings

GATE_CONDITION = builders.GATE_CONDITION
# In a revision template (the Deployment's gptd.io/template annotation, status.lastGoodTemplate): the revision's
# pods carry the readiness gate. builders.revision_hash leaves it out, so it never changes a revision.
TEMPLATE_GATE_KEY = builders.TEMPLATE_GATE_KEY
LABEL_ROLE = "gptd.io/evaluation-role"
LABEL_KEY = "gptd.io/evaluation-key"
ANN_TARGET = "gptd.io/evaluation-target"  # on an evaluator Job: the pod (and revision) it scores
ANN_TARGET_UID, ANN_TARGET_IP = ANN_EVAL_TARGET_UID, ANN_EVAL_TARGET_IP  # ...its uid and IP, checked at judgement
CANDIDATE, BASELINE = "candidate", "baseline"
DATASET_DIR = "/var/run/gptd/eval-dataset"
DATASET_FILE = f"{DATASET_DIR}/dataset.jsonl"
API_KEY_DIR = "/var/run/gptd/eval-api-key"
CA_DIR = "/var/run/gptd/eval-ca"  # ca.crt of the serving TLS Secret (by reference: the operator never reads it)
RESULT_FILE = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a termination message
# A Job gets this much beyond timeoutSeconds before Kubernetes kills it, so the operator's own timeout (which
# names the reason) fires first; activeDeadlineSeconds is the backstop when the operator is down.
JOB_DEADLINE_MARGIN_SECONDS = 60
# A Job seen Complete whose pod is not (yet) in the watch cache: how long to wait for the pod before giving up on
# its result (the pod may be gone: deleted by hand, or garbage-collected).
RESULT_GRACE_SECONDS = 60
EPSILON = 1e-9  # scores are ratios of small integers: 0.41 >= 0.5 - 0.09 (0.41000000000000003) must hold


# ------------------------------------------------------------------------------------------ validation


def check_evaluation(spec: GPTDeploymentSpec) -> None:
    """Cross-field checks of spec.evaluation; raise InvalidSpec naming the field."""
    ev = spec.evaluation
    if ev is None:
        return
    generation = spec.model.task == "text-generation"
    if ev.metric is not None and (ev.metric in ("exactMatch", "contains")) != generation:
        allowed = "exactMatch, contains" if generation else "accuracy, precision, recall, f1"
        raise InvalidSpec("spec.evaluation.metric", f"{ev.metric} does not apply to task {spec.model.task} "
                                                    f"(use {allowed})")
    if spec.service.tls is not None and spec.service.tls.clientCASecretName:
        # Under mutual TLS the Job would need a client certificate the operator does not have (it never reads or
        # mints Secrets). Plain server TLS works: the Job verifies the Service name's certificate at the pod's IP.
        raise InvalidSpec("spec.evaluation", "is not supported together with spec.service.tls.clientCASecretName "
                                             "(mutual TLS: the evaluator Job has no client certificate)")
    if spec.runtime.apiKeysSecretName is not None:
        # The operator never reads Secrets, so it cannot pick one key out of a many-key Secret for the Job.
        raise InvalidSpec("spec.evaluation", "needs spec.runtime.apiKeySecretRef (one key the evaluator Job "
                                             "mounts) rather than apiKeysSecretName")


def dataset_field(spec: GPTDeploymentSpec) -> str:
    ds = spec.evaluation.dataset  # type: ignore[union-attr]
    return "spec.evaluation.dataset.configMapRef" if ds.configMapRef is not None else "spec.evaluation.dataset.pvc"


def configmap_text(spec: GPTDeploymentSpec, configmap: Mapping[str, Any] | None) -> str:
    """The dataset text out of the ConfigMap the spec references; InvalidSpec naming the field when it is
    missing, lacks the key or is not UTF-8 (binaryData is base64)."""
    ref = spec.evaluation.dataset.configMapRef  # type: ignore[union-attr]
    assert ref is not None
    fld = "spec.evaluation.dataset.configMapRef"
    if configmap is None:
        raise InvalidSpec(fld, f"ConfigMap {ref.name} not found")
    data = configmap.get("data") or {}
    if ref.key in data:
        return str(data[ref.key])
    binary = configmap.get("binaryData") or {}
    if ref.key in binary:
        import base64

        try:
            return base64.b64decode(binary[ref.key]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise InvalidSpec(fld, f"ConfigMap {ref.name} key {ref.key} is not UTF-8 text") from None
    keys = sorted({*data, *binary})
    raise InvalidSpec(fld, f"ConfigMap {ref.name} has no key {ref.key} (keys: {', '.join(keys) or 'none'})")


def check_dataset(spec: GPTDeploymentSpec, text: str) -> str:
    """Parse every row as the evaluator will; InvalidSpec naming the field and the line. Returns the dataset's
    identity (what a baseline and a result are keyed by): the ConfigMap reference and a hash of the content."""
    ref = spec.evaluation.dataset.configMapRef  # type: ignore[union-attr]
    assert ref is not None
    try:
        parse_dataset(text, spec.model.task)
    except DatasetError as exc:
        raise InvalidSpec("spec.evaluation.dataset.configMapRef",
                          f"ConfigMap {ref.name} key {ref.key}: {exc}") from None
    return f"configmap {ref.name}/{ref.key} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def pvc_identity(spec: GPTDeploymentSpec) -> str:
    """A PVC dataset is not readable by the operator: it is known by its path (a file edited in place under the
    same path is not noticed; use a new path for a new set)."""
    return f"pvc {spec.evaluation.dataset.pvc}"  # type: ignore[union-attr]


def judged_dataset(spec: GPTDeploymentSpec, status: Mapping[str, Any], revision: str) -> str | None:
    """The dataset identity ``revision`` already has a verdict on under the current spec.evaluation (None when it
    has none): the dataset is then not read again, so deleting or editing it after the verdict changes nothing."""
    ev = status.get("evaluation") or {}
    if (ev.get("revision") == revision and ev.get("passed") is not None and ev.get("dataset")
            and ev.get("specHash") == evaluation_hash(spec)):
        return str(ev["dataset"])
    return None


def pvc_claim(spec: GPTDeploymentSpec) -> tuple[str, str]:
    claim, _, path = (spec.evaluation.dataset.pvc or "").partition("/")  # type: ignore[union-attr]
    return claim, path


# ------------------------------------------------------------------------------------------ observations


@dataclass(frozen=True)
class EvalRun:
    """One evaluator Job as the gate sees it: running, succeeded (with the evaluator's JSON) or failed."""

    state: str  # "running" | "succeeded" | "failed"
    started: datetime | None = None
    result: Mapping[str, Any] | None = None
    message: str = ""
    deadline_exceeded: bool = False
    target_uid: str = ""  # the pod it scores (uid, IP), when the Job says
    target_ip: str = ""
    # A Failed Job whose pod is not yet seen terminated is "running" for up to RESULT_GRACE_SECONDS: seconds left,
    # and when the operator first saw it Failed (kept in status.evaluation.failedSeen while it waits).
    recheck: float | None = None
    failed_seen: datetime | None = None


def _result(message: str) -> Mapping[str, Any] | None:
    try:
        parsed = json.loads(message) if message else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def run_of(job: JobObs, now: datetime | None = None, seen: datetime | None = None) -> EvalRun:
    """A Job (observe.JobObs: its conditions and its pod's termination message) → EvalRun. The Job and its pod are
    separate watch streams: a Job seen Complete before its pod's terminated state (which carries the result) is
    still running; it has no result only once its pod is seen terminated without one, or is gone for good. ``seen``:
    when the operator first saw it Failed (None: not before this pass)."""
    # The timeout counts from the Job's start; a Job not started (suspended by a queue, controller lag) from its
    # creation, so it still times out.
    job = job if job.start_time is not None else replace(job, start_time=job.created)
    return replace(_run_of(job, now, seen), target_uid=job.target_uid, target_ip=job.target_ip)


def _run_of(job: JobObs, now: datetime | None, seen: datetime | None) -> EvalRun:
    result = _result(job.message)
    if job.complete or job.succeeded > 0:
        if result is not None and isinstance(result.get("score"), int | float):
            return EvalRun("succeeded", job.start_time, result)
        if job.exit_code is not None:  # its pod is seen terminated, and said nothing we can judge by
            return EvalRun("failed", job.start_time, result, "the evaluator finished without a result")
        done = job.completion_time or job.start_time
        if job.pod_name is None and now is not None and _since(now, done) > RESULT_GRACE_SECONDS:
            return EvalRun("failed", job.start_time, None,
                           f"the Job completed but its pod is gone after {RESULT_GRACE_SECONDS}s: no result to read")
        return EvalRun("running", job.start_time, message="the Job completed; waiting for its pod's result")
    failed = job.condition("Failed")
    if job.finally_failed and failed is not None:
        _, reason, message = failed
        left = failed_grace_left(job, now, seen)
        if left is not None:
            return EvalRun("running", job.start_time, message="the Job failed; waiting for its pod's message",
                           recheck=left, failed_seen=seen or now)
        error = (result or {}).get("error")
        text = str(error) if error else (job.pod_failure or message or reason or "the Job failed")
        return EvalRun("failed", job.start_time, result, text, deadline_exceeded=reason == "DeadlineExceeded")
    return EvalRun("running", job.start_time)


def failed_grace_left(job: JobObs, now: datetime | None, seen: datetime | None = None) -> float | None:
    """For a Job seen finally Failed before its pod's terminated state: the seconds (at least 1) still to wait for
    that pod's termination message, which names the Job's own error; None once it is to be judged (the pod seen
    terminated or in a terminal phase, the grace over, a deadline, not Failed). ``seen``: when the operator first saw
    it Failed, by its own clock, from status (None: this pass is the first). Shared by the evaluator Jobs and the
    dataset-check Jobs (dataset_check.py)."""
    failed = job.condition("Failed")
    if (not job.finally_failed or failed is None or job.exit_code is not None or failed[1] == "DeadlineExceeded"
            or now is None or job.pod_phase in ("Failed", "Succeeded")):
        # The Job and its pod are separate watches, so a Job seen Failed first waits a grace for the pod; a deadline
        # is a timeout whatever the pod says. A pod already terminal without a container state (rejected at
        # admission, evicted before it started) will never get one: its own reason (JobObs.pod_failure) is all there
        # is to wait for, and it is here.
        return None
    # Timed by the operator's own clock from its first sighting, as model_cache.py times jobEndedAt: the API server's
    # lastTransitionTime ahead of it (a skewed clock) cannot hold the rollout past the grace. lastTransitionTime
    # still counts when it is longer ago (the Job failed while the operator was not running): whichever is older.
    age = max(_since(now, seen or now), _since(now, job.failed_since) if job.failed_since is not None else 0.0)
    left = RESULT_GRACE_SECONDS - max(0.0, age)
    return max(1.0, left) if left >= 0 else None


def sighting(value: Any, now: datetime | None) -> datetime | None:
    """A first sighting the operator recorded in status, read back. None, so that this pass sights the Job anew, when
    it is not a time (the status is writable by hand) or lies ahead of this clock (the clock stepped back, or another
    replica's ran ahead): trusted, it would hold the rollout until this clock passed it."""
    seen = parse_own_time(value)
    return None if seen is None or (now is not None and seen > now) else seen


def runs_of(jobs: Sequence[JobObs], now: datetime | None = None,
            seen: Mapping[str, Any] | None = None) -> dict[str, EvalRun]:
    """The evaluator Jobs by name; ``seen``: status.evaluation.failedSeen (Job name → when first seen Failed)."""
    seen = seen or {}
    return {j.name: run_of(j, now, sighting(seen.get(j.name), now)) for j in jobs
            if j.purpose == builders.EVALUATION_COMPONENT}


# ------------------------------------------------------------------------------------------ the gate


def evaluation_hash(spec: GPTDeploymentSpec) -> str:
    """spec.evaluation as a whole (thresholds included): a held evaluation failure is retried when it changes."""
    ev = spec.evaluation.model_dump_json() if spec.evaluation is not None else "none"
    return hashlib.sha256(ev.encode()).hexdigest()[:10]


def eval_key(spec: GPTDeploymentSpec, dataset: str, revision: str) -> str:
    """What a score depends on: the data, the revision and how it is scored (not minScore/maxRegression)."""
    ev = spec.evaluation
    assert ev is not None
    parts = [dataset, revision, spec.model.task, ev.effective_metric(spec.model.task), ev.average, str(ev.samples)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalJob:
    """An evaluator Job that must exist: who it scores and how to reach it."""

    role: str  # CANDIDATE | BASELINE
    name: str
    key: str
    revision: str
    pod: str
    ip: str
    uid: str = ""  # the target pod's uid: checked at judgement (the same pod, not a new one at a reused IP)


@dataclass
class Gate:
    """gate()'s answer. ``verdict``: "passed" | "pending" | "failed" | "timeout"."""

    verdict: str
    message: str
    jobs: tuple[EvalJob, ...] = ()
    evaluation: dict[str, Any] | None = None  # new status.evaluation
    baseline: dict[str, Any] | None = None  # new status.evaluationBaseline (None: unchanged)
    running: bool = False  # an evaluator Job is running: the rollout's progress deadline waits for it
    requeue: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def _since(now: datetime, when: datetime | None) -> float:
    if when is None:
        return 0.0
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    return (now - (when if when.tzinfo else when.replace(tzinfo=UTC))).total_seconds()


def _sooner(*delays: float | None) -> float | None:
    """The earliest of the delays given (at least 1 s), None if none is."""
    given = [d for d in delays if d is not None]
    return max(1.0, min(given)) if given else None


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


def _target(pods: Sequence[PodObs], revision: str, *, ready: bool) -> PodObs | None:
    """The first pod (by name) of ``revision`` with an IP whose containers (candidate) or self (baseline) are
    ready."""
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.revision == revision and pod.ip and (pod.ready if ready else pod.containers_ready):
            return pod
    return None


def gate(
    spec: GPTDeploymentSpec,
    name: str,
    state: Mapping[str, Any],
    revision: str,
    current: str | None,
    pods: Sequence[PodObs],
    dataset: str | None,
    jobs: Sequence[JobObs],
    now: datetime,
) -> Gate:
    """Where the gate of ``revision`` stands. ``state``: the rollout-owned status (evaluation,
    evaluationBaseline); ``current``: the revision serving now (the baseline), None for a first rollout."""
    ev = spec.evaluation
    prev = dict(state.get("evaluation") or {})
    if ev is None:
        # Removed while a gated rollout was in flight: the user no longer wants a score, so the gate opens.
        if prev.get("revision") == revision and prev.get("passed") is not None:
            return _final(prev)
        msg = "not scored: spec.evaluation was removed during the rollout"
        record = {"revision": revision, "passed": True, "finishedAt": format_time(now), "message": msg}
        return Gate("passed", msg, evaluation=record, events=[("Normal", "EvaluationSkipped", msg)])
    if dataset is None:  # the handlers could not identify the dataset (not expected: they refuse first)
        return Gate("pending", "waiting for the dataset check")
    metric = ev.effective_metric(spec.model.task)
    key = eval_key(spec, dataset, revision)
    spec_hash = evaluation_hash(spec)
    base = {"revision": revision, "key": key, "dataset": dataset, "metric": metric, "specHash": spec_hash}
    # When this key's Job was created (recorded by the pass that asked for it): the timeout's last resort when the
    # Job shows neither a startTime nor a creationTimestamp.
    created_at = prev.get("startedAt") if prev.get("key") == key and prev.get("passed") is None else None
    if prev.get("revision") == revision and prev.get("key") == key and prev.get("passed") is not None:
        if prev.get("specHash") in (None, spec_hash):
            return _final(prev)
        if prev.get("score") is not None:
            # spec.evaluation changed (a new minScore, say) after the verdict on the same data and revision: the
            # score is re-judged, not re-measured.
            result = {k: prev.get(k) for k in ("score", "samples", "perLabel")}
            return _judge(spec, Gate("pending", ""), base, result, prev.get("baseline"), "", current, now)
        # no score (timed out, the evaluator failed): measured again below
    prev_seen = prev.get("failedSeen")
    runs = runs_of(jobs, now, prev_seen if isinstance(prev_seen, dict) else None)
    # Jobs Failed and waiting for their pod's message: when each was first seen so (its grace's start, by the
    # operator's clock) goes into the pending record (pending()), for the Jobs still wanted, so the next pass (or a
    # restarted operator) times from it; a verdict's record has none.
    failed_seen = {n: format_time(r.failed_seen) for n, r in sorted(runs.items()) if r.failed_seen is not None}

    def pending(record: dict[str, Any], wanted_jobs: Sequence[EvalJob]) -> dict[str, Any]:
        seen = {j.name: failed_seen[j.name] for j in wanted_jobs if j.name in failed_seen}
        return {**record, "failedSeen": seen} if seen else record

    wanted: list[EvalJob] = []
    out = Gate("pending", "")

    # --- the baseline: once per dataset and current revision ---------------------------------------------
    baseline: float | None = None
    baseline_note = ""
    baseline_pending = False
    baseline_recheck: float | None = None  # a failed baseline Job waiting for its pod's message: look again then
    if ev.maxRegression is not None and current and current != revision:
        bkey = eval_key(spec, dataset, current)
        cached = state.get("evaluationBaseline") or {}
        this_rollout = (state.get("rollout") or {}).get("startedAt")
        if cached.get("key") == bkey and cached.get("score") is not None:
            baseline = float(cached["score"])
        elif cached.get("key") == bkey and cached.get("error") and cached.get("rolloutStartedAt") == this_rollout:
            baseline_note = str(cached["error"])  # failed once in this rollout: not measured again (no Job loop)
        else:
            bname = names.evaluation_job(name, BASELINE, bkey)
            brun = runs.get(bname)
            if brun is None:
                pod = _target(pods, current, ready=True)
                if pod is None:
                    baseline_note = f"no Ready pod of revision {current} to measure the baseline: judged on minScore"
                else:
                    wanted.append(EvalJob(BASELINE, bname, bkey, current, pod.name, pod.ip, pod.uid))
                    baseline_pending = True
            elif brun.state == "succeeded":
                baseline = float(brun.result["score"])  # type: ignore[index]
                out.baseline = {"key": bkey, "revision": current, "score": baseline, "finishedAt": format_time(now)}
            elif brun.state == "failed" or (_since(now, brun.started) > ev.timeoutSeconds and brun.recheck is None):
                why = "timed out" if brun.state == "running" or brun.deadline_exceeded else brun.message
                baseline_note = f"the baseline (revision {current}) could not be measured ({why}): judged on minScore"
                out.events.append(("Warning", "BaselineUnavailable", baseline_note))
                out.baseline = {"key": bkey, "revision": current, "error": baseline_note,
                                "rolloutStartedAt": this_rollout, "finishedAt": format_time(now)}
            else:
                wanted.append(EvalJob(BASELINE, bname, bkey, current, "", ""))
                baseline_pending = True
                baseline_recheck = brun.recheck
                out.running = True

    # --- the candidate: the first new-revision pod whose containers are ready ---------------------------
    cname = names.evaluation_job(name, CANDIDATE, key)
    run = runs.get(cname)
    if run is None:
        pod = _target(pods, revision, ready=False)
        if pod is None:
            out.jobs = tuple(wanted)
            out.message = f"waiting for a pod of revision {revision} to start, to evaluate it"
            out.evaluation = pending({**base, "message": out.message}, out.jobs)
            return out
        wanted.append(EvalJob(CANDIDATE, cname, key, revision, pod.name, pod.ip, pod.uid))
        out.jobs = tuple(wanted)
        out.running = True
        out.message = f"evaluating revision {revision} on pod {pod.name} ({metric}, dataset {dataset})"
        out.evaluation = pending({**base, "message": out.message, "startedAt": format_time(now)}, out.jobs)
        out.requeue = _sooner(float(ev.timeoutSeconds), baseline_recheck)
        out.events.append(("Normal", "EvaluationStarted", out.message))
        return out
    elapsed = _since(now, run.started or parse_time(created_at) or now)
    in_grace = run.state == "running" and run.recheck is not None  # failed, its pod's message not seen yet
    if ((run.state == "running" and (elapsed <= ev.timeoutSeconds or in_grace))
            or (run.state == "succeeded" and baseline_pending)):
        wanted.append(EvalJob(CANDIDATE, cname, key, revision, "", ""))
        out.jobs = tuple(wanted)
        out.running = True
        waiting = ("the baseline" if run.state == "succeeded" else "its pod's message (the Job failed)" if in_grace
                   else f"the evaluator (timeout {ev.timeoutSeconds}s from startedAt)")
        # No elapsed seconds in the message: a text that changes every pass is a status write every pass.
        out.message = f"evaluating revision {revision} (Job {cname}): waiting for {waiting}"
        out.evaluation = pending({**base, "message": out.message, "startedAt": created_at or format_time(now)},
                                 out.jobs)
        left = ev.timeoutSeconds - elapsed
        out.requeue = _sooner(left if left > 0 else None, run.recheck, baseline_recheck) or 1.0
        return out
    finished = format_time(now)
    if run.state == "running" or run.deadline_exceeded:
        msg = f"evaluation of revision {revision} did not finish within {ev.timeoutSeconds}s"
        out.verdict, out.message = "timeout", msg
        out.evaluation = {**base, "passed": False, "finishedAt": finished, "message": msg}
        return out
    if run.state == "succeeded" and run.target_uid and not any(
            p.uid == run.target_uid and p.ip == run.target_ip and p.revision == revision for p in pods):
        # The pod it scored is gone or changed while the Job ran: whatever answered at that IP (a new pod, maybe of
        # another revision) is not known to be this revision, so the score cannot pass it.
        run = replace(run, state="failed", message=f"the pod it scored ({run.target_ip}, uid {run.target_uid}) was "
                                                   "replaced while it ran: the score does not describe this revision")
    if run.state == "failed":
        msg = f"the evaluator failed on revision {revision}: {run.message}"
        out.verdict, out.message = "failed", msg
        out.evaluation = {**base, "passed": False, "finishedAt": finished, "message": msg}
        return out
    return _judge(spec, out, base, run.result or {}, baseline, baseline_note, current, now)


def _judge(
    spec: GPTDeploymentSpec, out: Gate, base: dict[str, Any], result: Mapping[str, Any], baseline: float | None,
    baseline_note: str, current: str | None, now: datetime,
) -> Gate:
    """The verdict on a score: >= minScore, and >= baseline - maxRegression when there is a baseline."""
    ev = spec.evaluation
    assert ev is not None
    metric, revision = base["metric"], base["revision"]
    score = float(result["score"])
    passed = score + EPSILON >= ev.minScore
    why = f"{metric} {_fmt(score)} {'>=' if passed else '<'} minScore {ev.minScore}"
    if passed and baseline is not None and ev.maxRegression is not None:
        bar = baseline - ev.maxRegression
        if score + EPSILON >= bar:
            why += f", baseline {_fmt(baseline)} (revision {current}) - maxRegression {ev.maxRegression} = {_fmt(bar)}"
        else:
            passed = False
            why = (f"{metric} {_fmt(score)} is more than maxRegression {ev.maxRegression} below the baseline "
                   f"{_fmt(baseline)} of revision {current}")
    if baseline_note:
        why += f"; {baseline_note}"
    record = {
        **base, "score": score, "baseline": baseline, "samples": result.get("samples"), "passed": passed,
        "finishedAt": format_time(now), "perLabel": result.get("perLabel") or None,
        "message": f"revision {revision} {'passed' if passed else 'failed'}: {why}",
    }
    out.verdict = "passed" if passed else "failed"
    out.message = record["message"]
    out.evaluation = {k: v for k, v in record.items() if v is not None}
    out.events.append(("Normal" if passed else "Warning", "EvaluationPassed" if passed else "EvaluationFailed",
                       out.message))
    return out


def _final(record: Mapping[str, Any]) -> Gate:
    """An evaluation already decided (kept in status.evaluation): the same verdict, nothing to run."""
    passed = bool(record.get("passed"))
    timeout = not passed and "did not finish within" in str(record.get("message", ""))
    verdict = "passed" if passed else "timeout" if timeout else "failed"
    return Gate(verdict, str(record.get("message") or ""), evaluation=dict(record))


def condition(
    spec: GPTDeploymentSpec, evaluation: Mapping[str, Any] | None, revision: str
) -> tuple[str, str, str] | None:
    """The ``Evaluated`` condition (status, reason, message) from status.evaluation; None when there is nothing to
    say (no spec.evaluation, never evaluated)."""
    ev = dict(evaluation or {})
    if ev.get("revision") != revision:  # a record of another revision says nothing about this one
        ev = {}
    if not ev:
        if spec.evaluation is None:
            return None
        return ("Unknown", "NotEvaluated", f"revision {revision} was not evaluated: spec.evaluation applies to the "
                                           "next revision rolled out")
    passed = ev.get("passed")
    message = str(ev.get("message") or "")
    if passed is None:
        return ("Unknown", "Evaluating", message)
    if passed:
        return ("True", "EvaluationPassed", message)
    reason = "EvaluationTimeout" if "did not finish within" in message else "EvaluationFailed"
    return ("False", reason, message)


# ------------------------------------------------------------------------------------------ builders


def evaluator_peer(name: str) -> dict[str, Any]:
    """The NetworkPolicy peer admitting the evaluator Jobs to the runtime port."""
    labels = builders.job_labels(name, builders.EVALUATION_COMPONENT, "")
    keep = (builders.LABEL_NAME, builders.LABEL_INSTANCE, builders.LABEL_COMPONENT)
    return {"podSelector": {"matchLabels": {k: labels[k] for k in keep}}}


def build_job(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings, job: EvalJob,
    image: str,
) -> dict[str, Any]:
    """The evaluator Job for ``job``: runtime image, dataset mounted read-only, result in the termination message,
    the API key (if any) mounted from its Secret (never in env), Pod Security "restricted"."""
    ev = spec.evaluation
    assert ev is not None
    port = spec.service.port
    tls_secret = builders.tls_secret_name(name, spec)
    args = [
        "python", "-m", "gptd_runtime", "evaluate",
        "--url", f"{'https' if tls_secret else 'http'}://{job.ip}:{port}",
        "--dataset", DATASET_FILE,
        "--task", spec.model.task,
        "--metric", ev.effective_metric(spec.model.task),
        "--average", ev.average,
        "--result-file", RESULT_FILE,
    ]
    if ev.samples is not None:
        args += ["--samples", str(ev.samples)]
    secret_mode = 0o440 if settings.run_as_user is not None else 0o444
    ds = ev.dataset
    if ds.configMapRef is not None:
        volume: dict[str, Any] = {"name": "dataset", "configMap": {
            "name": ds.configMapRef.name, "items": [{"key": ds.configMapRef.key, "path": "dataset.jsonl"}],
            "defaultMode": 0o444}}
        mount = {"name": "dataset", "mountPath": DATASET_DIR, "readOnly": True}
    else:
        claim, path = pvc_claim(spec)
        volume = {"name": "dataset", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": "dataset", "mountPath": DATASET_FILE, "subPath": path, "readOnly": True}
    volumes = [volume, {"name": "tmp", "emptyDir": {}}]
    mounts = [mount, {"name": "tmp", "mountPath": "/tmp"}]
    ref = spec.runtime.apiKeySecretRef
    if ref is not None:
        volumes.append({"name": "api-key", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "api-key"}], "defaultMode": secret_mode}})
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
        args += ["--api-key-file", f"{API_KEY_DIR}/api-key"]
    if tls_secret is not None:
        # The pod is reached by IP; its certificate names the Service, so that name is verified, against the CA in
        # the serving Secret's ca.crt (cert-manager writes it; a user's own Secret must carry it too).
        volumes.append({"name": "ca", "secret": {
            "secretName": tls_secret, "items": [{"key": "ca.crt", "path": "ca.crt"}], "defaultMode": 0o444}})
        mounts.append({"name": "ca", "mountPath": CA_DIR, "readOnly": True})
        args += ["--ca-file", f"{CA_DIR}/ca.crt", "--server-name", f"{names.service(name)}.{namespace}.svc"]
    labels = {**builders.job_labels(name, builders.EVALUATION_COMPONENT, job.revision), LABEL_ROLE: job.role,
              LABEL_KEY: job.key}
    return builders.verdict_job(
        name, namespace, uid, settings, job_name=job.name, labels=labels,
        annotations={ANN_TARGET: f"{job.pod} (revision {job.revision})", ANN_TARGET_UID: job.uid,
                     ANN_TARGET_IP: job.ip},
        container={
            "name": "evaluate",
            "image": image,
            "command": args,
            "volumeMounts": mounts,
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        },
        volumes=volumes, deadline_seconds=ev.timeoutSeconds + JOB_DEADLINE_MARGIN_SECONDS, result_file=RESULT_FILE,
    )
