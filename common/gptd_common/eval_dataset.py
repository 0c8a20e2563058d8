"""Evaluation datasets: JSON Lines, one example per line, shaped by the model's task. Pure (no torch, no HTTP),
so the operator can refuse a bad dataset with the same messages before it creates any pod. It lives in gptd_common
(shipped in both images): the operator image has no gptd_runtime (nor torch).

- text-classification:  {"text": "...", "label": "POSITIVE"}
- token-classification: {"text": "...", "entities": [{"start": 0, "end": 5, "label": "PER"}]}
  (character offsets into text, end exclusive; spans are trimmed of surrounding whitespace; no overlaps)
- text-generation:      {"prompt": "...", "expected": "...", "max_tokens": 64}  (max_tokens optional)

Blank lines are skipped; other keys (an "id", say) are allowed and ignored. Every row is validated, also
those past `samples`: a file with a broken row is refused whole. Errors name the 1-based line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

TASKS = ("text-classification", "token-classification", "text-generation")
DEFAULT_MAX_TOKENS = 64


class DatasetError(ValueError):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class ClassificationRow:
    line: int
    text: str
    label: str


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: str


@dataclass(frozen=True)
class NerRow:
    line: int
    text: str
    entities: tuple[Span, ...]


@dataclass(frozen=True)
class GenerationRow:
    line: int
    prompt: str
    expected: str
    max_tokens: int


Row = ClassificationRow | NerRow | GenerationRow


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink [start, end) so it neither starts nor ends with whitespace (tokenizers often include the
    leading space of a word in its offsets)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _string(obj: dict[str, Any], key: str, line: int, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DatasetError(f'missing field "{key}"', line)
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f'field "{key}" must be a string, got {type(value).__name__}', line)
    if not allow_empty and not value.strip():
        raise DatasetError(f'field "{key}" is empty', line)
    return value


def _int(value: Any, field: str, line: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f'field "{field}" must be an integer, got {json.dumps(value)}', line)
    return value


def _entities(obj: dict[str, Any], text: str, line: int) -> tuple[Span, ...]:
    if "entities" not in obj:
        raise DatasetError('missing field "entities" (use [] for a text without entities)', line)
    raw = obj["entities"]
    if not isinstance(raw, list):
        raise DatasetError(f'field "entities" must be a list, got {type(raw).__name__}', line)
    spans: list[tuple[int, Span]] = []
    for i, ent in enumerate(raw):
        where = f"entities[{i}]"
        if not isinstance(ent, dict):
            raise DatasetError(f"{where} must be an object with start, end and label", line)
        for key in ("start", "end", "label"):
            if key not in ent:
                raise DatasetError(f'{where} has no "{key}"', line)
        start, end = _int(ent["start"], f"{where}.start", line), _int(ent["end"], f"{where}.end", line)
        label = ent["label"]
        if not isinstance(label, str) or not label.strip():
            raise DatasetError(f"{where}.label must be a non-empty string", line)
        if not 0 <= start < end <= len(text):
            raise DatasetError(f"{where} span [{start}, {end}) is not inside the text (length {len(text)}, "
                               "offsets are characters, end exclusive)", line)
        start, end = trim_span(text, start, end)
        if start == end:
            raise DatasetError(f"{where} covers only whitespace", line)
        spans.append((i, Span(start, end, label)))
    spans.sort(key=lambda s: (s[1].start, s[1].end))
    for (i, a), (j, b) in pairwise(spans):
        if b.start < a.end:
            raise DatasetError(f"entities[{j}] overlaps entities[{i}] (strict span matching needs disjoint "
                               "entities)", line)
    return tuple(span for _, span in spans)


def parse_row(obj: Any, task: str, line: int) -> Row:
    if not isinstance(obj, dict):
        raise DatasetError(f"expected a JSON object, got {type(obj).__name__}", line)
    if task == "text-classification":
        return ClassificationRow(line, _string(obj, "text", line), _string(obj, "label", line))
    if task == "token-classification":
        text = _string(obj, "text", line)
        return NerRow(line, text, _entities(obj, text, line))
    if task == "text-generation":
        prompt = _string(obj, "prompt", line)
        expected = _string(obj, "expected", line)
        max_tokens = _int(obj.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", line)
        if max_tokens < 1:
            raise DatasetError(f'field "max_tokens" must be at least 1, got {max_tokens}', line)
        return GenerationRow(line, prompt, expected, max_tokens)
    raise DatasetError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def parse_dataset(text: str, task: str, samples: int | None = None) -> list[Row]:
    """All rows validated; the first `samples` returned (all when None)."""
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    rows: list[Row] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(f"not valid JSON ({e.msg} at column {e.colno})", number) from None
        rows.append(parse_row(obj, task, number))
    if not rows:
        raise DatasetError("the dataset has no rows")
    return rows if samples is None else rows[:samples]


def load_dataset(path: str | Path, task: str, samples: int | None = None) -> list[Row]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path}: {e.strerror}") from None
    return parse_dataset(text, task, samples)
