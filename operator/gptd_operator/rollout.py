"""Rollout of a new revision: a pure state machine.

``decide(spec, status, obs)`` takes the parsed spec, the CR's current status and what the operator
observed in the cluster, and returns a ``Plan``: which revision template each Deployment should run,
with which replica count and update strategy, plus the status fields, conditions and Events to emit.
It does no I/O and reads no clock (``obs.now``), so every transition is unit-testable.

INTERFACE CONTRACT (handlers.py depends on these names):
  - ``Template``: the revisioned part of the spec, ``{"model": {...}, "runtime": {...}}`` with the runtime
    image already resolved; ``builders.revision_hash(template)`` names it.
  - ``DeploymentObs`` / ``PodObs`` / ``Observations``: built by handlers from the API objects
    (``observe_deployment`` / ``observe_pod`` below do that, purely).
  - ``Plan``: handlers build the stable Deployment ``<name>`` from ``plan.stable`` and, when
    ``plan.canary`` is set, the Deployment ``<name>-canary`` from it (deleting it when None); they merge
    ``plan.status`` into the CR status, set ``plan.conditions`` and post ``plan.events``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .api import GPTDeploymentSpec

Template = dict[str, Any]


@dataclass(frozen=True)
class PodObs:
    revision: str | None
    ready: bool
    unschedulable_since: datetime | None = None  # PodScheduled=False reason=Unschedulable
    unschedulable_message: str = ""  # e.g. "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    crashloop_message: str = ""  # CrashLoopBackOff / ImagePullBackOff / ErrImagePull, with the container
    restarts: int = 0


@dataclass(frozen=True)
class DeploymentObs:
    revision: str | None  # label gptd.io/revision of the pod template
    template: Template | None  # annotation gptd.io/template (JSON) of the Deployment
    spec_replicas: int
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    up_to_date: bool = True  # status.observedGeneration >= metadata.generation


@dataclass(frozen=True)
class Observations:
    now: datetime
    desired_template: Template
    desired_revision: str
    stable: DeploymentObs | None
    canary: DeploymentObs | None
    pods: tuple[PodObs, ...] = ()
    promote: bool = False  # annotation gptd.io/promote=true
    abort: bool = False  # annotation gptd.io/abort=true
    analysis_breach: str | None = None  # set by handlers when canary.analysis found a breach


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
    stable: DeploymentPlan
    canary: DeploymentPlan | None
    status: dict[str, Any] = field(default_factory=dict)  # merged into CR .status
    conditions: tuple[ConditionPlan, ...] = ()
    events: tuple[EventPlan, ...] = ()
    annotations_to_clear: tuple[str, ...] = ()  # e.g. gptd.io/promote after it was honoured


def decide(spec: GPTDeploymentSpec, status: dict[str, Any], obs: Observations) -> Plan:
    raise NotImplementedError("being written (issue 4)")
