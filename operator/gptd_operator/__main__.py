"""CLI: ``python -m gptd_operator`` runs the operator; ``python -m gptd_operator crd`` prints the CRD.

Usage:
  gptd-operator [run] [--namespace NS ...] [--liveness URL] [--verbose]
  gptd-operator crd
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptd-operator", description="The gptd Kubernetes operator.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("crd", help="print the GPTDeployment CustomResourceDefinition (YAML) and exit")
    run = sub.add_parser("run", help="run the operator (the default)")
    for p in (parser, run):
        p.add_argument(
            "--namespace",
            "-n",
            action="append",
            default=None,
            help="watch only this namespace (repeatable; default: all namespaces, or GPTD_NAMESPACES)",
        )
        p.add_argument(
            "--liveness",
            default="http://0.0.0.0:8080/healthz",
            help="kopf liveness endpoint (default %(default)s); empty string disables it",
        )
        p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def run(namespaces: list[str] | None, liveness: str | None, verbose: bool) -> int:
    import kopf

    from . import handlers, kube
    from .settings import Settings

    settings = Settings.from_env()
    namespaces = namespaces or list(settings.namespaces)
    # One source of truth for the watched namespaces (the resync LISTs only those: a Role grants no more).
    settings = dataclasses.replace(settings, namespaces=tuple(namespaces))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf's own login handler (in handlers) reads the same kubeconfig/in-cluster config as kube.py.
    try:
        kube.configure()
    except kube.NoCredentials as exc:
        print(f"gptd-operator: {exc}", file=sys.stderr)
        return 2
    memo = handlers.configure(settings)
    asyncio.run(
        kopf.operator(
            memo=memo,
            standalone=True,  # one operator replica; peering would need extra RBAC and CRDs
            clusterwide=not namespaces,
            namespaces=namespaces or (),
            liveness_endpoint=liveness or None,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "crd":
        from .crd import render_crd

        sys.stdout.write(render_crd())
        return 0
    return run(args.namespace, args.liveness, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
