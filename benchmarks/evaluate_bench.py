"""Throughput of `gptd_runtime evaluate` (rows/s) on the demo models, with a peer client and a ceiling.

For each task a real runtime (`python -m gptd_runtime serve`) serves a tiny demo model built here; the
evaluator scores a synthetic dataset at each concurrency level. In the same run:
- peer: the same one-row requests sent by an async httpx client at the same concurrency (no dataset
  parsing, no scoring);
- ceiling: what the server does with the rows packed as tightly as it allows: classification as v2 infer
  requests of 32 texts (one forward pass each), generation as 32 concurrent completions (the server's batch
  size), sent through the evaluator's own client (the async httpx peer is slower than it on 2 cores).
The machine's load average is printed before and after (other work on the box shifts every number).

    .venv/bin/python benchmarks/evaluate_bench.py                    # 200 rows (64 for generation), 1 and 8
    .venv/bin/python benchmarks/evaluate_bench.py --rows 500 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime"), str(REPO / "common")]

from gptd_common.eval_dataset import load_dataset  # noqa: E402
from gptd_runtime.demo import _CORPUS, build_demo_model  # noqa: E402
from gptd_runtime.evaluate import EvalOptions, default_metric, evaluate  # noqa: E402

from tests.support.runtime import ServerProcess  # noqa: E402

TASKS = {"cls": "text-classification", "ner": "token-classification", "gen": "text-generation"}


def _dataset(task: str, n: int, path: Path, max_tokens: int) -> Path:
    lines = [line.strip() for line in _CORPUS.splitlines() if line.strip()]
    rows = []
    for i in range(n):
        text = lines[i % len(lines)]
        if task == "text-classification":
            rows.append({"text": text, "label": "positive" if i % 2 else "negative"})
        elif task == "token-classification":
            rows.append({"text": text, "entities": [{"start": 0, "end": min(5, len(text)), "label": "PER"}]})
        else:
            rows.append({"prompt": text, "expected": text.split()[0], "max_tokens": max_tokens})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def _peer(url: str, model: str, task: str, rows: list[Any], concurrency: int, pack: int = 1) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(row: Any) -> None:
            async with sem:
                if task == "text-generation":
                    body = {"model": model, "prompt": row.prompt, "max_tokens": row.max_tokens, "temperature": 0}
                    r = await client.post("/v1/completions", json=body)
                else:
                    texts = [x.text for x in row]
                    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
                    r = await client.post(f"/v2/models/{model}/infer", json=body)
                r.raise_for_status()

        if task == "text-generation":
            units: list[Any] = rows
        else:  # `pack` texts per infer request
            units = [rows[i : i + pack] for i in range(0, len(rows), pack)]
        start = time.perf_counter()
        await asyncio.gather(*(one(u) for u in units))
        return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--gen-rows", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()

    print(f"cpus={os.cpu_count()} loadavg(1m,5m,15m) before={os.getloadavg()}")
    print("| task | concurrency | rows | evaluator rows/s | peer (httpx async) rows/s | ceiling rows/s "
          "| evaluator/peer | evaluator/ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, task in TASKS.items():
            model_dir = build_demo_model(root / name, task)
            n = args.gen_rows if task == "text-generation" else args.rows
            rows = load_dataset(_dataset(task, n, root / f"{name}.jsonl", args.max_tokens), task)
            server = ServerProcess(["--model", str(model_dir), "--task", task, "--max-new-tokens",
                                    str(args.max_tokens)])
            try:
                server.wait_ready()
                measured: list[tuple[int, float, float]] = []
                for c in args.concurrency:
                    opts = EvalOptions(url=server.url, task=task, metric=default_metric(task), average="macro",
                                       concurrency=c)
                    evaluate(rows[: min(8, len(rows))], opts)  # warm connections and the server's paths
                    start = time.perf_counter()
                    result = evaluate(rows, opts)
                    ours = time.perf_counter() - start
                    peer = asyncio.run(_peer(server.url, name, task, rows, c))  # seconds
                    assert result["samples"] == len(rows)
                    measured.append((c, len(rows) / ours, len(rows) / peer))
                # The ceiling last, when every path of the server is warm.
                if task == "text-generation":
                    wide = EvalOptions(url=server.url, task=task, metric="exactMatch", average="macro", concurrency=32)
                    evaluate(rows, wide)  # warm-up at this width
                    start = time.perf_counter()
                    evaluate(rows, wide)
                    ceiling = len(rows) / (time.perf_counter() - start)
                else:
                    ceiling = len(rows) / asyncio.run(_peer(server.url, name, task, rows, 1, pack=32))
                for c, rate, peer_rate in measured:
                    print(f"| {task} | {c} | {len(rows)} | {rate:.1f} | {peer_rate:.1f} | {ceiling:.1f} "
                          f"| {rate / peer_rate:.2f} | {rate / ceiling:.2f} |", flush=True)
            finally:
                server.stop()
    print(f"loadavg after={os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
