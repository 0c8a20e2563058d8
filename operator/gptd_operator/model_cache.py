"""spec.model.cache (issue 10): the claim, the download Job per revision, and the pure download state machine.

Order of a rollout with a cache: a new revision → its download Job → only when the Job reported the revision
complete (the commit sha in its termination message) does ``rollout.decide`` change a Deployment; until then it
keeps what runs (``Observations.download_wait``). The pods mount the claim read-only and load
``file://<MODEL_CACHE_DIR>/<sha>``: the sha is recorded in the template (``builders.with_resolved``), so a moving
branch never changes running pods and a rollback returns to the very files it ran.

How progress is read: the running Job pod's last log lines (``pods/log?tailLines``), fetch's JSON progress lines,
read by handlers.py at most once per reconcile of a downloading CR and handed here parsed. Not the termination
message: the kubelet writes that only when the container exits. Not a status write from the Job: that would put
API credentials into the download pod. The result (sha or error) comes from the termination message (fetch
``--result-file /dev/termination-log``), which survives the log's rotation and the pod's exit.

This module owns ``status.model``. No I/O here (handlers.py does it); ``now`` is passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import builders, names
from .api import GPTDeploymentSpec
from .normalize import quantity
from .observe import JobObs, Template, format_time, parse_time
from .settings import Settings

COMPONENT = "model-download"  # app.kubernetes.io/component of the download Jobs and their pods
CONTAINER = "fetch"
TOKEN_DIR = "/var/run/gptd/hf-token"
TOKEN_FILE = f"{TOKEN_DIR}/token"
RESULT_FILE = "/dev/termination-log"
# The Job controller retries a failed pod with exponential backoff (10 s, 20 s, 40 s, 80 s): a flaky hub or a
# node lost mid-download. Then the Job is Failed and the operator waits RETRY_SECONDS * 2^(attempt-1) (at most
# RETRY_MAX_SECONDS) before a new Job: a 401 or a missing revision costs one hub request per backoff, not a storm.
BACKOFF_LIMIT = 4
# fetch's exit status when no retry can help (gptd_runtime.fetch.PERMANENT_EXIT_CODE: 401/403, not found): the
# Job's podFailurePolicy fails the Job on it at once (the operator's own backoff then applies), and a pod evicted or
# preempted (DisruptionTarget) is not counted against backoffLimit, as for the evaluation Job.
PERMANENT_EXIT_CODE = 3
RETRY_SECONDS = 300
RETRY_MAX_SECONDS = 3600
ACTIVE_DEADLINE_SECONDS = 6 * 3600  # a 100 GB model at 10 MB/s takes under 3 h
TTL_SECONDS = 24 * 3600  # a finished Job (and its pod's termination message) stays a day, for describe
PROGRESS_SECONDS = 10  # status.model.download is refreshed this often while a Job runs (issue: <= 15 s)
LOG_TAIL_LINES = 3
# The Job and its pods are separate watches: a finished Job can reach the operator before its pod's termination
# message does. Wait this long for it before reporting a Job without a result.
RESULT_GRACE_SECONDS = 30
# A download pod that is not scheduled, or whose volume does not attach (ContainerCreating), or a claim still
# Pending: normal for a moment (a node scaling up, WaitForFirstConsumer binding), a problem after these many seconds
# (an RWX claim on a class that only offers RWO stays Pending forever). Then Degraded reason=CacheUnavailable.
UNSCHEDULABLE_GRACE_SECONDS = 60
ATTACH_GRACE_SECONDS = 180
CLAIM_PENDING_GRACE_SECONDS = 180
# Small on purpose: fetch streams 1 MiB chunks with 4 threads; no GPU, so it may run on any (cheap) node.
JOB_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def wants_cache(spec: GPTDeploymentSpec) -> bool:
    return spec.model.cache is not None


# ------------------------------------------------------------------------------------------ builders


def build_pvc(name: str, namespace: str, uid: str, spec: GPTDeploymentSpec) -> dict[str, Any]:
    """``<name>-model-cache``. With ``retain`` no ownerReference: deleting the CR leaves the claim (and the
    weights) for a CR of the same name to reuse; otherwise the garbage collector deletes it with the CR."""
    cache = spec.model.cache
    if cache is None:
        raise ValueError("build_pvc needs spec.model.cache")
    pvc_spec: dict[str, Any] = {
        "accessModes": [cache.accessMode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storageClassName:  # absent (not ""): "" would mean "no class" to the API server, not the default one
        pvc_spec["storageClassName"] = cache.storageClassName
    metadata: dict[str, Any] = {
        "name": names.model_cache(name),
        "namespace": namespace,
        "labels": {**builders.common_labels(name), builders.LABEL_COMPONENT: "model-cache"},
    }
    # None (absent, and removed from a live claim when retain is turned on: a merge-patch null).
    metadata["ownerReferences"] = None if cache.retain else [builders.owner_reference(name, uid)]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": pvc_spec}


def claim_conflict(live: Mapping[str, Any] | None, spec: GPTDeploymentSpec) -> tuple[str, str] | None:
    """(field, message) when the live claim differs in what a claim can't change (access mode, class)."""
    cache = spec.model.cache
    if live is None or cache is None:
        return None
    live_spec = live.get("spec") or {}
    claim = (live.get("metadata") or {}).get("name")
    fix = f"delete the claim (kubectl delete pvc {claim}) to recreate it, or change the field back"
    if cache.accessMode not in (live_spec.get("accessModes") or []):
        return ("spec.model.cache.accessMode",
                f"the claim {claim} has accessModes {live_spec.get('accessModes')} and a claim's access mode can't "
                f"change: {fix}")
    if cache.storageClassName and live_spec.get("storageClassName") not in (None, cache.storageClassName):
        return ("spec.model.cache.storageClassName",
                f"the claim {claim} has storageClassName {live_spec.get('storageClassName')!r}, which can't change: "
                f"{fix}")
    live_size = ((live_spec.get("resources") or {}).get("requests") or {}).get("storage")
    live_q, want_q = quantity(live_size), quantity(cache.size)
    if live_q is not None and want_q is not None and want_q < live_q:
        # A claim only grows (the API server answers 422 to a smaller request): compared as quantities, 40Gi > 40G.
        return ("spec.model.cache.size",
                f"the claim {claim} requests {live_size} and a claim can't shrink (asked for {cache.size}): {fix}")
    return None


def claim_refused(claim: str, status: int, message: str) -> tuple[str, str]:
    """Degraded (InvalidCache) for a claim write the API server refused: 403 from the resize admission (a class
    without allowVolumeExpansion), 422 (an immutable field, a smaller request), 400. The other children still
    apply; the claim stays as it is."""
    return ("InvalidCache", f"spec.model.cache: the API server refused the claim {claim} ({status}): "
            f"{' '.join(message.split())}")


def job_name(name: str, revision: str, attempt: int) -> str:
    return names.job(name, "fetch", f"{revision}-{attempt}")


def model_key(template: Template | None) -> str | None:
    """What a download fetches, hashed (40 hex digits of SHA-1): the model's uri, revision and token reference only.
    The gptd revision also hashes the runtime fields (batch size, image...): a runtime-only change is a new revision
    (a rollout) but the same files, so the cache is keyed on this, not on the revision."""
    model = (template or {}).get("model")
    if not isinstance(model, Mapping) or not model.get("uri"):
        return None
    part = {"uri": model["uri"], "revision": model.get("revision") or "main",
            "hfTokenSecretRef": model.get("hfTokenSecretRef")}
    return hashlib.sha1(builders.canonical_json(part).encode()).hexdigest()


def s3_commit(template: Template) -> str:
    """An s3:// model has no commit: its cache directory is named by its model key (40 hex digits), so it sits in
    fetch's layout (``<cache>/<40 hex>``, kept or pruned like a hub commit). To sync a changed bucket prefix again,
    change spec.model.revision."""
    key = model_key(template)
    if key is None:
        raise ValueError("s3_commit needs a template with model.uri")
    return key


def _s3_command(uri: str, sha: str, keep: Sequence[str]) -> list[str]:
    """``aws s3 sync`` into ``.incomplete/<id>``, a marker, one rename to ``<id>``, housekeeping (every other
    revision directory but ``keep`` goes, each by one rename before it is deleted, as fetch --prune does), then the
    result line in the termination message, the same as fetch's (no byte progress: the AWS CLI prints none with
    --only-show-errors)."""
    dest = builders.MODEL_CACHE_DIR
    work, final = f"{dest}/.incomplete/{sha}", f"{dest}/{sha}"
    result = json.dumps({"revision": sha, "complete": True, "path": final})
    kept = " ".join(sorted({sha, *keep}))
    script = "\n".join([
        "set -eu",
        f"if [ ! -e {final}/.gptd-complete ]; then",
        f"  mkdir -p {work}",
        f"  aws s3 sync --only-show-errors {shlex.quote(uri)} {work}",
        f"  echo '{{}}' > {work}/.gptd-complete",
        f"  rm -rf {final}",
        f"  mv {work} {final}",
        "fi",
        f"mkdir -p {dest}/.incomplete",
        f"for d in {dest}/*; do",
        '  n=${d##*/}',
        '  case "$n" in *[!0-9a-f]*) continue ;; esac',
        '  [ "${#n}" -eq 40 ] || continue',
        f'  case " {kept} " in *" $n "*) continue ;; esac',
        f'  mv "$d" "{dest}/.incomplete/.pruned-$n" && rm -rf "{dest}/.incomplete/.pruned-$n"',
        "done",
        f"printf '%s\\n' {shlex.quote(result)} > {RESULT_FILE}",
    ])
    return ["sh", "-c", script]


def build_job(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings, *, revision: str,
    template: Template, attempt: int, keep: Sequence[str], pods_exist: bool = False,
) -> dict[str, Any]:
    """The download Job for ``revision`` (its template's model), attempt ``attempt``; ``keep``: the shas mounted by
    pods (current, last good, canary) that fetch's housekeeping must not delete; ``pods_exist``: runtime pods of
    the CR exist (under ReadWriteOnce the Job must then run on their node)."""
    cache = spec.model.cache
    if cache is None:
        raise ValueError("build_job needs spec.model.cache")
    model = template["model"]
    image = template["runtime"].get("image") or settings.runtime_image
    s3 = str(model["uri"]).startswith("s3://")
    if s3:
        # The s3 init container became this Job: the operator's AWS CLI image (GPTD_S3_INIT_IMAGE); credentials
        # from the pod's identity (IRSA / workload identity) or AWS_* in spec.runtime.env (by reference).
        image = settings.s3_init_image or ""
        command = _s3_command(str(model["uri"]), s3_commit(template), keep)
    else:
        # The runtime image's entrypoint serves: the command is spelled out.
        command = ["python", "-m", "gptd_runtime", "fetch", model["uri"], "--revision",
                   model.get("revision") or "main", "--dest", builders.MODEL_CACHE_DIR, "--result-file", RESULT_FILE,
                   "--progress-interval", "5"]
        # Housekeeping: every other revision goes, except those pods mount (current, last good, canary).
        command += ["--prune", *(["--keep", *sorted(set(keep))] if keep else [])]
    volumes: list[dict[str, Any]] = [
        {"name": "model", "persistentVolumeClaim": {"claimName": names.model_cache(name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "model", "mountPath": builders.MODEL_CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}]
    token = spec.model.hfTokenSecretRef
    if token is not None and not s3:
        # A file, never an env var: env shows in `kubectl describe pod` and in /proc/<pid>/environ.
        mode = 0o440 if settings.run_as_user is not None else 0o444
        volumes.append({"name": "hf-token", "secret": {
            "secretName": token.name, "items": [{"key": token.key, "path": "token"}], "defaultMode": mode}})
        mounts.append({"name": "hf-token", "mountPath": TOKEN_DIR, "readOnly": True})
        command += ["--token-file", TOKEN_FILE]
    # The user's env (HF_ENDPOINT for a mirror, proxies), by value or by reference, as the runtime gets it; never a
    # token by value (check_spec refuses that).
    env += [e.model_dump(mode="json", exclude_none=True) for e in spec.runtime.env]
    labels = builders.job_labels(name, COMPONENT, revision)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # each try is a new pod with its own termination message
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "command": command,
            "env": env,
            "resources": JOB_RESOURCES,
            "volumeMounts": mounts,
            "terminationMessagePath": RESULT_FILE,
            # If fetch dies before writing its result (OOM-killed), the kubelet uses the log's tail instead.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": builders.container_security_context(settings),
        }],
        "volumes": volumes,
        "securityContext": builders.pod_security_context(settings),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the download never talks to the API server
    }
    if cache.accessMode == "ReadWriteOnce":
        # The volume attaches to one node: run where the pods run (their nodeSelector, tolerations and affinity),
        # on the very node of the CR's pods, which holds the volume attached: required when they exist (elsewhere
        # the volume could not attach), preferred otherwise (a first download has no pod to follow).
        sched = spec.scheduling
        pod_spec["nodeSelector"] = sched.nodeSelector or None
        pod_spec["tolerations"] = builders._tolerations(spec)
        affinity = dict(sched.affinity or {})
        pod_affinity = dict(affinity.get("podAffinity") or {})
        if pods_exist:
            key = "requiredDuringSchedulingIgnoredDuringExecution"
            pod_affinity[key] = [*(pod_affinity.get(key) or []), builders.same_node_term(name)]
        else:
            key = "preferredDuringSchedulingIgnoredDuringExecution"
            pod_affinity[key] = [*(pod_affinity.get(key) or []),
                                 {"weight": 100, "podAffinityTerm": builders.same_node_term(name)}]
        affinity["podAffinity"] = pod_affinity
        pod_spec["affinity"] = affinity
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, revision, attempt),
            "namespace": namespace,
            "labels": labels,
            "annotations": {"gptd.io/attempt": str(attempt),
                            "gptd.io/model": f"{model['uri']}@{model.get('revision') or 'main'}"},
            "ownerReferences": [builders.owner_reference(name, uid)],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [PERMANENT_EXIT_CODE]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": {k: v for k, v in pod_spec.items() if v is not None}},
        },
    }


# ------------------------------------------------------------------------------------------ parsing


def json_lines(text: str | None) -> list[dict[str, Any]]:
    """The lines of ``text`` that are JSON objects, last first."""
    out = []
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue  # a line cut by tailLines/limitBytes or the log rotation
            if isinstance(value, dict):
                out.append(value)
    return out


def last_json_line(text: str | None) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object (fetch's result or error line), or None."""
    lines = json_lines(text)
    return lines[0] if lines else None


def parse_progress(text: str | None) -> dict[str, int] | None:
    """fetch's last progress line → {bytesDone, bytesTotal, filesDone, filesTotal}, or None."""
    keys = ("bytesDone", "bytesTotal", "filesDone", "filesTotal")
    for line in json_lines(text):  # other JSON lines (housekeeping on stderr) are skipped
        if all(isinstance(line.get(k), int) for k in keys):
            return {k: int(line[k]) for k in keys}
    return None


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class DownloadPlan:
    sha: str | None = None  # the desired revision is complete in the cache at this commit
    pvc: dict[str, Any] | None = None  # the claim to apply (None: leave it as it is)
    wait: tuple[str, str] | None = None  # (Progressing reason, message) while it is not: no pod is touched
    degraded: tuple[str, str] | None = None  # (reason, message) for the Degraded condition
    create: dict[str, Any] | None = None  # a download Job to create
    delete: tuple[str, ...] = ()  # download Jobs to delete (superseded, cancelled, retried)
    status: dict[str, Any] | None = None  # status.model (None: the key is removed)
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)
    requeue_after: float | None = None


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def retry_delay(attempt: int) -> float:
    return float(min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** max(0, attempt - 1)))


def _result(job: JobObs) -> dict[str, Any] | None:
    return last_json_line(job.message)


def known_sha(key: str | None, templates: Iterable[Template | None], previous: Mapping[str, Any] | None) -> str | None:
    """The commit the model ``key`` (``model_key``) already resolved to: from a template that runs or ran the same
    model (whatever its runtime fields), or the last download of it."""
    if key is None:
        return None
    for template in templates:
        if template and model_key(template) == key and builders.resolved_sha(template):
            return builders.resolved_sha(template)
    download = (previous or {}).get("download") or {}
    if download.get("modelKey") == key and download.get("phase") == "Complete" and download.get("sha"):
        return str(download["sha"])
    return None


@dataclass
class _Download:
    """The working state of one plan_download call."""

    name: str
    revision: str
    now: datetime
    prev: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def now_s(self) -> str:
        return format_time(self.now)


def plan_download(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings, *, revision: str,
    template: Template, previous_status: Mapping[str, Any], jobs: Sequence[JobObs], progress: Mapping[str, int] | None,
    templates: Sequence[Template | None], claim: Mapping[str, Any] | None = None, now: datetime,
    mounted: Iterable[str] = (), pods_exist: bool = False,
) -> DownloadPlan:
    """What to do about the cache this reconcile. ``template``: the desired revision's (without resolved);
    ``templates``: those running or kept (stable, canary, lastGoodTemplate) for known shas and ``--keep``;
    ``mounted``: the commits live runtime pods mount (their gptd.io/model-sha label: old ReplicaSets' pods too),
    also kept;
    ``progress``: the running Job pod's last progress line (handlers read it), ``jobs``: the CR's Jobs, ``claim``:
    the live ``<name>-model-cache`` claim."""
    plan = _plan(name, namespace, uid, spec, settings, revision=revision, template=template,
                 previous_status=previous_status, jobs=jobs, progress=progress, templates=templates, now=now,
                 mounted=tuple(mounted), pods_exist=pods_exist)
    if spec.model.cache is None:
        return plan
    conflict = claim_conflict(claim, spec)
    if conflict is not None:  # the claim stays as it is (the pods keep using it); say what can't be done
        field_, message = conflict
        return dataclasses.replace(plan, degraded=("InvalidCache", f"{field_}: {message}"))
    pending = claim_pending(claim, (plan.status or {}).get("download"), now)
    if pending is not None and (plan.degraded is None or plan.degraded[0] == "CacheUnavailable"):
        plan = dataclasses.replace(plan, degraded=("CacheUnavailable", pending))
    return dataclasses.replace(plan, pvc=build_pvc(name, namespace, uid, spec))


def _plan(
    name: str, namespace: str, uid: str, spec: GPTDeploymentSpec, settings: Settings, *, revision: str,
    template: Template, previous_status: Mapping[str, Any], jobs: Sequence[JobObs], progress: Mapping[str, int] | None,
    templates: Sequence[Template | None], now: datetime, mounted: tuple[str, ...] = (), pods_exist: bool = False,
) -> DownloadPlan:
    previous = dict(previous_status.get("model") or {})
    mine = [j for j in jobs if j.purpose == COMPONENT]
    if spec.model.cache is None:
        return DownloadPlan(delete=tuple(j.name for j in mine), status=None)
    prev_dl = dict(previous.get("download") or {})
    same = prev_dl.get("revision") == revision
    d = _Download(name, revision, now, prev_dl if same else {})
    # A spec change cancels: the Jobs of other revisions go (running ones stop; finished ones are of no use).
    stale = [j for j in mine if j.revision != revision]
    for j in stale:
        if j.active and not j.complete and not j.finally_failed:
            d.events.append(("Normal", "DownloadCancelled", f"download Job {j.name} of revision {j.revision} "
                             f"cancelled: the spec now asks for revision {revision}"))
    delete = [j.name for j in stale]
    key = model_key(template)
    sha = known_sha(key, [*templates, template], previous)
    if sha is not None:
        dl = {**d.prev, "revision": revision, "modelRevision": spec.model.revision, "modelKey": key,
              "phase": "Complete", "sha": sha,
              "percent": 100, "display": "complete", "etaSeconds": None, "bytesPerSecond": None,
              "reason": None, "message": None}
        return DownloadPlan(sha=sha, delete=tuple(delete), status={"download": dl}, events=tuple(d.events))

    attempt = int(d.prev.get("attempt") or 1)
    current = job_name(name, revision, attempt)
    job = next((j for j in mine if j.name == current), None)
    # Older attempts of this revision: done with.
    delete += [j.name for j in mine if j.revision == revision and j.name != current]
    keep = sorted({s for s in (*(builders.resolved_sha(t) for t in templates), *mounted)
                   if s and len(s) == 40 and all(ch in "0123456789abcdef" for ch in s)})

    def new_job(n: int) -> dict[str, Any]:
        return build_job(name, namespace, uid, spec, settings, revision=revision, template=template, attempt=n,
                         keep=keep, pods_exist=bool(mounted) or pods_exist)

    base = {"revision": revision, "modelRevision": spec.model.revision, "modelKey": key}
    what = f"{spec.model.uri}@{spec.model.revision} (revision {revision})"
    if job is None and d.prev.get("phase") == "Downloading" and d.prev.get("job") == current:
        # Created by an earlier pass and not in the Job index yet (the watch lags our POST), or deleted by hand:
        # (re)created if handlers have no record of it, without a second DownloadStarted.
        return DownloadPlan(wait=("Downloading", f"starting the download of {what}"), create=new_job(attempt),
                            delete=tuple(delete), status={"download": d.prev}, events=tuple(d.events),
                            requeue_after=PROGRESS_SECONDS)
    if job is None:
        if d.prev.get("phase") == "Failed":
            left = retry_delay(attempt) - _since(d.prev.get("finishedAt"), now)
            if left > 0:
                message = str(d.prev.get("message") or "the download failed")
                return DownloadPlan(wait=("DownloadFailed", f"{message}; retrying in {math.ceil(left)}s"),
                                    degraded=("DownloadFailed", message), delete=tuple(delete),
                                    status={"download": d.prev}, events=tuple(d.events), requeue_after=left)
            attempt += 1
            d.events.append(("Normal", "DownloadRetried", f"downloading {what} again (attempt {attempt})"))
        else:
            d.events.append(("Normal", "DownloadStarted", f"downloading {what} into {names.model_cache(name)}"))
        dl = {**base, "phase": "Downloading", "display": "starting", "job": job_name(name, revision, attempt),
              "attempt": attempt, "startedAt": d.now_s, "observedAt": None, "finishedAt": None, "jobEndedAt": None,
              "bytesDone": None,
              "bytesTotal": None, "percent": None, "bytesPerSecond": None, "etaSeconds": None, "filesDone": None,
              "filesTotal": None, "sha": None, "reason": None,
              "message": d.prev.get("message") if d.prev.get("phase") == "Failed" else None}
        return DownloadPlan(wait=("Downloading", f"starting the download of {what}"), create=new_job(attempt),
                            delete=tuple(delete), status={"download": dl}, events=tuple(d.events),
                            requeue_after=PROGRESS_SECONDS)

    dl = {**base, **d.prev, "job": job.name, "attempt": attempt}
    dl.setdefault("startedAt", format_time(job.start_time) if job.start_time else d.now_s)
    result = _result(job)
    # A pod terminal without a container state (rejected at admission, evicted before it started) will never report:
    # its own reason (JobObs.pod_failure) is all there is, so it is judged at once, as the evaluator's Jobs are.
    if ((job.complete or job.finally_failed) and result is None and job.exit_code is None
            and job.pod_phase not in ("Failed", "Succeeded")):
        ended = parse_time(dl.get("jobEndedAt"))
        if ended is None:
            dl["jobEndedAt"], ended = d.now_s, now
        left = RESULT_GRACE_SECONDS - (now - ended).total_seconds()
        if left > 0:  # its pod's report is on the way (or the pod is gone: then the Job's own words, below)
            return DownloadPlan(wait=("Downloading", f"downloading {what}: finishing"), delete=tuple(delete),
                                status={"download": {**dl, "phase": "Downloading"}}, events=tuple(d.events),
                                requeue_after=min(left, 5.0))
    if job.complete:
        sha = str((result or {}).get("revision") or "")
        if len(sha) == 40 and (result or {}).get("complete"):
            total = int((result or {}).get("bytesTotal") or dl.get("bytesTotal") or 0)
            started = parse_time(dl.get("startedAt")) or job.start_time
            finished = job.completion_time or now
            seconds = max(0.0, (finished - started).total_seconds()) if started else 0.0
            rate = f", {_human(total / seconds)}/s" if seconds > 0 else ""
            d.events.append(("Normal", "DownloadFinished",
                             f"downloaded {what}: {_human(total)} in {seconds:.0f}s{rate}, commit {sha}"))
            dl.update(phase="Complete", sha=sha, percent=100, display="complete", bytesDone=total, bytesTotal=total,
                      filesDone=(result or {}).get("filesTotal"), filesTotal=(result or {}).get("filesTotal"),
                      etaSeconds=None, bytesPerSecond=None, finishedAt=format_time(finished), reason=None, message=None)
            return DownloadPlan(sha=sha, delete=tuple(delete), status={"download": dl}, events=tuple(d.events))
        return _failed(d, dl, delete, "NoResult", f"the download Job {job.name} succeeded but its pod reported no "
                       f"complete revision (termination message {job.message[:200]!r})", what)
    if job.finally_failed:
        reason = str((result or {}).get("reason") or "")
        error = str((result or {}).get("error") or "")
        cond = job.condition("Failed") or ("", "", "")
        message = (error or job.message or job.pod_failure or f"{cond[1]}: {cond[2]}".strip(": ")
                   or "the download Job failed")
        return _failed(d, dl, delete, reason or cond[1] or "JobFailed", message, what)
    # Running, or waiting for its (next) pod.
    if progress is not None:
        done, total = progress["bytesDone"], progress["bytesTotal"]
        prev_done, prev_at = dl.get("bytesDone"), parse_time(dl.get("observedAt"))
        if prev_done is not None and prev_at is not None and done != prev_done:
            elapsed = (now - prev_at).total_seconds()
            if elapsed > 0 and done >= int(prev_done):
                dl["bytesPerSecond"] = int((done - int(prev_done)) / elapsed)
        if done != prev_done or dl.get("observedAt") is None:
            dl["observedAt"] = d.now_s
        rate = dl.get("bytesPerSecond") or 0
        dl.update(bytesDone=done, bytesTotal=total, filesDone=progress["filesDone"], filesTotal=progress["filesTotal"],
                  percent=min(99, math.floor(100 * done / total)) if total else 0,
                  etaSeconds=int((total - done) / rate) if rate > 0 and total >= done else None)
        dl["display"] = f"{dl['percent']}% of {_human(total)}"
    dl["phase"] = "Downloading"
    degraded = None
    if (job.exit_code not in (None, 0) or job.pod_failure) and not job.running:
        # A try failed and the Job controller retries after its backoff: say why now, not after the last try. A pod
        # evicted or rejected (pod_failure) says why only in its own reason, with or without an exit code.
        error = str((result or {}).get("error") or job.message or job.pod_failure or f"exit code {job.exit_code}")
        dl["reason"], dl["message"] = (result or {}).get("reason") or "Failed", error
        degraded = ("DownloadFailed", f"download of {what} failed (retrying): {error}")
    elif job.waiting:
        degraded = ("DownloadFailed", f"download Job {job.name}: {job.waiting}")
    elif job.unschedulable and _since_dt(job.unschedulable_since, now) >= UNSCHEDULABLE_GRACE_SECONDS:
        degraded = ("CacheUnavailable", f"spec.model.cache: the download pod {job.pod_name} cannot be scheduled "
                    f"({job.unschedulable}); check the claim {names.model_cache(name)} (its storage class and access "
                    "mode) and the nodes")
    elif not job.running and _since_dt(job.creating_since, now) >= ATTACH_GRACE_SECONDS:
        degraded = ("CacheUnavailable", f"spec.model.cache: the download pod {job.pod_name} has been in "
                    f"ContainerCreating for {int(_since_dt(job.creating_since, now))}s: the claim "
                    f"{names.model_cache(name)} does not attach (ReadWriteOnce attached to another node?); "
                    f"kubectl describe pod {job.pod_name}")
    if degraded is not None and degraded[0] == "CacheUnavailable":
        dl["display"] = "blocked"
    done_text = f"{dl['display']}" if dl.get("bytesTotal") else "starting"
    eta = f", about {dl['etaSeconds']}s left" if dl.get("etaSeconds") is not None else ""
    wait = ("Downloading", f"downloading {what}: {done_text}{eta}; the pods keep their revision until it is complete")
    return DownloadPlan(wait=wait, degraded=degraded, delete=tuple(delete), status={"download": dl},
                        events=tuple(d.events), requeue_after=PROGRESS_SECONDS)


def _failed(d: _Download, dl: dict[str, Any], delete: list[str], reason: str, message: str, what: str) -> DownloadPlan:
    message = " ".join(message.split())
    if d.prev.get("phase") != "Failed":
        d.events.append(("Warning", "DownloadFailed", f"download of {what} failed ({reason}): {message}"))
        dl["finishedAt"] = d.now_s
    attempt = int(dl.get("attempt") or 1)
    dl.update(phase="Failed", reason=reason, message=message, display="failed", etaSeconds=None, bytesPerSecond=None)
    left = retry_delay(attempt) - _since(dl.get("finishedAt"), d.now)
    if left <= 0:  # the backoff is over: the next pass starts attempt + 1 (this one's Job goes)
        return DownloadPlan(wait=("DownloadFailed", message), degraded=("DownloadFailed", message),
                            delete=tuple([*delete, str(dl.get("job"))]), status={"download": dl},
                            events=tuple(d.events), requeue_after=1.0)
    return DownloadPlan(wait=("DownloadFailed", f"{message}; retrying in {math.ceil(left)}s"),
                        degraded=("DownloadFailed", message), delete=tuple(delete), status={"download": dl},
                        events=tuple(d.events), requeue_after=left)


def _since_dt(when: datetime | None, now: datetime) -> float:
    """Seconds since ``when``; 0 when unknown (no grace has passed)."""
    return (now - when).total_seconds() if when is not None else 0.0


def claim_pending(claim: Mapping[str, Any] | None, download: Mapping[str, Any] | None, now: datetime) -> str | None:
    """Degraded message when the claim is still Pending although a download started long enough ago (an access mode
    the class cannot offer, no default class, a provisioner that fails: the pods would never start either)."""
    if claim is None or ((claim.get("status") or {}).get("phase")) != "Pending":
        return None
    started = (download or {}).get("startedAt")
    if (download or {}).get("phase") != "Downloading" or _since(started, now) < CLAIM_PENDING_GRACE_SECONDS:
        return None
    claim_name = (claim.get("metadata") or {}).get("name")
    claim_spec = claim.get("spec") or {}
    return (f"spec.model.cache: the claim {claim_name} is still Pending {int(_since(started, now))}s after the "
            f"download started (accessModes {claim_spec.get('accessModes')}, storageClassName "
            f"{claim_spec.get('storageClassName') or '(default)'}): the storage class may not offer this access mode "
            f"or size; kubectl describe pvc {claim_name}")


def _since(stamp: Any, now: datetime) -> float:
    when = parse_time(stamp) if isinstance(stamp, str) else None
    return (now - when).total_seconds() if when is not None else 0.0
