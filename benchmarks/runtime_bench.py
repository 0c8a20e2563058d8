"""Throughput/latency of the gptd runtime vs `transformers serve --continuous-batching` on the same model, both
as a percentage of the bound: a bare decode loop of the same model.

Both servers are started here as subprocesses on the same model directory (a demo model built with
gptd_runtime.demo unless --model-dir is given) and driven with the same OpenAI completions load (httpx async),
streaming and non-streaming: `--requests` requests of `--max-tokens` tokens at each concurrency level. Generated
tokens are counted from each response's `usage` (random weights may emit EOS early; both servers are counted the
same way). The bound is measured in this process: greedy decoding with a KV cache (no server, no scheduler),
same model, same torch thread count as gptd, batch = the cell's clients, `--max-tokens` tokens after a prompt of the
benchmark's length. Each run is reported against the bound of its own cell (one concurrency level and mode), and the
per-round ratios are summarised by their median and range (this shared VM moves the bound itself by 30 % and more
within minutes):
- at 1 client, every request goes to every participant in turn (gptd, the peer, the bare loop, the bare loop beside
  a busy neighbour, and in the last mode gptd's engine in-process, which then stays loaded, idle between its own
  requests, for that cell), in a balanced rotation (`rotation`; the request count is rounded up to a whole number
  of its periods). One client is one request at a time, so no participant's concurrency changes, and drift hits
  all of them alike. It does change what a request meets: the others' requests ran in between (cold caches,
  threads woken from idle), so these 1-client figures are not comparable with the earlier block-per-server ones.
  In an ad-hoc A/B on this VM (2026-12-02, output not kept; non-streaming, gptd/peer tokens/s), six 16-request
  blocks per server gave single-round ratios of 0.76-1.18; six interleaved blocks of 12 requests each, 0.99-1.08;
- at more clients the load is the point, so each server's run stays whole, and the bound is measured right before
  and right after the cell (both servers back to back), each run divided by the mean of the two.
The bound is also measured beside a busy neighbour (one other process spinning a Python loop): on a
2-vCPU VM whose vCPUs appear to share hardware, that cut the bare loop's tokens per CPU-second by 15-35 % in an
ad-hoc test with glibc's default allocator settings (2-12 % in the median of a full run with the server's
settings), and a server never runs alone (its HTTP thread and the client occupy the other vCPU), so "% of the busy
bound (CPU)" says how much of what the box allows the server's batching thread gets. Once per level and round,
gptd's engine is also driven in this process with no HTTP ("gptd engine, no HTTP"): the engine's own cost. Prints
markdown tables.

    .venv/bin/python benchmarks/runtime_bench.py --rounds 3            # CPU, 64 req x 64 tok, 1 and 32 clients
    .venv/bin/python benchmarks/runtime_bench.py --device cuda --dtype float16 --requests 256
    .venv/bin/python benchmarks/runtime_bench.py --profile 10          # + py-spy breakdown of gptd at 32 clients
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
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
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BOUND = "bare decode loop"  # the bound's Results in an interleaved (1-client) cell
BUSY_BOUND = "bare decode loop beside a busy neighbour"
ENGINE = "gptd engine, no HTTP"


@dataclass
class Result:
    server: str
    mode: str  # "stream" | "whole"
    clients: int
    requests: int
    tokens: int
    wall: float
    latencies: list[float]
    ttfts: list[float]
    errors: int
    busy_cpu: float = 0.0  # CPU seconds of the server's busiest thread (its batching loop) during the run
    round: int = 0
    # The bound paired with this run: at 1 client the bare loop's requests interleaved with this run's own; at more
    # clients the mean of the bare loop's figures just before and just after its cell.
    bound: float = float("nan")
    bound_cpu: float = float("nan")
    # The same with one other core kept busy by a Python loop (see busy_neighbour).
    bound_busy: float = float("nan")
    bound_busy_cpu: float = float("nan")

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else float("nan")  # no successful request: no figure

    @property
    def tok_per_cpu_s(self) -> float:
        """Tokens per CPU-second of the generation thread: what the step costs, whatever share of the shared
        cores the run got (the load of this 2-core box moves wall-clock figures by 2x between rounds)."""
        return self.tokens / self.busy_cpu if self.busy_cpu else float("nan")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(
    name: str, cmd: list[str], port: int, ready_path: str, log_dir: Path, env: dict[str, str],
    procs: dict[str, subprocess.Popen[bytes]],
) -> Iterator[str]:
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    procs[name] = proc
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


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
               stream: bool = True) -> tuple[float, float, int]:
    start = time.perf_counter()
    if not stream:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = await client.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        end = time.perf_counter() - start
        return end, end, r.json()["usage"]["completion_tokens"]
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
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


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``: the scheduler's nanosecond figure (/proc/PID/task/TID/schedstat,
    Linux) where there is one, since psutil's utime + stime count 10 ms ticks, coarse against 0.1 s requests."""
    tasks = Path(f"/proc/{pid}/task")
    out: dict[int, float] = {}
    with contextlib.suppress(OSError, ValueError):
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that ended between the listing and the read
                out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
    if out:
        return out
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


async def _drive(name: str, url: str, clients: int, requests: int, max_tokens: int, stream: bool,
                 pid: int | None = None) -> Result:
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
                    lat, ttft, n = await _one(client, url, prompt, max_tokens, stream)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(lat)
                ttfts.append(ttft)
                tokens += n

        cpu0 = _thread_cpu(pid) if pid else {}
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        cpu1 = _thread_cpu(pid) if pid else {}
    busy = max((cpu1[t] - cpu0.get(t, 0.0) for t in cpu1), default=0.0)
    return Result(name, "stream" if stream else "whole", clients, requests, tokens, wall, latencies, ttfts, errors,
                  busy)


def _merge(results: list[Result]) -> list[Result]:
    """Pool the rounds of each (server, clients): tokens/s = all tokens / all timed wall time."""
    merged: dict[tuple[str, str, int], Result] = {}
    for r in results:
        m = merged.get((r.server, r.mode, r.clients))
        if m is None:
            merged[(r.server, r.mode, r.clients)] = Result(r.server, r.mode, r.clients, r.requests, r.tokens, r.wall,
                                                           list(r.latencies), list(r.ttfts), r.errors, r.busy_cpu)
        else:
            m.requests += r.requests
            m.tokens += r.tokens
            m.wall += r.wall
            m.latencies += r.latencies
            m.ttfts += r.ttfts
            m.errors += r.errors
            m.busy_cpu += r.busy_cpu
    return list(merged.values())


@dataclass(frozen=True)
class Spread:
    """A per-round figure over the rounds: its median and range."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:  # a run with no CPU reading (NaN) has no ratio; min/max/median skip it
        object.__setattr__(self, "values", tuple(v for v in self.values if math.isfinite(v)))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def fmt(self, scale: float = 100.0, unit: str = " %", digits: int = 0) -> str:
        if not self.values:
            return "n/a"
        lo, hi = min(self.values), max(self.values)
        med = f"{scale * self.median:.{digits}f}{unit}"
        return med if len(self.values) == 1 else f"{med} ({scale * lo:.{digits}f}-{scale * hi:.{digits}f})"


def of_bound(results: list[Result], busy: bool = False) -> dict[tuple[str, str, int], tuple[Spread, Spread]]:
    """Per (server, mode, clients): each round's tokens/s over its paired bound, and the same per CPU-second
    (``busy``: over the bound measured beside a busy neighbour)."""
    out: dict[tuple[str, str, int], tuple[list[float], list[float]]] = {}
    for r in results:
        wall, cpu = out.setdefault((r.server, r.mode, r.clients), ([], []))
        wall.append(r.tok_s / (r.bound_busy if busy else r.bound))
        cpu.append(r.tok_per_cpu_s / (r.bound_busy_cpu if busy else r.bound_cpu))
    return {k: (Spread(tuple(w)), Spread(tuple(c))) for k, (w, c) in out.items()}


def versus(results: list[Result], server: str, peer: str) -> dict[tuple[str, int], tuple[Spread, Spread]]:
    """Per (mode, clients): server ÷ peer within each round (the two ran back to back), wall and per CPU-second."""
    runs = {(r.server, r.mode, r.clients, r.round): r for r in results}
    out: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for (name, mode, clients, round_), a in runs.items():
        b = runs.get((peer, mode, clients, round_))
        if name != server or b is None:
            continue
        wall, cpu = out.setdefault((mode, clients), ([], []))
        wall.append(a.tok_s / b.tok_s)
        cpu.append(a.tok_per_cpu_s / b.tok_per_cpu_s)
    return {k: (Spread(tuple(w)), Spread(tuple(c))) for k, (w, c) in out.items()}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


_BOUND_MODELS: dict[tuple[Path, str, str], tuple[Any, Any]] = {}


def _bound_model(model_dir: Path, device: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer and model for the bound, loaded once (it is measured many times a round)."""
    key = (model_dir, device, dtype)
    if key not in _BOUND_MODELS:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        _BOUND_MODELS[key] = (AutoTokenizer.from_pretrained(model_dir), model)
    return _BOUND_MODELS[key]


def bare_decode(model_dir: Path, device: str, dtype: str, threads: int, batch: int, prompt: str,
                max_tokens: int, repeats: int = 2) -> tuple[float, float]:
    """The bound: greedy decoding with the model's own KV cache, no server or scheduler. Returns (tokens/s,
    tokens per CPU-second of this thread) over `repeats` runs after a warm-up run (batch x max_tokens tokens,
    prefill included, as the servers' wall time includes it)."""
    wall = cpu = 0.0
    for i in range(repeats + 1):  # the first run warms up allocators / kernels
        w, c = decode_once(model_dir, device, dtype, threads, [prompt] * batch, max_tokens)
        if i:
            wall, cpu = wall + w, cpu + c
    tokens = repeats * batch * max_tokens
    return tokens / wall, tokens / cpu


def decode_once(model_dir: Path, device: str, dtype: str, threads: int, prompts: list[str],
                max_tokens: int) -> tuple[float, float]:
    """One run of the bare loop over ``prompts`` (one batch, equal lengths): (wall seconds, CPU seconds of this
    thread) for len(prompts) x max_tokens tokens."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    tok, model = _bound_model(model_dir, device, dtype)
    ids = torch.tensor([tok(p).input_ids for p in prompts], device=device)
    with torch.inference_mode():
        start, start_cpu = time.perf_counter(), time.thread_time()  # 1 torch thread on CPU: ops run inline
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_tokens - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.tolist()  # synchronise (GPU)
        return time.perf_counter() - start, time.thread_time() - start_cpu


@contextlib.contextmanager
def busy_neighbour() -> Iterator[None]:
    """One other process spinning a Python loop while the bound runs. On this 2-vCPU VM the two vCPUs share
    hardware: a busy neighbour slows the bare loop per CPU-second (see the module docstring), and a server
    never runs alone — its own HTTP thread and the benchmark's client keep the other vCPU busy. The bound measured
    beside a busy neighbour is what a server can reach on such a box; the bound alone is the issue's bound."""
    # Spins until killed, or until this process is gone (checked every ~10 ms: never left eating a core).
    spin = ("import os\nparent = os.getppid()\n"
            "while os.getppid() == parent:\n    for _ in range(100_000):\n        pass\n")
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # let it get scheduled
        yield
    finally:
        proc.kill()
        proc.wait()


def paired_bound(model_dir: Path, device: str, dtype: str, threads: int, batch: int, prompt: str,
                 max_tokens: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(tokens/s, tokens/CPU-s) of the bound alone, then beside a busy neighbour."""
    alone = bare_decode(model_dir, device, dtype, threads, batch, prompt, max_tokens)
    return alone, busy_bound(model_dir, device, dtype, threads, batch, prompt, max_tokens)


def busy_bound(model_dir: Path, device: str, dtype: str, threads: int, batch: int, prompt: str,
               max_tokens: int) -> tuple[float, float]:
    """(tokens/s, tokens/CPU-s) of the bound beside a busy neighbour."""
    with busy_neighbour():
        return bare_decode(model_dir, device, dtype, threads, batch, prompt, max_tokens)


def engine_settings(server_flags: list[str]) -> Any:
    """The Settings the gptd server gets from the same flags (`serve` + server_flags, GPTD_* env included)."""
    from gptd_runtime.__main__ import _parser
    from gptd_runtime.config import load_settings

    args = _parser().parse_args(["serve", *server_flags])
    return load_settings({k: v for k, v in vars(args).items() if k != "command"})


def _started_engine(settings: Any) -> Any:
    """A started GenerationEngine with the server's own settings (warm it up in the loop that will use it)."""
    from gptd_runtime.engine import GenerationEngine
    from gptd_runtime.loading import load_model

    engine = GenerationEngine(load_model(settings, Path(settings.model)), settings)
    engine.start()
    return engine


def _batching_thread(engine: Any) -> int | None:
    """The engine's batching thread, whose CPU counts (transformers' private attribute: a benchmark may use it;
    None without it, and callers take the busiest thread of this process, the batching one in practice)."""
    thread = getattr(engine._manager, "_generation_thread", None)
    return None if thread is None else thread.native_id


def engine_in_process(settings: Any, clients: int, requests: int, max_tokens: int) -> Result:
    """gptd's engine with no server: this process loads the model with the server's own settings, starts a
    GenerationEngine, warms it up like the server does, submits the benchmark's requests straight to it, `clients`
    at a time, and stops it again (nothing of it stays in the process during the bound or the server runs; at 1
    client the engine takes part in the interleaved cell instead, see interleaved_cell). What
    the engine alone costs, without HTTP, the event-loop thread or a client beside it. Metrics are not recorded
    (the server's prometheus counters are not part of the engine)."""
    from gptd_runtime.engine import SamplingParams

    engine = _started_engine(settings)
    try:
        tokenizer = engine.tokenizer
        prompts = [tokenizer(f"Request {i}: the quick brown fox jumps over the lazy dog.").input_ids
                   for i in range(requests)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        latencies: list[float] = []
        tokens = 0

        async def drive() -> tuple[float, float]:
            nonlocal tokens
            await engine.warmup()
            thread = _batching_thread(engine)
            queue = list(reversed(prompts))

            async def worker() -> None:
                nonlocal tokens
                while queue:
                    ids = queue.pop()
                    start = time.perf_counter()
                    stream = engine.submit(ids, params)
                    await stream.collect()
                    latencies.append(time.perf_counter() - start)
                    tokens += stream.completion_tokens

            cpu0 = _thread_cpu(os.getpid())
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - start
            cpu1 = _thread_cpu(os.getpid())
            if thread is not None:
                return wall, cpu1.get(thread, 0.0) - cpu0.get(thread, 0.0)
            return wall, max((cpu1[t] - cpu0.get(t, 0.0) for t in cpu1), default=0.0)

        wall, busy = asyncio.run(drive())
    finally:
        engine.stop()
    return Result(ENGINE, "whole", clients, requests, tokens, wall, latencies, latencies, 0, busy)


# -- one client: every participant's requests interleaved -----------------------------------------------------------
# At one client a cell is a few seconds per server, and this VM's speed moves by 30 % and more between such
# blocks (the bound alone went 663 -> 812 -> 832 -> 783 -> 488 tok/s in successive runs, pinned to either vCPU), which
# is as large as the differences measured. One client means one request at a time, so the requests of gptd, the
# peer, the bare loop and the in-process engine can alternate request by request without changing the load any
# of them sees: drift then hits all of them alike. (At 32 clients the load is the point, so cells stay whole.)
def rotation(names: list[str], j: int) -> list[str]:
    """The order in which request ``j`` of an interleaved cell goes to the participants: row ``j`` of a Williams
    design (a balanced Latin square; for an odd count, the square followed by its mirror image). Over
    2 x len(names) requests each participant runs in every position equally often, and right before every other
    one equally often, so drift between neighbouring requests favours none of them."""
    n = len(names)
    first, lo, hi = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(first) < n:
        if len(first) % 2:
            first, lo = [*first, lo], lo + 1
        else:
            first, hi = [*first, hi], hi - 1
    row = j % rotation_period(n)
    order = [names[(x + row % n) % n] for x in first]
    return order[::-1] if row >= n else order


def rotation_period(participants: int) -> int:
    """Requests after which rotation() has put every participant in every position equally often."""
    return participants if participants % 2 == 0 else 2 * participants


def balanced_count(requests: int, participants: int) -> int:
    """``requests`` rounded up to a whole number of rotation periods (else the rotation is not balanced)."""
    period = rotation_period(participants)
    return -(-requests // period) * period


async def run_rotation(runners: dict[str, Any], prompts: list[str]) -> dict[str, list[Any]]:
    """Each prompt to every runner, one at a time, in rotation() order; each runner's answers in prompt order."""
    names = list(runners)
    answers: dict[str, list[Any]] = {name: [] for name in names}
    for j, prompt in enumerate(prompts):
        for name in rotation(names, j):
            answers[name].append(await runners[name](prompt))
    return answers


@dataclass
class Sample:
    """One request of an interleaved cell: its latency, time to first token, tokens, and the CPU seconds each
    thread of the participant's process spent on it."""

    wall: float
    ttft: float
    tokens: int
    cpu: dict[int, float]


def tally(name: str, mode: str, samples: list[Sample | None]) -> Result:
    """A participant's Result from its interleaved requests (None: a failed request): tokens over the sum of its
    own requests' wall time; CPU of the thread that spent the most over all of them (the batching thread)."""
    ok = [x for x in samples if x is not None]
    per_thread: dict[int, float] = {}
    for x in ok:
        for t, c in x.cpu.items():
            per_thread[t] = per_thread.get(t, 0.0) + c
    return Result(name, mode, 1, len(samples), sum(x.tokens for x in ok), sum(x.wall for x in ok),
                  [x.wall for x in ok], [x.ttft for x in ok], len(samples) - len(ok),
                  max(per_thread.values(), default=0.0))


async def interleaved_cell(args: argparse.Namespace, threads: int, mode: str, urls: dict[str, str],
                           pids: dict[str, int], engine: Any, requests: int) -> list[Result]:
    """One 1-client cell: ``requests`` prompts (rounded up to a whole number of rotation periods), each sent to
    every participant (the servers of ``urls``, the bare loop, and ``engine`` when given) in rotation() order.
    Returns one Result per participant; the bare loop's is named BOUND, and the same beside a busy neighbour
    BUSY_BOUND."""
    from gptd_runtime.engine import SamplingParams

    stream = mode == "stream"
    participants = len(urls) + 2 + (engine is not None)  # the servers, the bound twice, the engine
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog."
               for i in range(balanced_count(requests, participants))]
    async with httpx.AsyncClient(timeout=600) as client:
        def server(name: str) -> Any:
            async def once(prompt: str) -> Sample | None:
                cpu0 = _thread_cpu(pids[name])
                try:
                    wall, ttft, tokens = await _one(client, urls[name], prompt, args.max_tokens, stream)
                except httpx.HTTPError:
                    return None
                cpu1 = _thread_cpu(pids[name])
                return Sample(wall, ttft, tokens, {t: c - cpu0.get(t, 0.0) for t, c in cpu1.items()})
            return once

        async def bound(prompt: str) -> Sample:
            wall, cpu = decode_once(args.model_dir, args.device, args.dtype, threads, [prompt], args.max_tokens)
            return Sample(wall, wall, args.max_tokens, {0: cpu})

        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        thread = None if engine is None else _batching_thread(engine)

        async def in_process(prompt: str) -> Sample:
            ids = engine.tokenizer(prompt).input_ids  # outside the clock, like the bound's
            cpu0 = _thread_cpu(os.getpid())
            start = time.perf_counter()
            out = engine.submit(ids, params)
            await out.collect()
            wall = time.perf_counter() - start
            cpu1 = _thread_cpu(os.getpid())
            cpu = {t: c - cpu0.get(t, 0.0) for t, c in cpu1.items() if thread is None or t == thread}
            return Sample(wall, wall, out.completion_tokens, cpu)

        async def busy(prompt: str) -> Sample:
            with busy_neighbour():  # started and settled before the timed run, stopped after it
                return await bound(prompt)

        runners: dict[str, Any] = {name: server(name) for name in urls}
        runners[BOUND] = bound
        runners[BUSY_BOUND] = busy
        if engine is not None:
            await engine.warmup()
            runners[ENGINE] = in_process
        # Warm-up outside the timed requests (first-request lazy init on the peer, allocator growth).
        for once in runners.values():
            for _ in range(2):
                await once("warm up")
        samples = await run_rotation(runners, prompts)
    return [tally(name, "whole" if name == ENGINE else mode, got) for name, got in samples.items()]


# py-spy frames -> the parts of a step the docs report. First match wins (checked on the innermost frames first).
_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sampler (gptd)", ("gptd_runtime/sampling.py", "gptd_runtime/constraints.py")),
    ("model forward", ("torch/nn/", "transformers/models/", "gptd_runtime/attention.py", "torch/_tensor",
                       "transformers/integrations/", "transformers/modeling_")),
    ("scheduler", ("continuous_batching/scheduler.py",)),
    ("cache bookkeeping", ("continuous_batching/cache", "continuous_batching/input_outputs.py",
                           "continuous_batching/requests.py", "_cb_internals.py (make_cache")),
    ("tokenizer/detokenizer", ("tokenizers/", "tokenization_", "_consume_tokens", "DecodeStream")),
    ("event-loop hand-off", ("call_soon_threadsafe", "asyncio/queues.py", "continuous_api.py (deliver",
                             "_on_output", "asyncio/base_events.py (_run_once", "selectors.py")),
    ("HTTP (uvicorn/starlette/fastapi/json)", ("uvicorn/", "starlette/", "fastapi/", "pydantic", "json/", "h11",
                                               "httptools", "gptd_runtime/api/")),
    ("batching loop, other", ("continuous_batching/",)),
)


def _bucket(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, needles in _BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other (idle, GC, imports)"


def profile_breakdown(raw: Path) -> dict[str, dict[str, float]]:
    """py-spy --format raw without --idle (collapsed stacks "thread;frame;... count", on-CPU samples only)
    -> {thread: {bucket: samples}}."""
    totals: dict[str, dict[str, float]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "_run_generation_loop" in stack:
            thread = "engine thread"
        elif "MainThread" in stack:
            thread = "event-loop thread"
        else:
            thread = "other threads"
        bucket = _bucket(stack)
        totals.setdefault(thread, {}).setdefault(bucket, 0.0)
        totals[thread][bucket] += int(count)
    return totals


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="HF model dir (default: build the 'small' demo model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", default="1,32", help="comma-separated concurrency levels")
    p.add_argument("--modes", default="stream,whole", help="stream (SSE) and/or whole (non-streaming)")
    p.add_argument("--single-client-requests", type=int, default=16,
                   help="requests for the 1-client level (sequential runs are slow)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the alternating runs and pool them")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--gptd-args", default="", help="extra flags for the gptd server (e.g. '--kv-cache-blocks 64')")
    p.add_argument("--threads", type=int, help="gptd --torch-threads and the bound's threads (default: gptd's rule)")
    p.add_argument("--peer-threads", type=int,
                   help="OMP_NUM_THREADS for transformers serve (default: the same torch threads as gptd)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--profile", type=float, default=0.0,
                   help="seconds of py-spy on gptd during its last 32-client streaming run (0: off)")
    p.add_argument("--json", type=Path, help="also write raw results here")
    args = p.parse_args()
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        p.error(f"--profile needs py-spy next to {sys.executable} (it is in the dev extras: make venv)")

    work = Path(tempfile.mkdtemp(prefix="gptd-bench-"))
    if args.model_dir is None:
        from gptd_runtime.demo import build_demo_model

        args.model_dir = build_demo_model(work / "model", size="small")
    from gptd_runtime.loading import default_torch_threads, placement_for

    threads = args.threads or default_torch_threads()
    placement = placement_for(args.device)
    levels = [int(c) for c in args.clients.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    print(f"model {args.model_dir} device {args.device} dtype {args.dtype}; devices used: "
          f"{', '.join(placement.devices)}; torch threads (gptd and bound): {threads}; {args.requests} requests x "
          f"{args.max_tokens} tokens (1 client: {args.single_client_requests} requests); load: {_load()}",
          file=sys.stderr)

    gptd_port, tf_port = _port(), _port()
    server_flags = [
        "--model", str(args.model_dir), "--host", "127.0.0.1", "--port", str(gptd_port), "--device", args.device,
        "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--max-new-tokens",
        str(max(args.max_tokens, 64)), "--max-queue", "4096", "--log-level", "warning", "--torch-threads",
        str(threads), *args.gptd_args.split()]
    in_process = engine_settings(server_flags)
    # The allocator settings the server runs with (loading.tune_malloc), from the start: the bound and the
    # in-process engine are measured in this process, and the engine's model load would otherwise change them
    # part-way through the run (glibc's thresholds move a CPU step by ~30 %).
    from gptd_runtime.loading import tune_malloc

    tune_malloc()
    peer_env = {"OMP_NUM_THREADS": str(args.peer_threads or threads)}  # same threads: the bound's, gptd's, the peer's
    servers: list[tuple[str, list[str], int, str, dict[str, str]]] = [(
        "gptd", [sys.executable, "-m", "gptd_runtime", "serve", *server_flags], gptd_port, "/health/ready", {},
    )]
    if not args.skip_transformers:
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        servers.append((
            "transformers-serve",
            [exe, "serve", str(args.model_dir), "--device", args.device, "--dtype", args.dtype,
             "--continuous-batching", "--host", "127.0.0.1", "--port", str(tf_port)],
            tf_port, "/health", peer_env,
        ))

    prompt = "Request 0: the quick brown fox jumps over the lazy dog."
    results: list[Result] = []
    bounds: dict[int, list[float]] = {}
    bounds_cpu: dict[int, list[float]] = {}
    bounds_busy_cpu: dict[int, list[float]] = {}
    profile_raw = work / "gptd.pyspy.txt"
    # Both servers stay up and the load alternates between them (request by request at 1 client, cell by cell at
    # more), so drift in background load hits both alike; the bound is measured within or around every cell for the
    # same reason.
    with contextlib.ExitStack() as stack:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        urls = {name: stack.enter_context(_server(name, cmd, port, ready, work, env, procs))
                for name, cmd, port, ready, env in servers}
        pids = {name: proc.pid for name, proc in procs.items()}
        for round_ in range(args.rounds):
            # Each run is divided by its own cell's bound (see the module docstring): on a shared VM the bound itself
            # moves by 30 % or more within minutes, so a bound measured once per round is a poor reference for a cell
            # run minutes later. The servers' order alternates between rounds so neither always runs first.
            order = list(urls.items()) if round_ % 2 == 0 else list(reversed(urls.items()))
            for clients in levels:
                n = args.single_client_requests if clients == 1 else args.requests
                for mode in modes:
                    with_engine = mode == modes[-1]  # once per level and round: the engine alone answers whole requests
                    if clients == 1:
                        engine = _started_engine(in_process) if with_engine else None
                        try:
                            cell = asyncio.run(interleaved_cell(args, threads, mode, dict(order), pids, engine, n))
                        finally:
                            if engine is not None:
                                engine.stop()
                                engine = None  # its model and KV cache are not kept through the next cells
                                gc.collect()
                        bare, busy = (next(r for r in cell if r.server == b) for b in (BOUND, BUSY_BOUND))
                        cell = [r for r in cell if r.server not in (BOUND, BUSY_BOUND)]
                        ref, ref_busy = (bare.tok_s, bare.tok_per_cpu_s), (busy.tok_s, busy.tok_per_cpu_s)
                        bounds.setdefault(clients, []).append(ref[0])
                        bounds_cpu.setdefault(clients, []).append(ref[1])
                        bounds_busy_cpu.setdefault(clients, []).append(ref_busy[1])
                        print(f"round {round_ + 1} bound batch=1 {mode}, interleaved request by request with the "
                              f"servers: {ref[0]:.0f} tok/s ({ref[1]:.0f} tok/CPU-s); beside a busy neighbour "
                              f"{ref_busy[1]:.0f} tok/CPU-s", file=sys.stderr)
                    else:
                        (before, before_busy) = paired_bound(args.model_dir, args.device, args.dtype, threads,
                                                             clients, prompt, args.max_tokens)
                        cell = []
                        for name, url in order:
                            cell.append(asyncio.run(_drive(name, url, clients, n, args.max_tokens, mode == "stream",
                                                           pids[name])))
                        if with_engine:
                            cell.append(engine_in_process(in_process, clients, n, args.max_tokens))
                        after, after_busy = paired_bound(args.model_dir, args.device, args.dtype, threads,
                                                         clients, prompt, args.max_tokens)
                        ref = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
                        bounds.setdefault(clients, []).extend([before[0], after[0]])
                        bounds_cpu.setdefault(clients, []).extend([before[1], after[1]])
                        print(f"round {round_ + 1} bound batch={clients} {mode}: {before[0]:.0f} before, "
                              f"{after[0]:.0f} after tok/s ({before[1]:.0f}, {after[1]:.0f} tok/CPU-s)",
                              file=sys.stderr)
                        ref_busy = ((before_busy[0] + after_busy[0]) / 2, (before_busy[1] + after_busy[1]) / 2)
                        bounds_busy_cpu.setdefault(clients, []).extend([before_busy[1], after_busy[1]])
                        print(f"round {round_ + 1} bound batch={clients} beside a busy neighbour: "
                              f"{before_busy[1]:.0f} before, {after_busy[1]:.0f} after tok/CPU-s", file=sys.stderr)
                    for r in cell:
                        r.bound, r.bound_cpu, r.round = ref[0], ref[1], round_
                        r.bound_busy, r.bound_busy_cpu = ref_busy
                        print(f"round {round_ + 1} {r.server} {mode} clients={clients}: {r.tok_s:.0f} tok/s "
                              f"({100 * r.tok_s / ref[0]:.0f} % of bound), {r.tok_per_cpu_s:.0f} tok/CPU-s "
                              f"({100 * r.tok_per_cpu_s / ref[1]:.0f} %; {100 * r.tok_per_cpu_s / ref_busy[1]:.0f} % "
                              f"of the busy bound), {r.errors} errors (load {_load()})", file=sys.stderr)
                    results.extend(cell)
        if args.profile:  # untimed: py-spy samples gptd while it serves the top level, streaming, until it is done
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(procs["gptd"].pid), "-d",
                 str(max(1, round(args.profile))), "-r", "200", "-f", "raw", "--threads", "-o",
                 str(profile_raw)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            while spy.poll() is None:
                asyncio.run(_drive("gptd", urls["gptd"], max(levels), args.requests, args.max_tokens, True))
    per_round = results
    ratios = of_bound(per_round)
    ratios_busy = of_bound(per_round, busy=True)
    results = _merge(results)
    bound = {c: statistics.median(v) for c, v in bounds.items()}
    bound_cpu = {c: statistics.median(v) for c, v in bounds_cpu.items()}
    bound_busy_cpu = {c: statistics.median(v) for c, v in bounds_busy_cpu.items()}

    print("\nBound (bare decode loop; 1 client: interleaved request by request with the servers, one figure per cell; "
          "more clients: measured right before and right after every cell; median of all cells' figures): " + ", ".join(
              f"batch {c}: {bound[c]:.0f} tok/s ({min(bounds[c]):.0f}-{max(bounds[c]):.0f}), {bound_cpu[c]:.0f} "
              f"tok/CPU-s; beside a busy neighbour {bound_busy_cpu[c]:.0f} tok/CPU-s ({min(bounds_busy_cpu[c]):.0f}-"
              f"{max(bounds_busy_cpu[c]):.0f})" for c in sorted(bound)))
    print(f"\n% of bound: each round's run over its own cell's bound (1 client: the bare loop's requests interleaved "
          f"with the run's own; more clients: the mean of the bound just before and after the cell); median over "
          f"{args.rounds} round(s), range in brackets. 'busy bound (CPU)': tokens per CPU-second of the batching"
          " thread against the bound's tokens per CPU-second measured while one other core runs a Python loop "
          "(a server always has its HTTP thread and the client beside it; on a shared-core VM that slows every "
          "instruction). tokens/s, latencies and TTFT: all rounds pooled.")
    print("\n| server | mode | clients | requests | gen tokens | tokens/s | % of bound | tok/CPU-s of the generation "
          "thread | % of bound (CPU) | % of busy bound (CPU) | p50 latency s | p95 latency s | p50 TTFT s | "
          "p95 TTFT s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        wall, cpu = ratios[(r.server, r.mode, r.clients)]
        _, bcpu = ratios_busy[(r.server, r.mode, r.clients)]
        print(f"| {r.server} | {r.mode} | {r.clients} | {r.requests} | {r.tokens} | {r.tok_s:.0f} | "
              f"{wall.fmt()} | {r.tok_per_cpu_s:.0f} | {cpu.fmt()} | {bcpu.fmt()} | "
              f"{_pct(r.latencies, 50):.3f} | {_pct(r.latencies, 95):.3f} | "
              f"{_pct(r.ttfts, 50):.3f} | {_pct(r.ttfts, 95):.3f} | {r.errors} |")
    by = {(r.server, r.mode, r.clients): r for r in results}
    for c in levels:  # fairness: both servers must have generated the same number of tokens
        for mode in modes:
            counts = {name: by[(name, mode, c)].tokens for name, *_ in servers}
            if len(set(counts.values())) > 1:
                print(f"WARNING: {mode} {c} clients: generated token counts differ {counts}; compare tokens/s "
                      "with care", file=sys.stderr)
    if not args.skip_transformers:
        vs = versus(per_round, "gptd", "transformers-serve")
        print("\n| mode | clients | gptd % of bound (wall / CPU) | gptd % of busy bound (CPU) | peer % of "
              "bound (wall / CPU) | gptd / peer (wall / CPU) | p50 latency ratio (pooled) | p50 TTFT ratio (pooled) |")
        print("|---|---|---|---|---|---|---|---|")
        for c in levels:
            for mode in modes:
                a, b2 = by[("gptd", mode, c)], by[("transformers-serve", mode, c)]
                ga, gcpu = ratios[("gptd", mode, c)]
                _, gbc = ratios_busy[("gptd", mode, c)]
                pa, pc = ratios[("transformers-serve", mode, c)]
                va, vc = vs[(mode, c)]
                print(f"| {mode} | {c} | {ga.fmt()} / {gcpu.fmt()} | {gbc.fmt()} | {pa.fmt()} / "
                      f"{pc.fmt()} | {va.fmt(1, 'x', 2)} / {vc.fmt(1, 'x', 2)} | "
                      f"{_pct(a.latencies, 50) / _pct(b2.latencies, 50):.2f} | "
                      f"{_pct(a.ttfts, 50) / _pct(b2.ttfts, 50):.2f} |")
    for c in levels:
        key = (ENGINE, "whole", c)
        if key in ratios:
            wall, cpu = ratios[key]
            print(f"\ngptd's engine alone (no HTTP, no client), {c} at a time: {wall.fmt()} of the bound wall-clock, "
                  f"{cpu.fmt()} per CPU-second of its batching thread")
    if args.profile and profile_raw.exists():
        seconds = max(1, round(args.profile))
        print(f"\npy-spy, gptd, {max(levels)} clients streaming, {seconds} s at 200 Hz: per thread, the share of "
              "wall time on CPU (busy), then how that CPU time splits:")
        for thread, buckets in sorted(profile_breakdown(profile_raw).items()):
            total = sum(buckets.values())
            parts = ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]))
            print(f"- {thread} (busy {100 * total / (200 * seconds):.0f} %): {parts}")
        shutil.copy(profile_raw, Path.cwd() / "gptd.pyspy.txt")
    print(f"\nload after the run: {_load()}")
    if args.json:
        args.json.write_text(json.dumps({"bound": bound, "bound_cpu": bound_cpu, "bounds": bounds,
                                         "bounds_cpu": bounds_cpu, "bounds_busy_cpu": bounds_busy_cpu,
                                         "per_round": [r.__dict__ for r in per_round],
                                         "results": [r.__dict__ for r in results]}, default=str, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
