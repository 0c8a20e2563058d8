"""Opt-in masking of personal data and secrets (`--redact email,phone,...`, env `GPTD_REDACT`).

Prompts are masked before they are tokenized (the model never sees the value) and outputs before the client
gets them. Each rule is a pattern plus, where the format has one, its check digit, so ordinary numbers stay:

| entity         | mask               | rule                                                                     |
|----------------|--------------------|--------------------------------------------------------------------------|
| `email`        | `[EMAIL]`          | local@domain.tld; local part ≤ 64, no leading/trailing/double dot       |
| `phone`        | `[PHONE]`          | `+CC` and 8-15 digits; or (NNN) NNN-NNNN / NNN-NNN-NNNN style with 10    |
|                |                    | digits and one kind of separator; or a Chinese mobile 1[3-9]NNNNNNNNN    |
| `creditCard`   | `[CREDIT_CARD]`    | 13-19 digits starting 2-6, one kind of separator (space or dash) or     |
|                |                    | none, valid Luhn checksum                                                |
| `ipAddress`    | `[IP_ADDRESS]`     | dotted-quad IPv4 or IPv6 that Python's `ipaddress` accepts              |
| `iban`         | `[IBAN]`           | country code + 2 check digits + BBAN (spaces every 4 allowed), the       |
|                |                    | country's length where known, ISO 13616 mod-97 = 1                       |
| `cnResidentId` | `[CN_RESIDENT_ID]` | 18 characters: region, a real birth date 1900-2099, sequence, ISO 7064   |
|                |                    | MOD 11-2 check character (0-9 or X)                                      |
| `secretLike`   | `[SECRET]`         | well-known token formats (sk-…, AKIA…, ghp_…, xox?-…, AIza…, glpat-…,  |
|                |                    | JWTs) and the value after password/secret/token/api_key `=` or `:`      |

Overlaps go to the rule listed first in `PRIORITY`. Streams hold back a bounded tail (`StreamRedactor`) so a
value split across chunks is still masked."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date

ENTITIES = ("email", "phone", "creditCard", "ipAddress", "iban", "cnResidentId", "secretLike")
MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "creditCard": "[CREDIT_CARD]", "ipAddress": "[IP_ADDRESS]",
         "iban": "[IBAN]", "cnResidentId": "[CN_RESIDENT_ID]", "secretLike": "[SECRET]"}
# Which rule wins where two matches overlap (e.g. a card number inside a "token=" value: the secret).
PRIORITY = ("secretLike", "email", "iban", "cnResidentId", "creditCard", "ipAddress", "phone")

# Streaming hold-back. Every match that contains whitespace is at most SPACED_MAX characters long (each
# pattern below is bounded so); a match without whitespace lies inside one whitespace-free run, held whole up
# to RUN_MAX characters (an e-mail address is at most 254). See StreamRedactor.
SPACED_MAX = 96
RUN_MAX = 256


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 lengths for the countries most often seen (others: any length 15-34 passes if mod-97 holds).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24,
    "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "QA": 29, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TR": 26, "UA": 29,
}


def iban_ok(raw: str) -> bool:
    iban = raw.replace(" ", "")
    want = IBAN_LENGTHS.get(iban[:2])
    if (want is not None and len(iban) != want) or not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def cn_resident_id_ok(raw: str) -> bool:
    s = raw.upper()
    if s[0] not in "123456789":  # region codes start 1-6 and 8 (Hong Kong/Macao/Taiwan residents' 81/82/83)
        return False
    try:
        born = date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2099:
        return False
    return _CN_CHECK[sum(int(c) * w for c, w in zip(s[:17], _CN_WEIGHTS, strict=True)) % 11] == s[17]


def _email_ok(m: re.Match[str]) -> bool:
    local = m.group(0).split("@", 1)[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


def _card_ok(m: re.Match[str]) -> bool:
    raw = m.group(0)
    seps = {c for c in raw if not c.isdigit()}
    digits = re.sub(r"\D", "", raw)
    return len(seps) <= 1 and 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _ip_ok(m: re.Match[str]) -> bool:
    try:
        ipaddress.ip_address(m.group(0))
    except ValueError:
        return False
    return True


def _phone_ok(m: re.Match[str]) -> bool:
    raw = m.group(0)
    digits = re.sub(r"\D", "", raw)
    if raw.startswith("+"):
        return 8 <= len(digits) <= 15
    if re.fullmatch(r"1[3-9]\d{9}", raw):  # Chinese mobile number
        return True
    seps = {c for c in re.sub(r"[\d()]", "", raw)}
    return len(digits) == 10 and len(seps - {" "}) <= 1 and (raw.startswith("(") or len(seps) == 1)


@dataclass(frozen=True)
class Rule:
    entity: str
    pattern: re.Pattern[str]
    valid: Callable[[re.Match[str]], bool] = lambda m: True
    group: int | str = 0  # the part that is masked (secrets: the value after "password=")


_SECRET = re.compile(
    r"(?<![\w-])(?:"
    r"(?:sk|rk|pk)-(?:[a-z]+-)?(?=[A-Za-z0-9_-]{0,200}\d)(?=[A-Za-z0-9_-]{0,200}[A-Za-z])[A-Za-z0-9_-]{20,200}"
    r"|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,200}|xox[abprs]-[A-Za-z0-9-]{10,200}|AIza[0-9A-Za-z_-]{35}"
    r"|glpat-[A-Za-z0-9_-]{20,200}|eyJ[A-Za-z0-9_-]{8,200}\.eyJ[A-Za-z0-9_-]{8,200}\.[A-Za-z0-9_-]{8,200}"
    r")(?![\w-])"
)
_SECRET_ASSIGNED = re.compile(
    r"(?i)\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)[\"']?[ \t]{0,2}[:=][ \t]{0,2}[\"']?"
    r"(?P<v>[^\s\"',;]{6,64})"
)

RULES: dict[str, tuple[Rule, ...]] = {
    "secretLike": (Rule("secretLike", _SECRET), Rule("secretLike", _SECRET_ASSIGNED, group="v")),
    "email": (Rule("email", re.compile(
        r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}"
        r"[A-Za-z]{2,24}(?![\w-]|\.\w)"), _email_ok),),
    "iban": (Rule("iban", re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?:[A-Z0-9]{4}|(?: [A-Z0-9]{4})){2,7}"
                                     r"(?: ?[A-Z0-9]{1,4})?(?![\w])"), lambda m: iban_ok(m.group(0))),),
    "cnResidentId": (Rule("cnResidentId", re.compile(r"(?<![\w])\d{17}[\dXx](?![\w])"),
                          lambda m: cn_resident_id_ok(m.group(0))),),
    "creditCard": (Rule("creditCard", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w]|-\d)"), _card_ok),),
    "ipAddress": (
        Rule("ipAddress", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"), _ip_ok),
        Rule("ipAddress", re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*[0-9A-Fa-f])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                                     r"[0-9A-Fa-f]{0,4}(?![\w:])"), _ip_ok),
    ),
    "phone": (Rule("phone", re.compile(
        r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}[ .-]?\d{2,4}"
        r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[ .-]\d{3}[ .-]\d{4}|1[3-9]\d{9})(?![\w]|[.-]\d)"), _phone_ok),),
}


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    entity: str
    anchor: int  # where the whole match starts (before `start` when only a group is masked: "password=")


def parse_entities(value: str | Iterable[str]) -> tuple[str, ...]:
    """`email,phone` (or a list) → entity names, checked; ValueError names the unknown ones."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    unknown = [n for n in names if n not in ENTITIES]
    if unknown:
        raise ValueError(f"unknown entity {', '.join(unknown)}; known: {', '.join(ENTITIES)}")
    return names


class Redactor:
    """Masks the configured entities. `on_mask(entity)` is called once per masked value (metrics)."""

    def __init__(self, entities: Iterable[str], on_mask: Callable[[str], None] | None = None):
        wanted = set(parse_entities(entities))
        self.entities = tuple(e for e in ENTITIES if e in wanted)
        self._rules = [r for e in PRIORITY if e in wanted for r in RULES[e]]
        self._on_mask = on_mask

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping matches, earlier-priority rules first, sorted by position."""
        chosen: list[Span] = []
        for rule in self._rules:
            for m in rule.pattern.finditer(text):
                start, end = m.span(rule.group)
                if start == end or not rule.valid(m):
                    continue
                if all(end <= s.start or start >= s.end for s in chosen):
                    chosen.append(Span(start, end, rule.entity, m.start()))
        return sorted(chosen, key=lambda s: s.start)

    def _mask(self, text: str, spans: Iterable[Span], lo: int = 0, hi: int | None = None) -> str:
        hi = len(text) if hi is None else hi
        out, pos = [], lo
        for s in spans:
            out.append(text[pos:s.start])
            out.append(MASKS[s.entity])
            pos = s.end
            if self._on_mask is not None:
                self._on_mask(s.entity)
        out.append(text[pos:hi])
        return "".join(out)

    def redact(self, text: str) -> str:
        return self._mask(text, self.spans(text))

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts text that arrives in pieces. `feed()` returns what is safe to send now, `flush()` the rest.

    Why the held tail is enough: a match not yet complete touches the end of the buffer. If it contains
    whitespace it is at most SPACED_MAX long, so it starts after `len - SPACED_MAX`; if it does not, it lies
    in the buffer's trailing whitespace-free run (or, for runs over RUN_MAX, within its last RUN_MAX
    characters). Text before the cut can therefore no longer become part of a match, and is masked final."""

    def __init__(self, redactor: Redactor):
        self._r = redactor
        self._buf = ""
        self._ctx = 0  # leading characters of _buf already sent (kept as context for the patterns' lookbehind)

    def _cut(self) -> int:
        n = len(self._buf)
        run = n
        while run > 0 and not self._buf[run - 1].isspace():
            run -= 1
        return max(self._ctx, min(n - SPACED_MAX, max(run, n - RUN_MAX)))

    def _emit(self, cut: int) -> str:
        spans = [s for s in self._r.spans(self._buf) if s.anchor >= self._ctx]
        moved = True
        while moved:  # never cut through a match, its keyword included (it is sent whole, later)
            moved = False
            for s in spans:
                if s.anchor < cut < s.end:
                    cut, moved = s.anchor, True
        out = self._r._mask(self._buf, [s for s in spans if s.end <= cut], self._ctx, cut)
        keep = min(cut, 1)
        self._buf, self._ctx = self._buf[cut - keep:], keep
        return out

    def feed(self, text: str) -> str:
        self._buf += text
        return self._emit(self._cut())

    def flush(self) -> str:
        return self._emit(len(self._buf))
