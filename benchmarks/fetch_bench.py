"""Cold vs warm start through `gptd_runtime fetch`, against today's download-at-start, on one local hub.

A GPT-2-shaped model with random weights is built here and served by the tests' local hub
(tests/support/hub.py, real HTTP on loopback). Measured in one run:
- transfer bound: every selected file read once over HTTP by a bare client (bytes discarded);
- fetch: `python -m gptd_runtime fetch` into an empty cache (cold), MB/s against the bound;
- peer: huggingface_hub's `snapshot_download` of the same repo (what `serve --model hf://...` does today);
- start to ready: `serve` on the fetched directory (warm cache: what a pod of a cached revision does),
  against `serve --model hf://...` pointed at the hub (every replica downloading at start, as today),
  and against fetch + serve (the first pod of a new revision with the cache).

    .venv/bin/python benchmarks/fetch_bench.py                 # 6 layers x 512 (~90 MB of safetensors)
    .venv/bin/python benchmarks/fetch_bench.py --layers 12 --width 768
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]

from tests.support.hub import FakeHub  # noqa: E402
from tests.support.runtime import ServerProcess  # noqa: E402

REPO_ID = "bench/gpt2"


def _build(path: Path, layers: int, width: int) -> Path:
    import torch
    from gptd_runtime.demo import build_demo_model
    from transformers import GPT2Config, GPT2LMHeadModel

    build_demo_model(path)  # tokenizer + configs; weights replaced below
    config = GPT2Config.from_pretrained(path)
    config.n_layer, config.n_embd, config.n_head = layers, width, max(1, width // 64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _ready_seconds(args: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    server = ServerProcess(args, env)
    try:
        server.wait_ready(timeout=600)
        return time.perf_counter() - start
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    args = p.parse_args()
    print(f"cpus={os.cpu_count()} loadavg before={os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
        root = Path(tmp)
        src = _build(root / "src", args.layers, args.width)
        sha = hub.add_directory(REPO_ID, src)
        names = sorted(p.name for p in src.iterdir())
        total = sum((src / n).stat().st_size for n in names)
        mb = total / 2**20
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}

        start = time.perf_counter()
        with httpx.Client(base_url=hub.url, timeout=120) as client:
            for name in names:
                with client.stream("GET", f"/{REPO_ID}/resolve/{sha}/{name}") as r:
                    for _ in r.iter_bytes():
                        pass
        bound = time.perf_counter() - start

        cache = root / "cache"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gptd_runtime", "fetch", f"hf://{REPO_ID}", "--dest", str(cache)],
                       cwd=REPO, env={**os.environ, **env}, check=True, capture_output=True)
        fetch_s = time.perf_counter() - start

        code = ("import sys, time; from huggingface_hub import snapshot_download; t = time.perf_counter(); "
                f"snapshot_download({REPO_ID!r}, cache_dir=sys.argv[1]); print(time.perf_counter() - t)")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(root / "hf-cache")], env={**os.environ, **env}, check=True,
                       capture_output=True)
        peer_s = time.perf_counter() - start

        warm = _ready_seconds(["--model", f"file://{cache / sha}"])
        today = _ready_seconds(["--model", f"hf://{REPO_ID}"], {**env, "HF_HOME": str(root / "pod-hf-home")})

    print(f"model: {args.layers} layers x {args.width}, {len(names)} files, {mb:.1f} MiB")
    print("| step | seconds | MiB/s | vs bound |")
    print("|---|---|---|---|")
    print(f"| bound: bare HTTP read of every file | {bound:.2f} | {mb / bound:.0f} | 1.00 |")
    print(f"| fetch (cold, incl. process start) | {fetch_s:.2f} | {mb / fetch_s:.0f} | {bound / fetch_s:.2f} |")
    print(f"| peer: snapshot_download (incl. process start) | {peer_s:.2f} | {mb / peer_s:.0f} "
          f"| {bound / peer_s:.2f} |")
    print()
    print("| start to ready | seconds |")
    print("|---|---|")
    print(f"| warm cache: serve file://<cache>/<sha> | {warm:.2f} |")
    print(f"| cold with the cache: fetch, then serve | {fetch_s + warm:.2f} |")
    print(f"| today: serve hf://... downloading at start | {today:.2f} |")
    print(f"loadavg after={os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
