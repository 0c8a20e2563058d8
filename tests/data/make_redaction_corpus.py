"""How tests/data/redaction_corpus.jsonl was made (run once; the file is committed): labelled lines with
positives for each entity of runtime/gptd_runtime/redaction.py and near-misses (numbers that look alike but
fail the check digit, dates, versions, hashes...). Check digits here are computed by this script's own code,
not by the module under test. Each line: {"text": ..., "entities": [[entity, value], ...]}.

    python tests/data/make_redaction_corpus.py > tests/data/redaction_corpus.jsonl
"""

from __future__ import annotations

import json
import random
import string

rng = random.Random(20261201)
lines: list[tuple[str, list[list[str]]]] = []


def add(template: str, *ents: tuple[str, str]) -> None:
    lines.append((template.format(*[v for _, v in ents]), [[e, v] for e, v in ents]))


def luhn_digit(body: str) -> str:
    s = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        s += d // 10 + d % 10
    return str((10 - s % 10) % 10)


def card(prefix: str, length: int, sep: str = "") -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    num = body + luhn_digit(body)
    if not sep:
        return num
    groups = [num[:4], num[4:10], num[10:]] if length == 15 else [num[i:i + 4] for i in range(0, length, 4)]
    return sep.join(groups)


def bad_card(prefix: str, length: int, sep: str = "") -> str:
    good = card(prefix, length)
    bad = good[:-1] + str((int(good[-1]) + rng.randint(1, 9)) % 10)
    return sep.join(bad[i:i + 4] for i in range(0, length, 4)) if sep else bad


IBAN_SPECS = {"DE": (22, "n"), "GB": (22, "a4n"), "FR": (27, "n"), "NL": (18, "a4n"), "ES": (24, "n"),
              "IT": (27, "a1n"), "CH": (21, "n"), "BE": (16, "n"), "AT": (20, "n"), "PL": (28, "n"),
              "SE": (24, "n"), "NO": (15, "n"), "IE": (22, "a4n"), "PT": (25, "n")}


def iban_check(cc: str, bban: str) -> str:
    num = "".join(str(int(c, 36)) for c in bban + cc + "00")
    return f"{98 - int(num) % 97:02d}"


def iban(cc: str, grouped: bool, corrupt: bool = False) -> str:
    length, kind = IBAN_SPECS[cc]
    n_letters = int(kind[1]) if kind.startswith("a") else 0
    bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(n_letters))
    bban += "".join(rng.choice(string.digits) for _ in range(length - 4 - n_letters))
    check = iban_check(cc, bban)
    if corrupt:
        check = f"{(int(check) + rng.randint(1, 50)) % 97 + 2:02d}" if check != "00" else "11"
    s = cc + check + bban
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4)) if grouped else s


W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id(corrupt: str = "") -> str:
    region = rng.choice(["110105", "310104", "440305", "510107", "330106", "420111", "610113", "210102"])
    y, m, d = rng.randint(1950, 2010), rng.randint(1, 12), rng.randint(1, 28)
    if corrupt == "date":
        m, d = 13, 5
    body = f"{region}{y:04d}{m:02d}{d:02d}{rng.randint(0, 999):03d}"
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, W, strict=True)) % 11]
    if corrupt == "check":
        check = rng.choice([c for c in "0123456789X" if c != check])
    return body + check


FIRST = ["alice", "bob", "chen.wei", "maria-jose", "o.connor", "li_na", "sam+news", "j.doe", "anna.k", "x"]
DOMAINS = ["example.org", "mail.example.com", "uni-heidelberg.de", "corp.co.uk", "example.cn", "ops.example.io"]
for i in range(32):
    e = f"{rng.choice(FIRST)}{rng.randint(1, 99) if i % 3 else ''}@{rng.choice(DOMAINS)}"
    if i % 7 == 0:
        e = e.upper()
    t = ["Please reply to {}.", "From: Alice <{}>", "cc {} when done", "({})", "mailto:{}",
         "email: {}, thanks", "Reach me at {} tomorrow", "{}"][i % 8]
    add(t, ("email", e))

PHONES = ["+1 415 555 0134", "+1-202-555-0173", "(212) 555-0199", "415.555.0134", "+44 20 7946 0958",
          "+86 138 0013 8000", "13912345678", "+49 30 12345678", "+33 1 42 68 53 00", "212-555-0147",
          "+81 3-1234-5678", "+61 2 9374 4000", "15800001111", "(646) 555 0123", "+91 98765 43210",
          "+34 912 345 678", "+7 495 123-45-67", "+1 (604) 555-0188", "18612345678", "650 555 0100",
          "+852 2123 4567", "+39 06 1234 5678", "+46 8 123 456 78", "+65 6123 4567", "303-555-0110",
          "+27 21 123 4567", "+55 11 91234-5678", "+31 20 123 4567", "+353 1 234 5678", "(917) 555-0175"]
for i, p in enumerate(PHONES):
    add(["Call {} any time.", "Tel: {}", "my number is {}", "phone {} (mobile)", "{}"][i % 5], ("phone", p))

CARDS = [("4", 16, " "), ("4", 16, ""), ("4", 16, "-"), ("51", 16, " "), ("55", 16, ""), ("2221", 16, " "),
         ("2720", 16, "-"), ("34", 15, " "), ("37", 15, ""), ("6011", 16, " "), ("65", 16, ""), ("4", 13, ""),
         ("4", 19, "")]
for i in range(32):
    prefix, length, sep = CARDS[i % len(CARDS)]
    add(["card {} exp 12/29", "Charge it to {}.", "number: {}", "pay with {} please", "{}"][i % 5],
        ("creditCard", card(prefix, length, sep)))
for known in ("4111 1111 1111 1111", "5500 0000 0000 0004", "378282246310005", "6011111111111117"):
    add("test card {}", ("creditCard", known))

IPS = ["192.168.1.20", "10.0.0.1", "172.16.254.3", "8.8.8.8", "203.0.113.77", "255.255.255.0", "127.0.0.1",
       "2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1",
       "100.64.12.9", "198.51.100.14", "2606:4700:4700::1111", "169.254.10.10"]
for i in range(26):
    add(["from {} at 09:00", "host {}", "GET / from {}", "client={}", "ssh admin@{}"][i % 5] if i % 5 != 4
        else "ping {}", ("ipAddress", IPS[i % len(IPS)]))

for i in range(26):
    cc = list(IBAN_SPECS)[i % len(IBAN_SPECS)]
    add(["IBAN {}", "transfer to {} by Friday", "account: {}", "Bank: {} (EUR)"][i % 4], ("iban", iban(cc, i % 2 == 0)))
for known in ("GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR1420041010050500013M02606"):
    add("registry example {}", ("iban", known))

for i in range(26):
    add(["身份证号 {}", "ID: {}", "resident id {} on file", "{}"][i % 4], ("cnResidentId", cn_id()))
add("example id {}", ("cnResidentId", "11010519491231002X"))

SECRETS = ["sk-proj-" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40)),
           "sk-" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(48)),
           "AKIAIOSFODNN7EXAMPLE",
           "ghp_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(36)),
           "xoxb-123456789012-abcdefghijkl", "AIza" + "".join(rng.choice(string.ascii_letters + string.digits)
                                                               for _ in range(35)),
           "glpat-" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(20)),
           "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"]
for i in range(16):
    add(["export OPENAI_API_KEY={}", "key: {}", "Authorization: Bearer {}", "use {} for CI"][i % 4],
        ("secretLike", SECRETS[i % len(SECRETS)]))
for v in ("hunter2!x", "S3cr3tP@ss", "correct-horse-battery", "t0ken_value_9"):
    add("password={}", ("secretLike", v))
    add('"api_key": "{}"', ("secretLike", v))

# mixed lines
for _ in range(8):
    e = f"{rng.choice(FIRST)}@{rng.choice(DOMAINS)}"
    p = rng.choice(PHONES)
    c = card("4", 16, " ")
    add("Name: Jo, email {}, phone {}, card {}.", ("email", e), ("phone", p), ("creditCard", c))

# near-misses: nothing to mask
NEAR = [
    "Version 1.2.3 released on 2026-12-01.", "Meeting at 12:30:45 in room 101.", "Order #123456789 shipped.",
    "The total is 1,234,567.89 EUR.", "ISBN 978-3-16-148410-0", "Call extension 4567.", "Postcode 10115 Berlin",
    "Timestamp 1700000000 in logs", "Build 20261201.3 passed", "user@localhost is not an address",
    "Follow @gptd on social media", "a@b", "sk-learn is a python package", "the task-force met",
    "999.1.2.3 is not an ip", "1.2.3 is a version", "commit 3f2a9c1e7b4d5a6f8e9d0c1b2a3f4e5d6c7b8a9f",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "pi is 3.14159265358979", "the year 2026 and 1999", "score 12/29 on the test", "chapter 11, section 2.4",
    "SKU 0000-1111-2222", "temperature 36.6 C", "ratio 16:9", "route 66", "tracking 1Z999AA10123456784",
    "password policy: 12 characters", "the token bucket refills", "secret santa on friday",
    "phone numbers have 10 digits", "price 49.99", "serial AB-1234-XYZ", "call 911", "555-0134",
    "Invoice INV-2026-0042", "lat 52.5200, lon 13.4050", "MAC 00:1A:2B:3C:4D:5E", "time 10:20", "20261201",
]
for t in NEAR:
    add(t.replace("{", "{{").replace("}", "}}"))
for i in range(16):
    lines.append((f"not a card: {bad_card('4', 16, ' ' if i % 2 else '')}", []))
for i in range(12):
    cc = list(IBAN_SPECS)[i % len(IBAN_SPECS)]
    lines.append((f"bad iban {iban(cc, i % 2 == 0, corrupt=True)}", []))
for i in range(12):
    lines.append((f"id {cn_id('check' if i % 2 else 'date')}", []))
for _ in range(8):
    digits = "".join(rng.choice(string.digits) for _ in range(rng.choice([7, 8, 9, 12])))
    lines.append((f"reference number {digits}", []))

# Known weak spots, labelled as a person would: they keep the figures honest (the rules miss or over-match them).
HARD = [
    ("UK office 020 7946 0958", [["phone", "020 7946 0958"]]),  # national format without +CC: missed
    ("dial 0049 30 12345678", [["phone", "0049 30 12345678"]]),  # 00 international prefix: missed
    ("mail bob (at) example (dot) org", [["email", "bob (at) example (dot) org"]]),  # obfuscated: missed
    ("firmware 10.2.0.1 installed", []),  # a version that is a valid IPv4 address: over-matched
    ("account 1234567812345670 closed", []),  # Luhn-valid, but no card network starts with 1: left alone
    ("account 5123456789012346 closed", []),  # a Luhn-valid account number (1 in 10 are): over-matched
    ("call me on 555 0134", [["phone", "555 0134"]]),  # 7-digit local number: missed
]
lines.extend((t, e) for t, e in HARD)

for text, ents in lines:
    print(json.dumps({"text": text, "entities": ents}, ensure_ascii=False))
