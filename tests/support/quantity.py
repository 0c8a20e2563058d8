"""Resource quantities as apimachinery (k8s.io/apimachinery/pkg/api/resource) canonicalises them.

The emulator's own implementation, written independently of ``gptd_operator.quantity`` on purpose: it is the
oracle the operator's normalisation is tested against, so the two must not share code. Exact arithmetic with
``Fraction``; values are rounded up to nano precision like ``ParseQuantity``; the canonical form follows
``Quantity.CanonicalizeBytes``: BinarySI (``Ki``...) stays binary only for integers with |v| >= 1024, else
it becomes DecimalSI; decimal forms use the largest exponent that is a multiple of 3 with an integer mantissa.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

_RE = re.compile(
    r"^(?P<sign>[+-]?)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$"
)
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_BY_EXP = {v: k for k, v in _DECIMAL.items()}
_BINARY_BY_EXP = {v: k for k, v in _BINARY.items()}


class InvalidQuantity(ValueError):
    pass


def parse(value: Any) -> tuple[Fraction, str]:
    """(value, format) with format one of DecimalSI, BinarySI, DecimalExponent."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidQuantity(f"quantities must match the regular expression: got {value!r}")
    text = repr(value) if isinstance(value, float) else str(value)
    m = _RE.match(text)
    if not m:
        raise InvalidQuantity(
            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        )
    number = Fraction(m.group("num"))
    if m.group("sign") == "-":
        number = -number
    if m.group("exp"):
        number *= Fraction(10) ** int(m.group("exp")[1:])
        fmt = "DecimalExponent"
    elif m.group("suffix") in _BINARY:
        number *= 2 ** _BINARY[m.group("suffix")]
        fmt = "BinarySI"
    else:
        number *= Fraction(10) ** _DECIMAL[m.group("suffix") or ""]
        fmt = "DecimalSI"
    # ParseQuantity rounds up to the nearest nano unit.
    nanos = number * 10**9
    number = Fraction(math.ceil(nanos), 10**9)
    return number, fmt


def canonical(value: Any) -> str:
    number, fmt = parse(value)
    if number == 0:
        return "0"
    if fmt == "BinarySI" and (abs(number) < 1024 or number.denominator != 1):
        fmt = "DecimalSI"
    if fmt == "BinarySI":
        mantissa, exp = int(number), 0
        while exp < 60 and mantissa % 1024 == 0:
            mantissa //= 1024
            exp += 10
        return f"{mantissa}{_BINARY_BY_EXP.get(exp, '')}"
    # decimal: the largest exponent (multiple of 3, >= -9) leaving an integer mantissa
    exp = -9
    mantissa = number * 10**9
    assert mantissa.denominator == 1
    m = int(mantissa)
    while m % 1000 == 0 and exp < 18 + (1000 if fmt == "DecimalExponent" else 0):
        m //= 1000
        exp += 3
    if fmt == "DecimalExponent":
        return f"{m}e{exp}" if exp else str(m)
    return f"{m}{_DECIMAL_BY_EXP[exp]}"
