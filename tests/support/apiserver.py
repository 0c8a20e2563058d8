"""An emulated kube-apiserver that behaves like the real one where the operator's correctness depends on it.

``kmock.KubernetesEmulator`` stores what it is sent. ``ApiServer`` adds, for every write:

- ``metadata.uid``, ``generateName``, ``resourceVersion`` (a counter), ``creationTimestamp``;
  ``metadata.generation`` 1 on create, +1 when anything outside ``metadata``/``status`` changes.
- Name validation with the real 422 ``Status`` body: Services (and Namespaces) are DNS-1035 / DNS-1123
  labels (<= 63, no dots), everything else a DNS-1123 subdomain (<= 253); label keys and values (<= 63).
- For the built-in kinds the operator writes (Deployment, Service, Pod, PDB, HPA v2, NetworkPolicy, Event,
  Secret, Job, PersistentVolumeClaim) the object is walked against the real OpenAPI schema of Kubernetes v1.35
  (bundled by ``kubernetes-validate``, so the known-fields schema is complete for those kinds):
  unknown fields are dropped, or refused with 400 ``strict decoding error: unknown field "..."`` under
  ``?fieldValidation=Strict`` (the real server's status and message); ``omitempty`` empties are dropped
  (``""`` strings, ``[]`` lists and ``{}`` string maps of optional fields; a ``{}`` struct such as
  ``emptyDir: {}`` stays, as in Go); every ``resource.Quantity`` is canonicalised (``"0.5"`` → ``"500m"``,
  ``1000`` → ``"1k"``; see ``quantity.py``). Custom resources (GPTDeployment, ScaledObject, Certificate) are
  stored as sent (no CRD schema here). A resource that is not registered (a CRD not installed) is 404 to every
  verb, POST included, as on a real API server.
- Immutable fields (422, the real messages): a PersistentVolumeClaim's spec except its storage request, which may
  only grow; a Job's pod template.
- JSON merge patch (RFC 7386): maps merged key by key, only ``null`` removes a key, lists replaced whole; a
  PATCH of ``/status`` changes only ``status``, a PATCH of the main resource never ``status`` (for kinds
  with a status subresource), ``/scale`` only ``spec.replicas``. A PATCH of a missing object is 404.
- LIST: ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``), ``limit`` / ``continue`` pagination.
- ``GET pods/<name>/log`` (``tailLines``, ``limitBytes``): the text a test set with ``set_pod_log()`` (the
  kubelet's container log), ``text/plain``; 404 for a missing pod, 400 (as the kubelet's "container is waiting to
  start") for a pod without a log yet.
- Test controls: ``expire_watches()`` ends every open watch with ``ERROR 410 Gone`` (kopf then re-lists);
  ``delete_silently()`` deletes an object without a watch event (an event lost in a watch gap).

Simplifications (none matters to the operator): no admission, no RBAC, no defaulting of built-in kinds, no
server-side apply, integers other than quantities are not range-checked, PUT is not emulated.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate

from .quantity import InvalidQuantity
from .quantity import canonical as canonical_quantity
from .quantity import parse as parse_quantity

SCHEMA_VERSION = "v1.35.0"
# (group, version, plural) → the OpenAPI definition of the kind
SCHEMAS = {
    ("apps", "v1", "deployments"): "io.k8s.api.apps.v1.Deployment",
    ("", "v1", "services"): "io.k8s.api.core.v1.Service",
    ("", "v1", "pods"): "io.k8s.api.core.v1.Pod",
    ("", "v1", "secrets"): "io.k8s.api.core.v1.Secret",
    ("", "v1", "events"): "io.k8s.api.core.v1.Event",
    ("policy", "v1", "poddisruptionbudgets"): "io.k8s.api.policy.v1.PodDisruptionBudget",
    ("autoscaling", "v2", "horizontalpodautoscalers"): "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler",
    ("networking.k8s.io", "v1", "networkpolicies"): "io.k8s.api.networking.v1.NetworkPolicy",
    ("batch", "v1", "jobs"): "io.k8s.api.batch.v1.Job",
    ("", "v1", "persistentvolumeclaims"): "io.k8s.api.core.v1.PersistentVolumeClaim",
}
# Kinds whose names must be DNS labels (no dots, <= 63): (regex, rule name, message)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS1035_MESSAGE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
    "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
    "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
    "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
WITH_STATUS = {"deployments", "pods", "poddisruptionbudgets", "horizontalpodautoscalers", "gptdeployments",
               "scaledobjects", "services", "certificates", "jobs", "persistentvolumeclaims"}


@functools.cache
def _definitions() -> dict[str, Any]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{SCHEMA_VERSION}-local-strict"
    return json.loads((root / "_definitions.json").read_text())["$defs"]


class ApiRejection(Exception):
    """A request the real API server refuses; rendered as its ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def _invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> ApiRejection:
    """422 Invalid, worded like the API server: 'Service "x" is invalid: field: message'."""
    joined = ", ".join(f"{field}: {msg}" for field, msg in causes)
    text = f'{kind} "{name}" is invalid: ' + (f"[{joined}]" if len(causes) > 1 else joined)
    details = {"name": name, "kind": kind,
               "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field} for field, msg in causes]}
    return ApiRejection(422, "Invalid", text, details)


# ------------------------------------------------------------------------------------------- merge patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


STRATEGIC_MERGE = "application/strategic-merge-patch+json"


def _content_type(request: Any) -> str:
    headers = getattr(request, "headers", None) or {}
    return str(headers.get("Content-Type") or headers.get("content-type") or "").split(";")[0].strip()


def merge_by_key(old: list[Any], new: list[Any], key: str) -> list[Any]:
    """A strategic-merge list: items of ``new`` replace (merged into) the ``old`` item with the same ``key``, new
    keys are appended; order kept."""
    out = [dict(o) for o in old]
    for item in new:
        match = next((o for o in out if o.get(key) == item.get(key)), None)
        if match is None:
            out.append(dict(item))
        else:
            match.update(item)
    return out


def diff_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new`` (kmock applies patches with the same map semantics)."""
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = diff_patch(before, value)
            if nested:
                out[key] = nested
        elif before != value or key not in old:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------------- schema walk


class _Walk:
    """Prune / reject unknown fields, drop omitempty empties, canonicalise quantities — one object."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.unknown: list[str] = []
        self.invalid: list[tuple[str, str]] = []

    def node(self, value: Any, schema: dict[str, Any], path: str) -> Any:
        ref = schema.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
                try:
                    return canonical_quantity(value)
                except InvalidQuantity as exc:
                    self.invalid.append((path, f"Invalid value: {json.dumps(value)}: {exc}"))
                    return value
            return self.node(value, _definitions()[name], path)
        if isinstance(value, dict) and "properties" in schema:
            props = schema["properties"]
            required = set(schema.get("required") or ())
            out = {}
            for key, item in value.items():
                if key not in props:
                    if schema.get("additionalProperties") is False:
                        self.unknown.append(f"{path}.{key}".lstrip("."))
                        continue
                    out[key] = item
                    continue
                item = self.node(item, props[key], f"{path}.{key}")
                if item is None:
                    continue
                if key not in required and _omitempty_empty(item, props[key]):
                    continue
                out[key] = item
            return out
        if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            return {k: self.node(v, schema["additionalProperties"], f"{path}[{k}]") for k, v in value.items()}
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [self.node(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(value)]
        return value


def _omitempty_empty(value: Any, schema: dict[str, Any]) -> bool:
    """Go's encoding/json omitempty: "" and empty slices/maps vanish; an empty struct pointer stays."""
    if value == "" or value == []:
        return True
    if value == {}:
        return "$ref" not in schema and "properties" not in schema  # a map[string]X, not a struct
    return False


# ------------------------------------------------------------------------------------------------ server


class ApiServer(kmock.KubernetesEmulator):
    """See the module docstring. ``strict_requests`` counts the writes that asked for fieldValidation=Strict."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Every request, in order (what tests inspect). kmock's own log is re-scanned by its reaction filters on
        # every new request (its DSL allows slices over history): quadratic, so a write storm (the bug class these
        # tests exist to catch) would starve the event loop instead of failing the test. kmock's log and its
        # iteration hold only the requests in flight; this one holds them all.
        self.log: list[Any] = []
        self._inflight: list[Any] = []
        self._rv = itertools.count(1)
        self._watch_epoch = 0
        self._watch_namespaces: set[str | None] = set()
        self.rejections: list[dict[str, Any]] = []
        self.pod_logs: dict[tuple[str, str], str] = {}
        # A StorageClass without allowVolumeExpansion: the real server's resize admission (PersistentVolumeClaimResize)
        # answers 403 Forbidden to a larger storage request. One knob for every claim (tests use one class).
        self.allow_volume_expansion = True

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        """What the pod's container has written to stdout so far (``GET .../pods/<name>/log`` serves it)."""
        self.pod_logs[(namespace, name)] = text

    # --- test controls

    async def expire_watches(self) -> None:
        """End every open watch stream with ERROR 410 Gone, as after an etcd compaction."""
        self._watch_epoch += 1
        # A watch only sees events of its own namespace (or all): one marker per namespace reaches every watch.
        namespaces = {ns for (_, ns, _) in self.objects} | self._watch_namespaces | {None}
        for bus in list(self._buses.values()):
            for ns in namespaces:
                await bus.put({"type": "_EXPIRE", "object": {"metadata": {"namespace": ns}}})

    def delete_silently(self, plural: str, namespace: str, name: str) -> None:
        """Delete an object without a watch event: what a watcher misses during a disconnection."""
        for (res, ns, obj_name), obj in self.objects.items():
            if res.plural == plural and ns == namespace and obj_name == name and not obj.deleted:
                obj.delete()
                return
        raise KeyError((plural, namespace, name))

    # --- request handling

    def _served(self, res: Any) -> bool:
        """Whether the resource is installed. Nothing registered: every resource is (unit tests of the emulator)."""
        keys = {(r.group, r.version, r.plural) for r in self.resources.keys()}
        if res.plural is None:  # discovery of a group version: served while any of its resources is
            return not keys or any((g, v) == (res.group, res.version) for g, v, _ in keys)
        return not keys or (res.group, res.version, res.plural) in keys

    def __iter__(self) -> Any:
        return iter(list(self._inflight))

    async def _handle(self, request: Any) -> Any:
        self.log.append(request)
        self._requests.clear()
        self._inflight.append(request)
        try:
            return await self._handle_one(request)
        finally:
            self._inflight.remove(request)

    async def _handle_one(self, request: Any) -> Any:
        try:
            if request.resource is not None and not self._served(request.resource):
                # A kind whose CRD is not installed: the real server answers 404 to every verb, POST included.
                res = request.resource
                raise ApiRejection(404, "NotFound", f"the server could not find the requested resource ({res.plural}"
                                   f".{res.group})", {"group": res.group, "kind": res.plural})
            res = request.resource
            if res is not None and res.plural == "pods" and request.subresource == "log" and request.name:
                return self._serve_log(request)
            if request.resource is not None and request.action is not None:
                action = str(request.action.value if hasattr(request.action, "value") else request.action)
                if action == "CREATE" and isinstance(request.data, dict):
                    self._on_create(request)
                elif action == "UPDATE" and isinstance(request.data, dict) and request.name:
                    self._on_patch(request)
        except ApiRejection as exc:
            self.rejections.append(exc.body())
            from aiohttp import web

            return web.json_response(exc.body(), status=exc.code)
        return await super()._handle(request)

    def _serve_log(self, request: Any) -> Any:
        from aiohttp import web

        if self._stored(request) is None:
            raise ApiRejection(404, "NotFound", f'pods "{request.name}" not found', {"name": request.name})
        text = self.pod_logs.get((request.namespace, request.name))
        if text is None:
            raise ApiRejection(400, "BadRequest",
                               f'container "fetch" in pod "{request.name}" is waiting to start: ContainerCreating')
        tail = request.params.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        limit = request.params.get("limitBytes")
        if limit is not None:
            text = text.encode()[: int(limit)].decode(errors="ignore")
        return web.Response(text=text, content_type="text/plain")

    def _key(self, request: Any, namespace: str | None, name: str) -> Any:
        return (request.resource, namespace, name)

    def _stored(self, request: Any) -> dict[str, Any] | None:
        key = self._key(request, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(dict(self.objects[key].last.raw))
        return None

    def _on_create(self, request: Any) -> None:
        res = request.resource
        data = request.data
        meta = data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace  # the real server fills it in from the URL
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        kind = data.get("kind") or _kind_of(self, res)
        name = meta.get("name") or ""
        causes = _name_causes(res.plural, name) + _label_causes(data)
        obj = self._normalise(request, data, kind, name, causes)
        obj.setdefault("metadata", {})
        obj["metadata"]["uid"] = meta.get("uid") or str(uuid.uuid4())
        obj["metadata"].setdefault("generation", 1)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        obj["metadata"].setdefault(
            "creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        data.clear()
        data.update(obj)

    def _on_patch(self, request: Any) -> None:
        stored = self._stored(request)
        if stored is None:
            return  # kmock answers 404
        patch = request.data
        sub = request.subresource
        res = request.resource
        if sub == "status":
            status_patch = patch.get("status") or {}
            if _content_type(request) == STRATEGIC_MERGE and isinstance(status_patch.get("conditions"), list):
                # Strategic merge patch: status.conditions merge by their "type" (patchMergeKey), as the real
                # server does for pods; a JSON merge patch replaces the whole list.
                status_patch = {**status_patch, "conditions": merge_by_key(
                    (stored.get("status") or {}).get("conditions") or [], status_patch["conditions"], "type")}
            merged = {**stored, "status": merge_patch(stored.get("status"), status_patch)}
        elif sub == "scale":
            replicas = (patch.get("spec") or {}).get("replicas")
            merged = copy.deepcopy(stored)
            if replicas is not None:
                merged.setdefault("spec", {})["replicas"] = replicas
        else:
            body = {k: v for k, v in patch.items() if not (k == "status" and res.plural in WITH_STATUS)}
            merged = merge_patch(stored, body)
            merged.setdefault("metadata", {})
            for immutable in ("uid", "name", "namespace", "creationTimestamp"):
                if immutable in stored.get("metadata", {}):
                    merged["metadata"][immutable] = stored["metadata"][immutable]
        kind = merged.get("kind") or _kind_of(self, res)
        causes = _label_causes(merged)
        new = self._normalise(request, merged, kind, stored["metadata"]["name"], causes)
        if sub is None:
            _check_immutable(res.plural, kind, stored, new)
            if res.plural == "persistentvolumeclaims" and not self.allow_volume_expansion:
                _check_expansion(kind, stored, new)
        before = {k: v for k, v in stored.items() if k not in ("metadata", "status")}
        after = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        generation = stored.get("metadata", {}).get("generation") or 1
        new["metadata"]["generation"] = generation + 1 if before != after else generation
        new["metadata"]["resourceVersion"] = str(next(self._rv))
        request.data.clear()
        request.data.update(diff_patch(stored, new))

    def _normalise(
        self, request: Any, obj: dict[str, Any], kind: str, name: str, causes: list[tuple[str, str]]
    ) -> dict[str, Any]:
        res = request.resource
        definition = SCHEMAS.get((res.group, res.version, res.plural))
        strict = str(request.params.get("fieldValidation", "")).lower() == "strict"
        if definition is None:
            if causes:
                raise _invalid(kind, name, causes)
            return copy.deepcopy(obj)
        walk = _Walk(strict)
        out = walk.node(copy.deepcopy(obj), _definitions()[definition], "")
        if strict and walk.unknown:
            unknown = ", ".join(f'unknown field "{u}"' for u in walk.unknown)
            raise ApiRejection(
                400, "BadRequest",
                f"{kind} in version \"{res.version}\" cannot be handled as a {kind}: strict decoding error: {unknown}",
            )
        if causes or walk.invalid:
            raise _invalid(kind, name, causes + walk.invalid)
        return out

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        items = [i for i in result["items"] if _selected(i, request.params.get("labelSelector", ""))]
        items.sort(key=lambda o: ((o.get("metadata") or {}).get("namespace") or "", o["metadata"]["name"]))
        start = 0
        token = request.params.get("continue")
        if token:
            start = int(base64.urlsafe_b64decode(token.encode()).decode())
        limit = int(request.params.get("limit") or 0)
        page = items[start:start + limit] if limit else items[start:]
        meta: dict[str, Any] = {"resourceVersion": str(next(self._rv))}
        if limit and start + limit < len(items):
            meta["continue"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        return {"kind": "List", "apiVersion": "v1", "metadata": meta, "items": page}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        epoch = self._watch_epoch
        self._watch_namespaces.add(request.namespace)
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "_EXPIRE":
                if self._watch_epoch != epoch:
                    yield {"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "too old resource version", "reason": "Expired", "code": 410}}
                    return
                continue
            yield event


def _check_immutable(plural: str, kind: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """What a real API server refuses to change (422): a claim's spec but its storage request (and only growing
    it), a Job's pod template."""
    name = old["metadata"]["name"]
    if plural == "persistentvolumeclaims":
        before, after = dict(old.get("spec") or {}), dict(new.get("spec") or {})
        old_size = ((before.pop("resources", None) or {}).get("requests") or {}).get("storage")
        new_size = ((after.pop("resources", None) or {}).get("requests") or {}).get("storage")
        for key in ("volumeName", "volumeAttributesClassName"):
            before.pop(key, None)
            after.pop(key, None)
        if before != after:
            raise _invalid(kind, name, [("spec", "Forbidden: spec is immutable after creation except "
                                                 "resources.requests and volumeAttributesClassName for bound claims")])
        if old_size and new_size and parse_quantity(new_size)[0] < parse_quantity(old_size)[0]:
            raise _invalid(kind, name, [("spec.resources.requests.storage",
                                         "Forbidden: field can not be less than status.capacity")])
    if plural == "jobs" and (old.get("spec") or {}).get("template") != (new.get("spec") or {}).get("template"):
        raise _invalid(kind, name, [("spec.template", "Invalid value: field is immutable")])


def _check_expansion(kind: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """The resize admission plugin's answer when the claim's class does not allow expansion (403, its words)."""
    def size(obj: dict[str, Any]) -> Any:
        return (((obj.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")

    if size(old) and size(new) and parse_quantity(size(new))[0] > parse_quantity(size(old))[0]:
        raise ApiRejection(403, "Forbidden", f'{kind.lower()}s "{old["metadata"]["name"]}" is forbidden: only '
                           "dynamically provisioned pvc can be resized and the storageclass that provisions the pvc "
                           "must support resize")


def _kind_of(server: ApiServer, res: Any) -> str:
    for key, info in server.resources.items():
        if getattr(key, "plural", None) == res.plural and info.kind:
            return str(info.kind)
    return str(res.plural)


def _name_causes(plural: str, name: str) -> list[tuple[str, str]]:
    if not name:
        return [("metadata.name", "Required value: name or generateName is required")]
    if plural in ("services",):
        if len(name) > 63:
            return [("metadata.name", f'Invalid value: "{name}": must be no more than 63 characters')]
        if not _DNS1035.match(name):
            return [("metadata.name", f'Invalid value: "{name}": {DNS1035_MESSAGE}')]
        return []
    if plural == "namespaces":
        ok = len(name) <= 63 and _DNS1123_LABEL.match(name)
        return [] if ok else [("metadata.name", f'Invalid value: "{name}": a DNS-1123 label is required')]
    if plural == "jobs" and len(name) > 63:
        # The Job controller copies the name into the pods' batch.kubernetes.io/job-name label (<= 63).
        return [("metadata.name", f'Invalid value: "{name}": must be no more than 63 characters')]
    if len(name) > 253:
        return [("metadata.name", f'Invalid value: "{name}": must be no more than 253 characters')]
    if not _DNS1123_SUBDOMAIN.match(name):
        return [("metadata.name", f'Invalid value: "{name}": {DNS1123_SUBDOMAIN_MESSAGE}')]
    return []


def _label_causes(obj: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    maps = [("metadata.labels", (obj.get("metadata") or {}).get("labels"))]
    spec = obj.get("spec") or {}
    if isinstance(spec, dict):
        template = spec.get("template") or {}
        if isinstance(template, dict):
            maps.append(("spec.template.metadata.labels", (template.get("metadata") or {}).get("labels")))
        selector = spec.get("selector")
        if isinstance(selector, dict):
            maps.append(("spec.selector.matchLabels", selector.get("matchLabels")))
            if "matchLabels" not in selector and all(isinstance(v, str) for v in selector.values()):
                maps.append(("spec.selector", selector))  # a Service's plain map
    for field, labels in maps:
        for key, value in (labels or {}).items():
            name = key.rsplit("/", 1)[-1]
            if len(name) > 63 or not _QUALIFIED_NAME.match(name):
                out.append((field, f'Invalid value: "{key}": name part must be no more than 63 characters'
                            " and consist of alphanumeric characters, '-', '_' or '.'"))
            if not isinstance(value, str):
                out.append((field, f"Invalid value: {value!r}: label values must be strings"))
            elif len(value) > 63:
                out.append((field, f'Invalid value: "{value}": must be no more than 63 characters'))
            elif not _LABEL_VALUE.match(value):
                out.append((field, f'Invalid value: "{value}": {LABEL_VALUE_MESSAGE}'))
    return out


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True
