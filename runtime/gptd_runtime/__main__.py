"""CLI: `python -m gptd_runtime serve ...`, `build-demo PATH`, `fetch URI --dest DIR` and
`evaluate --url URL --dataset FILE --task TASK`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .config import ENV_VARS, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptd_runtime", description="gptd model server")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over HTTP (every flag also reads a GPTD_* env var)")

    def opt(flag: str, field: str, **kw: object) -> None:
        serve.add_argument(flag, dest=field, default=None, help=f"{kw.pop('help', '')} [env {ENV_VARS[field]}]",
                           **kw)  # type: ignore[arg-type]

    opt("--model", "model", help="local dir, file://PATH or hf://org/name")
    opt("--revision", "revision", help="hf:// revision")
    opt("--task", "task", help="text-generation | text-classification | token-classification")
    opt("--dtype", "dtype", help="auto | float32 | float16 | bfloat16")
    opt("--device", "device", help="auto | cpu | cuda | cuda:N")
    opt("--host", "host", help="listen address (default 127.0.0.1; pods pass 0.0.0.0)")
    opt("--port", "port", type=int)
    opt("--metrics-port", "metrics_port", type=int, help="also serve /metrics alone on this port (plain HTTP)")
    opt("--served-model-name", "served_model_name", help="model id in the API (default: directory name)")
    opt("--max-batch-size", "max_batch_size", type=int, help="requests per forward pass")
    opt("--max-input-tokens", "max_input_tokens", type=int)
    opt("--max-new-tokens", "max_new_tokens", type=int, help="cap (and default) for max_tokens")
    opt("--max-queue", "max_queue", type=int, help="waiting requests beyond the batch before 429")
    opt("--api-key-file", "api_key_file", help="file of accepted bearer keys, one per line (re-read on change)")
    opt("--api-key-reload-seconds", "api_key_reload_seconds", type=float, help="how often the key file is checked")
    opt("--auth-failure-limit", "auth_failure_limit", type=int,
        help="failed authentications per client address per minute before 429")
    opt("--drain-timeout-seconds", "drain_timeout_seconds", type=float)
    opt("--max-body-bytes", "max_body_bytes", type=int)
    opt("--max-header-bytes", "max_header_bytes", type=int, help="request header bytes before 431")
    opt("--kv-cache-blocks", "kv_cache_blocks", type=int, help="KV cache pages (memory budget)")
    opt("--kv-cache-page-size", "kv_cache_page_size", type=int, help="tokens per KV page")
    opt("--max-batch-tokens", "max_batch_tokens", type=int)
    opt("--torch-threads", "torch_threads", type=int, help="CPU intra-op threads (default: CPU budget - 1)")
    opt("--cache-dir", "cache_dir", help="where --demo builds its model (default $HF_HOME)")
    opt("--hf-token-file", "hf_token_file")
    opt("--log-level", "log_level")
    opt("--redact", "redact", help="mask these in prompts and outputs: email,phone,creditCard,ipAddress,iban,"
        "cnResidentId,secretLike")
    opt("--tls-cert-file", "tls_cert_file", help="PEM certificate chain: serve HTTPS only (with --tls-key-file)")
    opt("--tls-key-file", "tls_key_file", help="PEM private key of --tls-cert-file")
    opt("--tls-client-ca-file", "tls_client_ca_file", help="PEM CA bundle: require client certs (mutual TLS)")
    opt("--tls-reload-seconds", "tls_reload_seconds", type=float, help="how often renewed cert files are picked up")
    serve.add_argument("--demo", action="store_true", default=None,
                       help=f"build and serve a tiny random demo model [env {ENV_VARS['demo']}]")

    demo = sub.add_parser("build-demo", help="build a tiny random model directory (no download)")
    demo.add_argument("path", type=Path)
    demo.add_argument("--task", default="text-generation")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small"])
    demo.add_argument("--chat-template", action="store_true")

    from . import evaluate, fetch

    fetch.add_arguments(sub.add_parser("fetch", help="download a model revision into a cache directory"))
    evaluate.add_arguments(sub.add_parser("evaluate", help="score a running runtime on a JSON Lines dataset"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build-demo":
        from .demo import build_demo_model

        print(build_demo_model(args.path, args.task, size=args.size, chat_template=args.chat_template))
        return 0
    if args.command == "fetch":
        from . import fetch

        return fetch.run(args)
    if args.command == "evaluate":
        from . import evaluate

        return evaluate.run(args)

    cli = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = load_settings(cli)
        from .apikeys import KeyRing
        from .tls import reloader_from

        if settings.api_key_file is not None:  # fail now, in one line, if the key file is unusable
            KeyRing(settings.api_key_file)

        reloader_from(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)  # same for TLS
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        print(f"gptd-runtime: error: invalid setting {field} ({ENV_VARS.get(field, '')}): {err['msg']}",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"gptd-runtime: error: {e}", file=sys.stderr)
        return 2
    if not settings.model and not settings.demo:
        print("gptd-runtime: error: no model given: pass --model PATH_OR_URI (or GPTD_MODEL), or --demo",
              file=sys.stderr)
        return 2
    from .logs import configure

    configure(settings.log_level)

    from .app import run_server

    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
