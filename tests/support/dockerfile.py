"""A small Dockerfile reader for tests: instructions with continuation lines joined, ARG defaults, ENV values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] in order, comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip() if pending else line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value
    return out


def env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def runs(path: Path) -> list[str]:
    return [rest for word, rest in instructions(path) if word == "RUN"]


DIGEST = re.compile(r"^[\w.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}$")
