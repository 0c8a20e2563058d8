"""normalize.py: desired objects in the API server's form, compared like the server returns them."""

from __future__ import annotations

import random
from typing import Any

import pytest
from gptd_operator import normalize

from tests.support import quantity as oracle


def _random_quantity(rng: random.Random) -> Any:
    number = rng.choice([
        str(rng.randint(0, 5000)), f"{rng.randint(0, 99)}.{rng.randint(0, 999)}", f".{rng.randint(1, 9)}",
        rng.randint(0, 100000),
    ])
    if isinstance(number, int):
        return number
    return number + rng.choice(["", "", "m", "u", "n", "k", "M", "G", "Ki", "Mi", "Gi", "e3", "e-3", "E6"])


def test_canonical_quantity_agrees_with_the_apimachinery_oracle() -> None:
    rng = random.Random(8)
    for _ in range(3000):
        value = _random_quantity(rng)
        assert normalize.canonical_quantity(value) == oracle.canonical(value), value


@pytest.mark.parametrize(("given", "want"), [
    ("0.5", "500m"), ("1.5m", "1500u"), (1000, "1k"), ("1000", "1k"), (1, "1"), ("1.5Gi", "1536Mi"),
    ("0.5Ki", "512"), ("1e3", "1e3"), ("lots", "lots"),
])
def test_canonical_quantity(given: Any, want: str) -> None:
    assert normalize.canonical_quantity(given) == want


def test_server_form_drops_omitempty_empties_and_canonicalises() -> None:
    desired = {"spec": {
        "nodeSelector": {}, "priorityClassName": "", "emptyDir": {}, "labels": {"a": ""},
        "env": [{"name": "X", "value": ""}, {"name": "L", "valueFrom": {"resourceFieldRef": {"divisor": 1}}}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "resources": {"limits": {"cpu": "0.5"}, "requests": {}},
        "args": ["", "x"],
        "metrics": [{"pods": {"target": {"averageValue": "1000"}}}],
    }}
    assert normalize.server_form(desired) == {"spec": {
        "nodeSelector": None, "priorityClassName": None, "emptyDir": {}, "labels": {"a": ""},
        "env": [{"name": "X", "value": None}, {"name": "L", "valueFrom": {"resourceFieldRef": {"divisor": "1"}}}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": None}},
        "resources": {"limits": {"cpu": "500m"}, "requests": None},
        "args": ["", "x"],
        "metrics": [{"pods": {"target": {"averageValue": "1k"}}}],
    }}


def test_affinity_is_exact_at_every_depth_and_patched_whole() -> None:
    live = {"affinity": {"nodeAffinity": {"a": 1, "b": 2}, "podAntiAffinity": {"c": 3}}}
    desired = {"affinity": {"nodeAffinity": {"a": 1}}}
    assert not normalize.is_subset(desired, live)
    assert normalize.with_removals(desired, live) == {
        "affinity": {"nodeAffinity": {"a": 1, "b": None}, "podAntiAffinity": None}}
    # Elsewhere extra live keys (server defaults) are fine.
    assert normalize.is_subset({"spec": {"x": 1}}, {"spec": {"x": 1, "default": 2}})
