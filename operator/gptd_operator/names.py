"""Child names derived from the GPTDeployment's name: deterministic, DNS-1035 labels, collision-free (but for kept
legacy bases, below).

A CR name is a DNS-1123 subdomain (up to 253 characters, dots allowed: ``llama-3.1-8b``). Its children need
more: a Service name is a DNS-1035 label (lower-case alphanumerics and ``-``, letter first, at most 63
characters, no dots), and the ``app.kubernetes.io/instance`` label value is at most 63 characters. So every
child carries the *base* name:

- the CR name itself when it is a DNS-1035 label of at most 56 characters (room for ``-canary``), contains no
  ``--`` and does not end in ``-canary``; that is almost every name people write, and the children keep the
  CR's name;
- otherwise ``<stem>--<hash>``: the name lower-cased with every run of other characters replaced by ``-``
  (a leading non-letter gets a ``g`` before it), cut to 44 characters, then ``--`` and the first 10 hex
  digits of the SHA-256 of the full CR name. ``llama-3.1-8b`` → ``llama-3-1-8b--<hash>``.

The stable Deployment, the Service, the PDB, the HPA, the KEDA ScaledObject, the NetworkPolicy and the
cert-manager Certificate are named ``<base>``; the canary Deployment ``<base>-canary``; the Secret the
Certificate's issuer writes ``<base>-tls`` (a fixed suffix on distinct bases: distinct Secrets).
Among these bases no two CRs' children can collide: a base never ends in ``-canary``
(hashed bases end in hex digits, plain ones are refused that ending), so no stable name equals a canary
name; plain bases contain no ``--`` and hashed ones do, so a plain name never equals a hashed one; two
hashed bases are equal only if 40 bits of SHA-256 collide. Every valid CR name is served this way, so no
name needs refusing. ``status.service`` and ``status.url`` name the Service.

Upgrading from a release before these rules (commit 006c30e): that release named every child after the CR
itself (stable Deployment, Service, PDB, HPA and ScaledObject ``<name>``, canary ``<name>-canary``, instance
label ``<name>``) and wrote no ``status.service``. For a CR whose name is not plain, building the new names
would start a second stable Deployment (the model twice, its GPUs twice) beside the old one, which nobody
deletes. So the names are *sticky*: a CR that still controls its legacy stable Deployment (named ``<name>``,
legacy labels) keeps the legacy base (``keeps_legacy``, decided once per reconcile from what the watches show);
its children are patched in place (the kept Deployment to today's pod template: its pods roll once if the old
template differed), nothing is created beside them and ``status.service`` names the old Service. Only CR names
that are valid label values (at most 63 characters) can have legacy children (a longer label was refused).
A legacy base is not always a valid Service name (``llama-3.1-8b`` has dots; the old release's Service POST
was refused, its Deployment was not): the Service then takes the hashed base, everything else the legacy one.
A CR created after the upgrade has no legacy children, so it gets the names above. A kept legacy base is outside
those rules, so it can collide: two CRs that both kept legacy names collide as they did before the upgrade (CR
``foo``'s canary ``foo-canary`` is the legacy stable Deployment of CR ``foo-canary``), and a kept base may contain
``--`` and equal another CR's hashed base (a CR literally named ``abc--0123456789`` beside one whose name hashes
to that). The ownership checks (kube.NotOwned: a child controlled by another owner is never patched or
adopted) turn either into a refusal of the second CR's child (InvalidSpec), never a takeover, until the kept CR
moves to its new names: delete its legacy stable Deployment (the only evidence, ``keeps_legacy``), then its other
legacy children by label (docs/operator.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_LABEL = 63
CANARY_SUFFIX = "-canary"
_HASH_CHARS = 10
_STEM_CHARS = MAX_LABEL - len(CANARY_SUFFIX) - 2 - _HASH_CHARS  # 44: "<stem>--<hash>-canary" fits in 63
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_plain(name: str) -> bool:
    """Whether ``name`` is used as it is for the children."""
    return (
        len(name) <= MAX_LABEL - len(CANARY_SUFFIX)
        and bool(_DNS1035.match(name))
        and "--" not in name
        and not name.endswith(CANARY_SUFFIX)
    )


class LegacyName(str):
    """The name of a CR that keeps its legacy base (``keeps_legacy``): the same string, so owner references,
    GETs of the CR and events are unchanged, while ``base()`` returns it as it is. A marker on the value rather
    than a parameter because every builder derives its child names from the CR name it is given."""

    __slots__ = ()


# The legacy release's labels (builders.LABEL_* values; not imported: builders imports this module).
_MANAGED_BY = ("app.kubernetes.io/managed-by", "gptd-operator")
_INSTANCE = "app.kubernetes.io/instance"


def may_have_legacy_children(name: str) -> bool:
    """Whether the legacy release could have left children of CR ``name`` under other names than ``base(name)``:
    the name is not plain, and it fits a label value (a longer instance label was refused, so nothing was made)."""
    return not is_plain(name) and len(name) <= MAX_LABEL


def keeps_legacy(name: str, uid: str, deployments: Iterable[Mapping[str, Any]]) -> bool:
    """Whether CR ``name`` (uid ``uid``) keeps its legacy base: it may have legacy children, and one of
    ``deployments`` (what the watches show carrying instance label ``name``) is the legacy *stable Deployment*:
    named ``name``, gptd's, instance label ``name``, controlled by this CR.

    That Deployment alone is the evidence: it holds the GPUs (a second one is what the sticky names prevent), and
    the legacy release always made it. Every other child a kept CR gets (NetworkPolicy, PVC, Jobs, ...) carries
    the same labels and owner, so counting them would keep a CR legacy forever; with the Deployment alone,
    ``kubectl delete deployment <name>`` moves it to its new names (docs/operator.md).
    Another CR's objects never count, whatever their name: CR ``foo``'s canary ``foo-canary`` carries
    instance ``foo`` and ``foo``'s uid, so it does not make a new CR ``foo-canary`` take legacy names."""
    if not uid or not may_have_legacy_children(name):
        return False
    for dep in deployments:
        meta = dep.get("metadata") or {}
        labels = meta.get("labels") or {}
        if dep.get("kind") not in (None, "Deployment") or meta.get("name") != name:
            continue
        if labels.get(_MANAGED_BY[0]) != _MANAGED_BY[1] or labels.get(_INSTANCE) != name:
            continue
        if any(r.get("uid") == uid and r.get("controller") for r in meta.get("ownerReferences") or []):
            return True
    return False


def children_name(name: str, uid: str, deployments: Iterable[Mapping[str, Any]]) -> str:
    """``name`` as the builders should get it: a ``LegacyName`` when it keeps its legacy base."""
    return LegacyName(name) if keeps_legacy(name, uid, deployments) else name


def _hashed(name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not stem[:1].isalpha():
        stem = f"g{stem}"
    stem = stem[:_STEM_CHARS].rstrip("-")
    return f"{stem}--{hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]}"


def base(name: str) -> str:
    """The base name of every child of the GPTDeployment ``name`` (see the module docstring)."""
    if isinstance(name, LegacyName):
        return str(name)
    if is_plain(name):
        return name
    return _hashed(name)


def deployment(name: str, track: str = "stable") -> str:
    """``<base>`` for the stable track, ``<base>-canary`` for the canary."""
    return base(name) if track == "stable" else f"{base(name)}-{track}"


def service(name: str) -> str:
    """The Service: ``<base>``, but a DNS-1035 label even where a kept legacy base is not one (dots, a digit first:
    the legacy release never got such a Service created)."""
    kept = base(name)
    return kept if _DNS1035.match(kept) else _hashed(str(name))


def network_policy(name: str) -> str:
    return base(name)


def certificate(name: str) -> str:
    return base(name)


def certificate_secret(name: str) -> str:
    """The Secret cert-manager writes for the Certificate (tls.crt, tls.key, ca.crt); the pods mount it."""
    return f"{base(name)}-tls"


def evaluation_job(name: str, role: str, key: str) -> str:
    """``<stem>-eval-<digest>``: one Job per (role, what is scored); at most 63 characters (the Job controller puts
    the name in a label). The digest covers the full base, so a cut stem can't make two CRs' Jobs collide."""
    digest = hashlib.sha256(f"{base(name)}\0{role}\0{key}".encode()).hexdigest()[:_HASH_CHARS]
    return f"{base(name)[:MAX_LABEL - 6 - _HASH_CHARS].rstrip('-')}-eval-{digest}"


def model_cache(name: str) -> str:
    """The PersistentVolumeClaim of spec.model.cache (issue 10): ``<base>-model-cache``."""
    return f"{base(name)}-model-cache"


def job(name: str, purpose: str, revision: str) -> str:
    """A Job of CR ``name`` for ``purpose`` ("fetch", "eval", ...) and ``revision``: ``<base>-<purpose>-<revision>``.

    The Job controller copies a Job's name into its pods' ``batch.kubernetes.io/job-name`` label, so the API server
    refuses Job names over 63 characters; a longer one keeps the ``-<purpose>-<revision>`` tail and shortens the
    base to a stem plus 8 hex digits of the base's SHA-256 (distinct bases: distinct names)."""
    tail = f"-{purpose}-{revision}"
    full = f"{base(name)}{tail}"
    if len(full) <= MAX_LABEL:
        return full
    digest = hashlib.sha256(base(name).encode()).hexdigest()[:8]
    stem = base(name)[: MAX_LABEL - len(tail) - len(digest) - 1].rstrip("-")
    return f"{stem}-{digest}{tail}"
