"""The dataset-check Job of a PVC evaluation dataset (dataset_check.py) and how decide() holds the rollout for it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from gptd_operator import builders, dataset_check, evaluation
from gptd_operator.dataset_check import COMPONENT, STATUS_KEY, WAIT_REASON, plan_check
from gptd_operator.observe import JobObs
from gptd_operator.rollout import decide
from gptd_operator.settings import Settings

from tests.support.chart import assert_restricted
from tests.support.evaluation import EVAL, GATED, NAME, RA, RB, SETTLED, TA, TB, at, cond, make_spec, merged, observe

PVC_EVAL = {**EVAL, "dataset": {"pvc": "eval-data/sets/sentiment.jsonl"}}
BAD = {"error": 'dataset /var/run/gptd/eval-dataset/dataset.jsonl: line 4: missing field "label"', "line": 4}


def _plan(spec: Any, status: dict[str, Any], jobs: tuple[JobObs, ...] = (), t: float = 0,
          revision: str = RB) -> dataset_check.CheckPlan:
    return plan_check(spec, NAME, "ns", "uid", Settings(), "rt:1", status, revision, jobs, at(t))


def _job(name: str, *, result: dict[str, Any] | None = None, ok: bool = True, t: float = 0) -> JobObs:
    if result is None:
        return JobObs(name=name, revision=RB, purpose=COMPONENT, active=1, start_time=at(t))
    if ok:
        return JobObs(name=name, revision=RB, purpose=COMPONENT, succeeded=1, start_time=at(t),
                      conditions=(("Complete", "True", "", ""),), message=json.dumps(result), exit_code=0,
                      pod_name=f"{name}-x")
    return JobObs(name=name, revision=RB, purpose=COMPONENT, failed=1, start_time=at(t),
                  conditions=(("Failed", "True", "BackoffLimitExceeded", "Job has reached the backoff limit"),),
                  message=json.dumps(result), exit_code=1, pod_name=f"{name}-x", failed_since=at(t))


def _with(status: dict[str, Any], check: dataset_check.CheckPlan) -> dict[str, Any]:
    return {**status, STATUS_KEY: check.record} if check.record is not None else status


def test_the_check_job_parses_the_claims_file_read_only_and_restricted() -> None:
    spec = make_spec({**PVC_EVAL, "samples": 50})
    check = _plan(spec, dict(SETTLED))
    job = check.create
    assert job is not None and check.identity is None and check.invalid is None
    assert check.wait is not None and check.wait[0] == WAIT_REASON
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["labels"][builders.LABEL_COMPONENT] == COMPONENT and meta["labels"][builders.LABEL_REVISION] == RB
    assert meta["ownerReferences"][0]["uid"] == "uid" and meta["name"].startswith(f"{NAME}-dscheck-")
    long = plan_check(spec, "x" * 253, "ns", "uid", Settings(), "rt:1", dict(SETTLED), RB, (), at(0)).create
    assert long is not None and len(long["metadata"]["name"]) <= 63
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "gptd_runtime", "evaluate", "--check-dataset", "--dataset", dataset_check.DATASET_FILE,
        "--task", "text-classification", "--samples", "50", "--result-file", "/dev/termination-log"]
    assert "--url" not in container["command"]
    assert {"name": "dataset", "persistentVolumeClaim": {"claimName": "eval-data", "readOnly": True}} in pod["volumes"]
    assert {"name": "dataset", "mountPath": dataset_check.DATASET_FILE, "subPath": "sets/sentiment.jsonl",
            "readOnly": True} in container["volumeMounts"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"] == [
        {"type": "DisruptionTarget", "status": "True"}]
    assert_restricted(pod, "dataset-check Job")
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False


def test_no_template_change_until_the_check_passed() -> None:
    spec = make_spec(PVC_EVAL)
    status = dict(SETTLED)
    check = _plan(spec, status)
    status = _with(status, check)
    assert status[STATUS_KEY]["revision"] == RB and "passed" not in status[STATUS_KEY]
    # The handlers hand the wait to decide like the model cache's download wait: the old template stays, no gate.
    held = dataclasses.replace(observe(0), download_wait=check.wait, evaluation_dataset=check.identity)
    plan = decide(spec, status, held)
    assert plan.stable is not None and plan.stable.template == TA and plan.stable.revision == RA
    assert not plan.evaluation_jobs and "rollout" not in merged(status, plan)
    assert (cond(plan, "Progressing").status, cond(plan, "Progressing").reason) == ("True", WAIT_REASON)
    # still running: held, nothing created again
    name = check.create["metadata"]["name"]  # type: ignore[index]
    check = _plan(spec, status, (_job(name),), t=5)
    assert check.wait is not None and check.create is None and check.record is None and check.identity is None
    # passed: the identity goes to the gate, the Job is deleted, decide starts the gated rollout
    check = _plan(spec, status, (_job(name, result={"rows": 40, "labels": ["NEG", "POS"]}),), t=9)
    assert check.identity == "pvc eval-data/sets/sentiment.jsonl" and check.wait is None and check.delete == (name,)
    status = _with(status, check)
    assert status[STATUS_KEY]["passed"] is True and status[STATUS_KEY]["rows"] == 40
    plan = decide(spec, status, dataclasses.replace(observe(10), evaluation_dataset=check.identity))
    assert plan.stable is not None and plan.stable.template == {**TB, GATED: True}


def test_a_failure_names_the_claim_file_and_line_and_is_not_retried_until_the_spec_changes() -> None:
    spec = make_spec(PVC_EVAL)
    status = dict(SETTLED)
    first = _plan(spec, status)
    status = _with(status, first)
    name = first.create["metadata"]["name"]  # type: ignore[index]
    check = _plan(spec, status, (_job(name, result=BAD, ok=False),), t=5)
    assert check.invalid == 'PersistentVolumeClaim eval-data file sets/sentiment.jsonl: line 4: missing field "label"'
    assert check.identity is None and check.wait is None and check.create is None and name in check.delete
    status = _with(status, check)
    assert status[STATUS_KEY]["passed"] is False
    # held: refused again from the record, no Job (even with the old Job gone from the cluster)
    again = _plan(spec, status, t=60)
    assert again.invalid == check.invalid and again.create is None and again.record is None
    # a change to spec.evaluation checks again, with a new Job (not the deleted failed one)
    changed = make_spec({**PVC_EVAL, "minScore": 0.5})
    retry = _plan(changed, status, t=70)
    assert retry.create is not None and retry.create["metadata"]["name"] != name and retry.invalid is None
    # a Job that never got to run (a claim no pod can mount): refused saying so
    late = JobObs(name=name, revision=RB, purpose=COMPONENT, failed=1, start_time=at(0),
                  conditions=(("Failed", "True", "DeadlineExceeded", "Job was active longer than specified"),))
    assert "did not finish in time" in (_plan(spec, _with(dict(SETTLED), first), (late,), t=700).invalid or "")
    # ...naming what its pod waits on, if it said (a path missing on the read-only claim)
    stuck = "CreateContainerConfigError: failed to create subPath directory"
    waiting = dataclasses.replace(late, failed=0, conditions=(), waiting=stuck)
    assert stuck in (_plan(spec, _with(dict(SETTLED), first), (waiting,), t=60).wait or ("", ""))[1]
    late = dataclasses.replace(late, waiting=stuck)
    assert (_plan(spec, _with(dict(SETTLED), first), (late,), t=700).invalid or "").endswith(
        f"did not finish in time ({stuck})")


def test_a_pass_runs_once_per_dataset_and_revision() -> None:
    spec = make_spec(PVC_EVAL)
    first = _plan(spec, dict(SETTLED))
    name = first.create["metadata"]["name"]  # type: ignore[index]
    status = _with(dict(SETTLED), _plan(spec, _with(dict(SETTLED), first),
                                        (_job(name, result={"rows": 3, "labels": ["POS"]}),)))
    for s in (spec, make_spec({**PVC_EVAL, "minScore": 0.5})):  # thresholds do not change the rows
        again = _plan(s, status, t=30)
        assert again.identity == "pvc eval-data/sets/sentiment.jsonl" and again.create is None
        assert again.record is None and again.wait is None
    # another revision, or another file: checked again
    assert _plan(spec, status, revision=RA).create is not None
    other = make_spec({**PVC_EVAL, "dataset": {"pvc": "eval-data/sets/v2.jsonl"}})
    assert _plan(other, status).create is not None


def test_a_complete_job_waits_for_its_pods_result() -> None:
    spec = make_spec(PVC_EVAL)
    name = _plan(spec, dict(SETTLED)).create["metadata"]["name"]  # type: ignore[index]
    done = JobObs(name=name, revision=RB, purpose=COMPONENT, succeeded=1, start_time=at(0),
                  completion_time=at(1), conditions=(("Complete", "True", "", ""),))
    assert _plan(spec, dict(SETTLED), (done,), t=10).wait is not None  # the pod's terminated state not seen yet
    gone = _plan(spec, dict(SETTLED), (done,), t=120)
    assert gone.invalid is not None and "pod is gone" in gone.invalid


def test_both_graces_of_a_check_job_are_the_evaluators_one_value(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Job Complete whose pod is gone and a Job Failed before its pod wait the same evaluation.RESULT_GRACE_SECONDS,
    # read when judging: set once (as the integration tests shorten it), both follow.
    monkeypatch.setattr(evaluation, "RESULT_GRACE_SECONDS", 5)
    spec = make_spec(PVC_EVAL)
    name = _plan(spec, dict(SETTLED)).create["metadata"]["name"]  # type: ignore[index]
    done = JobObs(name=name, revision=RB, purpose=COMPONENT, succeeded=1, start_time=at(0),
                  completion_time=at(1), conditions=(("Complete", "True", "", ""),))
    assert _plan(spec, dict(SETTLED), (done,), t=5).invalid is None
    assert "pod is gone after 5s" in (_plan(spec, dict(SETTLED), (done,), t=7).invalid or "")
    spec, status, seen = _failed_first(0)
    assert _plan(spec, status, (seen,), t=2).requeue_after == 3
    assert _plan(spec, status, (seen,), t=6).invalid is not None


def test_every_record_the_check_writes_is_declared_in_the_typed_status() -> None:
    """status.datasetCheck is typed (api.DatasetCheckStatus, extra=forbid): a key the plan writes but the model
    lacks fails here rather than going undocumented in the CRD."""
    from gptd_operator.api import DatasetCheckStatus, GPTDeploymentStatus

    spec = make_spec(PVC_EVAL)
    started = _plan(spec, dict(SETTLED))
    name = started.create["metadata"]["name"]  # type: ignore[index]
    status = _with(dict(SETTLED), started)
    passed = _plan(spec, status, (_job(name, result={"rows": 3, "labels": ["POS"]}),), t=5)
    failed = _plan(spec, status, (_job(name, result=BAD, ok=False),), t=5)
    in_grace = _plan(spec, status, (_failed_first(0)[2],), t=5)  # Failed before its pod: first sighting recorded
    records = [c.record for c in (started, passed, failed)]
    assert all(records) and {r["passed"] for r in records[1:]} == {True, False}  # type: ignore[index]
    assert in_grace.record is not None and "failedSeenAt" in in_grace.record
    records.append(in_grace.record)
    for record in records:
        parsed = GPTDeploymentStatus.model_validate({STATUS_KEY: record})
        assert isinstance(getattr(parsed, STATUS_KEY), DatasetCheckStatus)
        assert parsed.model_dump(exclude_none=True)[STATUS_KEY] == record


def _failed_first(failed_at: float) -> tuple[Any, dict[str, Any], JobObs]:
    """The spec, the status once its check Job started, and that Job seen Failed (lastTransitionTime
    ``failed_at``) before its pod's terminated state."""
    spec = make_spec(PVC_EVAL)
    first = _plan(spec, dict(SETTLED))
    name = first.create["metadata"]["name"]  # type: ignore[index]
    job = dataclasses.replace(_job(name, result=BAD, ok=False), message="", exit_code=None, pod_name=None,
                              failed_since=at(failed_at))
    return spec, _with(dict(SETTLED), first), job


def test_a_check_job_seen_failed_before_its_pod_waits_a_grace_for_the_line_it_names() -> None:
    """The Job and its pod come by separate watches: a Job seen Failed first is not refused with the Job
    controller's generic message while its pod's termination message (naming the line) may still come."""
    grace = evaluation.RESULT_GRACE_SECONDS
    # Failed at t=60 by the Job's lastTransitionTime, its pod not seen (or seen still running)
    spec, status, seen = _failed_first(60)
    name = seen.name
    for job in (seen, dataclasses.replace(seen, pod_name=f"{name}-x", running=True)):
        check = _plan(spec, status, (job,), t=70)
        assert check.invalid is None and check.identity is None and check.create is None
        assert check.wait is not None and check.wait[0] == WAIT_REASON
        assert "waiting for its pod's message" in check.wait[1]
        assert check.requeue_after == grace - 10  # woken when the grace ends: no watch event may come
        # the first sighting is recorded (the operator's clock), the rest of the record kept
        assert check.record == {**status[STATUS_KEY], "failedSeenAt": "2026-01-01T00:01:10Z"}
    assert _plan(spec, _with(status, check), (seen,), t=75).record is None  # recorded once
    # what keeps its container from starting, when known, is still said meanwhile
    why = 'CreateContainerConfigError: secret "s" not found'
    check = _plan(spec, status, (dataclasses.replace(seen, pod_name=f"{name}-x", waiting=why),), t=70)
    assert check.wait is not None and check.wait[1].endswith(f"waiting for its pod's message ({why})")
    # the pod's terminated state arrives within the grace: refused naming the line
    told = dataclasses.replace(seen, message=json.dumps(BAD), exit_code=1, pod_name=f"{name}-x")
    check = _plan(spec, status, (told,), t=71)
    assert check.invalid == 'PersistentVolumeClaim eval-data file sets/sentiment.jsonl: line 4: missing field "label"'
    assert check.requeue_after is None
    # no pod past the grace: refused on the Job's own message
    check = _plan(spec, status, (seen,), t=60 + grace + 1)
    assert check.invalid is not None and check.invalid.endswith("Job has reached the backoff limit")
    assert check.requeue_after is None and check.wait is None
    # a deadline is judged at once (a timeout whatever the pod says)...
    late = dataclasses.replace(seen, conditions=(("Failed", "True", "DeadlineExceeded", "Job was active longer"),))
    assert "did not finish in time" in (_plan(spec, status, (late,), t=70).invalid or "")
    # a Failed condition without lastTransitionTime waits the grace from the operator's own first sighting
    bare = dataclasses.replace(seen, failed_since=None)
    first = _plan(spec, status, (bare,), t=70)
    assert first.invalid is None and first.requeue_after == grace
    later = _with(status, first)
    assert _plan(spec, later, (bare,), t=70 + grace - 1).invalid is None
    assert (_plan(spec, later, (bare,), t=70 + grace + 1).invalid or "").endswith("Job has reached the backoff limit")


def test_a_check_job_whose_pod_is_terminal_without_a_container_state_is_refused_at_once_naming_the_pods_reason(
) -> None:
    # Rejected at admission (OutOfcpu), or evicted before it started: no container state will ever come, so no
    # grace, and the refusal says what the pod says rather than the Job's generic BackoffLimitExceeded.
    spec, status, seen = _failed_first(60)
    why = "OutOfcpu: Pod was rejected: Node didn't have enough resource: cpu"
    rejected = dataclasses.replace(seen, pod_name=f"{seen.name}-x", pod_phase="Failed", pod_failure=why)
    check = _plan(spec, status, (rejected,), t=61)
    assert check.invalid == f"PersistentVolumeClaim eval-data file sets/sentiment.jsonl: {why}"
    assert check.requeue_after is None and check.wait is None
    # terminal, saying nothing of itself: judged at once all the same, on the Job's message
    bare = dataclasses.replace(rejected, pod_failure="")
    assert (_plan(spec, status, (bare,), t=61).invalid or "").endswith("Job has reached the backoff limit")
    # a deadline names it too
    late = dataclasses.replace(rejected, conditions=(("Failed", "True", "DeadlineExceeded", "Job was active"),))
    assert _plan(spec, status, (late,), t=61).invalid == (
        f"PersistentVolumeClaim eval-data file sets/sentiment.jsonl: the dataset check did not finish in time ({why})")


def test_with_the_api_servers_clock_ahead_a_check_jobs_grace_counts_from_the_operators_first_sighting() -> None:
    # lastTransitionTime is the API server's clock; an hour ahead of the operator's, it would hold the rollout an
    # hour and a grace. The operator times the grace from when it first saw the Job Failed (status), as
    # model_cache.py times jobEndedAt, so the wait is the grace whatever the skew.
    grace = evaluation.RESULT_GRACE_SECONDS
    spec, status, ahead = _failed_first(3600)  # an hour ahead of the operator's now
    first = _plan(spec, status, (ahead,), t=70)
    assert first.wait is not None and first.requeue_after == grace and first.record is not None
    assert first.record["failedSeenAt"] == "2026-01-01T00:01:10Z"
    later = _with(status, first)
    assert _plan(spec, later, (ahead,), t=70 + grace - 1).invalid is None
    assert _plan(spec, later, (ahead,), t=70 + grace + 1).invalid is not None  # not 3600 + grace
    # a sighting recorded for another Job of the check (an earlier key) does not count
    other = {**later, STATUS_KEY: {**later[STATUS_KEY], "job": "other"}}
    assert _plan(spec, other, (ahead,), t=70 + grace + 1).invalid is None


def test_a_check_job_failed_while_the_operator_was_away_is_judged_by_its_lastTransitionTime() -> None:
    # first seen long after the Job controller stamped Failed (the operator restarted): no fresh grace
    grace = evaluation.RESULT_GRACE_SECONDS
    spec, status, seen = _failed_first(60)
    assert _plan(spec, status, (seen,), t=60 + grace + 1).invalid is not None


def test_a_check_jobs_sighting_recorded_ahead_of_the_clock_or_not_a_time_is_taken_anew() -> None:
    # A sighting the operator's own clock has not reached yet (it stepped back; another replica's ran ahead), or a
    # hand-written value: trusted, it would hold the rollout until the clock passed it, or stop every pass.
    grace = evaluation.RESULT_GRACE_SECONDS
    spec, status, seen = _failed_first(60)
    bare = dataclasses.replace(seen, failed_since=None)
    for recorded in ("2026-01-01T01:01:10Z", "yesterday"):
        ahead = {**status, STATUS_KEY: {**status[STATUS_KEY], "failedSeenAt": recorded}}
        check = _plan(spec, ahead, (bare,), t=70)
        assert check.invalid is None and check.requeue_after == grace
        assert check.record is not None and check.record["failedSeenAt"] == "2026-01-01T00:01:10Z"
