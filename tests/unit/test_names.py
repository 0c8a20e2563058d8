"""Child names: deterministic DNS-1035 labels, the CR's own name where possible, never colliding."""

from __future__ import annotations

import re

import pytest
from gptd_operator import names

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("name", ["gpt2", "llama3-8b", "a" * 56])
def test_plain_names_are_kept(name: str) -> None:
    assert names.base(name) == name == names.service(name) == names.deployment(name)
    assert names.deployment(name, "canary") == f"{name}-canary"


@pytest.mark.parametrize("name", [
    "llama-3.1-8b", "7b", "3.1", "a" * 57, "m" * 253, "x-canary", "x--y", "a.b.c-canary", "qwen2.5-72b-instruct",
])
def test_other_names_become_dns1035_labels(name: str) -> None:
    for child in (names.base(name), names.deployment(name, "canary")):
        assert DNS1035.match(child) and len(child) <= 63, child
    assert names.base(name) == names.base(name)  # deterministic
    assert names.base(name) != name


def test_no_collisions_between_stable_and_canary_names() -> None:
    crs = ["x", "x-canary", "x-canary-canary", "x.canary", "x--canary", "x-y", "x.y", "x--y", "llama-3.1-8b",
           "llama-3-1-8b", "a" * 56, "a" * 57, "a" * 58]
    children = [names.deployment(n, t) for n in crs for t in ("stable", "canary")]
    assert len(children) == len(set(children)), sorted(children)
    assert names.base("llama-3.1-8b").startswith("llama-3-1-8b--")
