"""`python -m gptd_runtime evaluate --url URL --dataset FILE --task TASK [--metric M] [--average A]
[--samples N] [--api-key-file F] [--concurrency C]`: score a running runtime on a JSON Lines dataset over
its public API (v2 infer for the classification tasks, greedy /v1/completions for generation).

With --check-dataset (no --url) it only parses and validates the dataset with the same parser and prints
{"rows": N, "labels": [...]} (exit 0), or the one-line error naming the line (exit 1): the operator runs that
as a Job before a revision's pods when the dataset is on a PVC it cannot read itself.

stdout gets exactly one JSON object: {"metric", "average", "score", "samples", "perLabel", "accuracy",
"seconds"}, exit 0 (the score is the result, not the exit status). When it cannot score (server down,
refused key, bad dataset, wrong task), stdout gets one line {"error": "...", ["line": N]} and exit 1; bad
flags exit 2. With --result-file the same object is also written to that file, trimmed to 4 KiB (per-label rows
with the least support dropped first, counted in perLabelTrimmed): the operator's evaluation Job passes
/dev/termination-log, which the kubelet keeps as the container's termination message. Stdlib HTTP only
(http.client, one keep-alive connection per worker thread), so the runtime needs no extra client library;
prompts, outputs and the key are never printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from gptd_common.eval_dataset import (
    TASKS,
    ClassificationRow,
    DatasetError,
    GenerationRow,
    NerRow,
    Row,
    load_dataset,
    trim_span,
)

from .eval_metrics import (
    AVERAGES,
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    Entity,
    classification_scores,
    entity_scores,
    generation_score,
)

_RETRY_STATUS = frozenset({429, 503})


class EvaluationError(Exception):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line


@dataclass(frozen=True)
class EvalOptions:
    url: str
    task: str
    metric: str
    average: str
    api_key: str | None = None
    concurrency: int = 8
    timeout_seconds: float = 120.0
    attempts: int = 5  # per row, for 429 / 503 (honouring Retry-After, capped at 5 s)
    ca_file: Path | None = None
    # Verify the certificate for this name instead of the URL's host: the operator's Job reaches one pod by IP,
    # which the serving certificate (the Service's DNS names) does not name.
    server_name: str | None = None


def default_metric(task: str) -> str:
    return "exactMatch" if task == "text-generation" else "f1"


def check_metric(task: str, metric: str, average: str) -> None:
    allowed = GENERATION_METRICS if task == "text-generation" else CLASSIFICATION_METRICS
    if metric not in allowed:
        raise EvaluationError(f"--metric {metric} does not apply to {task} (use {', '.join(allowed)})")
    if average not in AVERAGES:
        raise EvaluationError(f"--average must be one of {', '.join(AVERAGES)}, got {average}")


# ---- HTTP ------------------------------------------------------------------------------------------------
class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection that may check the certificate (SNI and hostname) for another name than the host it
    connects to."""

    def __init__(self, host: str, port: int | None, *, server_name: str | None, **kw: Any):
        super().__init__(host, port, **kw)
        self.server_name = server_name

    def connect(self) -> None:
        if not self.server_name:
            return super().connect()
        http.client.HTTPConnection.connect(self)  # the TCP connection to host:port
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)  # type: ignore[attr-defined]
        return None


class _Client:
    """One keep-alive connection per thread to the runtime."""

    def __init__(self, opts: EvalOptions):
        parts = urlsplit(opts.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EvaluationError(f"--url must be http://HOST:PORT or https://HOST:PORT, got {opts.url!r}")
        self.opts = opts
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base = parts.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=opts.ca_file) if parts.scheme == "https" else None
        if opts.server_name and self.context is None:
            raise EvaluationError("--server-name needs an https:// --url")
        self.local = threading.local()
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if opts.api_key:
            self.headers["Authorization"] = f"Bearer {opts.api_key}"

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            if self.context is not None:
                conn = _HTTPSConnection(self.host, self.port, timeout=self.opts.timeout_seconds,
                                        context=self.context, server_name=self.opts.server_name)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.opts.timeout_seconds)
            self.local.conn = conn
        return conn

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                line: int | None = None) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.opts.attempts):
            try:
                conn = self._conn()
                conn.request(method, self.base + path, body=payload, headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self.local.conn = None
                if attempt == 0 and isinstance(e, http.client.RemoteDisconnected):
                    continue  # a keep-alive connection the server had closed: one silent reconnect
                raise EvaluationError(f"cannot reach {self.opts.url}: {type(e).__name__}: {e}", line) from e
            if resp.status in _RETRY_STATUS and attempt + 1 < self.opts.attempts:
                retry_after = resp.getheader("Retry-After") or "1"
                time.sleep(min(5.0, float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0))
                continue
            try:
                decoded = json.loads(data) if data else {}
            except json.JSONDecodeError:
                decoded = {}
            if resp.status >= 400:
                err = decoded.get("error") if isinstance(decoded, dict) else None
                message = err.get("message") if isinstance(err, dict) else (err or data[:200].decode(errors="replace"))
                if resp.status == 401:
                    raise EvaluationError(f"the server refused the API key (401): {message}")
                if resp.status == 400 and line is not None:
                    raise EvaluationError(f"the server refused the row (400): {message}", line)
                raise EvaluationError(f"{method} {path} answered {resp.status}: {message}", line)
            if not isinstance(decoded, dict):
                raise EvaluationError(f"{method} {path} answered with something other than a JSON object", line)
            return decoded
        raise AssertionError("unreachable")


def _server_model(client: _Client, task: str) -> str:
    models = client.request("GET", "/v1/models")
    try:
        name = models["data"][0]["id"]
    except (KeyError, IndexError, TypeError) as e:
        raise EvaluationError(f"{client.opts.url}/v1/models lists no model") from e
    served = client.request("GET", f"/v2/models/{quote(name, safe='')}").get("task")
    if served and served != task:
        raise EvaluationError(f"the server at {client.opts.url} serves a {served} model, not {task}")
    return name


def _predictor(client: _Client, model: str, task: str) -> Callable[[Row], Any]:
    infer = f"/v2/models/{quote(model, safe='')}/infer"

    def v2(text: str, line: int) -> Any:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        outputs = {o["name"]: o["data"] for o in client.request("POST", infer, body, line).get("outputs", [])}
        key = "entities" if task == "token-classification" else "label"
        if not outputs.get(key):
            raise EvaluationError(f"v2 infer returned no {key!r} output", line)
        return outputs[key][0]

    def predict(row: Row) -> Any:
        if isinstance(row, ClassificationRow):
            return str(v2(row.text, row.line))
        if isinstance(row, NerRow):
            raw = v2(row.text, row.line)
            return _entities(json.loads(raw) if isinstance(raw, str) else raw, row.text)
        assert isinstance(row, GenerationRow)
        body = {"model": model, "prompt": row.prompt, "max_tokens": row.max_tokens, "temperature": 0}
        choices = client.request("POST", "/v1/completions", body, row.line).get("choices") or [{}]
        return str(choices[0].get("text", ""))

    return predict


def _entities(raw: Any, text: str) -> list[Entity]:
    """The server's entities -> disjoint (start, end, label) spans, trimmed like the dataset's."""
    spans = []
    for ent in raw if isinstance(raw, list) else []:
        label = ent.get("entity_group") or ent.get("entity") or ent.get("label")
        start, end = ent.get("start"), ent.get("end")
        if not isinstance(start, int) or not isinstance(end, int) or not label:
            continue
        start, end = trim_span(text, max(0, start), min(len(text), end))
        if start < end:
            spans.append((start, end, str(label).removeprefix("B-").removeprefix("I-")))
    spans.sort()
    disjoint: list[Entity] = []
    for span in spans:  # keep the first of overlapping predictions: strict matching needs disjoint spans
        if not disjoint or span[0] >= disjoint[-1][1]:
            disjoint.append(span)
    return disjoint


# ---- evaluation ------------------------------------------------------------------------------------------
def evaluate(rows: Sequence[Row], opts: EvalOptions) -> dict[str, Any]:
    check_metric(opts.task, opts.metric, opts.average)
    started = time.monotonic()
    client = _Client(opts)
    model = _server_model(client, opts.task)
    predict = _predictor(client, model, opts.task)
    failed = threading.Event()

    def guarded(row: Row) -> Any:
        # Stop at the first failure: rows not yet started are never sent (no storm of doomed requests).
        if failed.is_set():
            return None
        try:
            return predict(row)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=max(1, opts.concurrency), thread_name_prefix="evaluate") as pool:
        futures = [pool.submit(guarded, row) for row in rows]
        try:
            predictions = [f.result() for f in futures]
        except BaseException:
            failed.set()
            raise

    if opts.task == "text-generation":
        gen_rows = [r for r in rows if isinstance(r, GenerationRow)]
        score = generation_score(opts.metric, [r.expected for r in gen_rows], predictions)
        result = {"metric": opts.metric, "average": None, "score": score, "samples": len(rows), "perLabel": {},
                  "accuracy": score}
    else:
        if opts.task == "text-classification":
            gold = [r.label for r in rows if isinstance(r, ClassificationRow)]
            scores = classification_scores(gold, predictions)
            if not set(gold) & set(predictions):  # almost always a naming mismatch ("POSITIVE" vs "positive")
                print(f"gptd-evaluate: warning: no predicted label is a dataset label (the server predicts "
                      f"{sorted(set(predictions))}, the dataset has {sorted(set(gold))})", file=sys.stderr)
        else:
            ner = [r for r in rows if isinstance(r, NerRow)]
            gold = [[(e.start, e.end, e.label) for e in r.entities] for r in ner]
            scores = entity_scores([r.text for r in ner], gold, predictions)
        result = {"metric": opts.metric, "average": None if opts.metric == "accuracy" else opts.average,
                  "score": scores.score(opts.metric, opts.average), "samples": len(rows),
                  "perLabel": {label: s.as_dict() for label, s in scores.per_label.items()},
                  "accuracy": scores.accuracy}
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


# ---- CLI -------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the runtime, http(s)://HOST:PORT (required unless --check-dataset)")
    p.add_argument("--check-dataset", action="store_true",
                   help="only parse and validate the dataset (no runtime): print {\"rows\": N, \"labels\": [...]} "
                        "or fail in one line naming the line; the operator's dataset-check Job runs this")
    p.add_argument("--dataset", required=True, type=Path, help="JSON Lines file (docs/fetch-and-evaluate.md)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--metric", help="accuracy | precision | recall | f1 (default f1); exactMatch | contains for "
                                    "text-generation (default exactMatch)")
    p.add_argument("--average", default="macro", choices=AVERAGES)
    p.add_argument("--samples", type=int, help="score only the first N rows")
    p.add_argument("--api-key-file", type=Path, help="file holding the runtime's API key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--timeout-seconds", type=float, default=120.0, help="per request")
    p.add_argument("--ca-file", type=Path, help="CA bundle for an https:// runtime")
    p.add_argument("--server-name", help="verify the https:// runtime's certificate for this DNS name instead of the "
                                         "--url host (e.g. the Service's name when --url is a pod IP)")
    p.add_argument("--result-file", type=Path,
                   help="also write the JSON object here, at most 4 KiB (perLabel trimmed to fit): in a pod, "
                        "/dev/termination-log becomes the container's termination message")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    code, obj = _run(args)
    print(json.dumps(obj), file=out, flush=True)  # stdout: exactly one JSON object, untrimmed
    if getattr(args, "result_file", None) is not None:
        _write_result(args.result_file, obj)
    return code


RESULT_FILE_LIMIT = 4096  # bytes the kubelet keeps of a termination message


def fit_result(obj: dict[str, Any], limit: int = RESULT_FILE_LIMIT) -> str:
    """``obj`` as JSON of at most ``limit`` bytes: per-label rows are dropped, fewest-supported first, with
    ``perLabelTrimmed`` saying how many; an error message is cut. The score is never dropped."""
    text = json.dumps(obj)
    if len(text.encode()) <= limit:
        return text
    out = dict(obj)
    per = dict(out.get("perLabel") or {})
    order = sorted(per, key=lambda k: (-(per[k] or {}).get("support", 0) if isinstance(per[k], dict) else 0, k))
    dropped = 0
    while order and len(json.dumps({**out, "perLabel": per, "perLabelTrimmed": dropped}).encode()) > limit:
        per.pop(order.pop())
        dropped += 1
    if dropped:
        out["perLabel"], out["perLabelTrimmed"] = per, dropped
    text = json.dumps(out)
    if len(text.encode()) > limit and isinstance(out.get("error"), str):
        out["error"] = out["error"][: max(0, limit - 200)]
        text = json.dumps(out)
    return text


def _write_result(path: Path, obj: dict[str, Any]) -> None:
    try:
        path.write_text(fit_result(obj))
    except OSError as e:  # stdout already has the result; say why the file has not (stderr, one line)
        print(f"cannot write --result-file {path}: {e.strerror}", file=sys.stderr)


def check_dataset(rows: Sequence[Row]) -> dict[str, Any]:
    """What a dataset-check reports: the row count (after --samples) and the gold labels, sorted (none for
    text-generation). Never a row's text: prompts and outputs stay out of logs and termination messages."""
    labels: set[str] = set()
    for row in rows:
        if isinstance(row, ClassificationRow):
            labels.add(row.label)
        elif isinstance(row, NerRow):
            labels.update(span.label for span in row.entities)
    return {"rows": len(rows), "labels": sorted(labels)}


def _run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    try:
        if args.samples is not None and args.samples < 1:
            raise EvaluationError(f"--samples must be at least 1, got {args.samples}")
        if args.concurrency < 1:
            raise EvaluationError(f"--concurrency must be at least 1, got {args.concurrency}")
        metric = args.metric or default_metric(args.task)
        check_metric(args.task, metric, args.average)
        if getattr(args, "check_dataset", False):
            return 0, check_dataset(load_dataset(args.dataset, args.task, args.samples))
        if not args.url:
            raise EvaluationError("--url is required (unless --check-dataset)")
        key = None
        if args.api_key_file is not None:
            try:
                key = args.api_key_file.read_text().strip() or None
            except OSError as e:
                raise EvaluationError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror}") from e
        rows = load_dataset(args.dataset, args.task, args.samples)
        opts = EvalOptions(url=args.url, task=args.task, metric=metric, average=args.average, api_key=key,
                           concurrency=args.concurrency, timeout_seconds=args.timeout_seconds, ca_file=args.ca_file,
                           server_name=args.server_name)
        result = evaluate(rows, opts)
    except DatasetError as e:
        return 1, _failure(f"dataset {args.dataset}: {e}", e.line)
    except EvaluationError as e:
        return 1, _failure(e.message if e.line is None else f"dataset line {e.line}: {e.message}", e.line)
    except Exception as e:  # e.g. a response of an unexpected shape: still one line, never a traceback
        return 1, _failure(f"unexpected {type(e).__name__} while evaluating against {args.url}: {e}", None)
    return 0, result


def _failure(message: str, line: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": " ".join(message.split())}
    if line is not None:
        body["line"] = line
    return body

