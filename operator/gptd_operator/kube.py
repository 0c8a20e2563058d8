"""The one module that talks to the Kubernetes API server (besides kopf's own watching).

lightkube does config loading (in-cluster service account first, then kubeconfig / ``$KUBECONFIG``), auth
(token, rotating in-cluster token file, exec plugins run as asyncio subprocesses) and transport (its
httpx client with the cluster's TLS); ``connection_info()`` hands the very same credentials to kopf. What
lightkube lacks is this thin layer (docs/operator.md lists it): bounded retries honouring Retry-After,
request counting, untyped JSON by path with merge patches (never PUT), apply-if-different, ownership checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx  # lightkube's transport (a maintained httpx fork); its exceptions and types
import yaml
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.config.models import User
from lightkube.core.exceptions import ConfigError

from .normalize import is_subset, server_form, strip_none, with_removals

MERGE_PATCH = "application/merge-patch+json"
# Pod status conditions merge by type under a strategic merge patch; a JSON merge patch would replace the list (and
# drop the kubelet's Ready, ContainersReady... until its next sync).
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
FIELD_MANAGER = "gptd-operator"  # managedFields name every object gptd writes
# Bounded retries (API Priority and Fairness answers 429 with Retry-After; apiservers restart; connections reset).
RETRIES = 5
BACKOFF_SECONDS = 0.2  # doubled per attempt: 0.2, 0.4, 0.8, 1.6, 3.2
MAX_RETRY_AFTER_SECONDS = 10.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
log = logging.getLogger(__name__)
# httpx logs every request at INFO (URL and status): noise at 500 CRs; our retries log what matters.
logging.getLogger("httpx2").setLevel(logging.WARNING)


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"gptd-operator/{version('gptd')}"
    except Exception:  # not installed as a distribution (a source checkout)
        return "gptd-operator/dev"


USER_AGENT = _user_agent()


@dataclass(frozen=True)
class Resource:
    group_version: str  # "v1", "apps/v1", "gptd.io/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.group_version}" if "/" not in self.group_version else f"/apis/{self.group_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


GPTDEPLOYMENTS = Resource("gptd.io/v1alpha1", "gptdeployments")
DEPLOYMENTS = Resource("apps/v1", "deployments")
SERVICES = Resource("v1", "services")
PDBS = Resource("policy/v1", "poddisruptionbudgets")
HPAS = Resource("autoscaling/v2", "horizontalpodautoscalers")
PODS = Resource("v1", "pods")
SCALEDOBJECTS = Resource("keda.sh/v1alpha1", "scaledobjects")
# One-off work next to the serving pods (the model download, the evaluation): Jobs and their pods are watched.
JOBS = Resource("batch/v1", "jobs")
PVCS = Resource("v1", "persistentvolumeclaims")
CONFIGMAPS = Resource("v1", "configmaps")  # read by name only (the evaluation dataset)
BY_KIND = {
    "ScaledObject": SCALEDOBJECTS,
    "Deployment": DEPLOYMENTS,
    "Service": SERVICES,
    "PodDisruptionBudget": PDBS,
    "HorizontalPodAutoscaler": HPAS,
    "Job": JOBS,
    "PersistentVolumeClaim": PVCS,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NotOwned(ApiError):
    """A child's name is taken by an object another owner (or nobody) controls: never adopted or overwritten."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(409, f"{kind} {name} already exists and is not controlled by this GPTDeployment")


class OwnerGone(ApiError):
    """A child's name is held by the child of a deleted GPTDeployment of the same name (a CR deleted and
    recreated before the garbage collector got there): wait for the collector, don't fail."""

    def __init__(self, kind: str, name: str, owner_uid: str) -> None:
        super().__init__(409, f"{kind} {name} still belongs to the deleted GPTDeployment (uid {owner_uid}); "
                              "waiting for the garbage collector")


def old_owner_uid(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> str | None:
    """The uid of ``obj``'s controller when it is a GPTDeployment named like ``owner`` with another uid: names are
    unique, so that one is deleted (or being deleted)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if (ref.get("controller") and ref.get("kind") == owner.get("kind")
                and ref.get("apiVersion") == owner.get("apiVersion") and ref.get("name") == owner.get("name")
                and ref.get("uid") != owner.get("uid")):
            return str(ref.get("uid"))
    return None


def controlled_by(obj: Mapping[str, Any] | None, uid: str | None) -> bool:
    """Whether ``obj`` has a controller ownerReference to ``uid`` (always True when uid is unknown)."""
    if obj is None or not uid:
        return obj is not None
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


# ---------------------------------------------------------------------------------------- config


class NoCredentials(Exception):
    """Neither in-cluster credentials nor a usable kubeconfig: one line saying what was looked for."""


@dataclass
class Config:
    """Where the API server is and how to authenticate: a lightkube ``SingleConfig`` (one kubeconfig context, or
    the in-cluster service account); ``Config(server=url)`` alone is an unauthenticated plain connection."""

    server: str
    single: SingleConfig | None = field(default=None, repr=False)

    def resolved(self) -> SingleConfig:
        single = self.single or KubeConfig.from_server(self.server).get()
        assert single is not None  # from_server always sets a current context
        # lightkube's transport wants a user entry even when it carries no credentials.
        return single if single.user is not None else single._replace(user=User())

    def auth_header(self) -> str | None:
        """The Authorization header lightkube's auth would send now (token, rotated token file or exec plugin),
        for sync callers: kopf's login handler runs in a thread. Kube's own requests authenticate through the
        same lightkube auth, asynchronously (an exec plugin runs as an asyncio subprocess)."""
        auth = client_adapter.user_auth(self.resolved().user)
        if auth is None:
            return None
        request = httpx.Request("GET", self.server)
        next(auth.sync_auth_flow(request))
        return request.headers.get("Authorization")


def load_config(kubeconfig: str | None = None) -> Config:
    """In-cluster service account first, then the kubeconfig (``kubeconfig``, ``$KUBECONFIG`` or ~/.kube/config)."""
    import os

    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        try:
            if kubeconfig:
                raise ConfigError("explicit kubeconfig")
            # lightkube's from_env raises KeyError when a token is mounted but KUBERNETES_SERVICE_* are unset.
            loaded = KubeConfig.from_service_account()
        except (ConfigError, KeyError):
            loaded = KubeConfig.from_file(path)
        single = loaded.get()
    except (ConfigError, OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NoCredentials(
            "no Kubernetes credentials: not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset or the service "
            f"account token unreadable) and no usable kubeconfig at {path} ({reason})"
        ) from None
    assert single is not None
    return Config(server=single.cluster.server.rstrip("/"), single=single)


_config: Config | None = None


def configure(kubeconfig: str | None = None) -> Config:
    global _config
    _config = load_config(kubeconfig)
    return _config


def get_config() -> Config:
    return _config if _config is not None else configure()


def connection_info(cfg: Config) -> Any:
    """The same credentials for kopf's ``@kopf.on.login``."""
    import kopf

    single = cfg.resolved()
    cluster, user = single.cluster, single.user or User()
    scheme, token = None, None
    header = cfg.auth_header()
    if header:
        scheme, _, token = header.partition(" ") if " " in header else ("Bearer", "", header)

    def path(name: str | None) -> str | None:
        return str(single.abs_file(name)) if name else None

    return kopf.ConnectionInfo(
        server=cfg.server,
        ca_path=path(cluster.certificate_auth),
        ca_data=cluster.certificate_auth_data,  # base64, as kopf reads it from a kubeconfig
        insecure=cluster.insecure,
        scheme=scheme,
        token=token,
        certificate_path=path(user.client_cert),
        certificate_data=user.client_cert_data,
        private_key_path=path(user.client_key),
        private_key_data=user.client_key_data,
    )


# ---------------------------------------------------------------------------------------- client


@dataclass
class Counters:
    reads: int = 0
    writes: int = 0


class Kube:
    """A tiny async Kubernetes client: get / create / patch / delete, plus apply (patch-if-different)."""

    def __init__(self, cfg: Config | None = None, *, limit: int = 32) -> None:
        self.cfg = cfg if cfg is not None else get_config()
        self.counters = Counters()
        self._session: httpx.AsyncClient | None = None
        self._limit = limit

    async def _get_session(self) -> httpx.AsyncClient:
        if self._session is None or self._session.is_closed:
            # lightkube builds the TLS context (CA file or data, client certificates, insecure-skip-tls-verify)
            # and the auth (token, in-cluster token file re-read on 401, exec plugin run asynchronously).
            params = client_adapter.ConnectionParams(timeout=httpx.Timeout(30), trust_env=False)
            self._session = httpx.AsyncClient(
                **params.httpx_params(self.cfg.resolved()),
                limits=httpx.Limits(max_connections=self._limit, max_keepalive_connections=self._limit),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.aclose()
            self._session = None

    async def _request(
        self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """One API call, retried (bounded, with backoff, honouring Retry-After) on 429/5xx/connection errors.

        404 is None; any other error status raises ApiError with the Status message (it names the field)."""
        session = await self._get_session()
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body).encode()
        if method in ("POST", "PATCH", "PUT"):
            params = {"fieldManager": FIELD_MANAGER, **(params or {})}
        for attempt in range(RETRIES + 1):
            if method == "GET":
                self.counters.reads += 1
            else:
                self.counters.writes += 1
            delay = BACKOFF_SECONDS * 2**attempt
            try:
                resp = await session.request(method, path, content=content, headers=headers, params=params)
            except httpx.TransportError as exc:  # connect/read errors, resets, timeouts
                if attempt >= RETRIES:
                    raise ApiError(503, f"{method} {path}: {exc!r} after {RETRIES} retries") from exc
                log.warning("%s %s: %r, retry %d/%d in %.1fs", method, path, exc, attempt + 1, RETRIES, delay)
                await asyncio.sleep(delay)
                continue
            if resp.status_code == 404:
                return None
            if resp.status_code in RETRY_STATUSES and attempt < RETRIES:
                delay = max(delay, _retry_after(resp.headers.get("Retry-After")))
                log.warning("%s %s: %s, retry %d/%d in %.1fs", method, path, resp.status_code, attempt + 1,
                            RETRIES, delay)
                await asyncio.sleep(delay)
                continue
            if resp.status_code >= 400:
                raise ApiError(resp.status_code, _status_message(resp.text)[:500])
            try:
                data = resp.json()
            except ValueError as exc:
                raise ApiError(resp.status_code, f"{method} {path}: not JSON: {resp.text[:200]!r}") from exc
            return data if isinstance(data, dict) else None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", res.path(namespace, name))

    async def list(
        self, res: Resource, namespace: str | None = None, *, label_selector: str = "", page: int = 500
    ) -> list[dict[str, Any]]:
        """Every object (cluster-wide when ``namespace`` is None), paginated with limit/continue."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"limit": str(page), **({"labelSelector": label_selector} if label_selector else {}),
                      **({"continue": token} if token else {})}
            out = await self._request("GET", res.path(namespace), params=params) or {}
            items += out.get("items") or []
            token = (out.get("metadata") or {}).get("continue") or ""
            if not token:
                return items

    async def pod_log(self, namespace: str, name: str, *, tail_lines: int = 5, limit_bytes: int = 16384) -> str | None:
        """The last ``tail_lines`` lines of a pod's (only) container log, or None when there is none to read (no pod,
        the container not started, any error): best effort, one request, never retried (the caller polls)."""
        session = await self._get_session()
        self.counters.reads += 1
        params = {"tailLines": str(tail_lines), "limitBytes": str(limit_bytes)}
        try:
            resp = await session.get(PODS.path(namespace, name, "log"), params=params,
                                     headers={"Accept": "text/plain", "User-Agent": USER_AGENT})
        except httpx.TransportError as exc:
            log.info("GET log of pod %s/%s: %r", namespace, name, exc)
            return None
        if resp.status_code != 200:
            return None
        return resp.text

    async def create(self, res: Resource, body: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """POST; ``strict``: an unknown field is a 400 naming it (fieldValidation=Strict), never silently dropped."""
        ns = body["metadata"].get("namespace")
        params = {"fieldValidation": "Strict"} if strict else None
        out = await self._request("POST", res.path(ns), body=strip_none(body), params=params)
        if out is None:
            raise ApiError(404, f"namespace {ns} or resource {res.plural} not found")
        return out

    async def patch(
        self, res: Resource, namespace: str, name: str, patch: Mapping[str, Any], *, subresource: str | None = None,
        strict: bool = False,
    ) -> dict[str, Any] | None:
        return await self._request(
            "PATCH", res.path(namespace, name, subresource), body=dict(patch), content_type=MERGE_PATCH,
            params={"fieldValidation": "Strict"} if strict else None,
        )

    async def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> dict[str, Any] | None:
        """Add or replace one condition (by type) in a pod's status, leaving the kubelet's conditions alone."""
        return await self._request(
            "PATCH", PODS.path(namespace, name, "status"), body={"status": {"conditions": [dict(condition)]}},
            content_type=STRATEGIC_MERGE_PATCH,
        )

    async def delete(self, res: Resource, namespace: str, name: str) -> bool:
        # Background propagation: the garbage collector removes the ReplicaSets/pods of a Deployment.
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        return await self._request("DELETE", res.path(namespace, name), body=body) is not None

    async def apply(
        self, desired: Mapping[str, Any], live: Mapping[str, Any] | None, *, refetch: bool = True
    ) -> tuple[str, dict[str, Any] | None]:
        """Create ``desired`` if missing, merge-patch it if ``live`` differs; zero writes when equal.

        ``live`` is what the caller last saw (e.g. a kopf index); on a create conflict (the watch
        lagged behind) the object is fetched and compared again. Returns (action, object).
        """
        res = BY_KIND[desired["kind"]]
        desired = server_form(desired)  # compared and sent the way the server will return it
        meta = desired["metadata"]
        if live is None:
            try:
                return "created", await self.create(res, desired)
            except ApiError as exc:
                if exc.status != 409 or not refetch:
                    raise
                live = await self.get(res, meta["namespace"], meta["name"])
                if live is None:
                    raise
                owner = (meta.get("ownerReferences") or [{}])[0]
                if not controlled_by(live, owner.get("uid")):
                    gone = old_owner_uid(live, owner)
                    if gone:
                        raise OwnerGone(desired["kind"], meta["name"], gone) from None
                    raise NotOwned(desired["kind"], meta["name"]) from None
        if is_subset(desired, live):
            return "unchanged", dict(live)
        patch = with_removals({k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}, live)
        patched = await self.patch(res, meta["namespace"], meta["name"], patch, strict=True)
        if patched is None:  # 404: it was deleted since we last saw it (the index or the GET lagged)
            return "created", await self.create(res, desired)
        return "patched", patched


def _retry_after(value: str | None) -> float:
    try:
        return min(MAX_RETRY_AFTER_SECONDS, max(0.0, float(value))) if value else 0.0
    except ValueError:  # an HTTP date: not sent by kube-apiserver
        return 0.0


def _status_message(text: str) -> str:
    try:  # a Status object: its message names the offending field
        return str(json.loads(text).get("message") or text)
    except (ValueError, AttributeError):
        return text
