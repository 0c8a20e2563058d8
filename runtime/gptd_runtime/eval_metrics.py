"""Scores for the evaluator, in plain Python (the runtime image carries no scikit-learn).

Definitions follow scikit-learn and seqeval exactly (tests compare against both on the same predictions):
- labels: the sorted union of gold and predicted labels (a label only ever predicted counts, with support 0);
- per label: precision = tp / predicted, recall = tp / gold, f1 = 2 tp / (predicted + gold); 0.0 where the
  denominator is 0 (scikit-learn's zero_division=0, seqeval's default);
- macro: unweighted mean over labels; weighted: mean weighted by gold support; micro: from summed counts;
  averaged f1 is the mean of per-label f1 (not the harmonic mean of averaged precision and recall), as both do;
- token-classification: an entity is (row, start, end, label) and counts only on an exact span + label
  match (seqeval's strict mode); accuracy is per character on IOB2 tags (seqeval's accuracy_score with one
  token per character);
- text-generation: exactMatch / contains after case folding and collapsing whitespace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

AVERAGES = ("macro", "micro", "weighted")
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
GENERATION_METRICS = ("exactMatch", "contains")


@dataclass(frozen=True)
class LabelScore:
    precision: float
    recall: float
    f1: float
    support: int

    def as_dict(self) -> dict[str, float | int]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "support": self.support}


@dataclass(frozen=True)
class Scores:
    per_label: dict[str, LabelScore]
    averages: dict[str, LabelScore]  # "macro" | "micro" | "weighted"; support = total gold count
    accuracy: float

    def score(self, metric: str, average: str) -> float:
        if metric == "accuracy":
            return self.accuracy
        return getattr(self.averages[average], metric)


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _from_counts(tp: Counter[str], predicted: Counter[str], gold: Counter[str], accuracy: float) -> Scores:
    labels = sorted(set(predicted) | set(gold))
    per_label = {
        label: LabelScore(_div(tp[label], predicted[label]), _div(tp[label], gold[label]),
                          _div(2 * tp[label], predicted[label] + gold[label]), gold[label])
        for label in labels
    }
    total = sum(gold.values())
    scores = list(per_label.values())
    n = len(scores)

    def mean(field: str, weighted: bool) -> float:
        if weighted:
            return _div(sum(getattr(s, field) * s.support for s in scores), total)
        return _div(sum(getattr(s, field) for s in scores), n)

    sum_tp, sum_pred = sum(tp.values()), sum(predicted.values())
    averages = {
        "macro": LabelScore(mean("precision", False), mean("recall", False), mean("f1", False), total),
        "weighted": LabelScore(mean("precision", True), mean("recall", True), mean("f1", True), total),
        "micro": LabelScore(_div(sum_tp, sum_pred), _div(sum_tp, total), _div(2 * sum_tp, sum_pred + total), total),
    }
    return Scores(per_label, averages, accuracy)


def classification_scores(gold: Sequence[str], predicted: Sequence[str]) -> Scores:
    """One label per example (sklearn's precision_recall_fscore_support / accuracy_score)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    tp = Counter(g for g, p in zip(gold, predicted, strict=True) if g == p)
    accuracy = _div(sum(tp.values()), len(gold))
    return _from_counts(tp, Counter(predicted), Counter(gold), accuracy)


Entity = tuple[int, int, str]  # (start, end, label): character offsets, end exclusive


def iob2_tags(length: int, entities: Iterable[Entity]) -> list[str]:
    """One IOB2 tag per character. Entities must be disjoint (the dataset and the evaluator ensure it)."""
    tags = ["O"] * length
    for start, end, label in entities:
        tags[start] = f"B-{label}"
        for i in range(start + 1, end):
            tags[i] = f"I-{label}"
    return tags


def entity_scores(texts: Sequence[str], gold: Sequence[Iterable[Entity]],
                  predicted: Sequence[Iterable[Entity]]) -> Scores:
    """Entity-level strict span + label matching over rows (seqeval mode='strict', scheme=IOB2)."""
    if not len(texts) == len(gold) == len(predicted):
        raise ValueError("texts, gold and predicted must have one entry per row")
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    same = chars = 0
    for text, g_row, p_row in zip(texts, gold, predicted, strict=True):
        g, p = set(g_row), set(p_row)
        n_gold.update(label for _, _, label in g)
        n_pred.update(label for _, _, label in p)
        tp.update(label for _, _, label in g & p)
        g_tags, p_tags = iob2_tags(len(text), g), iob2_tags(len(text), p)
        same += sum(a == b for a, b in zip(g_tags, p_tags, strict=True))
        chars += len(text)
    return _from_counts(tp, n_pred, n_gold, _div(same, chars))


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def generation_score(metric: str, expected: Sequence[str], outputs: Sequence[str]) -> float:
    """Share of rows whose output matches (exactMatch) or contains (contains) the expected text."""
    if metric not in GENERATION_METRICS:
        raise ValueError(f"unknown generation metric {metric!r}")
    hits = [
        normalize(o) == normalize(e) if metric == "exactMatch" else normalize(e) in normalize(o)
        for e, o in zip(expected, outputs, strict=True)
    ]
    return _div(sum(hits), len(hits))
