"""Runtime settings: one pydantic model filled from CLI flags, then GPTD_* environment variables, then defaults.

The operator configures pods through the environment variables only, so their names are a contract (see
docs/runtime.md); flags exist for humans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .redaction import parse_entities

Task = Literal["text-generation", "text-classification", "token-classification"]
DType = Literal["auto", "float32", "float16", "bfloat16"]

# field name -> environment variable. Every field is settable from the environment.
ENV_VARS: dict[str, str] = {
    "model": "GPTD_MODEL",
    "revision": "GPTD_REVISION",
    "task": "GPTD_TASK",
    "dtype": "GPTD_DTYPE",
    "device": "GPTD_DEVICE",
    "host": "GPTD_HOST",
    "port": "GPTD_PORT",
    "metrics_port": "GPTD_METRICS_PORT",
    "served_model_name": "GPTD_SERVED_MODEL_NAME",
    "max_batch_size": "GPTD_MAX_BATCH_SIZE",
    "max_input_tokens": "GPTD_MAX_INPUT_TOKENS",
    "max_new_tokens": "GPTD_MAX_NEW_TOKENS",
    "max_queue": "GPTD_MAX_QUEUE",
    "api_key_file": "GPTD_API_KEY_FILE",
    "drain_timeout_seconds": "GPTD_DRAIN_TIMEOUT_SECONDS",
    "max_body_bytes": "GPTD_MAX_BODY_BYTES",
    "max_header_bytes": "GPTD_MAX_HEADER_BYTES",
    "kv_cache_blocks": "GPTD_KV_CACHE_BLOCKS",
    "kv_cache_page_size": "GPTD_KV_CACHE_PAGE_SIZE",
    "max_batch_tokens": "GPTD_MAX_BATCH_TOKENS",
    "torch_threads": "GPTD_TORCH_THREADS",
    "demo": "GPTD_DEMO",
    "cache_dir": "GPTD_CACHE_DIR",
    "hf_token_file": "GPTD_HF_TOKEN_FILE",
    "log_level": "GPTD_LOG_LEVEL",
    "api_key_reload_seconds": "GPTD_API_KEY_RELOAD_SECONDS",
    "auth_failure_limit": "GPTD_AUTH_FAILURE_LIMIT",
    "redact": "GPTD_REDACT",
    "tls_cert_file": "GPTD_TLS_CERT_FILE",
    "tls_key_file": "GPTD_TLS_KEY_FILE",
    "tls_client_ca_file": "GPTD_TLS_CLIENT_CA_FILE",
    "tls_reload_seconds": "GPTD_TLS_RELOAD_SECONDS",
}


class Settings(BaseModel):
    """Everything the server needs to know. Immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="local dir, file://, hf://org/name, pvc:// or s3:// (mounted)")
    revision: str | None = Field(None, description="hf:// revision (branch, tag or commit)")
    task: Task = "text-generation"
    dtype: DType = "auto"
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    # Loopback unless told otherwise: a server started by hand is not reachable from the network by accident.
    # Pods must pass GPTD_HOST=0.0.0.0 (the operator does).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="also serve /metrics (only) here, plain HTTP: a port a NetworkPolicy can "
        "open to the monitoring namespace alone"
    )
    served_model_name: str | None = Field(None, description="name in /v1/models; default: last path part")
    max_batch_size: int = Field(32, ge=1, description="max requests sharing one forward pass")
    max_input_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="cap on max_tokens per request (also the default)")
    max_queue: int = Field(256, ge=0, description="requests allowed to wait beyond the running batch")
    api_key_file: Path | None = Field(None, description="one accepted key per line (# comments); re-read on change")
    api_key_reload_seconds: float = Field(10.0, gt=0, description="how often the key file is checked for changes")
    auth_failure_limit: int = Field(
        10, ge=1, description="failed authentications per client address per minute before 429s"
    )
    drain_timeout_seconds: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request header names + values; more: 431")
    kv_cache_blocks: int | None = Field(
        None, ge=1, description="KV cache pages; default sized to fit max_batch_size full-length requests"
    )
    kv_cache_page_size: int = Field(64, ge=4, description="tokens per KV cache page")
    max_batch_tokens: int | None = Field(None, ge=1, description="tokens per forward pass (prefill chunking)")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU intra-op threads; default: the container's CPU budget minus one"
    )
    demo: bool = False
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "gptd")
    )
    hf_token_file: Path | None = None
    log_level: str = "info"
    redact: tuple[str, ...] = Field(
        (), description="entities masked in prompts and outputs (redaction.py): comma-separated, e.g. email,phone"
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; with tls_key_file: HTTPS only")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle: clients must present a cert from it")
    tls_reload_seconds: float = Field(5.0, gt=0, description="how often the cert/key files are checked for renewal")

    @field_validator("task", "dtype", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("redact", mode="before")
    @classmethod
    def _entities(cls, v: Any) -> Any:
        return parse_entities(v) if isinstance(v, str | list | tuple) else v

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(f"{missing} is required when the other TLS file is given (both or neither)")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port ({self.port})")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is on top of TLS)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.demo and not self.model:
            return "gptd-demo"
        return (self.model or "model").rstrip("/").rsplit("/", 1)[-1] or "model"

    def kv_blocks(self) -> int:
        """Explicit KV budget. Without one, transformers sizes the cache from the *node's* free memory (psutil),
        which inside a pod ignores the container limit and gets the pod OOM-killed."""
        if self.kv_cache_blocks is not None:
            return self.kv_cache_blocks
        per_request = -(-(self.max_input_tokens + self.max_new_tokens) // self.kv_cache_page_size)
        return per_request * self.max_batch_size

    def batch_tokens(self) -> int:
        return self.max_batch_tokens or max(self.max_input_tokens, 256)


_BOOL_TRUE = {"1", "true", "yes", "on"}


def load_settings(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge CLI values (None = not given) over GPTD_* env vars over defaults. Raises pydantic.ValidationError."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        values[field] = raw.strip().lower() in _BOOL_TRUE if field == "demo" else raw
    for field, value in (cli or {}).items():
        if value is not None and value is not False:
            values[field] = value
    return Settings(**values)
