"""Pure: desired objects in the form the API server returns them, and the comparison with live objects.

The API server rewrites what it is sent: ``omitempty`` fields with empty values vanish (``env[].value: ""``,
``tolerations[].value: ""``, empty lists inside ``affinity``, ``nodeSelector: {}``), and every resource
quantity comes back canonical (``"0.5"`` → ``"500m"``, ``"1.5m"`` → ``"1500u"``, ``1000`` → ``"1k"``, ``1`` →
``"1"``). A desired object compared as sent would never equal the live one, and every resync would PATCH.
So ``server_form`` rewrites the desired object the same way first (empties become ``None``, which means
"absent" below and "remove" in a merge patch), and quantities compare by value on top of that.

Comparison (``is_subset``): extra keys in the live object are fine (server defaults, other controllers'
fields), except in what gptd owns entirely: the string maps in ``EXACT_MAPS`` (a hand-added nodeSelector
entry or resources key is a difference and is removed) and the pass-through ``affinity`` (compared and
replaced whole at every depth, so a term removed from the spec leaves the Deployment). Lists are always
ours entirely: a merge patch replaces them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

# Maps gptd owns entirely: a key someone added is a difference, and is removed.
EXACT_MAPS = frozenset({"selector", "matchLabels", "nodeSelector", "limits", "requests"})
# Pass-through objects owned entirely at every depth (replaced whole).
EXACT_TREES = frozenset({"affinity"})
# map[string]string fields: copied as they are (a "" value in a map is kept by the server), dropped when empty.
STRING_MAPS = frozenset({"labels", "annotations", "nodeSelector", "matchLabels", "selector"})
QUANTITY_MAPS = frozenset({"limits", "requests"})  # map values are quantities
QUANTITY_KEYS = frozenset({"divisor", "sizeLimit", "averageValue"})  # scalar quantities

_QUANTITY_RE = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_SUFFIX = {v: k for k, v in _DECIMAL.items()} | {0: ""}
_BINARY_SUFFIX = {v: k for k, v in _BINARY.items()} | {0: ""}


# --------------------------------------------------------------------------------------------- quantities


def _parse(value: Any) -> tuple[Decimal, str] | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    match = _QUANTITY_RE.match(str(value))
    if not match:
        return None
    number, exponent, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation:
        return None
    if exponent:
        return amount.scaleb(int(exponent[1:])), "exp"
    if suffix in _BINARY:
        return amount * (Decimal(1024) ** _BINARY[suffix]), "bin"
    return amount.scaleb(_DECIMAL.get(suffix or "", 0)), "dec"


def quantity(value: Any) -> Decimal | None:
    """A quantity's value (rounded up to nano units, as the API server does), or None."""
    parsed = _parse(value)
    if parsed is None:
        return None
    return parsed[0].scaleb(9).to_integral_value(rounding="ROUND_CEILING").scaleb(-9)


def canonical_quantity(value: Any) -> Any:
    """apimachinery's canonical string for a quantity (``Quantity.CanonicalizeBytes``); ``value`` when invalid."""
    parsed = _parse(value)
    amount = quantity(value)
    if parsed is None or amount is None:
        return value
    fmt = parsed[1]
    if amount == 0:
        return "0"
    if fmt == "bin" and (abs(amount) < 1024 or amount != amount.to_integral_value()):
        fmt = "dec"  # small or fractional binary quantities are shown in decimal SI
    if fmt == "bin":
        mantissa, power = int(amount), 0
        while power < 6 and mantissa % 1024 == 0:
            mantissa, power = mantissa // 1024, power + 1
        return f"{mantissa}{_BINARY_SUFFIX[power]}"
    # Decimal: an integer mantissa and the largest exponent that is a multiple of 3 (nano at the least).
    mantissa, exp = int(amount.scaleb(9)), -9
    while mantissa % 1000 == 0 and (exp < 18 or fmt == "exp"):
        mantissa, exp = mantissa // 1000, exp + 3
    if fmt == "exp":
        return f"{mantissa}e{exp}" if exp else str(mantissa)
    return f"{mantissa}{_DECIMAL_SUFFIX[exp]}"


# -------------------------------------------------------------------------------------------- server form


def server_form(obj: Any, key: str | None = None) -> Any:
    """``obj`` as the API server would store it; omitted (omitempty) values become ``None``."""
    if obj is None or obj == "" or obj == []:
        return None
    if isinstance(obj, Mapping):
        if key in QUANTITY_MAPS:
            return {k: canonical_quantity(v) for k, v in obj.items()} or None
        if key in STRING_MAPS and all(isinstance(v, str | None) for v in obj.values()):
            return dict(obj) or None
        return {k: server_form(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [v if isinstance(v, str) else server_form(v, key) for v in obj]  # "" in a list is kept
    if key in QUANTITY_KEYS:
        return canonical_quantity(obj)
    return obj


# ---------------------------------------------------------------------------------------------- comparison


def _same_scalar(desired: Any, live: Any, key: str | None, parent: str | None) -> bool:
    if desired == live:
        return True
    if key in QUANTITY_KEYS or parent in QUANTITY_MAPS:
        a, b = quantity(desired), quantity(live)
        return a is not None and a == b
    return False


def is_subset(desired: Any, live: Any, key: str | None = None, *, exact: bool = False,
              parent: str | None = None) -> bool:
    """Whether ``live`` already has everything ``desired`` says; ``None`` in desired means "absent"."""
    if desired is None:
        return live is None
    exact = exact or key in EXACT_TREES
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        if (exact or key in EXACT_MAPS) and set(live) - {k for k, v in desired.items() if v is not None}:
            return False
        return all(is_subset(v, live.get(k), k, exact=exact, parent=key) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return False
        return all(is_subset(d, lv, key, exact=exact, parent=parent) for d, lv in zip(desired, live, strict=True))
    return _same_scalar(desired, live, key, parent)


def with_removals(desired: Any, live: Any, key: str | None = None, *, exact: bool = False) -> Any:
    """``desired`` as a merge patch that also removes keys someone added where gptd owns everything."""
    exact = exact or key in EXACT_TREES
    if isinstance(desired, Mapping):
        sub = live if isinstance(live, Mapping) else {}
        out = {k: with_removals(v, sub.get(k), k, exact=exact) for k, v in desired.items()}
        if exact or key in EXACT_MAPS:
            out.update({k: None for k in sub if k not in out})
        return out
    if isinstance(desired, list):
        return strip_none(desired)  # replaced whole: a null inside would mean nothing
    return desired


def strip_none(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [strip_none(v) for v in obj]
    return obj
