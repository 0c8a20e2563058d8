"""Operator settings, read once from the environment (the Deployment of the operator sets them)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_RUNTIME_IMAGE = "ghcr.io/gptd-io/gptd-runtime:0.1.0"
SCALE_TO_ZERO_PROVIDERS = ("keda",)
DEFAULT_RUN_AS_USER = 10001
DEFAULT_MONITORING_NAMESPACE = "monitoring"
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # and at most 63 characters


@dataclass(frozen=True)
class Settings:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    # Empty: all namespaces. `--namespace` on the command line wins over GPTD_NAMESPACES.
    namespaces: tuple[str, ...] = ()
    # Set when the cluster has a scale-to-zero provider; only then is autoscaling.minReplicas 0 accepted.
    scale_to_zero_provider: str | None = None
    # Prometheus the KEDA ScaledObjects query (scale to zero); e.g. http://prometheus.monitoring:9090
    prometheus_url: str | None = None
    # Image with the AWS CLI for s3:// models; unset means s3:// URIs are rejected as InvalidSpec.
    s3_init_image: str | None = None
    # Periodic re-check of every GPTDeployment (restores deleted or hand-edited children).
    resync_seconds: float = 30.0
    # Seconds the preStop hook sleeps so endpoints deregister before the runtime gets SIGTERM.
    prestop_sleep_seconds: int = 5
    # UID/GID of the runtime pods; None leaves them to the platform (OpenShift restricted-v2). Never root.
    run_as_user: int | None = DEFAULT_RUN_AS_USER
    # The namespace whose pods (Prometheus) may scrape the metrics port when spec.networkPolicy is enabled.
    monitoring_namespace: str = DEFAULT_MONITORING_NAMESPACE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        provider = env.get("GPTD_SCALE_TO_ZERO_PROVIDER", "").strip().lower() or None
        if provider is not None and provider not in SCALE_TO_ZERO_PROVIDERS:
            raise ValueError(f"GPTD_SCALE_TO_ZERO_PROVIDER must be one of {SCALE_TO_ZERO_PROVIDERS}, got {provider!r}")
        run_as = env.get("GPTD_RUNTIME_RUN_AS_USER", str(DEFAULT_RUN_AS_USER)).strip()
        if run_as and (not run_as.isdigit() or int(run_as) < 1):
            raise ValueError(
                f"GPTD_RUNTIME_RUN_AS_USER must be a UID >= 1 or empty (platform-assigned), got {run_as!r}"
            )
        monitoring = env.get("GPTD_MONITORING_NAMESPACE", "").strip() or DEFAULT_MONITORING_NAMESPACE
        if len(monitoring) > 63 or not _NAMESPACE_RE.match(monitoring):
            # It becomes a label value in every NetworkPolicy: refuse it here, not as a 422 on each CR.
            raise ValueError(f"GPTD_MONITORING_NAMESPACE must be a namespace name (DNS-1123 label), got {monitoring!r}")
        namespaces = tuple(ns.strip() for ns in env.get("GPTD_NAMESPACES", "").split(",") if ns.strip())
        return cls(
            runtime_image=env.get("GPTD_RUNTIME_IMAGE", "").strip() or DEFAULT_RUNTIME_IMAGE,
            namespaces=namespaces,
            scale_to_zero_provider=provider,
            s3_init_image=env.get("GPTD_S3_INIT_IMAGE", "").strip() or None,
            prometheus_url=env.get("GPTD_PROMETHEUS_URL", "").strip() or None,
            resync_seconds=float(env.get("GPTD_RESYNC_SECONDS", "30")),
            prestop_sleep_seconds=int(env.get("GPTD_PRESTOP_SLEEP_SECONDS", "5")),
            run_as_user=int(run_as) if run_as else None,
            monitoring_namespace=monitoring,
        )
