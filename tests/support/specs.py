"""GPTDeployment specs for the operator's unit tests: the smallest valid spec, with top-level overrides."""

from __future__ import annotations

from typing import Any

from gptd_operator.api import parse_spec


def spec(**over: Any) -> Any:
    raw: dict[str, Any] = {"model": {"uri": "hf://openai-community/gpt2"}}
    raw.update(over)
    return parse_spec(raw)
