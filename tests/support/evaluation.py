"""Fixtures for the evaluation gate's pure tests: two revision templates, a spec maker, pod/Job/observation
builders and the status merge a handler does (shared by tests/unit/test_evaluation*.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gptd_operator import api, builders, evaluation, names, rollout
from gptd_operator.evaluation import BASELINE, CANDIDATE, eval_key
from gptd_operator.observe import DeploymentObs, JobObs, Observations, PodObs

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAME = "sent"
TA: dict[str, Any] = {"model": {"uri": "hf://org/a", "revision": "main"}, "runtime": {"image": "rt:1"}}
TB: dict[str, Any] = {"model": {"uri": "hf://org/b", "revision": "main"}, "runtime": {"image": "rt:1"}}
RA, RB = builders.revision_hash(TA), builders.revision_hash(TB)
GATED = builders.TEMPLATE_GATE_KEY
DATASET = "configmap sentiment-eval/eval.jsonl sha256:0123456789abcdef"
EVAL = {"dataset": {"configMapRef": {"name": "sentiment-eval", "key": "eval.jsonl"}}, "minScore": 0.85,
        "timeoutSeconds": 600}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_spec(evaluation: dict[str, Any] | None = EVAL, replicas: int = 2, **over: Any) -> api.GPTDeploymentSpec:
    raw: dict[str, Any] = {"model": {"uri": "hf://org/b", "task": "text-classification"}, "replicas": replicas}
    if evaluation is not None:
        raw["evaluation"] = evaluation
    raw.update(over)
    return api.parse_spec(raw)


def dep(rev: str, template: dict[str, Any], n: int = 2, ready: int | None = None) -> DeploymentObs:
    ready = n if ready is None else ready
    return DeploymentObs(revision=rev, template=template, spec_replicas=n, replicas=n, ready_replicas=ready,
                         updated_replicas=n, available_replicas=ready)


def pod(rev: str, name: str, *, ready: bool = False, containers: bool = False, ip: str = "") -> PodObs:
    return PodObs(revision=rev, ready=ready, name=name, ip=ip, containers_ready=containers, gated=rev == RB)


OLD_PODS = (pod(RA, "sent-a1", ready=True, containers=True, ip="10.0.0.1"),
            pod(RA, "sent-a2", ready=True, containers=True, ip="10.0.0.2"))
NEW_POD = pod(RB, "sent-b1", containers=True, ip="10.0.0.9")


def running(name: str, started: float) -> JobObs:
    return JobObs(name=name, revision=None, purpose="evaluation", active=1, start_time=at(started))


def succeeded(name: str, result: dict[str, Any], started: float = 0) -> JobObs:
    return JobObs(name=name, revision=None, purpose="evaluation", succeeded=1, start_time=at(started),
                  conditions=(("Complete", "True", "", ""),), message=json.dumps(result), exit_code=0)


def failed(name: str, reason: str = "BackoffLimitExceeded", message: str = "", started: float = 0,
           failed_at: float | Literal["started"] | None = "started") -> JobObs:
    """Its pod seen terminated (exit 1, ``message``). The Failed condition's lastTransitionTime (``failed_since``) is
    ``failed_at``, by default ``started``, as a real Job controller always stamps it; None: a condition without it."""
    stamp = started if failed_at == "started" else failed_at
    return JobObs(name=name, revision=None, purpose="evaluation", failed=1, start_time=at(started),
                  conditions=(("Failed", "True", reason, "Job has reached the specified backoff limit"),),
                  message=message, exit_code=1, failed_since=None if stamp is None else at(stamp))


def observe(t: float, *, pods: tuple[PodObs, ...] = OLD_PODS, runs: tuple[JobObs, ...] = (),
            stable: DeploymentObs | None = None, canary: DeploymentObs | None = None) -> Observations:
    return Observations(
        now=at(t), desired_template=TB, desired_revision=RB, name=NAME,
        stable=stable if stable is not None else dep(RA, TA), canary=canary, pods=pods,
        evaluation_dataset=DATASET, jobs=runs,
    )


SETTLED = {"currentRevision": RA, "lastGoodRevision": RA, "lastGoodTemplate": TA}


def cand_name(spec: api.GPTDeploymentSpec) -> str:
    return names.evaluation_job(NAME, CANDIDATE, eval_key(spec, DATASET, RB))


def base_name(spec: api.GPTDeploymentSpec) -> str:
    return names.evaluation_job(NAME, BASELINE, eval_key(spec, DATASET, RA))


def scored(name: str, score: float, t: float = 0) -> JobObs:
    return succeeded(name, {"metric": "f1", "score": score, "samples": 40,
                            "perLabel": {"POS": {"f1": score, "support": 20}}}, t)


def merged(status: dict[str, Any], plan: Any) -> dict[str, Any]:
    out = {**status, **plan.status}
    return {k: v for k, v in out.items() if v is not None}


def cond(plan: Any, type_: str) -> Any:
    return next(c for c in plan.conditions if c.type == type_)


def as_handlers_pass(spec: api.GPTDeploymentSpec, status: dict[str, Any], obs: Observations) -> Observations:
    """``obs`` with the dataset identity the handlers really pass to decide (handlers._check_dataset): read only when
    rollout.needs_dataset says this pass may gate; the recorded one once the revision has a verdict."""
    if not rollout.needs_dataset(spec, status, obs.desired_revision):
        return dataclasses.replace(obs, evaluation_dataset=None)
    judged = evaluation.judged_dataset(spec, status, obs.desired_revision)
    return dataclasses.replace(obs, evaluation_dataset=judged or obs.evaluation_dataset)
