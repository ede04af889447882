"""Ray Serve scale-out: the same FastAPI app in N replicas behind Ray's HTTP proxy.

Each replica is its own process holding one loaded, patched pipeline and its own batching queue;
Ray's proxy spreads requests over the replicas and replaces a replica that dies.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from sdkern.apps.serve.app import ServeConfig

logger = logging.getLogger("sdkern")


@dataclass
class RayOptions:
    """Ray Serve deployment options (``sdkern serve --ray``).

    ``min_replicas``/``max_replicas`` switch on autoscaling (target ``target_ongoing_requests`` per
    replica); otherwise ``replicas`` is a fixed count.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    address: str | None = None
    name: str = "sdkern"


class SdkernReplica:
    """One Ray Serve replica: the sdkern FastAPI app, loaded when the replica is constructed."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from sdkern.apps.serve.app import create_app

        self.app = create_app(ServeConfig.from_dict(cfg))
        self.app.state.sdkern.load()  # loaded (and warmed) before Ray routes traffic here
        if self.app.state.sdkern.error:
            raise RuntimeError(f"sdkern replica failed to load: {self.app.state.sdkern.error}")
        self._lifespan: Any = None
        self._lock: Any = None

    async def _ensure_started(self) -> None:
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._lifespan is None:
                ctx = self.app.router.lifespan_context(self.app)
                await ctx.__aenter__()
                self._lifespan = ctx

    async def __call__(self, request: Any) -> Any:
        """Forward Ray's Starlette request to the ASGI app and return its response."""
        from starlette.responses import Response

        await self._ensure_started()
        out: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out["status"], out["headers"] = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                out["body"].append(message.get("body", b""))

        scope = dict(request.scope)
        scope["path"] = scope.get("path", "/")
        await self.app(scope, request.receive, send)
        headers = {k.decode(): v.decode() for k, v in out["headers"] if k.lower() != b"content-length"}
        return Response(b"".join(out["body"]), status_code=out["status"], headers=headers)

    async def check_health(self) -> None:
        """Ray's replica health check: raise when the engine is not serving."""
        if self.app.state.sdkern.engine is None:
            raise RuntimeError("sdkern replica has no engine")


def deployment(cfg: ServeConfig, opts: RayOptions) -> Any:
    """The bound Ray Serve application of ``cfg`` with ``opts``' replicas and resources."""
    from ray import serve

    kwargs: dict[str, Any] = {
        "name": opts.name,
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        "max_ongoing_requests": max(4, cfg.queue_size + cfg.max_batch),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": max(10.0, cfg.timeout_s),
    }
    if opts.min_replicas is not None or opts.max_replicas is not None:
        lo = opts.min_replicas if opts.min_replicas is not None else 1
        hi = opts.max_replicas if opts.max_replicas is not None else max(lo, opts.replicas)
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"--min-replicas {lo} / --max-replicas {hi}: need 0 <= min <= max, max >= 1")
        kwargs["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": max(lo, min(hi, opts.replicas)),
            "target_ongoing_requests": opts.target_ongoing_requests,
        }
    else:
        kwargs["num_replicas"] = opts.replicas
    return serve.deployment(SdkernReplica, **kwargs).bind(cfg.to_dict())


def start(cfg: ServeConfig, opts: RayOptions) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on ``opts.host:opts.port`` and deploy."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if opts.address:
            ray.init(address=opts.address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(deployment(cfg, opts), name=opts.name, route_prefix="/", blocking=False)
    logger.info("sdkern serve: Ray Serve deployment %r on http://%s:%d", opts.name, opts.host, opts.port)


def run_ray(cfg: ServeConfig, opts: RayOptions) -> int:
    """``sdkern serve --ray``: deploy, serve until SIGTERM / Ctrl-C, then shut the deployment down; exit 0."""
    import ray
    from ray import serve

    start(cfg, opts)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    print(f"sdkern serve: ready on http://{opts.host}:{opts.port} (Ray Serve, {opts.replicas} replica(s))", flush=True)
    stop.wait()
    logger.info("sdkern serve: shutting down the Ray Serve deployment (replicas finish their requests)")
    serve.shutdown()
    if not opts.address:
        ray.shutdown()
    return 0
