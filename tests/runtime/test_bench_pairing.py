"""benchmarks/runtime_bench.py's summary: each run is judged against the bound of its own cell, per round."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runtime_bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(bench: ModuleType, server: str, round_: int, tokens: int, wall: float, cpu: float, bound: float,
         bound_cpu: float, mode: str = "stream", clients: int = 32, busy_cpu: float = float("nan")):
    return bench.Result(server, mode, clients, 64, tokens, wall, [wall], [0.1], 0, busy_cpu=cpu, round=round_,
                        bound=bound, bound_cpu=bound_cpu, bound_busy_cpu=busy_cpu)


def test_each_round_is_divided_by_its_own_bound(bench: ModuleType) -> None:
    # Round 0 on a fast machine (bound 3000), round 1 on a slow one (bound 1500): gptd is 80 % of the bound in
    # both. Pooling the tokens and dividing by one median bound would say 60 % and 120 %-ish instead.
    runs = [
        _run(bench, "gptd", 0, 2400, 1.0, 0.9, 3000.0, 3000.0),
        _run(bench, "gptd", 1, 1200, 1.0, 0.9, 1500.0, 1500.0),
    ]
    wall, cpu = bench.of_bound(runs)[("gptd", "stream", 32)]
    assert wall.values == pytest.approx((0.8, 0.8))
    assert cpu.values == pytest.approx((2400 / 0.9 / 3000, 1200 / 0.9 / 1500))
    assert wall.fmt() == "80 % (80-80)"


def test_peer_ratio_pairs_runs_of_the_same_round_and_cell(bench: ModuleType) -> None:
    runs = [
        _run(bench, "gptd", 0, 2000, 1.0, 1.0, 1.0, 1.0),
        _run(bench, "peer", 0, 1000, 1.0, 1.0, 1.0, 1.0),
        _run(bench, "gptd", 1, 900, 1.0, 1.0, 1.0, 1.0),
        _run(bench, "peer", 1, 600, 1.0, 1.0, 1.0, 1.0),
        _run(bench, "gptd", 0, 300, 1.0, 1.0, 1.0, 1.0, mode="whole", clients=1),  # no peer run: no ratio
    ]
    vs = bench.versus(runs, "gptd", "peer")
    wall, _ = vs[("stream", 32)]
    assert wall.values == pytest.approx((2.0, 1.5))
    assert wall.median == pytest.approx(1.75)
    assert wall.fmt(1, "x", 2) == "1.75x (1.50-2.00)"
    assert ("whole", 1) not in vs


def test_one_round_prints_no_range(bench: ModuleType) -> None:
    assert bench.Spread((0.5,)).fmt() == "50 %"
    assert bench.Spread(()).fmt() == "n/a"


def test_the_busy_bound_is_a_separate_reference(bench: ModuleType) -> None:
    # 2000 tokens in 1 CPU-second; the bound alone does 4000 per CPU-second, beside a busy neighbour 2500.
    runs = [_run(bench, "gptd", 0, 2000, 1.0, 1.0, 4000.0, 4000.0, busy_cpu=2500.0)]
    _, alone = bench.of_bound(runs)[("gptd", "stream", 32)]
    _, busy = bench.of_bound(runs, busy=True)[("gptd", "stream", 32)]
    assert alone.values == pytest.approx((0.5,))
    assert busy.values == pytest.approx((0.8,))


def test_a_run_without_a_cpu_reading_has_no_ratio(bench: ModuleType) -> None:
    assert bench.Spread((float("nan"), 0.5, 0.7)).fmt() == "60 % (50-70)"
    assert bench.Spread((float("nan"),)).fmt() == "n/a"


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_interleaving_balances_positions_and_neighbours(bench: ModuleType, n: int) -> None:
    # Over 2 x n requests every participant runs in every position equally often, and right before every other one
    # equally often: drift between neighbouring requests then favours none of them.
    names = [f"p{i}" for i in range(n)]
    orders = [bench.rotation(names, j) for j in range(2 * n)]
    assert all(sorted(o) == names for o in orders)
    for pos in range(n):
        counts = {name: sum(o[pos] == name for o in orders) for name in names}
        assert set(counts.values()) == {2}, (pos, counts)
    pairs: dict[tuple[str, str], int] = {}
    for o in orders:
        for a, b in itertools.pairwise(o):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
    assert len(pairs) == n * (n - 1)  # every ordered pair of distinct participants occurs
    assert len(set(pairs.values())) == 1, pairs


def test_tally_counts_own_requests_and_the_busiest_thread(bench: ModuleType) -> None:
    samples = [bench.Sample(0.5, 0.1, 64, {1: 0.4, 2: 0.05}), None, bench.Sample(0.25, 0.05, 32, {1: 0.2, 2: 0.3})]
    r = bench.tally("gptd", "whole", samples)
    assert (r.requests, r.tokens, r.errors) == (3, 96, 1)
    assert r.tok_s == pytest.approx(96 / 0.75)
    assert r.busy_cpu == pytest.approx(0.6)  # thread 1 over both requests, not the larger single-request figure
    assert r.latencies == [0.5, 0.25] and r.ttfts == [0.1, 0.05]


def test_request_counts_round_up_to_whole_rotation_periods(bench: ModuleType) -> None:
    assert [bench.rotation_period(n) for n in (2, 3, 4, 5)] == [2, 6, 4, 10]
    assert bench.balanced_count(16, 4) == 16
    assert bench.balanced_count(16, 5) == 20
    assert bench.balanced_count(16, 3) == 18


def test_run_rotation_sends_every_prompt_to_every_runner_in_rotation_order(bench: ModuleType) -> None:
    import asyncio

    calls: list[tuple[str, str]] = []

    def runner(name: str):
        async def once(prompt: str) -> str:
            calls.append((name, prompt))
            return f"{name}:{prompt}"
        return once

    names = ["gptd", "peer", "bound", "busy"]
    prompts = [f"p{j}" for j in range(8)]
    answers = asyncio.run(bench.run_rotation({n: runner(n) for n in names}, prompts))
    assert answers == {n: [f"{n}:{p}" for p in prompts] for n in names}  # each runner's answers in prompt order
    expected = [(n, p) for j, p in enumerate(prompts) for n in bench.rotation(names, j)]
    assert calls == expected  # one prompt at a time, to all runners, in that prompt's rotation order
    assert [c[0] for c in calls[:4]] != [c[0] for c in calls[4:8]]  # the order moves between prompts


def test_a_participant_whose_requests_all_failed_has_no_figure(bench: ModuleType) -> None:
    r = bench.tally("peer", "stream", [None, None])
    assert (r.tokens, r.errors) == (0, 2)
    assert math.isnan(r.tok_s) and math.isnan(r.tok_per_cpu_s)
