"""Operator benchmark (run by hand, not a test): N GPTDeployments against kmock's KubernetesEmulator.

    .venv/bin/python benchmarks/operator_bench.py [--count 500] [--resync 5]

The operator runs as it does in a cluster: a separate process, ``python -m gptd_operator``, reading a
kubeconfig that points at the emulator (which runs here, in this process). Reported:
  - time from the first CR POST until every Deployment exists;
  - API requests the operator made per GPTDeployment while creating them (by method);
  - requests and writes (POST/PATCH/PUT/DELETE) during a no-op period covering >= 2 full resync passes;
  - the operator process's peak RSS (psutil; VmHWM).
The emulator plays no controllers, so Deployments never become ready: the CRs stay in phase Pending.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import psutil
import yaml

# The emulator set-up (resources with verbs, kubeconfig) is the integration tests' own, so both measure the same thing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.cluster import register_resources, write_kubeconfig

WRITES = {"POST", "PATCH", "PUT", "DELETE"}
BENCH_AGENT = "gptd-bench"


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with two changes for scale (neither changes what the operator sees):

    - uid / generateName on create, as every API server does (kopf's indices key on uid);
    - kmock keeps every request and each reaction filter re-scans that log on every new request (its
      DSL allows slices over history): quadratic, minutes for 5000 requests. Here the filters see only
      the requests in flight, and requests are counted in ``self.log`` (method, path, user agent).
    """

    log: list[tuple[str, str, str]]
    _inflight: list[Any]

    def __iter__(self) -> Any:
        return iter(list(getattr(self, "_inflight", [])))

    async def _handle(self, request: Any) -> Any:
        if not hasattr(self, "log"):
            self.log = []
        if not hasattr(self, "_inflight"):
            self._inflight = []
        agent = (request.headers or {}).get("User-Agent", "")
        path = request.url.path + ("?watch" if "watch=" in str(request.url) else "")
        self.log.append((_method(request), path, agent))
        self._requests.clear()  # only our in-flight list is scanned by the filters
        data = request.data
        if str(request.method).upper().endswith("POST") and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
        self._inflight.append(request)
        try:
            return await super()._handle(request)
        finally:
            self._inflight.remove(request)


def _method(req: Any) -> str:
    return str(req.method).rsplit(".", 1)[-1].upper()


def _operator_requests(k: Emulator, since: int = 0) -> list[tuple[str, str, str]]:
    return [r for r in k.log[since:] if r[2] != BENCH_AGENT]


def _count_deployments(k: Emulator) -> int:
    return sum(1 for (res, _, _), obj in k.objects.items() if res.plural == "deployments" and not obj.deleted)


async def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _resync_passes(log: Path) -> int:
    return len(re.findall(r"resync pass done", log.read_text(errors="replace")))


async def main(count: int, resync: float, namespaces: int) -> dict[str, Any]:
    async with Emulator() as k, kmock.Server(k) as srv:
        register_resources(k)
        url = str(srv.url).rstrip("/")
        tmp = Path(tempfile.mkdtemp(prefix="gptd-bench-"))
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", url)
        log = tmp / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GPTD_RESYNC_SECONDS": str(resync)}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gptd_operator", "run", "--liveness", ""],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            ps = psutil.Process(proc.pid)
            # Up when it watches GPTDeployments.
            k.log = []
            await _wait(lambda: any(p.endswith("gptdeployments?watch") for _, p, _ in k.log),
                        60, "the operator to watch gptdeployments")
            start_index = len(k.log)
            cpu0 = sum(ps.cpu_times()[:2])
            t0 = time.monotonic()
            sem = asyncio.Semaphore(50)
            async with aiohttp.ClientSession(url, headers={"User-Agent": BENCH_AGENT}) as session:

                async def create(i: int) -> None:
                    ns = f"bench-{i % namespaces}"
                    body = {
                        "apiVersion": "gptd.io/v1alpha1", "kind": "GPTDeployment",
                        "metadata": {"name": f"m{i:04d}", "namespace": ns, "generation": 1},
                        "spec": {"model": {"uri": f"hf://org/model-{i}"}, "replicas": 1 + i % 3},
                    }
                    async with sem, session.post(
                        f"/apis/gptd.io/v1alpha1/namespaces/{ns}/gptdeployments", json=body
                    ) as resp:
                        assert resp.status < 400, await resp.text()

                await asyncio.gather(*(create(i) for i in range(count)))
            t_posted = time.monotonic() - t0
            await _wait(lambda: _count_deployments(k) >= count, 600, f"{count} Deployments")
            t_all = time.monotonic() - t0

            # Let the creation wave settle: no operator request for 2 s.
            last, quiet_since = len(k.log), time.monotonic()
            while time.monotonic() - quiet_since < 2.0:
                await asyncio.sleep(0.2)
                now_len = len(k.log)
                if now_len != last:
                    last, quiet_since = now_len, time.monotonic()
            creation = _operator_requests(k, start_index)
            by_method = Counter(m for m, _, _ in creation)
            cpu_creation = sum(ps.cpu_times()[:2]) - cpu0

            # No-op period: at least two full resync passes, nothing changed in the cluster.
            mark = len(k.log)
            cpu1 = sum(ps.cpu_times()[:2])
            passes0 = _resync_passes(log)
            await _wait(lambda: _resync_passes(log) >= passes0 + 2, 10 * resync + 120, "2 resync passes")
            idle = _operator_requests(k, mark)
            idle_writes = [f"{m} {p}" for m, p, _ in idle if m in WRITES]
            cpu_idle = sum(ps.cpu_times()[:2]) - cpu1
            rss = ps.memory_info().rss
            try:
                hwm_kb = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text()).group(1))
            except (OSError, AttributeError):
                hwm_kb = rss // 1024
            timings = re.findall(r"resync pass done: (\d+) GPTDeployments in ([0-9.]+) s", log.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    return {
        "count": count,
        "namespaces": namespaces,
        "cpus": os.cpu_count(),
        "seconds_to_post_all_crs": round(t_posted, 2),
        "seconds_until_every_deployment_exists": round(t_all, 2),
        "operator_requests_during_creation": len(creation),
        "operator_cpu_seconds_during_creation": round(cpu_creation, 2),
        "operator_cpu_seconds_during_noop_period": round(cpu_idle, 2),
        "operator_requests_per_cr": round(len(creation) / count, 2),
        "per_cr_by_method": {m: round(c / count, 2) for m, c in sorted(by_method.items())},
        "noop_resync_passes_observed": _resync_passes(log) - passes0,
        "noop_resync_last_pass": timings[-1] if timings else None,
        "noop_period_operator_requests": len(idle),
        "noop_period_writes": len(idle_writes),
        "noop_period_write_samples": idle_writes[:5],
        "operator_rss_mb": round(rss / 2**20, 1),
        "operator_peak_rss_mb": round(hwm_kb / 1024, 1),
        "log": str(log),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--resync", type=float, default=5.0, help="operator resync period (GPTD_RESYNC_SECONDS)")
    parser.add_argument("--namespaces", type=int, default=10)
    result = asyncio.run(main(parser.parse_args().count, parser.parse_args().resync, parser.parse_args().namespaces))
    print(yaml.safe_dump(result, sort_keys=False))
