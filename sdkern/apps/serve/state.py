"""What ``sdkern serve`` is configured with (:class:`ServeConfig`), the app's live :class:`State` (engine, batcher,
metrics, lifecycle) and the HTTP errors its handlers raise."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sdkern.apps.serve.batching import Batcher
from sdkern.apps.serve.engine import Engine, EngineOptions

logger = logging.getLogger("sdkern")


@dataclass
class ServeConfig:
    """Everything ``sdkern serve`` configures.

    Attributes
    ----------
    engine : EngineOptions
        What to load and how.
    max_batch : int
        Most images per U-Net batch.
    batch_wait_ms : float
        How long the first request of a batch waits for compatible ones.
    queue_size : int
        Most requests waiting; beyond it 429 with ``Retry-After``.
    timeout_s : float
        Per-request time limit (queue + run); beyond it 504.
    api_key : str or None
        Bearer token required on every endpoint but ``/health``.
    max_body_bytes : int
        Largest accepted request body (413 beyond).
    warmup : bool
        Run one small generation before reporting ready.
    exact_batching : bool
        Make the pipeline batch-invariant (:mod:`sdkern.apps.serve.exact`), so a batched request gets the
        image it gets alone, bit for bit (only when ``max_batch > 1``: with 1 every request runs alone).
    """

    engine: EngineOptions = field(default_factory=EngineOptions)
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    queue_size: int = 64
    timeout_s: float = 300.0
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024
    warmup: bool = True
    exact_batching: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        d = dict(d)
        d["engine"] = EngineOptions(**d.get("engine", {}))
        return cls(**d)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}, "detail": message}


class State:
    """The app's live state: engine, batcher, metrics and lifecycle status."""

    def __init__(self, cfg: ServeConfig, engine_factory: Callable[[EngineOptions], Engine]) -> None:
        self.cfg = cfg
        self.engine_factory = engine_factory
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.status = "loading"
        self.error: str | None = None
        self.started = int(time.time())
        from sdkern.apps.serve.metrics import Metrics

        self.metrics = Metrics(lambda: self.batcher.depth if self.batcher else 0, cfg.max_batch)
        self.loaded = threading.Event()

    def load(self) -> None:
        """Load, patch and warm the engine (blocking; runs on a thread)."""
        try:
            engine = self.engine_factory(self.cfg.engine)
            # with --max-batch 1 every request runs alone: there is no batch to be invariant to
            if self.cfg.exact_batching and self.cfg.max_batch > 1 and engine.kind in ("sd", "sdxl"):
                from sdkern.apps.serve.exact import make_batch_invariant

                pipe = engine.pipe
                make_batch_invariant(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
            elif engine.kind == "onnx" and self.cfg.max_batch > 1:
                logger.info(
                    "sdkern serve: ONNX engine: batches run as they are in ONNX Runtime (batched == solo bit for "
                    "bit was verified on CPU for the tiny model only); --max-batch 1 guarantees solo results"
                )
            if self.cfg.warmup:
                logger.info("sdkern serve: warmed up in %.2f s", engine.warmup())
            self.engine = engine
        except Exception as e:
            logger.exception("sdkern serve: loading %s failed", self.cfg.engine.model)
            self.error = f"{type(e).__name__}: {e}"
            self.status = "failed"
        finally:
            self.loaded.set()

    def ready_batcher(self) -> Batcher:
        if self.status == "draining" or (self.batcher is not None and not self.batcher.accepting):
            raise HTTPError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.batcher is None:
            if self.status == "failed":
                raise HTTPError(503, f"the model failed to load: {self.error}")
            raise HTTPError(503, "the model is still loading", headers={"Retry-After": "5"})
        return self.batcher
