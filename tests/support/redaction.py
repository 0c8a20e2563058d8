"""Scoring the redaction rules on the labelled corpus (tests/data/redaction_corpus.jsonl): per entity, true
positives are predicted (entity, exact value) pairs that a line's labels hold."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

from gptd_runtime.redaction import ENTITIES, Redactor

CORPUS = Path(__file__).resolve().parents[1] / "data" / "redaction_corpus.jsonl"


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def load_corpus(path: Path = CORPUS) -> list[tuple[str, list[tuple[str, str]]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["text"], [(e, v) for e, v in r["entities"]]) for r in rows]


def score(corpus: list[tuple[str, list[tuple[str, str]]]]) -> tuple[dict[str, Score], list[str]]:
    """Per-entity scores with every rule on, and the lines where prediction and labels differ."""
    redactor = Redactor(ENTITIES)
    scores = {e: Score() for e in ENTITIES}
    misses = []
    for text, labels in corpus:
        predicted = collections.Counter((s.entity, text[s.start:s.end]) for s in redactor.spans(text))
        wanted = collections.Counter(labels)
        for (entity, _), n in (predicted & wanted).items():
            scores[entity].tp += n
        for (entity, _), n in (predicted - wanted).items():
            scores[entity].fp += n
        for (entity, _), n in (wanted - predicted).items():
            scores[entity].fn += n
        if predicted != wanted:
            misses.append(f"{text!r}: predicted {sorted(predicted)} labelled {sorted(wanted)}")
    return scores, misses
