"""Run the app on uvicorn in the foreground, with a graceful SIGTERM / Ctrl-C drain."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from sdkern.apps.serve.app import ServeConfig, create_app
from sdkern.apps.serve.engine import Engine, EngineOptions

logger = logging.getLogger("sdkern")


def run_server(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    engine_factory: Callable[[EngineOptions], Engine] | None = None,
) -> int:
    """Serve until SIGTERM / SIGINT, then drain and return the exit status.

    On the first SIGTERM or SIGINT the server stops accepting connections, answers every request it
    already accepted (queued ones included), stops the batching worker and returns 0. A second Ctrl-C
    forces the exit. If the model fails to load the server stops and returns 1. Stopped while the model is
    still loading (nothing accepted yet), the process exits with 0 at once instead of waiting for the load.

    Parameters
    ----------
    cfg : ServeConfig
        Server settings.
    host, port : str, int
        Where to listen (default loopback only).
    log_level : str
        uvicorn's log level.
    engine_factory : callable, optional
        ``EngineOptions -> Engine`` instead of the real engine (tests).
    """
    import uvicorn

    app = create_app(cfg) if engine_factory is None else create_app(cfg, engine_factory=engine_factory)
    state = app.state.sdkern

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if state.status in ("ready", "loading"):
                state.status = "draining"
                logger.info("sdkern serve: signal %d: draining (no new connections, finishing accepted requests)", sig)
            super().handle_exit(sig, frame)

        def capture_signals(self) -> Any:  # uvicorn re-raises the signal afterwards; a drained exit is 0
            import contextlib

            @contextlib.contextmanager
            def capture() -> Any:
                originals = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, h in originals.items():
                        signal.signal(s, h)

            return capture()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    server = _Server(config)

    import threading

    def watch_load() -> None:  # a model that cannot load: stop instead of serving 503s forever
        state.loaded.wait()
        if state.status == "failed":
            server.should_exit = True

    threading.Thread(target=watch_load, daemon=True).start()
    server.run()
    if not state.loaded.is_set():  # stopped while loading: the loading thread would hold the interpreter's exit
        logger.info("sdkern serve: exiting before the model finished loading")
        logging.shutdown()
        os._exit(0)
    if state.error:
        logger.error("sdkern serve: %s", state.error)
        return 1
    return 0
