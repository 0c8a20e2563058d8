"""Throughput/latency of the gptd runtime vs `transformers serve --continuous-batching` on the same model.

Both servers are started here as subprocesses on the same model directory (a demo model built with
gptd_runtime.demo unless --model-dir is given) and driven with the same OpenAI streaming completions load
(httpx async): `--requests` requests of `--max-tokens` tokens at each concurrency level. Generated tokens are
counted from each response's `usage` (random weights may emit EOS early; both servers are counted the same
way). Prints a markdown table.

    .venv/bin/python benchmarks/runtime_bench.py                      # CPU, 64 req x 64 tok, 1 and 32 clients
    .venv/bin/python benchmarks/runtime_bench.py --device cuda --dtype float16 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    server: str
    clients: int
    requests: int
    tokens: int
    wall: float
    latencies: list[float]
    ttfts: list[float]
    errors: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(
    name: str, cmd: list[str], port: int, ready_path: str, log_dir: Path, env: dict[str, str]
) -> Iterator[str]:
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}; see {log_dir / (name + '.log')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 300s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return end, ttft if ttft is not None else end, tokens


async def _drive(name: str, url: str, clients: int, requests: int, max_tokens: int) -> Result:
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog." for i in range(requests)]
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # Warm-up outside the timed window (first-request lazy init on the peer).
        await asyncio.gather(*(_one(client, url, "warm up", 8) for _ in range(min(clients, 4))))

        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                prompt = queue.get_nowait()
                try:
                    lat, ttft, n = await _one(client, url, prompt, max_tokens)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(lat)
                ttfts.append(ttft)
                tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return Result(name, clients, requests, tokens, wall, latencies, ttfts, errors)


def _merge(results: list[Result]) -> list[Result]:
    """Pool the rounds of each (server, clients): tokens/s = all tokens / all timed wall time."""
    merged: dict[tuple[str, int], Result] = {}
    for r in results:
        m = merged.get((r.server, r.clients))
        if m is None:
            merged[(r.server, r.clients)] = Result(r.server, r.clients, r.requests, r.tokens, r.wall,
                                                   list(r.latencies), list(r.ttfts), r.errors)
        else:
            m.requests += r.requests
            m.tokens += r.tokens
            m.wall += r.wall
            m.latencies += r.latencies
            m.ttfts += r.ttfts
            m.errors += r.errors
    return list(merged.values())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="HF model dir (default: build the 'small' demo model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", default="1,32", help="comma-separated concurrency levels")
    p.add_argument("--single-client-requests", type=int, default=16,
                   help="requests for the 1-client level (sequential runs are slow)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the alternating runs and pool them")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--gptd-args", default="", help="extra flags for the gptd server (e.g. '--kv-cache-blocks 64')")
    p.add_argument("--threads", type=int, help="gptd --torch-threads (default: its own CPU-budget rule)")
    p.add_argument("--peer-threads", type=int, help="OMP_NUM_THREADS for transformers serve (default: unset)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", type=Path, help="also write raw results here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gptd-bench-"))
    if args.model_dir is None:
        from gptd_runtime.demo import build_demo_model

        args.model_dir = build_demo_model(work / "model", size="small")
    levels = [int(c) for c in args.clients.split(",")]
    print(f"model {args.model_dir} device {args.device} dtype {args.dtype}; {args.requests} requests x "
          f"{args.max_tokens} tokens (1 client: {args.single_client_requests} requests)", file=sys.stderr)

    gptd_port, tf_port = _port(), _port()
    threads = [] if args.threads is None else ["--torch-threads", str(args.threads)]
    peer_env = {} if args.peer_threads is None else {"OMP_NUM_THREADS": str(args.peer_threads)}
    servers: list[tuple[str, list[str], int, str, dict[str, str]]] = [(
        "gptd",
        [sys.executable, "-m", "gptd_runtime", "serve", "--model", str(args.model_dir), "--host", "127.0.0.1",
         "--port", str(gptd_port), "--device", args.device, "--dtype", args.dtype,
         "--max-batch-size", str(args.max_batch_size), "--max-new-tokens", str(max(args.max_tokens, 64)),
         "--max-queue", "4096", "--log-level", "warning", *threads, *args.gptd_args.split()],
        gptd_port, "/health/ready", {},
    )]
    if not args.skip_transformers:
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        servers.append((
            "transformers-serve",
            [exe, "serve", str(args.model_dir), "--device", args.device, "--dtype", args.dtype,
             "--continuous-batching", "--host", "127.0.0.1", "--port", str(tf_port)],
            tf_port, "/health", peer_env,
        ))

    results: list[Result] = []
    # Both servers stay up and the load alternates between them level by level, so drift in background load
    # (shared CI boxes) hits both alike.
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(_server(name, cmd, port, ready, work, env))
                for name, cmd, port, ready, env in servers}
        for round_ in range(args.rounds):
            for clients in levels:
                n = args.single_client_requests if clients == 1 else args.requests
                for name, url in urls.items():
                    r = asyncio.run(_drive(name, url, clients, n, args.max_tokens))
                    print(f"round {round_ + 1} {name} clients={clients}: {r.tok_s:.0f} tok/s, {r.errors} errors",
                          file=sys.stderr)
                    results.append(r)
    results = _merge(results)

    print("\n| server | clients | requests | gen tokens | tokens/s | p50 latency s | p95 latency s "
          "| p50 TTFT s | p95 TTFT s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.server} | {r.clients} | {r.requests} | {r.tokens} | {r.tok_s:.0f} | "
              f"{_pct(r.latencies, 50):.3f} | {_pct(r.latencies, 95):.3f} | {_pct(r.ttfts, 50):.3f} | "
              f"{_pct(r.ttfts, 95):.3f} | {r.errors} |")
    by = {(r.server, r.clients): r for r in results}
    for c in levels:  # fairness: both servers must have generated the same number of tokens
        counts = {name: by[(name, c)].tokens for name, *_ in servers}
        if len(set(counts.values())) > 1:
            print(f"WARNING: {c} clients: generated token counts differ {counts}; compare tokens/s with care",
                  file=sys.stderr)
    if not args.skip_transformers:
        print("\n| clients | throughput ratio gptd / transformers-serve | p50 latency ratio | p50 TTFT ratio |")
        print("|---|---|---|---|")
        for c in levels:
            a, b = by[("gptd", c)], by[("transformers-serve", c)]
            print(f"| {c} | {a.tok_s / b.tok_s:.2f}x | {_pct(a.latencies, 50) / _pct(b.latencies, 50):.2f} | "
                  f"{_pct(a.ttfts, 50) / _pct(b.ttfts, 50):.2f} |")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], default=str, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
