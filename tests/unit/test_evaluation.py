"""The evaluation gate, purely: spec validation, the dataset check, the builders (readiness gate, Job, NetworkPolicy)
and the gate inside the rollout state machine (evaluation.gate via rollout.decide)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from gptd_operator import api, builders, crd, evaluation, names, rollout
from gptd_operator.api import GPTDeploymentStatus, InvalidSpec
from gptd_operator.evaluation import BASELINE, CANDIDATE, eval_key, run_of
from gptd_operator.observe import DeploymentObs, JobObs, Observations, PodObs, observe_job, observe_pod
from gptd_operator.rollout import decide
from gptd_operator.settings import Settings

from tests.support.evaluation import (
    DATASET,
    EVAL,
    GATED,
    NAME,
    NEW_POD,
    OLD_PODS,
    RA,
    RB,
    SETTLED,
    TA,
    TB,
    as_handlers_pass,
    at,
    base_name,
    cand_name,
    cond,
    dep,
    failed,
    make_spec,
    merged,
    observe,
    pod,
    running,
    scored,
    succeeded,
)

# ------------------------------------------------------------------------------------------------- API


def test_spec_parses_and_defaults() -> None:
    ev = make_spec().evaluation
    assert ev is not None and ev.average == "macro" and ev.maxRegression is None and ev.samples is None
    assert ev.effective_metric("text-classification") == "f1"
    assert ev.effective_metric("text-generation") == "exactMatch"
    assert make_spec({**EVAL, "timeoutSeconds": 900}).evaluation.timeoutSeconds == 900  # type: ignore[union-attr]


@pytest.mark.parametrize(("evaluation", "field", "text"), [
    ({"dataset": {}, "minScore": 0.5}, "spec.evaluation.dataset", "exactly one of configMapRef and pvc"),
    ({"dataset": {"pvc": "c/a.jsonl", "configMapRef": {"name": "n", "key": "k"}}, "minScore": 0.5},
     "spec.evaluation.dataset", "exactly one"),
    ({"dataset": {"pvc": "data/../etc/passwd"}, "minScore": 0.5}, "spec.evaluation.dataset", "'..'"),
    ({"dataset": {"pvc": "just-a-claim"}, "minScore": 0.5}, "spec.evaluation.dataset.pvc", "pattern"),
    ({"dataset": {"pvc": "c/a.jsonl"}}, "spec.evaluation.minScore", "required"),
    ({"dataset": {"pvc": "c/a.jsonl"}, "minScore": 1.5}, "spec.evaluation.minScore", "less than or equal"),
    ({"dataset": {"pvc": "c/a.jsonl"}, "minScore": 0.5, "metric": "bleu"}, "spec.evaluation.metric", ""),
    ({"dataset": {"pvc": "c/a.jsonl"}, "minScore": 0.5, "sample": 3}, "spec.evaluation.sample", "Extra"),
])
def test_bad_evaluation_specs_name_the_field(evaluation: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        make_spec(evaluation)
    assert exc.value.field == field and text in exc.value.message


def test_metric_must_fit_the_task_and_mutual_tls_is_refused() -> None:
    with pytest.raises(InvalidSpec) as exc:
        evaluation.check_evaluation(make_spec({**EVAL, "metric": "exactMatch"}))
    assert exc.value.field == "spec.evaluation.metric" and "text-classification" in exc.value.message
    gen = api.parse_spec({"model": {"uri": "hf://o/g"}, "evaluation": {**EVAL, "metric": "f1"}})
    with pytest.raises(InvalidSpec, match="use exactMatch, contains"):
        evaluation.check_evaluation(gen)
    evaluation.check_evaluation(make_spec({**EVAL, "metric": "accuracy"}))  # fits: no error
    mtls = make_spec(service={"tls": {"secretName": "t", "clientCASecretName": "clients"}})
    with pytest.raises(InvalidSpec) as exc:
        evaluation.check_evaluation(mtls)
    assert exc.value.field == "spec.evaluation" and "spec.service.tls.clientCASecretName" in exc.value.message
    evaluation.check_evaluation(make_spec(service={"tls": {"secretName": "t"}}))  # server TLS: the Job verifies it
    with pytest.raises(InvalidSpec, match="apiKeySecretRef"):
        evaluation.check_evaluation(make_spec(runtime={"apiKeysSecretName": "keys"}))
    evaluation.check_evaluation(make_spec(None, service={"tls": {"secretName": "t"}}))  # no evaluation: no check


def test_crd_has_the_dataset_rule_status_and_score_column() -> None:
    built = crd.build_crd()
    version = built["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    dataset = schema["spec"]["properties"]["evaluation"]["properties"]["dataset"]
    assert dataset["x-kubernetes-validations"][0]["rule"] == "has(self.configMapRef) != has(self.pvc)"
    status = schema["status"]["properties"]["evaluation"]["properties"]
    assert {"revision", "metric", "score", "baseline", "samples", "passed", "finishedAt", "perLabel"} <= set(status)
    cols = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert cols["Score"]["jsonPath"] == ".status.evaluation.score" and cols["Score"]["type"] == "number"


# --------------------------------------------------------------------------------------------- dataset


def test_configmap_dataset_checked_with_the_evaluators_parser() -> None:
    spec = make_spec()
    with pytest.raises(InvalidSpec) as exc:
        evaluation.configmap_text(spec, None)
    assert exc.value.field == "spec.evaluation.dataset.configMapRef" and "sentiment-eval not found" in exc.value.message
    with pytest.raises(InvalidSpec, match=r"has no key eval.jsonl \(keys: other.jsonl\)"):
        evaluation.configmap_text(spec, {"data": {"other.jsonl": "{}"}})
    good = '{"text": "fine", "label": "POS"}\n{"text": "bad", "label": "NEG"}\n'
    assert evaluation.configmap_text(spec, {"data": {"eval.jsonl": good}}) == good
    identity = evaluation.check_dataset(spec, good)
    assert identity.startswith("configmap sentiment-eval/eval.jsonl sha256:")
    assert evaluation.check_dataset(spec, good + "\n") != identity  # any edit is a new dataset (a new baseline)
    with pytest.raises(InvalidSpec) as exc:
        evaluation.check_dataset(spec, good + '{"text": "no label"}\n')
    assert exc.value.field == "spec.evaluation.dataset.configMapRef"
    assert exc.value.message == 'ConfigMap sentiment-eval key eval.jsonl: line 3: missing field "label"'


# -------------------------------------------------------------------------------------------- builders


def test_gate_is_in_the_pod_template_but_not_in_the_revision() -> None:
    assert builders.revision_hash({**TB, GATED: True}) == builders.revision_hash(TB) == RB
    spec, settings = make_spec(), Settings()
    gated = builders.build_deployment(NAME, "ns", "uid", spec, settings, template={**TB, GATED: True})
    plain = builders.build_deployment(NAME, "ns", "uid", spec, settings, template=TB)
    assert gated["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": "gptd.io/evaluated"}]
    assert plain["spec"]["template"]["spec"]["readinessGates"] is None  # merge patch: removes a stale one
    assert gated["spec"]["template"]["metadata"]["labels"]["gptd.io/revision"] == RB
    # spec.evaluation alone changes nothing in the pod template (it is decided per revision by rollout.py)
    unevaluated = builders.build_deployment(NAME, "ns", "uid", make_spec(None), settings, template=TB)
    assert unevaluated["spec"]["template"] == plain["spec"]["template"]


def test_network_policy_admits_this_crs_evaluator_jobs_only_with_evaluation() -> None:
    settings = Settings()
    with_eval = builders.build_network_policy(NAME, "ns", "uid", make_spec(networkPolicy={"enabled": True}), settings)
    without = builders.build_network_policy(NAME, "ns", "uid", make_spec(None, networkPolicy={"enabled": True}),
                                            settings)
    peers = [p for rule in with_eval["spec"]["ingress"] for p in rule["from"]]
    evaluator = {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "gptd-job", "app.kubernetes.io/instance": NAME,
        "app.kubernetes.io/component": "evaluation"}}}
    assert evaluator in peers
    assert evaluator not in [p for rule in without["spec"]["ingress"] for p in rule["from"]]
    rule = next(r for r in with_eval["spec"]["ingress"] if evaluator in r["from"])
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert evaluator == evaluation.evaluator_peer(NAME)


def _job(spec: api.GPTDeploymentSpec, role: str = CANDIDATE) -> dict[str, Any]:
    job = evaluation.EvalJob(role, cand_name(spec), "k" * 16, RB, "sent-b1", "10.0.0.9")
    return evaluation.build_job(NAME, "ns", "uid", spec, Settings(), job, "rt:1")


def test_job_scores_the_pod_by_ip_and_returns_its_result_in_the_termination_message() -> None:
    spec = make_spec({**EVAL, "samples": 50, "metric": "accuracy"}, runtime={"apiKeySecretRef": {"name": "k",
                                                                                                 "key": "key"}})
    job = _job(spec)
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid" and len(job["metadata"]["name"]) <= 63
    pod = job["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    args = c["command"]
    assert args[:4] == ["python", "-m", "gptd_runtime", "evaluate"]
    opt = dict(zip(args[4::2], args[5::2], strict=True))
    assert opt == {"--url": "http://10.0.0.9:8000", "--dataset": evaluation.DATASET_FILE,
                   "--task": "text-classification", "--metric": "accuracy", "--average": "macro",
                   "--result-file": "/dev/termination-log", "--samples": "50",
                   "--api-key-file": f"{evaluation.API_KEY_DIR}/api-key"}
    assert c["terminationMessagePath"] == "/dev/termination-log" and c["terminationMessagePolicy"] == "File"
    # the key by file from its Secret, never in env
    assert all("valueFrom" not in e and "KEY" not in e["name"] for e in c["env"])
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["api-key"]["secret"] == {"secretName": "k", "items": [{"key": "key", "path": "api-key"}],
                                         "defaultMode": 0o440}
    assert vols["dataset"]["configMap"]["items"] == [{"key": "eval.jsonl", "path": "dataset.jsonl"}]
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] != "tmp")
    # Pod Security "restricted"; no API token; not selected as a runtime pod; one try
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and pod["spec"]["securityContext"]["runAsNonRoot"]
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "gptd-job"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    assert pod["metadata"]["labels"]["gptd.io/revision"] == RB
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600 + 60


def test_job_mounts_a_pvc_dataset_file_read_only() -> None:
    job = _job(make_spec({**EVAL, "dataset": {"pvc": "eval-data/sets/sentiment.jsonl"}}))
    spec = job["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dataset"]["persistentVolumeClaim"] == {"claimName": "eval-data", "readOnly": True}
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "dataset")
    assert mount == {"name": "dataset", "mountPath": evaluation.DATASET_FILE, "subPath": "sets/sentiment.jsonl",
                     "readOnly": True}
    assert "api-key" not in vols


def test_job_names_fit_a_label_and_differ_by_role_and_key() -> None:
    long = "a" * 253
    assert len(names.evaluation_job(long, CANDIDATE, "k1")) <= 63
    got = {names.evaluation_job(n, r, k) for n in (NAME, long) for r in (CANDIDATE, BASELINE) for k in ("k1", "k2")}
    assert len(got) == 8


# ----------------------------------------------------------------------------------------- observation


def test_observe_pod_sees_the_gate_ip_and_containers() -> None:
    p = observe_pod({
        "metadata": {"name": "sent-b1", "labels": {"gptd.io/revision": RB}},
        "spec": {"readinessGates": [{"conditionType": "gptd.io/evaluated"}]},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "ContainersReady", "status": "True"},
                                                       {"type": "Ready", "status": "False"}]},
    })
    assert (p.name, p.ip, p.containers_ready, p.ready, p.gated, p.evaluated) == (
        "sent-b1", "10.0.0.9", True, False, True, False)


def _pod_of(job: str, message: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{job}-x1", "creationTimestamp": "2026-01-01T00:00:01Z",
                         "labels": {"batch.kubernetes.io/job-name": job}},
            "status": {"phase": "Succeeded", "containerStatuses": [{"name": "evaluate", "state": {"terminated": {
                "exitCode": 0, "message": message, "finishedAt": "2026-01-01T00:01:00Z"}}}]}}


def test_run_of_reads_the_result_and_the_failure_from_the_job() -> None:
    job = {"metadata": {"name": "j", "labels": {"app.kubernetes.io/component": "evaluation"}},
           "status": {"startTime": "2026-01-01T00:00:00Z", "active": 1}}
    run = run_of(observe_job(job))
    assert run.state == "running" and run.started == at(0)
    done = {**job, "status": {"startTime": "2026-01-01T00:00:00Z", "succeeded": 1,
                              "conditions": [{"type": "Complete", "status": "True"}]}}
    run = run_of(observe_job(done, [_pod_of("j", json.dumps({"score": 0.9, "samples": 4}))]))
    assert run.state == "succeeded" and run.result == {"score": 0.9, "samples": 4}
    assert run_of(observe_job(done, [_pod_of("j", "")])).state == "failed"  # finished, no result to judge by
    bad = {**job, "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                          "reason": "BackoffLimitExceeded"}]}}
    error = json.dumps({"error": "dataset x: line 7: not valid JSON", "line": 7})
    run = run_of(observe_job(bad, [_pod_of("j", error)]))
    assert run.state == "failed" and run.message == "dataset x: line 7: not valid JSON" and not run.deadline_exceeded
    late = {**job, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                              "message": "Job was active longer than specified deadline"}]}}
    assert run_of(observe_job(late)).deadline_exceeded
    # another purpose's Job (a model download) is not an evaluation
    assert evaluation.runs_of([observe_job({**done, "metadata": {"name": "d", "labels": {
        "app.kubernetes.io/component": "model-download"}}})]) == {}


# -------------------------------------------------------------------------------- the gate in decide()


def test_adding_or_removing_evaluation_on_a_settled_cr_rolls_nothing() -> None:
    settled_obs = Observations(now=at(0), desired_template=TA, desired_revision=RA, name=NAME,
                               stable=dep(RA, TA), canary=None, pods=OLD_PODS)
    plan = decide(make_spec(), dict(SETTLED), settled_obs)
    assert plan.stable.revision == RA and GATED not in plan.stable.template and plan.stable.template == TA
    assert "rollout" not in merged(SETTLED, plan) and not plan.evaluation_jobs
    assert cond(plan, "Evaluated").reason == "NotEvaluated"  # it applies to the next revision: said so
    assert plan.conditions_to_drop == ()
    # without spec.evaluation and no evaluation on record there is nothing to say: the condition is dropped
    plain = decide(make_spec(None), dict(SETTLED), settled_obs)
    assert "Evaluated" not in {c.type for c in plain.conditions} and plain.conditions_to_drop == ("Evaluated",)
    # a revision rolled out with the gate keeps it when spec.evaluation goes
    gated_settled = {**SETTLED, "lastGoodTemplate": {**TA, GATED: True}}
    plan = decide(make_spec(None), gated_settled, settled_obs)
    assert plan.stable.template == {**TA, GATED: True} and plan.stable.revision == RA
    assert plan.evaluated_revisions == (RA,)  # its later pods (restarts, scale-up) still get the condition


def test_pass_opens_the_gate_and_the_rollout_continues() -> None:
    spec = make_spec()
    plan = decide(spec, dict(SETTLED), observe(0, pods=OLD_PODS))
    status = merged(SETTLED, plan)
    assert status["rollout"]["evaluationGate"] is True
    assert plan.stable.template == {**TB, GATED: True} and plan.stable.revision == RB
    assert not plan.evaluation_jobs and "waiting for a pod of revision" in status["evaluation"]["message"]
    # the new pod's containers are ready (Ready waits for the gate): a Job scores it by IP
    plan = decide(spec, status, observe(10, pods=(*OLD_PODS, NEW_POD)))
    status = merged(status, plan)
    (job,) = plan.evaluation_jobs
    assert (job.role, job.name, job.ip, job.pod, job.revision) == (CANDIDATE, cand_name(spec), "10.0.0.9",
                                                                   "sent-b1", RB)
    assert cond(plan, "Progressing").reason == "Evaluating" and cond(plan, "Evaluated").status == "Unknown"
    assert [e.reason for e in plan.events] == ["EvaluationStarted"]
    assert RB not in plan.evaluated_revisions
    # the Job is still running: kept, no new event
    plan = decide(spec, status, observe(20, pods=(*OLD_PODS, NEW_POD),
                                        runs=(running(cand_name(spec), 12),)))
    status = merged(status, plan)
    assert [j.name for j in plan.evaluation_jobs] == [cand_name(spec)] and not plan.events
    # it scored 0.91 >= 0.85: the condition goes on the revision's pods, the Job goes away
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=(scored(cand_name(spec), 0.91, 12),)))
    status = merged(status, plan)
    ev = status["evaluation"]
    assert (ev["revision"], ev["metric"], ev["score"], ev["samples"], ev["passed"]) == (RB, "f1", 0.91, 40, True)
    assert ev["finishedAt"] == "2026-01-01T00:00:30Z" and ev["perLabel"] == {"POS": {"f1": 0.91, "support": 20}}
    assert RB in plan.evaluated_revisions and not plan.evaluation_jobs
    assert cond(plan, "Evaluated").status == "True" and cond(plan, "Evaluated").reason == "EvaluationPassed"
    assert "rollout" in status and status["rollout"]["phase"] == "RollingOut"
    # once every new pod is Ready the rollout completes; the last good template keeps the gate
    plan = decide(spec, status, observe(40, stable=dep(RB, {**TB, GATED: True}),
                                        pods=tuple(pod(RB, f"b{i}", ready=True) for i in range(2))))
    status = merged(status, plan)
    assert status["currentRevision"] == RB and status["lastGoodTemplate"] == {**TB, GATED: True}
    assert plan.stable.template == {**TB, GATED: True}


def test_a_low_score_rolls_back_with_the_scores_and_is_not_retried() -> None:
    spec = make_spec()
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=(scored(cand_name(spec), 0.6),)))
    status = merged(status, plan)
    ro = status["rollout"]
    assert ro["phase"] == "RolledBack" and ro["reason"] == "EvaluationFailed"
    assert "f1 0.6000 < minScore 0.85" in ro["message"]
    assert plan.stable.revision == RA and plan.stable.template == TA  # the old pods are untouched
    rolled = cond(plan, "RolledBack")
    assert (rolled.status, rolled.reason) == ("True", "EvaluationFailed") and "0.6000" in rolled.message
    assert cond(plan, "Evaluated").reason == "EvaluationFailed" and status["evaluation"]["passed"] is False
    warnings = [e for e in plan.events if e.type == "Warning"]
    assert {e.reason for e in warnings} == {"EvaluationFailed", "RolledBack"}
    assert RB not in plan.evaluated_revisions and RA in plan.evaluated_revisions
    # the spec still asks for RB: held, no Job, no retry
    again = decide(spec, status, observe(60, pods=(*OLD_PODS, NEW_POD)))
    assert again.stable.revision == RA and not again.evaluation_jobs and not again.events
    assert merged(status, again)["rollout"]["phase"] == "RolledBack"


def test_a_job_past_timeout_rolls_back_as_evaluation_timeout() -> None:
    spec = make_spec()
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    runs = (running(cand_name(spec), 10),)
    plan = decide(spec, status, observe(600, pods=(*OLD_PODS, NEW_POD), runs=runs))
    assert "rollout" in plan.status and plan.status["rollout"]["phase"] == "RollingOut"
    assert plan.requeue_after == 10  # woken when the timeout is due
    plan = decide(spec, status, observe(611, pods=(*OLD_PODS, NEW_POD), runs=runs))
    ro = plan.status["rollout"]
    assert ro["phase"] == "RolledBack" and ro["reason"] == "EvaluationTimeout" and "within 600s" in ro["message"]
    assert cond(plan, "Evaluated").reason == "EvaluationTimeout"
    # Kubernetes' own deadline (activeDeadlineSeconds) says the same
    late = (failed(cand_name(spec), "DeadlineExceeded", started=10),)
    assert decide(spec, status, observe(100, runs=late)).status["rollout"]["reason"] == "EvaluationTimeout"


def test_the_progress_deadline_waits_while_the_evaluator_runs() -> None:
    spec = make_spec({**EVAL, "timeoutSeconds": 3000}, rollout={"progressDeadlineSeconds": 60})
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    runs = (running(cand_name(spec), 10),)
    plan = decide(spec, status, observe(500, pods=(*OLD_PODS, NEW_POD), runs=runs))
    assert plan.status["rollout"]["phase"] == "RollingOut"
    # without a running Job the deadline applies as before
    plan = decide(spec, status, observe(500, pods=OLD_PODS))
    assert plan.status["rollout"]["reason"] == "ProgressDeadlineExceeded"


def test_baseline_once_per_dataset_and_regression_fails() -> None:
    spec = make_spec({**EVAL, "minScore": 0.4, "maxRegression": 0.09})
    plan = decide(spec, dict(SETTLED), observe(0, pods=OLD_PODS))
    status = merged(SETTLED, plan)
    (job,) = plan.evaluation_jobs  # the baseline starts at once, on a Ready current pod
    assert (job.role, job.revision, job.pod, job.ip, job.name) == (BASELINE, RA, "sent-a1", "10.0.0.1",
                                                                   base_name(spec))
    runs = (succeeded(base_name(spec), {"score": 0.5}, 1), scored(cand_name(spec), 0.4, 5))
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=runs))
    status = merged(status, plan)
    assert status["evaluationBaseline"]["score"] == 0.5 and status["evaluationBaseline"]["revision"] == RA
    ev = status["evaluation"]
    assert ev["passed"] is False and ev["baseline"] == 0.5 and ev["score"] == 0.4  # 0.4 >= minScore 0.4
    assert "more than maxRegression 0.09 below the baseline 0.5000" in status["rollout"]["message"]
    # the next rollout against the same current revision and data (status.evaluation of the failed try gone, as
    # after another revision in between): the baseline is not measured again; 0.41 is exactly 0.5 - 0.09 (a
    # float edge: 0.5 - 0.09 is 0.41000000000000003) and passes
    status.pop("rollout")
    status.pop("evaluation")
    plan = decide(spec, status, observe(100, pods=OLD_PODS))
    assert [j.role for j in plan.evaluation_jobs] == []
    plan = decide(spec, merged(status, plan), observe(110, pods=(*OLD_PODS, NEW_POD),
                                                      runs=(scored(cand_name(spec), 0.41),)))
    assert plan.status["evaluation"]["passed"] is True and plan.status["evaluation"]["baseline"] == 0.5


def test_candidate_done_waits_for_a_running_baseline_and_a_failed_baseline_falls_back_to_min_score() -> None:
    spec = make_spec({**EVAL, "maxRegression": 0.02})
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    runs: tuple[JobObs, ...] = (running(base_name(spec), 0), scored(cand_name(spec), 0.9))
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=runs))
    assert {j.role for j in plan.evaluation_jobs} == {BASELINE, CANDIDATE}
    assert plan.status["evaluation"].get("passed") is None and "waiting for the baseline" in \
        plan.status["evaluation"]["message"]
    runs = (failed(base_name(spec), message=json.dumps({"error": "cannot reach http://10.0.0.1:8000"})),
            scored(cand_name(spec), 0.9))
    plan = decide(spec, status, observe(40, pods=(*OLD_PODS, NEW_POD), runs=runs))
    ev = plan.status["evaluation"]
    assert ev["passed"] is True and "baseline" not in ev and "judged on minScore" in ev["message"]
    assert "BaselineUnavailable" in {e.reason for e in plan.events}


def test_canary_first_step_is_gated() -> None:
    spec = make_spec(replicas=4, rollout={"strategy": "Canary", "canary": {"steps": [{"weight": 25}]}})
    plan = decide(spec, dict(SETTLED), observe(0, stable=dep(RA, TA, 4)))
    status = merged(SETTLED, plan)
    assert status["rollout"]["phase"] == "Canary"
    assert plan.canary is not None and plan.canary.template == {**TB, GATED: True}
    assert plan.stable.template == TA
    canary = DeploymentObs(revision=RB, template={**TB, GATED: True}, spec_replicas=1, replicas=1)
    plan = decide(spec, status, observe(10, stable=dep(RA, TA, 4), canary=canary, pods=(*OLD_PODS, NEW_POD)))
    status = merged(status, plan)
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE]
    assert "evaluating revision" in cond(plan, "Progressing").message
    plan = decide(spec, status, observe(20, stable=dep(RA, TA, 4), canary=canary, pods=(*OLD_PODS, NEW_POD),
                                        runs=(scored(cand_name(spec), 0.1),)))
    ro = plan.status["rollout"]
    assert ro["phase"] == "RolledBack" and ro["reason"] == "EvaluationFailed" and plan.canary is None


def test_removing_evaluation_mid_rollout_opens_the_gate_without_a_score() -> None:
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    plan = decide(make_spec(None), status, observe(10, pods=(*OLD_PODS, NEW_POD)))
    assert plan.stable.template == {**TB, GATED: True}  # the pods already made keep their template
    assert RB in plan.evaluated_revisions and plan.status["evaluation"]["passed"] is True
    assert "EvaluationSkipped" in {e.reason for e in plan.events}


def test_first_revision_is_scored_against_min_score_only() -> None:
    spec = make_spec({**EVAL, "maxRegression": 0.02})
    first = Observations(now=at(0), desired_template=TB, desired_revision=RB, name=NAME, stable=None, canary=None,
                         pods=(NEW_POD,), evaluation_dataset=DATASET)
    plan = decide(spec, {}, first)
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE]
    status = merged({}, plan)
    plan = decide(spec, status, Observations(now=at(9), desired_template=TB, desired_revision=RB, name=NAME,
                                             stable=None, canary=None, pods=(NEW_POD,),
                                             evaluation_dataset=DATASET, jobs=(scored(cand_name(spec), 0.5),)))
    ro = plan.status["rollout"]
    assert ro["phase"] == "Failed" and ro["reason"] == "EvaluationFailed"  # nothing to roll back to; no traffic
    assert plan.stable.template == {**TB, GATED: True} and RB not in plan.evaluated_revisions  # still gated


def test_a_changed_evaluation_spec_retries_a_held_failure() -> None:
    """"No retry until the spec changes": spec.evaluation is part of the spec. A stored score is re-judged (no new
    Job); an evaluation without a score (timed out) is measured again."""
    spec = make_spec()
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=(scored(cand_name(spec), 0.6),)))
    held = merged(status, plan)
    assert held["rollout"]["phase"] == "RolledBack" and held["rollout"]["evaluationSpec"]
    # the same spec: held, nothing runs, and the handlers read no dataset for it
    same = as_handlers_pass(spec, held, observe(40, pods=(*OLD_PODS, NEW_POD)))
    assert same.evaluation_dataset is None
    again = decide(spec, held, same)
    assert again.stable.revision == RA and not again.evaluation_jobs
    # a lower bar: the handlers check the dataset first (the retried revision is refused before any pod when it is
    # bad); the rollout starts again and the stored 0.6 passes at once, without a Job
    lower = make_spec({**EVAL, "minScore": 0.5})
    retry = as_handlers_pass(lower, held, observe(50, pods=(*OLD_PODS, NEW_POD)))
    assert retry.evaluation_dataset == DATASET
    plan = decide(lower, held, retry)
    st = merged(held, plan)
    assert st["rollout"]["phase"] == "RollingOut" and st["rollout"]["revision"] == RB
    assert st["evaluation"]["passed"] is True and st["evaluation"]["score"] == 0.6
    assert "0.6000 >= minScore 0.5" in st["evaluation"]["message"]
    assert not plan.evaluation_jobs and RB in plan.evaluated_revisions
    assert plan.stable.template == {**TB, GATED: True}
    # a timeout has no score: a changed timeout measures it again
    runs = (running(cand_name(spec), 0),)
    plan = decide(spec, status, observe(700, pods=(*OLD_PODS, NEW_POD), runs=runs))
    timed_out = merged(status, plan)
    assert timed_out["rollout"]["reason"] == "EvaluationTimeout"
    longer = make_spec({**EVAL, "timeoutSeconds": 1800})
    plan = decide(longer, timed_out, as_handlers_pass(longer, timed_out, observe(710, pods=(*OLD_PODS, NEW_POD))))
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE] and plan.evaluation_jobs[0].ip == "10.0.0.9"
    assert merged(timed_out, plan)["rollout"]["phase"] == "RollingOut"


# ------------------------------------------------------------------------- review findings (issue 11)


def _first(t: float, *, pods: tuple[PodObs, ...] = (NEW_POD,), runs: tuple[JobObs, ...] = (),
           stable: DeploymentObs | None = None) -> Observations:
    return Observations(now=at(t), desired_template=TB, desired_revision=RB, name=NAME, stable=stable, canary=None,
                        pods=pods, evaluation_dataset=DATASET, jobs=runs)


def test_a_failed_first_revision_keeps_its_gate_and_is_never_made_current() -> None:
    spec = make_spec()
    status = merged({}, decide(spec, {}, _first(0)))
    plan = decide(spec, status, _first(9, runs=(scored(cand_name(spec), 0.5),)))
    status = merged(status, plan)
    assert status["rollout"]["phase"] == "Failed" and status["rollout"]["evaluationGate"] is True
    assert plan.stable.template == {**TB, GATED: True}  # the held template keeps the readiness gate
    assert RB not in plan.evaluated_revisions
    # even if every pod of it reports Ready (a gate set by hand, say) the failed revision is not made current
    ready = tuple(pod(RB, f"b{i}", ready=True, containers=True, ip=f"10.0.1.{i}") for i in range(2))
    plan = decide(spec, status, _first(60, pods=ready, stable=dep(RB, {**TB, GATED: True})))
    status = merged(status, plan)
    assert "currentRevision" not in status and status["rollout"]["phase"] == "Failed"
    assert plan.stable.template == {**TB, GATED: True} and cond(plan, "Progressing").reason == "FirstRevisionFailed"


def test_zero_replicas_keep_a_gated_rollout_open_until_its_first_pod_is_scored() -> None:
    spec = make_spec(replicas=0)
    st0 = {**SETTLED, "lastGoodTemplate": {**TA, GATED: True}}
    status = merged(st0, decide(spec, dict(st0), observe(0, pods=(), stable=dep(RA, {**TA, GATED: True}, 0))))
    # the Deployment runs the gated RB template at 0 replicas: "done", but nothing was scored
    plan = decide(spec, status, observe(5, pods=(), stable=dep(RB, {**TB, GATED: True}, 0)))
    status = merged(status, plan)
    assert status["currentRevision"] == RA and status["rollout"]["phase"] == "RollingOut"
    assert RB not in plan.evaluated_revisions and not plan.evaluation_jobs
    progressing = cond(plan, "Progressing")
    assert progressing.reason == "Evaluating" and "0 replicas" in progressing.message
    # no progress deadline while nothing is wanted
    plan = decide(spec, status, observe(5000, pods=(), stable=dep(RB, {**TB, GATED: True}, 0)))
    status = merged(status, plan)
    assert status["rollout"]["phase"] == "RollingOut"
    # scaled up: its first pod is scored before any of them is marked
    up = make_spec(replicas=2)
    plan = decide(up, status, observe(5010, pods=(NEW_POD,), stable=dep(RB, {**TB, GATED: True}, 2, 0)))
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE] and RB not in plan.evaluated_revisions


def test_promote_waits_for_the_first_canary_steps_evaluation() -> None:
    spec = make_spec(replicas=4, rollout={"strategy": "Canary", "canary": {"steps": [{"weight": 25}, {"weight": 50}]}})
    status = merged(SETTLED, decide(spec, dict(SETTLED), observe(0, stable=dep(RA, TA, 4))))
    canary = DeploymentObs(revision=RB, template={**TB, GATED: True}, spec_replicas=1, replicas=1)
    status = merged(status, decide(spec, status, observe(10, stable=dep(RA, TA, 4), canary=canary,
                                                         pods=(*OLD_PODS, NEW_POD))))
    promote = dataclasses.replace(observe(20, stable=dep(RA, TA, 4), canary=canary, pods=(*OLD_PODS, NEW_POD),
                                          runs=(running(cand_name(spec), 12),)), promote=True)
    plan = decide(spec, status, promote)
    status = merged(status, plan)
    assert status["rollout"]["phase"] == "Canary" and [j.name for j in plan.evaluation_jobs] == [cand_name(spec)]
    assert "gptd.io/promote" not in plan.annotations_to_clear  # kept: honoured once the evaluation passed
    assert [e.reason for e in plan.events] == ["PromoteDeferred"] and plan.stable.template == TA
    assert "waits for the evaluation to pass" in cond(plan, "Progressing").message
    plan = decide(spec, status, dataclasses.replace(promote, now=at(25)))  # said once
    status = merged(status, plan)
    assert not plan.events and status["rollout"]["phase"] == "Canary"
    passed = dataclasses.replace(promote, now=at(30), jobs=(scored(cand_name(spec), 0.9, 12),))
    plan = decide(spec, status, passed)
    status = merged(status, plan)
    assert status["rollout"]["phase"] == "Promoting" and "gptd.io/promote" in plan.annotations_to_clear
    assert RB in plan.evaluated_revisions and "promoteDeferred" not in status["rollout"]


def test_promoting_before_the_gate_passed_still_gates() -> None:
    """Promoting without a score (the spec lost its canary steps mid-evaluation): scored before completion."""
    spec = make_spec(replicas=2)  # RollingUpdate now: no canary steps left
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "Canary", "step": 0, "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    plan = decide(spec, status, observe(10, pods=(*OLD_PODS, NEW_POD)))
    status = merged(status, plan)
    assert status["rollout"]["phase"] == "Promoting" and [j.role for j in plan.evaluation_jobs] == [CANDIDATE]
    assert [e.reason for e in plan.events].count("EvaluationStarted") == 1
    # every stable pod on RB and Ready (gate set by hand): still not complete before the score
    done = observe(20, stable=dep(RB, {**TB, GATED: True}), pods=(pod(RB, "sent-b1", ready=True, containers=True,
                                                                      ip="10.0.0.9"),),
                   runs=(running(cand_name(spec), 12),))
    plan = decide(spec, status, done)
    assert plan.status["rollout"]["phase"] == "Promoting" and "currentRevision" in plan.status
    assert plan.status["currentRevision"] == RA
    plan = decide(spec, status, dataclasses.replace(done, now=at(30), jobs=(scored(cand_name(spec), 0.1, 12),)))
    assert plan.status["rollout"]["phase"] == "RolledBack" and plan.status["rollout"]["reason"] == "EvaluationFailed"


def _eval_job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j", "labels": {"app.kubernetes.io/component": "evaluation"}},
            "status": {"startTime": "2026-01-01T00:00:00Z", **status}}


def _eval_pod(state: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "j-x1", "creationTimestamp": "2026-01-01T00:00:01Z",
                         "labels": {"batch.kubernetes.io/job-name": "j"}},
            "status": {"phase": "Running", "containerStatuses": [{"name": "evaluate", "state": state}]}}


def test_a_complete_job_waits_for_its_pods_result_in_either_watch_order() -> None:
    result = json.dumps({"score": 0.9, "samples": 4})
    terminated = {"terminated": {"exitCode": 0, "message": result}}
    complete = _eval_job(succeeded=1, completionTime="2026-01-01T00:01:00Z",
                         conditions=[{"type": "Complete", "status": "True"}])
    # the Job's Complete arrives first: its pod is still seen running, or not seen at all yet
    for pods in ([_eval_pod({"running": {}})], []):
        run = run_of(observe_job(complete, pods), at(70))
        assert run.state == "running" and "waiting for its pod's result" in run.message
    # then the pod's terminated state (with the result) arrives
    assert run_of(observe_job(complete, [_eval_pod(terminated)]), at(70)).state == "succeeded"
    # the pod's terminated state first: the Job is not Complete yet, so it still runs; then both
    assert run_of(observe_job(_eval_job(active=1), [_eval_pod(terminated)]), at(70)).state == "running"
    # a terminated pod without a result is a failure at once; a Job whose pod is gone past the grace too
    empty = run_of(observe_job(complete, [_eval_pod({"terminated": {"exitCode": 0}})]), at(70))
    assert empty.state == "failed" and "without a result" in empty.message
    gone = run_of(observe_job(complete, []), at(60 + evaluation.RESULT_GRACE_SECONDS + 1))
    assert gone.state == "failed" and "pod is gone" in gone.message


def test_a_failed_baseline_is_recorded_and_not_recreated_in_this_rollout() -> None:
    spec = make_spec({**EVAL, "maxRegression": 0.02})
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    bfail = failed(base_name(spec), message=json.dumps({"error": "cannot reach http://10.0.0.1:8000"}))
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, NEW_POD), runs=(bfail, running(cand_name(spec), 20))))
    status = merged(status, plan)
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE]  # the failed baseline Job goes
    assert [e.reason for e in plan.events] == ["BaselineUnavailable"]
    record = status["evaluationBaseline"]
    assert record["key"] == eval_key(spec, DATASET, RA) and "cannot reach" in record["error"]
    assert "score" not in record and record["rolloutStartedAt"] == "2026-01-01T00:00:00Z"
    # its Job deleted: not created again, no second Warning
    plan = decide(spec, status, observe(35, pods=(*OLD_PODS, NEW_POD), runs=(running(cand_name(spec), 20),)))
    status = merged(status, plan)
    assert [j.role for j in plan.evaluation_jobs] == [CANDIDATE] and not plan.events
    # judged on minScore, the reason in the message
    plan = decide(spec, status, observe(40, pods=(*OLD_PODS, NEW_POD), runs=(scored(cand_name(spec), 0.9, 20),)))
    ev = plan.status["evaluation"]
    assert ev["passed"] is True and "cannot reach" in ev["message"] and "judged on minScore" in ev["message"]
    assert "BaselineUnavailable" not in {e.reason for e in plan.events}
    # a later rollout (another start) measures it again
    later = {**status, "rollout": {**status["rollout"], "startedAt": "2026-01-02T00:00:00Z"}}
    later.pop("evaluation")
    plan = decide(spec, later, observe(50, pods=(*OLD_PODS, NEW_POD)))
    assert BASELINE in [j.role for j in plan.evaluation_jobs]


def test_a_job_without_a_start_time_still_times_out() -> None:
    spec = make_spec()
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    # suspended by a queue: no startTime; its creationTimestamp counts
    suspended = JobObs(name=cand_name(spec), revision=None, purpose="evaluation", created=at(10),
                       conditions=(("Suspended", "True", "JobSuspended", ""),))
    plan = decide(spec, status, observe(600, pods=(*OLD_PODS, NEW_POD), runs=(suspended,)))
    assert plan.status["rollout"]["phase"] == "RollingOut" and plan.requeue_after == 10
    plan = decide(spec, status, observe(611, pods=(*OLD_PODS, NEW_POD), runs=(suspended,)))
    assert plan.status["rollout"]["reason"] == "EvaluationTimeout"
    # neither startTime nor creationTimestamp seen: from status.evaluation.startedAt, set when the Job was asked for
    plan = decide(spec, status, observe(5, pods=(*OLD_PODS, NEW_POD)))
    asked = merged(status, plan)
    assert asked["evaluation"]["startedAt"] == "2026-01-01T00:00:05Z"
    bare = JobObs(name=cand_name(spec), revision=None, purpose="evaluation")
    plan = decide(spec, asked, observe(300, pods=(*OLD_PODS, NEW_POD), runs=(bare,)))
    asked = merged(asked, plan)
    assert asked["rollout"]["phase"] == "RollingOut" and asked["evaluation"]["startedAt"] == "2026-01-01T00:00:05Z"
    plan = decide(spec, asked, observe(606, pods=(*OLD_PODS, NEW_POD), runs=(bare,)))
    assert plan.status["rollout"]["reason"] == "EvaluationTimeout"


def test_going_back_to_the_serving_revision_mid_rollout_does_not_gate_it() -> None:
    spec = make_spec()
    status = merged(SETTLED, decide(spec, dict(SETTLED), observe(0)))
    back = Observations(now=at(10), desired_template=TA, desired_revision=RA, name=NAME,
                        stable=dep(RB, {**TB, GATED: True}), canary=None, pods=(*OLD_PODS, NEW_POD),
                        evaluation_dataset=DATASET)
    plan = decide(spec, status, back)
    status = merged(status, plan)
    assert plan.stable.template == TA and not plan.evaluation_jobs  # served ungated: not re-gated, not scored
    assert "evaluationGate" not in status["rollout"] and RA in plan.evaluated_revisions
    # one that was rolled out with the gate keeps it (its template must not change)
    gated = {**SETTLED, "lastGoodTemplate": {**TA, GATED: True}}
    status = merged(gated, decide(spec, dict(gated), observe(0)))
    plan = decide(spec, status, back)
    assert plan.stable.template == {**TA, GATED: True} and not plan.evaluation_jobs
    assert "evaluationGate" not in merged(status, plan)["rollout"] and RA in plan.evaluated_revisions


def test_the_dataset_is_read_only_while_it_can_gate_and_not_after_the_verdict() -> None:
    spec = make_spec()
    rolling = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "evaluationGate": True}}
    assert rollout.needs_dataset(spec, dict(SETTLED), RB)  # about to start a gated rollout
    assert rollout.needs_dataset(spec, rolling, RB)
    assert not rollout.needs_dataset(spec, dict(SETTLED), RA)  # settled
    assert not rollout.needs_dataset(spec, rolling, RA)  # back to the serving revision: not gated
    assert not rollout.needs_dataset(make_spec(None), rolling, RB)
    assert not rollout.needs_dataset(spec, {**rolling, "rollout": {"revision": RB, "phase": "RollingOut"}}, RB)
    held = {**SETTLED, "rollout": {"revision": RB, "phase": "RolledBack",
                                   "evaluationSpec": evaluation.evaluation_hash(spec)}}
    assert not rollout.needs_dataset(spec, held, RB)  # held under the same spec.evaluation
    assert rollout.needs_dataset(make_spec({**EVAL, "minScore": 0.5}), held, RB)  # retried: checked first
    # once the revision has a verdict under this spec.evaluation, the recorded identity is used (no read)
    plan = decide(spec, rolling, observe(30, pods=(*OLD_PODS, NEW_POD), runs=(scored(cand_name(spec), 0.9),)))
    passed = merged(rolling, plan)
    assert evaluation.judged_dataset(spec, passed, RB) == DATASET
    assert evaluation.judged_dataset(make_spec({**EVAL, "minScore": 0.5}), passed, RB) is None  # re-judged
    assert evaluation.judged_dataset(spec, passed, RA) is None
    assert evaluation.judged_dataset(spec, rolling, RB) is None  # no verdict yet


def test_evaluated_and_the_score_describe_the_desired_revision_only() -> None:
    old_eval = {"revision": RA, "passed": True, "score": 0.9, "message": f"revision {RA} passed: f1 0.9"}
    settled = {**SETTLED, "evaluation": old_eval}
    # an ungated rollout of RB: RA's record goes (the Score column), no Evaluated condition for RB
    plan = decide(make_spec(None), dict(settled), observe(0))
    status = merged(settled, plan)
    assert "evaluation" not in status and plan.status["evaluation"] is None  # cleared in the CR (merge-patch null)
    assert "Evaluated" not in {c.type for c in plan.conditions} and plan.conditions_to_drop == ("Evaluated",)
    # gated: Evaluating for RB, never RA's True
    plan = decide(make_spec(), dict(settled), observe(0))
    assert cond(plan, "Evaluated").status == "Unknown" and RA not in cond(plan, "Evaluated").message
    assert plan.status["evaluation"]["revision"] == RB and "score" not in plan.status["evaluation"]
    # the condition itself ignores a record of another revision
    assert evaluation.condition(make_spec(), old_eval, RB) == (
        "Unknown", "NotEvaluated", f"revision {RB} was not evaluated: spec.evaluation applies to the next revision "
        "rolled out")
    assert evaluation.condition(make_spec(None), old_eval, RB) is None
    assert evaluation.condition(make_spec(None), old_eval, RA) == ("True", "EvaluationPassed", old_eval["message"])


def test_evaluator_disruption_is_not_a_verdict_and_the_scored_pod_is_checked_at_judgement() -> None:
    spec = make_spec()
    target = PodObs(revision=RB, ready=False, name="sent-b1", ip="10.0.0.9", containers_ready=True, gated=True,
                    uid="u-b1")
    built = evaluation.build_job(NAME, "ns", "uid", spec, Settings(),
                                 evaluation.EvalJob(CANDIDATE, cand_name(spec), "k" * 16, RB, "sent-b1", "10.0.0.9",
                                                    "u-b1"), "rt:1")
    # an evicted/preempted evaluator pod is recreated, not counted against backoffLimit 0
    assert built["spec"]["podFailurePolicy"] == {"rules": [{
        "action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    ann = built["metadata"]["annotations"]
    assert (ann[evaluation.ANN_TARGET_UID], ann[evaluation.ANN_TARGET_IP]) == ("u-b1", "10.0.0.9")
    # the Job as observed carries its target; a score of the same pod is judged
    done = {**built, "status": {"startTime": "2026-01-01T00:00:00Z", "succeeded": 1,
                                "conditions": [{"type": "Complete", "status": "True"}]}}
    job = observe_job(done, [_pod_of(cand_name(spec), json.dumps({"score": 0.9, "samples": 4}))])
    assert (job.target_uid, job.target_ip) == ("u-b1", "10.0.0.9")
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    plan = decide(spec, status, observe(30, pods=(*OLD_PODS, target), runs=(job,)))
    assert plan.status["evaluation"]["passed"] is True
    # the pod was replaced while the Job ran (a new pod, even at the same IP): the score cannot pass the revision
    for other in (dataclasses.replace(target, uid="u-b2"), dataclasses.replace(target, ip="10.0.0.10"),
                  dataclasses.replace(target, revision=RA)):
        plan = decide(spec, status, observe(30, pods=(*OLD_PODS, other), runs=(job,)))
        ro = plan.status["rollout"]
        assert ro["phase"] == "RolledBack" and "was replaced while it ran" in ro["message"]


@pytest.mark.parametrize(("tls", "secret"), [({"secretName": "serving"}, "serving"),
                                             ({"issuerRef": {"name": "ca"}}, names.certificate_secret(NAME))])
def test_under_server_tls_the_job_verifies_the_service_name_at_the_pod_ip(tls: dict[str, Any], secret: str) -> None:
    job = _job(make_spec(service={"tls": tls}))
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["command"]
    opt = dict(zip(args[4::2], args[5::2], strict=True))
    assert opt["--url"] == "https://10.0.0.9:8000"
    assert opt["--server-name"] == f"{names.service(NAME)}.ns.svc"
    assert opt["--server-name"] in builders.service_dns_names(NAME, "ns")  # a name the Certificate covers
    assert opt["--ca-file"] == f"{evaluation.CA_DIR}/ca.crt"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["ca"]["secret"] == {"secretName": secret, "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                    "defaultMode": 0o444}  # by reference: the operator never reads the Secret
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ca")
    assert mount == {"name": "ca", "mountPath": evaluation.CA_DIR, "readOnly": True}
    # without TLS: plain HTTP, no CA
    plain = _job(make_spec())["spec"]["template"]["spec"]
    assert "--server-name" not in plain["containers"][0]["command"] and "ca" not in {v["name"] for v in
                                                                                      plain["volumes"]}


def _failed_job(reason: str = "BackoffLimitExceeded", failed_at: str | None = "2026-01-01T00:01:00Z") -> dict[str, Any]:
    cond = {"type": "Failed", "status": "True", "reason": reason,
            "message": "Job has reached the specified backoff limit"}
    if failed_at is not None:
        cond["lastTransitionTime"] = failed_at
    return _eval_job(failed=1, conditions=[cond])


def test_a_failed_job_waits_a_grace_for_its_pods_message() -> None:
    grace = evaluation.RESULT_GRACE_SECONDS
    error = json.dumps({"error": "dataset x: line 7: not valid JSON"})
    job = _failed_job()
    assert observe_job(job).failed_since == at(60)
    # the Job's Failed arrives first (its pod not seen, or seen still running): it waits, and says for how long
    for pods in ([], [_eval_pod({"running": {}})]):
        run = run_of(observe_job(job, pods), at(70))
        assert run.state == "running" and "waiting for its pod's message" in run.message
        assert run.recheck == grace - 10
    # the pod's terminated state arrives: the evaluator's own error, at once
    run = run_of(observe_job(job, [_eval_pod({"terminated": {"exitCode": 1, "message": error}})]), at(70))
    assert run.state == "failed" and run.message == "dataset x: line 7: not valid JSON"
    # no pod past the grace: judged on the Job's own message
    run = run_of(observe_job(job), at(60 + grace + 1))
    assert run.state == "failed" and run.message == "Job has reached the specified backoff limit"
    # a deadline is a timeout whatever the pod says
    assert run_of(observe_job(_failed_job("DeadlineExceeded")), at(70)).deadline_exceeded
    # without lastTransitionTime the grace counts from the operator's own first sighting
    bare = observe_job(_failed_job(failed_at=None))
    run = run_of(bare, at(70))
    assert run.state == "running" and run.recheck == grace and run.failed_seen == at(70)
    assert run_of(bare, at(70 + grace - 1), seen=at(70)).state == "running"
    assert run_of(bare, at(70 + grace + 1), seen=at(70)).state == "failed"


# A pod the kubelet rejected at admission: terminal at once, no container ever started (so no container state).
REJECTED = {"phase": "Failed", "reason": "OutOfcpu",
            "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 500, used: 3800"}
REJECTED_TEXT = "OutOfcpu: " + REJECTED["message"]


def test_a_failed_job_whose_pod_is_terminal_without_a_container_state_is_judged_at_once_on_the_pods_reason() -> None:
    # the Job's grace waits for a container termination message that a pod rejected at admission never gets
    rejected = {**_eval_pod({}), "status": REJECTED}
    job = observe_job(_failed_job(), [rejected])
    assert job.pod_failure == REJECTED_TEXT and job.exit_code is None
    assert evaluation.failed_grace_left(job, at(70)) is None
    run = run_of(job, at(70))
    assert run.state == "failed" and run.message == REJECTED_TEXT  # not the Job's generic backoff-limit message
    # evicted after its container ran, but it said nothing (no termination message): the pod's reason too
    evicted = {**_eval_pod({"terminated": {"exitCode": 137, "reason": "Error"}}),
               "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
                          "containerStatuses": [{"name": "evaluate", "state": {"terminated": {"exitCode": 137}}}]}}
    assert run_of(observe_job(_failed_job(), [evicted]), at(70)).message == (
        "Evicted: The node was low on resource: memory.")
    # the evaluator's own error, when its container said one, still comes first
    told = {**evicted, "status": {**evicted["status"], "containerStatuses": [{"name": "evaluate", "state": {
        "terminated": {"exitCode": 1, "message": json.dumps({"error": "dataset x: line 7: not valid JSON"})}}}]}}
    assert run_of(observe_job(_failed_job(), [told]), at(70)).message == "dataset x: line 7: not valid JSON"
    # a pod still Pending with a reason is not a failure of its own
    assert observe_job(_failed_job(), [{**rejected, "status": {**REJECTED, "phase": "Pending"}}]).pod_failure == ""


def test_the_gate_holds_a_failed_candidate_for_its_message_even_past_the_timeout() -> None:
    spec = make_spec()  # timeoutSeconds 600
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    grace = evaluation.RESULT_GRACE_SECONDS
    job = dataclasses.replace(failed(cand_name(spec), started=10), exit_code=None, message="", failed_since=at(605))
    plan = decide(spec, status, observe(615, pods=(*OLD_PODS, NEW_POD), runs=(job,)))
    assert plan.status["rollout"]["phase"] == "RollingOut" and [j.role for j in plan.evaluation_jobs] == [CANDIDATE]
    assert plan.requeue_after == grace - 10  # woken when the grace ends, not a timeout verdict meanwhile
    assert "waiting for its pod's message" in plan.status["evaluation"]["message"]
    plan = decide(spec, status, observe(605 + grace + 1, pods=(*OLD_PODS, NEW_POD), runs=(job,)))
    ro = plan.status["rollout"]
    assert ro["phase"] == "RolledBack" and ro["reason"] == "EvaluationFailed"
    assert "the specified backoff limit" in ro["message"]


def test_a_failed_baseline_in_its_grace_is_waited_for_not_called_timed_out() -> None:
    spec = make_spec({**EVAL, "maxRegression": 0.02})  # timeoutSeconds 600
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    grace = evaluation.RESULT_GRACE_SECONDS
    bjob = dataclasses.replace(failed(base_name(spec)), exit_code=None, message="", failed_since=at(605))
    runs = (bjob, running(cand_name(spec), 590))
    plan = decide(spec, status, observe(615, pods=(*OLD_PODS, NEW_POD), runs=runs))
    assert {j.role for j in plan.evaluation_jobs} == {BASELINE, CANDIDATE} and not plan.events
    assert plan.requeue_after == grace - 10  # the baseline's grace ends before the candidate's timeout
    assert plan.status["evaluation"]["failedSeen"] == {base_name(spec): "2026-01-01T00:10:15Z"}
    # its pod's message arrives: the evaluator's own error is the note
    told = dataclasses.replace(bjob, exit_code=1, message=json.dumps({"error": "cannot reach http://10.0.0.1:8000"}))
    plan = decide(spec, status, observe(616, pods=(*OLD_PODS, NEW_POD), runs=(told, running(cand_name(spec), 590))))
    assert [e.reason for e in plan.events] == ["BaselineUnavailable"] and "cannot reach" in plan.events[0].message


def test_with_the_api_servers_clock_ahead_a_failed_jobs_grace_counts_from_the_operators_first_sighting() -> None:
    # lastTransitionTime is the API server's clock: an hour ahead of the operator's, it would hold the rollout an
    # hour and a grace. Timed from the operator's own first sighting (status.evaluation.failedSeen) instead.
    grace = evaluation.RESULT_GRACE_SECONDS
    job = observe_job(_failed_job(failed_at="2026-01-01T01:00:00Z"))  # an hour ahead of the operator's now
    run = run_of(job, at(70))
    assert run.state == "running" and run.recheck == grace and run.failed_seen == at(70)
    run = run_of(job, at(80), seen=at(70))
    assert run.recheck == grace - 10 and run.failed_seen == at(70)  # the first sighting is kept
    assert run_of(job, at(70 + grace + 1), seen=at(70)).state == "failed"  # not 3600 + grace
    # first seen long after the Job controller stamped it (the operator was away): no fresh grace
    assert run_of(observe_job(_failed_job()), at(60 + grace + 1)).state == "failed"


def test_the_gate_wakes_within_the_grace_when_the_failure_is_stamped_ahead_of_its_clock() -> None:
    spec = make_spec()  # timeoutSeconds 600
    status = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                     "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}
    job = dataclasses.replace(failed(cand_name(spec), started=10), exit_code=None, message="", failed_since=at(4000))
    plan = decide(spec, status, observe(615, pods=(*OLD_PODS, NEW_POD), runs=(job,)))
    assert plan.status["rollout"]["phase"] == "RollingOut"
    grace = evaluation.RESULT_GRACE_SECONDS
    assert plan.requeue_after == grace
    # the first sighting is in status.evaluation, and the grace counts from it, not from the stamp ahead
    assert plan.status["evaluation"]["failedSeen"] == {cand_name(spec): "2026-01-01T00:10:15Z"}
    typed = GPTDeploymentStatus.model_validate({"evaluation": plan.status["evaluation"]})  # declared (extra=forbid)
    assert typed.model_dump(exclude_none=True)["evaluation"] == plan.status["evaluation"]
    status = merged(status, plan)
    plan = decide(spec, status, observe(615 + grace - 1, pods=(*OLD_PODS, NEW_POD), runs=(job,)))
    assert plan.status["rollout"]["phase"] == "RollingOut" and plan.requeue_after == 1
    assert plan.status["evaluation"]["failedSeen"] == {cand_name(spec): "2026-01-01T00:10:15Z"}  # kept
    plan = decide(spec, status, observe(615 + grace + 1, pods=(*OLD_PODS, NEW_POD), runs=(job,)))
    assert plan.status["rollout"]["phase"] == "RolledBack"
    assert "the specified backoff limit" in plan.status["rollout"]["message"]


ROLLING = {**SETTLED, "rollout": {"revision": RB, "phase": "RollingOut", "startedAt": "2026-01-01T00:00:00Z",
                                  "progressAt": "2026-01-01T00:00:00Z", "readyPods": 0, "evaluationGate": True}}


def test_a_verdict_keeps_no_sighting_and_a_pending_record_only_the_wanted_jobs() -> None:
    spec = make_spec({**EVAL, "maxRegression": 0.02})
    in_grace = dataclasses.replace(failed(base_name(spec)), exit_code=None, message="", failed_since=at(605))
    leftover = dataclasses.replace(failed("gpt2-eval-candidate-0ldkey"), exit_code=None, message="",
                                   failed_since=at(605))  # another key's Job, about to be deleted
    plan = decide(spec, ROLLING, observe(615, pods=(*OLD_PODS, NEW_POD),
                                         runs=(in_grace, leftover, running(cand_name(spec), 590))))
    assert plan.status["evaluation"]["failedSeen"] == {base_name(spec): "2026-01-01T00:10:15Z"}
    # the candidate fails for good while the baseline is still in its grace: the verdict's record has no sighting
    told = failed(cand_name(spec), message=json.dumps({"error": "dataset x: line 3: not valid JSON"}), started=590)
    plan = decide(spec, merged(ROLLING, plan), observe(616, pods=(*OLD_PODS, NEW_POD), runs=(in_grace, told)))
    assert plan.status["rollout"]["phase"] == "RolledBack"
    assert plan.status["evaluation"]["passed"] is False and "failedSeen" not in plan.status["evaluation"]


def test_a_sighting_recorded_ahead_of_the_clock_or_not_a_time_is_taken_anew() -> None:
    grace = evaluation.RESULT_GRACE_SECONDS
    job = observe_job(_failed_job(failed_at=None))  # nothing else to time the grace from
    runs = evaluation.runs_of((dataclasses.replace(job, name="j"),), at(70), {"j": "2026-01-01T01:01:10Z"})
    assert runs["j"].failed_seen == at(70) and runs["j"].recheck == grace  # recorded an hour ahead: taken anew
    later = evaluation.runs_of((dataclasses.replace(job, name="j"),), at(70 + grace + 1), {"j": "2026-01-01T00:01:10Z"})
    assert later["j"].state == "failed"  # so the grace ends after one grace
    spec = make_spec()
    broken = {**ROLLING, "evaluation": {"failedSeen": {cand_name(spec): "yesterday"}}}
    jobd = dataclasses.replace(failed(cand_name(spec), started=10), exit_code=None, message="", failed_since=None)
    plan = decide(spec, broken, observe(615, pods=(*OLD_PODS, NEW_POD), runs=(jobd,)))  # no ValueError
    assert plan.status["evaluation"]["failedSeen"] == {cand_name(spec): "2026-01-01T00:10:15Z"}


def test_a_running_evaluators_record_does_not_change_from_pass_to_pass() -> None:
    spec = make_spec()  # timeoutSeconds 600
    runs = (running(cand_name(spec), 10),)
    first = decide(spec, ROLLING, observe(100, pods=(*OLD_PODS, NEW_POD), runs=runs))
    later = decide(spec, merged(ROLLING, first), observe(200, pods=(*OLD_PODS, NEW_POD), runs=runs))
    assert "waiting for the evaluator" in first.status["evaluation"]["message"]
    assert later.status["evaluation"] == first.status["evaluation"]  # no status write per pass while it runs
