"""Precision and recall of each redaction rule on the labelled corpus; prints the table docs/security.md quotes.

    .venv/bin/python benchmarks/redaction_eval.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptd_runtime.redaction import ENTITIES, Redactor

from tests.support.redaction import load_corpus, score


def main() -> None:
    corpus = load_corpus()
    scores, misses = score(corpus)
    positives = sum(1 for _, labels in corpus if labels)
    print(f"corpus: {len(corpus)} lines ({positives} with entities, {len(corpus) - positives} near-misses only)")
    print("| entity | labelled | TP | FP | FN | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for e in ENTITIES:
        s = scores[e]
        print(f"| `{e}` | {s.tp + s.fn} | {s.tp} | {s.fp} | {s.fn} | {s.precision:.3f} | {s.recall:.3f} |")
    text = "\n".join(t for t, _ in corpus)
    r = Redactor(ENTITIES)
    t0 = time.perf_counter()
    for _ in range(20):
        r.redact(text)
    dt = (time.perf_counter() - t0) / 20
    print(f"\nall rules over the whole corpus ({len(text)} chars): {dt * 1000:.1f} ms "
          f"({len(text) / dt / 1e6:.2f} MB/s)")
    for m in misses:
        print("MISS", m)


if __name__ == "__main__":
    main()
