"""What a real `serve` process writes at the default level: one start-up line with the facts an operator needs,
and nothing alarming or noisy (transformers' set-up chatter, advice, progress bars, probe access lines)."""

from __future__ import annotations

import logging
import re
import signal
from typing import Any

import httpx
import pytest
from gptd_runtime import logs


@pytest.mark.timeout(120)
def test_default_level_logs_one_startup_line_and_no_noise(server_factory: Any, models: Any) -> None:
    server = server_factory("--model", str(models["chat"]), "--served-model-name", "tiny", "--revision", "r1",
                            "--kv-cache-blocks", "40")
    secret_prompt = "my-private-prompt-text"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(3):
            assert client.get("/health/ready").status_code == 200
            assert client.get("/metrics").status_code == 200
        assert client.post("/v1/completions", json={"prompt": secret_prompt, "max_tokens": 3}).status_code == 200
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3, "stream": True})
        assert r.status_code == 200
        assert client.post("/v1/embeddings", json={"input": secret_prompt}).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    err = server.proc.stderr.read() + server.proc.stdout.read()
    ready = [line for line in err.splitlines() if "ready: serving" in line]
    assert len(ready) == 1, err
    # 40 blocks x 64 tokens x 2 layers x (k, v) x 128 wide x 4 bytes = 5 MiB
    assert re.search(r"ready: serving 'tiny' \(text-generation\) from \S+chat revision r1: float32 on cpu "
                     r"\(\d+ torch thread\(s\)\), KV cache 40 blocks x 64 tokens = 5 MiB$", ready[0]), ready[0]
    for noise in ("Memory available for cache allocation", "flash", "attention_mask", "attention mask",
                  "Loading weights", "ContinuousBatchingLogger", "/health/ready", "/metrics", "KV cache:",
                  "WARNING", "ERROR", "Traceback", secret_prompt):
        assert noise not in err, (noise, err)
    assert re.search(r"request id=\w+ POST /v1/completions status=200 in=\d+B out=\d+B [\d.]+ms", err), err


def test_advice_filter_drops_only_the_advice() -> None:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.levelname} {record.getMessage()}")

    logs.quiet_third_party()
    logger = logging.getLogger("transformers.modeling_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("We strongly recommend passing in an `attention_mask` since your input_ids may be padded.")
        logger.warning("Some weights of the model checkpoint were not used")  # a real warning: kept
        logger.error("We strongly recommend passing in an `attention_mask` (as an error)")  # errors: kept
    finally:
        logger.removeHandler(handler)
    assert seen == ["WARNING Some weights of the model checkpoint were not used",
                    "ERROR We strongly recommend passing in an `attention_mask` (as an error)"]
    assert logging.getLogger(logs.CB_LOGGER).getEffectiveLevel() == logging.WARNING
