"""App factory and process lifecycle: listen at once -> load -> warm up -> ready -> (SIGTERM) drain -> exit.

The server listens while loading so liveness probes pass and readiness says 503; a failed load ends the
process with a non-zero code and a one-line reason (kubelet shows it, nothing hangs "ready")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI

from .api import embeddings, health, metrics, openai, tasks
from .api.errors import install_error_handlers
from .api.metrics import Metrics
from .api.middleware import GuardMiddleware
from .apikeys import FailureLimiter, KeyRing
from .config import Settings
from .embeddings import Embedder
from .engine import ClassificationEngine, GenerationEngine, kv_cache_bytes
from .loading import ModelLoadError, load_model, resolve_model_dir
from .logs import quiet_access_log
from .redaction import Redactor
from .state import ModelInfo, Phase, RuntimeState, startup_line
from .tls import reloader_from

log = logging.getLogger("gptd_runtime")
WARMUP_TIMEOUT_SECONDS = 600.0


def build_engine(
    settings: Settings, metrics: Metrics, abandoned: threading.Event | None = None
) -> tuple[Any, ModelInfo, Embedder]:
    """Blocking: resolve, load, start the engine. Runs in a worker thread. If `abandoned` is set meanwhile (the
    server shut down during the load), the engine is not left running: its thread is not a daemon and would
    keep the process alive after a SIGTERM."""
    loaded = load_model(settings, resolve_model_dir(settings))
    generation = settings.task == "text-generation"
    info = ModelInfo.from_model(loaded.model, loaded.describe_devices(),
                                kv_cache_bytes(loaded.model, settings) if generation else None)
    embedder = Embedder(loaded)  # before the engine starts: its view keeps the model's own attention
    if generation:
        engine: Any = GenerationEngine(loaded, settings, metrics)
    else:
        engine = ClassificationEngine(loaded, settings)
    if abandoned is not None and abandoned.is_set():
        raise ModelLoadError("start-up abandoned: the server is shutting down")
    engine.start()
    if abandoned is not None and abandoned.is_set():  # set between the check and start()
        engine.stop()
        raise ModelLoadError("start-up abandoned: the server is shutting down")
    return engine, info, embedder


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Like asyncio.to_thread, but the thread does not hold up interpreter exit (the default executor's
    threads are joined at exit: a SIGTERM during a minutes-long load would wait for it)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not fut.done():
            setter(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(deliver, fut.set_exception, e)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, fut.set_result, result)

    threading.Thread(target=run, name="gptd-load", daemon=True).start()
    return await fut


async def _startup(state: RuntimeState, engine: Any | None) -> None:
    try:
        if engine is None:
            engine, state.model, state.embedder = await _in_daemon_thread(
                build_engine, state.settings, state.metrics, state.abandoned
            )
        state.engine = engine
        if state.phase is Phase.LOADING:  # not if a SIGTERM already started the drain
            state.phase = Phase.WARMING_UP
        # Readiness means "a real generation went through", not merely "weights are in memory".
        await asyncio.wait_for(engine.warmup(), WARMUP_TIMEOUT_SECONDS)
        if state.phase is Phase.WARMING_UP:  # a SIGTERM during warm-up wins
            state.phase = Phase.READY
            log.info("%s", startup_line(state))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        state.phase = Phase.FAILED
        state.error = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}".splitlines()[0]
        log.error("startup failed: %s", state.error)
        if state.on_fatal is not None:
            state.on_fatal(state.error)


def create_app(
    settings: Settings, *, engine: Any | None = None, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """Build the app. `engine` swaps in a ready-made engine (tests); otherwise the model is loaded in the
    background when the app starts. `on_fatal(reason)` is called if loading or warm-up fails."""
    keys = None if settings.api_key_file is None else KeyRing(settings.api_key_file, settings.api_key_reload_seconds)
    state = RuntimeState(settings=settings, metrics=Metrics(), api_keys=keys,
                         auth_failures=FailureLimiter(settings.auth_failure_limit), on_fatal=on_fatal)
    if settings.redact:
        counter = state.metrics.redactions
        state.redactor = Redactor(settings.redact, lambda entity: counter.labels(entity=entity).inc())

    def gauge(name: str) -> Callable[[], float]:
        return lambda: float(getattr(state.engine, name)()) if state.engine is not None else 0.0

    state.metrics.bind(gauge("num_running"), gauge("num_waiting"), lambda: float(state.phase is Phase.READY))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.startup = asyncio.create_task(_startup(state, engine))
        try:
            yield
        finally:
            state.abandoned.set()  # a load still running in its thread will not start the engine
            state.startup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.startup
            if state.embedder is not None:
                state.embedder.stop()
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="gptd runtime", version="0.1.0", lifespan=lifespan)
    app.state.runtime = state
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(openai.router)
    app.include_router(tasks.router)
    app.include_router(embeddings.router)
    app.add_middleware(GuardMiddleware, state=state)
    install_error_handlers(app)
    return app


async def drain(state: RuntimeState, timeout: float) -> None:
    """Stop admitting work (readiness 503 at once), then wait for in-flight requests, streams included."""
    state.phase = Phase.DRAINING
    log.info("draining: %d request(s) in flight, timeout %.0fs", state.inflight, timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight:
        log.warning("drain timeout: %d request(s) still in flight, exiting anyway", state.inflight)


def make_server(app: FastAPI, settings: Settings, on_signal: Callable[[int], None] | None = None) -> Any:
    """The uvicorn server for `app`: HTTPS with a reloading certificate when TLS files are set, no `server:`
    banner. `on_signal` replaces uvicorn's SIGTERM/SIGINT handling (uvicorn's stops listening at once; the
    runtime keeps listening, answering 503, while it drains). The server's `tls` is the CertReloader or None."""
    import uvicorn

    tls = reloader_from(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    side = _metrics_listener(app, settings)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if on_signal is None:
                with super().capture_signals():
                    yield
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        async def serve(self, sockets: Any = None) -> None:
            # The certificate check runs on this loop: the one that makes the handshakes.
            watcher = asyncio.create_task(tls.watch(settings.tls_reload_seconds)) if tls is not None else None
            metrics = asyncio.create_task(side[0].serve(sockets=[side[1]])) if side is not None else None
            try:
                await super().serve(sockets)
            finally:
                if watcher is not None:
                    watcher.cancel()
                if metrics is not None:  # scrapes keep working through the drain; stop with the server
                    side[0].should_exit = True
                    await metrics

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
        # Default keep-alive lets idle connections pin the shutdown; drain already waited for real work.
        timeout_keep_alive=5,
        server_header=False,  # no version banner
        access_log=False,  # api/middleware.py logs each request (without its path's query string)
        ssl_context_factory=(lambda _config, _default: tls.context) if tls is not None else None,
    )
    server = Server(config)
    server.tls = tls
    return server


def _metrics_listener(app: FastAPI, settings: Settings) -> tuple[Any, Any] | None:
    """With --metrics-port: a second, plain-HTTP uvicorn server answering /metrics only, from the same registry,
    on a socket bound here (a taken port fails now, before anything loads)."""
    if settings.metrics_port is None:
        return None
    import socket

    import uvicorn

    metrics_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    metrics_app.state.runtime = app.state.runtime
    metrics_app.include_router(metrics.router)
    # The probes too: under mutual TLS the kubelet presents no client certificate, so it probes this plain port.
    metrics_app.include_router(health.router)

    class Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the main server owns SIGTERM/SIGINT
            yield

    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.metrics_port))
    except OSError as e:
        sock.close()
        raise OSError(f"--metrics-port {settings.metrics_port}: {e.strerror or e}") from e
    sock.listen(64)
    sock.set_inheritable(True)
    config = uvicorn.Config(metrics_app, log_level=settings.log_level.lower(), access_log=False,
                            server_header=False, lifespan="off", timeout_keep_alive=5)
    return Quiet(config), sock


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (drained) or a fatal startup error. Returns the process exit code."""
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    state: RuntimeState = app.state.runtime
    draining: list[asyncio.Task[None]] = []

    def on_signal(sig: int) -> None:
        if draining:  # second signal: stop now
            server.should_exit = server.force_exit = True
            return
        log.info("received %s", signal.Signals(sig).name)

        async def drain_then_exit() -> None:
            await drain(state, settings.drain_timeout_seconds)
            server.should_exit = True

        draining.append(asyncio.get_running_loop().create_task(drain_then_exit()))

    try:
        server = make_server(app, settings, on_signal)
    except OSError as e:  # the metrics port is taken
        print(f"gptd-runtime: error: {e}", file=sys.stderr, flush=True)
        return 1
    quiet_access_log()  # after uvicorn.Config set up its loggers
    server.run()
    if fatal:
        print(f"gptd-runtime: error: {fatal[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
