"""The evaluator: metrics equal to scikit-learn's and seqeval's (strict) on the same predictions, dataset
errors with line numbers, and `python -m gptd_runtime evaluate` against real runtimes serving the tiny
classification / NER / generation models built by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from gptd_common.eval_dataset import DatasetError, NerRow, parse_dataset
from gptd_runtime.eval_metrics import classification_scores, entity_scores, generation_score, normalize
from gptd_runtime.evaluate import EvalOptions, EvaluationError, evaluate
from seqeval import metrics as seqeval_metrics  # the references are dev dependencies: a missing one must fail
from seqeval.scheme import IOB2
from sklearn import metrics as sklearn_metrics

from tests.support.runtime import REPO, ServerProcess, free_port
from tests.support.tls import CA

KEYS = {"metric", "average", "score", "samples", "perLabel", "accuracy", "seconds"}
API_KEY = "eval-key-0123456789"


# ---- metrics against the references ----------------------------------------------------------------------
def _label_cases() -> Iterator[tuple[list[str], list[str]]]:
    rng = random.Random(7)
    yield ["a", "b", "a", "c"], ["a", "b", "b", "c"]
    yield ["a", "a", "a"], ["a", "a", "a"]
    yield ["a", "b", "c", "a"], ["x", "b", "b", "x"]  # "x" only predicted, "c" never predicted
    for _ in range(30):
        labels = ["neg", "pos", "neu", "mixed"][: rng.randint(2, 4)]
        n = rng.randint(1, 60)
        gold = [rng.choice(labels) for _ in range(n)]
        pred = [g if rng.random() < 0.5 else rng.choice([*labels, "other"]) for g in gold]
        yield gold, pred


@pytest.mark.parametrize(("gold", "pred"), list(_label_cases()))
def test_classification_metrics_equal_scikit_learn(gold: list[str], pred: list[str]) -> None:
    ours = classification_scores(gold, pred)
    assert ours.accuracy == pytest.approx(sklearn_metrics.accuracy_score(gold, pred), abs=1e-12)
    labels = sorted(set(gold) | set(pred))
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    assert list(ours.per_label) == labels
    for i, label in enumerate(labels):
        got = ours.per_label[label]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-12)
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(gold, pred, average=average, zero_division=0)
        got = ours.averages[average]
        assert (got.precision, got.recall, got.f1) == pytest.approx((p, r, f), abs=1e-12), average
        for metric, want in (("precision", p), ("recall", r), ("f1", f)):
            assert ours.score(metric, average) == pytest.approx(want, abs=1e-12)


def _char_tags(text: str, spans: list[tuple[int, int, str]]) -> list[str]:
    """Reference IOB2 tagging, one token per character (written here, independently of the runtime)."""
    tags = ["O"] * len(text)
    for start, end, label in spans:
        tags[start:end] = [f"B-{label}"] + [f"I-{label}"] * (end - start - 1)
    return tags


def _ner_case(rng: random.Random) -> tuple[list[str], list[list[tuple[int, int, str]]], list[list[tuple]]]:
    texts, gold, pred = [], [], []
    for _ in range(rng.randint(1, 12)):
        text = "".join(rng.choice("abcde ") for _ in range(rng.randint(5, 40)))
        row_gold: list[tuple[int, int, str]] = []
        pos = 0
        while pos < len(text) - 1:
            start = rng.randint(pos, len(text) - 1)
            end = rng.randint(start + 1, min(len(text), start + 6))
            if rng.random() < 0.6:
                row_gold.append((start, end, rng.choice(["PER", "LOC", "ORG"])))
            pos = end
        row_pred = []
        for start, end, label in row_gold:  # right, wrong label, wrong boundary, or missed
            roll = rng.random()
            if roll < 0.5:
                row_pred.append((start, end, label))
            elif roll < 0.65:
                row_pred.append((start, end, rng.choice(["PER", "LOC", "MISC"])))
            elif roll < 0.8 and end - start > 1:
                row_pred.append((start, end - 1, label))
        texts.append(text)
        gold.append(row_gold)
        pred.append(row_pred)
    return texts, gold, pred


@pytest.mark.parametrize("seed", range(25))
def test_entity_metrics_equal_seqeval_strict(seed: int) -> None:
    texts, gold, pred = _ner_case(random.Random(seed))
    ours = entity_scores(texts, gold, pred)
    y_true = [_char_tags(t, g) for t, g in zip(texts, gold, strict=True)]
    y_pred = [_char_tags(t, p) for t, p in zip(texts, pred, strict=True)]
    assert ours.accuracy == pytest.approx(seqeval_metrics.accuracy_score(y_true, y_pred), abs=1e-12)
    if not any(gold) and not any(pred):
        return
    report = seqeval_metrics.classification_report(y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True,
                                                   zero_division=0)
    for label, got in ours.per_label.items():
        want = report[label]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx(
            (want["precision"], want["recall"], want["f1-score"], want["support"]), abs=1e-12), label
    assert set(ours.per_label) == {k for k in report if not k.endswith(" avg")}
    for average in ("macro", "micro", "weighted"):
        kw = {"average": average, "mode": "strict", "scheme": IOB2, "zero_division": 0}
        p = seqeval_metrics.precision_score(y_true, y_pred, **kw)
        r = seqeval_metrics.recall_score(y_true, y_pred, **kw)
        f = seqeval_metrics.f1_score(y_true, y_pred, **kw)
        got = ours.averages[average]
        assert (got.precision, got.recall, got.f1) == pytest.approx((p, r, f), abs=1e-12), average


def test_generation_metrics_normalise_whitespace_and_case() -> None:
    assert normalize("  Hello\n  World\t") == "hello world"
    expected = ["Paris", "the answer is 42", "Berlin", "Rome"]
    outputs = [" paris ", "The  answer\nis 42.", "I think it is BERLIN, yes", "Roma"]
    assert generation_score("exactMatch", expected, outputs) == 0.25  # only " paris "
    assert generation_score("contains", expected, outputs) == 0.75  # all but "Roma"
    assert generation_score("contains", ["Paris"], ["PARIS"]) == 1.0
    assert generation_score("exactMatch", ["a b"], ["ab"]) == 0.0


# ---- datasets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("task", "lines", "message"), [
    ("text-classification", ['{"text": "ok", "label": "a"}', "{bad json"], "line 2: not valid JSON"),
    ("text-classification", ['{"text": "ok"}'], 'line 1: missing field "label"'),
    ("text-classification", ['{"text": "ok", "label": 1}'], 'line 1: field "label" must be a string, got int'),
    ("text-classification", ['', '["text"]'], "line 2: expected a JSON object, got list"),
    ("text-classification", ['{"text": "  ", "label": "a"}'], 'line 1: field "text" is empty'),
    ("token-classification", ['{"text": "Bob"}'], 'line 1: missing field "entities"'),
    ("token-classification", ['{"text": "Bob", "entities": [{"start": 0, "end": 9, "label": "PER"}]}'],
     "line 1: entities[0] span [0, 9) is not inside the text (length 3"),
    ("token-classification", ['{"text": "Bob", "entities": [{"start": "0", "end": 3, "label": "PER"}]}'],
     'line 1: field "entities[0].start" must be an integer'),
    ("token-classification", ['{"text": "Bob Li", "entities": [{"start": 0, "end": 3, "label": "PER"}, '
                              '{"start": 2, "end": 6, "label": "PER"}]}'], "line 1: entities[1] overlaps entities[0]"),
    ("token-classification", ['{"text": "a  b", "entities": [{"start": 1, "end": 3, "label": "X"}]}'],
     "line 1: entities[0] covers only whitespace"),
    ("text-generation", ['{"prompt": "p"}'], 'line 1: missing field "expected"'),
    ("text-generation", ['{"prompt": "p", "expected": "e", "max_tokens": 0}'],
     'line 1: field "max_tokens" must be at least 1'),
    ("text-generation", ["", "  "], "the dataset has no rows"),
])
def test_dataset_errors_name_the_line_and_the_field(task: str, lines: list[str], message: str) -> None:
    with pytest.raises(DatasetError) as e:
        parse_dataset("\n".join(lines), task)
    assert str(e.value).startswith(message), str(e.value)


def test_dataset_rows_samples_and_span_trimming() -> None:
    text = "\n".join([
        '{"text": "Alice in Paris", "entities": [{"start": 0, "end": 6, "label": "PER"}, '
        '{"start": 8, "end": 14, "label": "LOC"}], "id": 7}',
        "",
        '{"text": "nothing", "entities": []}',
        '{"text": "x", "entities": []}',
    ])
    rows = parse_dataset(text, "token-classification", samples=2)
    assert len(rows) == 2 and all(isinstance(r, NerRow) for r in rows)
    assert [(e.start, e.end, e.label) for e in rows[0].entities] == [(0, 5, "PER"), (9, 14, "LOC")]
    assert rows[1].line == 3 and rows[1].entities == ()
    gen = parse_dataset('{"prompt": "p", "expected": "e"}', "text-generation")
    assert gen[0].max_tokens == 64


# ---- against real runtimes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(API_KEY + "\n")
    procs = {
        "cls": ServerProcess(["--model", str(models["cls"]), "--task", "text-classification",
                              "--api-key-file", str(key_file)]),
        "ner": ServerProcess(["--model", str(models["ner"]), "--task", "token-classification"]),
        "gen": ServerProcess(["--model", str(models["plain"]), "--max-new-tokens", "16"]),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield {**procs, "key_file": key_file}
    finally:
        for proc in procs.values():
            proc.stop()


def _cli(*args: str, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
    result = subprocess.run([sys.executable, "-m", "gptd_runtime", "evaluate", *args], cwd=REPO, text=True,
                            capture_output=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEXTS = ["Beautiful is better than ugly.", "Alice lives in Paris and works with Bob in Berlin.",
         "Errors should never pass silently.", "The quick brown fox jumps over the lazy dog.",
         "Readability counts.", "Namespaces are one honking great idea", "hello, who are you?",
         "Now is better than never.", "Simple is better than complex.", "Flat is better than nested."]


def test_text_classification_cli_scores_like_scikit_learn(servers: dict[str, Any], tmp_path: Path) -> None:
    url = servers["cls"].url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    predicted = []
    for text in TEXTS:  # what the server says, asked directly
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        out = httpx.post(f"{url}/v2/models/cls/infer", json=body, headers=headers, timeout=30).json()
        predicted.append(next(o for o in out["outputs"] if o["name"] == "label")["data"][0])
    gold = ["positive", "negative", "neutral", "positive", "negative", "positive", "negative", "positive",
            "negative", "neutral"]
    dataset = _write(tmp_path / "cls.jsonl", [{"text": t, "label": g} for t, g in zip(TEXTS, gold, strict=True)])

    rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "text-classification",
                        "--api-key-file", str(servers["key_file"]), "--average", "weighted", "--concurrency", "1")
    assert rc == 0, (out, err)
    [result] = out
    assert set(result) == KEYS and result["metric"] == "f1" and result["average"] == "weighted"
    assert result["samples"] == len(TEXTS) and result["seconds"] > 0
    *_, f, _ = sklearn_metrics.precision_recall_fscore_support(gold, predicted, average="weighted", zero_division=0)
    assert result["score"] == pytest.approx(f, abs=1e-9)
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, predicted), abs=1e-9)
    labels = sorted(set(gold) | set(predicted))
    per = sklearn_metrics.precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    assert sorted(result["perLabel"]) == labels
    for i, label in enumerate(labels):
        got = result["perLabel"][label]
        assert [got["precision"], got["recall"], got["f1"], got["support"]] == pytest.approx(
            [per[0][i], per[1][i], per[2][i], per[3][i]], abs=1e-9)

    rc, out, _ = _cli("--url", url, "--dataset", str(dataset), "--task", "text-classification",
                      "--api-key-file", str(servers["key_file"]), "--metric", "accuracy", "--samples", "4")
    assert rc == 0 and out[0]["samples"] == 4 and out[0]["average"] is None
    assert out[0]["score"] == pytest.approx(sklearn_metrics.accuracy_score(gold[:4], predicted[:4]))

    # Without the key: one line, non-zero, and the key is never printed anywhere.
    rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "text-classification")
    assert rc == 1 and len(out) == 1 and "401" in out[0]["error"], out
    assert API_KEY not in json.dumps(out) + err


def test_a_row_the_server_refuses_is_named_by_its_line(servers: dict[str, Any], tmp_path: Path) -> None:
    rows = [{"text": "fine", "label": "positive"}, {"text": "word " * 5000, "label": "negative"}]
    dataset = _write(tmp_path / "long.jsonl", rows)
    rc, out, _ = _cli("--url", servers["cls"].url, "--dataset", str(dataset), "--task", "text-classification",
                      "--api-key-file", str(servers["key_file"]))
    assert rc == 1 and len(out) == 1 and out[0]["line"] == 2, out
    assert out[0]["error"].startswith("dataset line 2: the server refused the row (400):"), out
    assert "word word" not in out[0]["error"]  # the row's text is not echoed


def test_token_classification_cli_scores_like_seqeval(servers: dict[str, Any], tmp_path: Path) -> None:
    url = servers["ner"].url
    texts = TEXTS[:6]
    predicted = []
    for text in texts:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        out = httpx.post(f"{url}/v2/models/ner/infer", json=body, timeout=30).json()
        spans = []
        for ent in json.loads(out["outputs"][0]["data"][0]):
            start, end = ent["start"], ent["end"]
            word = text[start:end]
            start += len(word) - len(word.lstrip())  # the server's offsets may include a word's leading space
            end -= len(word) - len(word.rstrip())
            spans.append((start, end, ent["entity_group"]))
        predicted.append(spans)
    assert any(predicted), "the random NER model predicted no entity at all: the comparison would be vacuous"
    # Gold: half of the server's entities (so some match exactly) plus one it did not predict.
    gold = [p[::2] for p in predicted]
    gold[1] = [*gold[1], (0, 5, "PER")] if all(s[0] >= 5 for s in gold[1]) else gold[1]
    rows = [{"text": t, "entities": [{"start": s, "end": e, "label": lab} for s, e, lab in g]}
            for t, g in zip(texts, gold, strict=True)]
    dataset = _write(tmp_path / "ner.jsonl", rows)

    rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "token-classification",
                        "--average", "micro", "--concurrency", "1")
    assert rc == 0, (out, err)
    [result] = out
    assert set(result) == KEYS
    y_true = [_char_tags(t, g) for t, g in zip(texts, gold, strict=True)]
    y_pred = [_char_tags(t, p) for t, p in zip(texts, predicted, strict=True)]
    f = seqeval_metrics.f1_score(y_true, y_pred, average="micro", mode="strict", scheme=IOB2, zero_division=0)
    assert result["score"] == pytest.approx(f, abs=1e-9) and 0 < result["score"] < 1
    assert result["accuracy"] == pytest.approx(seqeval_metrics.accuracy_score(y_true, y_pred), abs=1e-9)
    report = seqeval_metrics.classification_report(y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True,
                                                   zero_division=0)
    for label, got in result["perLabel"].items():
        assert got["f1"] == pytest.approx(report[label]["f1-score"]) and got["support"] == report[label]["support"]


def test_text_generation_cli_exact_match_and_contains(servers: dict[str, Any], tmp_path: Path) -> None:
    url = servers["gen"].url
    prompts = TEXTS[:6]
    outputs = []
    for prompt in prompts:
        body = {"model": "plain", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        outputs.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])
    assert all(o.strip() for o in outputs)
    # Rows 0-2 expect the server's own output, shouted and re-spaced; rows 3-5 expect something else.
    expected = ["  " + " ".join(o.split()).upper() + "\n" for o in outputs[:3]] + ["no such output"] * 3
    rows = [{"prompt": p, "expected": e, "max_tokens": 8} for p, e in zip(prompts, expected, strict=True)]
    dataset = _write(tmp_path / "gen.jsonl", rows)

    rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "text-generation", "--concurrency", "1")
    assert rc == 0, (out, err)
    [result] = out
    assert set(result) == KEYS and result["metric"] == "exactMatch" and result["average"] is None
    assert result["score"] == pytest.approx(0.5) and result["perLabel"] == {}

    pieces = [{"prompt": p, "expected": o.split()[0], "max_tokens": 8} for p, o in zip(prompts, outputs, strict=True)]
    rc, out, _ = _cli("--url", url, "--dataset", str(_write(tmp_path / "c.jsonl", pieces)),
                      "--task", "text-generation", "--metric", "contains", "--concurrency", "1")
    assert rc == 0 and out[0]["score"] == 1.0

    # The wrong task for this server: refused in one line before any row is sent.
    rc, out, _ = _cli("--url", url, "--dataset", str(_write(tmp_path / "x.jsonl", [{"text": "a", "label": "b"}])),
                      "--task", "text-classification")
    assert rc == 1 and "serves a text-generation model" in out[0]["error"]


def test_cli_fails_in_one_line_when_it_cannot_score(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jsonl", [{"text": "a", "label": "b"}])
    rc, out, _ = _cli("--url", f"http://127.0.0.1:{free_port()}", "--dataset", str(good), "--task",
                      "text-classification")
    assert rc == 1 and len(out) == 1 and out[0]["error"].startswith("cannot reach"), out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\n{"text": "a", "labl": "b"}\n')
    rc, out, _ = _cli("--url", "http://127.0.0.1:9", "--dataset", str(bad), "--task", "text-classification")
    assert rc == 1 and out == [{"error": f'dataset {bad}: line 2: missing field "label"', "line": 2}]

    rc, out, _ = _cli("--url", "http://127.0.0.1:9", "--dataset", str(good), "--task", "text-classification",
                      "--metric", "exactMatch")
    assert rc == 1 and "does not apply to text-classification" in out[0]["error"]

    rc, out, _ = _cli("--url", "http://127.0.0.1:9", "--dataset", str(tmp_path / "missing.jsonl"),
                      "--task", "text-generation")
    assert rc == 1 and "cannot read dataset" in out[0]["error"]


def test_check_dataset_validates_without_a_runtime(tmp_path: Path) -> None:
    """--check-dataset (the operator's dataset-check Job) needs no --url: rows and sorted gold labels on success,
    the parser's one-line error naming the line on failure, the same object in --result-file."""
    cls = _write(tmp_path / "cls.jsonl", [{"text": "a", "label": "POS"}, {"text": "b", "label": "NEG"},
                                          {"text": "c", "label": "POS"}])
    result = tmp_path / "termination-log"
    rc, out, _ = _cli("--check-dataset", "--dataset", str(cls), "--task", "text-classification",
                      "--result-file", str(result))
    assert rc == 0 and out == [{"rows": 3, "labels": ["NEG", "POS"]}] and json.loads(result.read_text()) == out[0]

    rc, out, _ = _cli("--check-dataset", "--dataset", str(cls), "--task", "text-classification", "--samples", "1")
    assert rc == 0 and out == [{"rows": 1, "labels": ["POS"]}]

    ner = _write(tmp_path / "ner.jsonl", [{"text": "Alice in Paris", "entities": [
        {"start": 0, "end": 5, "label": "PER"}, {"start": 9, "end": 14, "label": "LOC"}]}])
    rc, out, _ = _cli("--check-dataset", "--dataset", str(ner), "--task", "token-classification")
    assert rc == 0 and out == [{"rows": 1, "labels": ["LOC", "PER"]}]

    gen = _write(tmp_path / "gen.jsonl", [{"prompt": "p", "expected": "e"}])
    rc, out, _ = _cli("--check-dataset", "--dataset", str(gen), "--task", "text-generation")
    assert rc == 0 and out == [{"rows": 1, "labels": []}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\n\n{"text": "a", "label": "b"}\n{"text": "a", "labl": "b"}\n')
    rc, out, _ = _cli("--check-dataset", "--dataset", str(bad), "--task", "text-classification",
                      "--result-file", str(result))
    assert rc == 1 and out == [{"error": f'dataset {bad}: line 4: missing field "label"', "line": 4}]
    assert json.loads(result.read_text()) == out[0]

    rc, out, _ = _cli("--dataset", str(cls), "--task", "text-classification")
    assert rc == 1 and out == [{"error": "--url is required (unless --check-dataset)"}]


def test_result_file_gets_the_same_object_as_stdout(tmp_path: Path) -> None:
    """--result-file (the operator's Job passes /dev/termination-log) gets what stdout gets, on failure too."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    result = tmp_path / "termination-log"
    rc, out, _ = _cli("--url", "http://127.0.0.1:9", "--dataset", str(bad), "--task", "text-classification",
                      "--result-file", str(result))
    assert rc == 1 and json.loads(result.read_text()) == out[0] == {
        "error": f'dataset {bad}: line 1: missing field "label"', "line": 1}


def test_result_file_is_trimmed_to_the_termination_message_limit() -> None:
    from gptd_runtime.evaluate import RESULT_FILE_LIMIT, fit_result

    small = {"metric": "f1", "score": 0.5, "perLabel": {"A": {"f1": 0.5, "support": 3}}}
    assert json.loads(fit_result(small)) == small  # fits: unchanged
    per = {f"LABEL_{i:03d}": {"precision": 0.123456, "recall": 0.654321, "f1": 0.333333, "support": i}
           for i in range(200)}
    big = {"metric": "f1", "average": "macro", "score": 0.4, "samples": 999, "perLabel": per, "accuracy": 0.4}
    text = fit_result(big)
    assert len(text.encode()) <= RESULT_FILE_LIMIT
    got = json.loads(text)
    assert got["score"] == 0.4 and got["samples"] == 999 and got["perLabelTrimmed"] == 200 - len(got["perLabel"])
    assert "LABEL_199" in got["perLabel"] and "LABEL_000" not in got["perLabel"]  # most-supported kept
    long_error = {"error": "x" * 10_000}
    assert len(fit_result(long_error).encode()) <= RESULT_FILE_LIMIT


# ---- concurrency and retries, against a scripted stand-in (to observe what a runtime cannot report) ---------
class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, statuses: list[int]):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.statuses = statuses  # statuses for successive infer calls, then 200
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.infers = 0
        self.infer_body: dict[str, Any] = {
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Stub

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._reply(200, {"data": [{"id": "m"}]})
        else:
            self._reply(200, {"name": "m", "task": "text-classification"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.infers += 1
            status = srv.statuses.pop(0) if srv.statuses else 200
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        time.sleep(0.03)
        with srv.lock:
            srv.in_flight -= 1
        if status != 200:
            self._reply(status, {"error": {"message": "busy"}})
        else:
            self._reply(200, srv.infer_body)


@pytest.fixture
def stub() -> Iterator[_Stub]:
    server = _Stub([])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _rows(n: int) -> list[Any]:
    return parse_dataset("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(n)),
                         "text-classification")


def test_concurrency_is_bounded_and_busy_answers_are_retried(stub: _Stub) -> None:
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    stub.statuses[:] = [429, 503]
    opts = EvalOptions(url=url, task="text-classification", metric="accuracy", average="macro", concurrency=3)
    result = evaluate(_rows(24), opts)
    assert result["score"] == 1.0 and result["samples"] == 24
    assert stub.max_in_flight == 3  # parallel, and never above the bound
    assert stub.infers == 24 + 2  # each busy answer retried once


def test_a_server_that_stays_busy_fails_after_bounded_retries(stub: _Stub) -> None:
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    stub.statuses[:] = [503] * 100
    opts = EvalOptions(url=url, task="text-classification", metric="accuracy", average="macro", concurrency=1,
                       attempts=4)
    with pytest.raises(EvaluationError) as e:
        evaluate(_rows(5), opts)
    assert "503" in str(e.value) and stub.infers == 4  # gave up on the first row: no storm over the rest


def test_unexpected_responses_and_label_mismatches_are_reported(stub: _Stub, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    opts = EvalOptions(url=url, task="text-classification", metric="f1", average="macro", concurrency=2)
    rows = parse_dataset('{"text": "t", "label": "A"}\n', "text-classification")
    assert evaluate(rows, opts)["score"] == 0.0  # the server says "a", the dataset "A": scored, and flagged
    assert "no predicted label is a dataset label" in capsys.readouterr().err

    stub.infer_body = {"outputs": "not a list"}
    dataset = _write(tmp_path / "d.jsonl", [{"text": "t", "label": "a"}])
    rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "text-classification")
    assert rc == 1 and len(out) == 1 and out[0]["error"].startswith("unexpected"), (out, err)
    assert "Traceback" not in err


@contextlib.contextmanager
def _https_stub(tmp_path: Path, *, dns: tuple[str, ...], ips: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """The stub runtime over TLS with a certificate naming ``dns``/``ips``, issued by a test CA: (url, CA file)."""
    ca = CA()
    issued = ca.issue("stub-runtime", dns=dns, ips=ips)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    server = _Stub([])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca.write(tmp_path / "ca.pem")
    finally:
        server.shutdown()
        server.server_close()


def test_https_runtime_is_verified_against_the_ca_file(tmp_path: Path) -> None:
    with _https_stub(tmp_path, dns=("localhost",), ips=("127.0.0.1",)) as (url, ca_file):
        rows = _rows(3)
        ok = EvalOptions(url=url, task="text-classification", metric="accuracy", average="macro", ca_file=ca_file)
        assert evaluate(rows, ok)["score"] == 1.0
        untrusted = EvalOptions(url=url, task="text-classification", metric="accuracy", average="macro")
        with pytest.raises(EvaluationError) as e:
            evaluate(rows, untrusted)
        assert "CERTIFICATE_VERIFY_FAILED" in e.value.message


def test_https_by_ip_is_verified_for_the_server_name(tmp_path: Path) -> None:
    """The operator's Job reaches one pod by IP; the certificate names the Service: --server-name."""
    with _https_stub(tmp_path, dns=("gpt2.ns.svc",), ips=()) as (url, ca_file):
        rows = _rows(3)
        common = {"url": url, "task": "text-classification", "metric": "accuracy", "average": "macro",
                  "ca_file": ca_file}
        assert evaluate(rows, EvalOptions(**common, server_name="gpt2.ns.svc"))["score"] == 1.0
        for wrong in (None, "other.ns.svc"):  # by IP alone, or another name: refused
            with pytest.raises(EvaluationError) as e:
                evaluate(rows, EvalOptions(**common, server_name=wrong))
            assert "CERTIFICATE_VERIFY_FAILED" in e.value.message
        # the CLI takes it too
        dataset = _write(tmp_path / "d.jsonl", [{"text": "t", "label": "a"}])
        rc, out, err = _cli("--url", url, "--dataset", str(dataset), "--task", "text-classification",
                            "--ca-file", str(ca_file), "--server-name", "gpt2.ns.svc")
        assert rc == 0 and "score" in out[0], (out, err)
