"""Token labels -> entities, the way transformers' token-classification pipeline does with
`aggregation_strategy="simple"`, minus three artefacts it has on byte-level tokenizers (GPT-2 style):

* a character split into several byte tokens (CJK, emoji) gives the pipeline several entities over the same
  character span, and words like "\\ufffd": here such tokens first form one unit (their label probabilities
  averaged), so entities never overlap and never split a character;
* a token's offsets include the space before the word ("Ġword"): here spans and words exclude surrounding
  whitespace, and whitespace-only entities are dropped;
* `word` is the text's own characters (`text[start:end]`), not re-detokenized tokens.

Otherwise the same rules: each unit takes its argmax label; a unit continues the previous entity when it has
the same type and is not a B- tag; "O" (and labels without a B-/I- prefix) group like any type and "O"
groups are dropped; an entity's score is the mean of its units' scores. Pure: unit-tested against the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # like the pipeline: a bare label continues a group of the same label


def _units(
    text: str, offsets: Sequence[tuple[int, int]], probs: Sequence[Sequence[float]], skip: Sequence[bool]
) -> list[tuple[int, int, list[float]]]:
    """(start, end, mean label probabilities) per unit: tokens sharing characters merged into one."""
    groups: list[tuple[int, int, list[Sequence[float]]]] = []
    for (start, end), p, s in zip(offsets, probs, skip, strict=True):
        if s or start >= end:
            continue
        if groups and start < groups[-1][1]:  # overlaps the previous token: bytes of the same character(s)
            g_start, g_end, ps = groups[-1]
            groups[-1] = (g_start, max(g_end, end), [*ps, p])
        else:
            groups.append((start, end, [p]))
    return [(start, end, [sum(col) / len(ps) for col in zip(*ps, strict=True)]) for start, end, ps in groups]


def aggregate_simple(
    text: str,
    offsets: Sequence[tuple[int, int]],
    probs: Sequence[Sequence[float]],
    id2label: dict[int, str],
    skip: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """Entities ({entity_group, score, word, start, end}, character offsets into `text`), in text order.
    `probs[i]` are token i's label probabilities; `skip[i]` marks special/padding tokens."""
    skip = skip if skip is not None else [False] * len(offsets)
    groups: list[tuple[str, list[tuple[int, int, float]]]] = []
    last_type: str | None = None
    for start, end, p in _units(text, offsets, probs, skip):
        best = max(range(len(p)), key=p.__getitem__)
        bi, kind = _tag(id2label[best])
        if groups and kind == last_type and bi != "B":
            groups[-1][1].append((start, end, p[best]))
        else:
            groups.append((kind, [(start, end, p[best])]))
        last_type = kind
    entities = []
    for kind, members in groups:
        if kind == "O":
            continue
        start, end = members[0][0], members[-1][1]
        piece = text[start:end]
        if not piece.strip():
            continue  # whitespace only
        start, end = start + len(piece) - len(piece.lstrip()), end - (len(piece) - len(piece.rstrip()))
        entities.append({"entity_group": kind, "score": sum(m[2] for m in members) / len(members),
                         "word": text[start:end], "start": start, "end": end})
    return entities
