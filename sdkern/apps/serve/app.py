"""The FastAPI application: OpenAI Images and AUTOMATIC1111 endpoints, health, metrics, models.

:func:`create_app` returns an app that loads its engine in the background when it starts (``/health``
says ``loading`` until the pipeline is loaded, patched and warmed up, then ``ready``). The same app runs
under uvicorn (:mod:`sdkern.apps.serve.server`) and as a Ray Serve deployment (:mod:`sdkern.apps.serve.ray_app`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdkern.apps.serve.batching import Batcher, NotAccepting, QueueFull
from sdkern.apps.serve.engine import Engine, EngineOptions, ImageJob
from sdkern.apps.serve.schedulers import canonical
from sdkern.apps.serve.schemas import MAX_IMAGES, A1111Txt2ImgRequest, InputError, OpenAIImageRequest

logger = logging.getLogger("sdkern")

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
ENDPOINTS = ("/v1/images/generations", "/sdapi/v1/txt2img", "/health", "/metrics", "/v1/models")


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
        image it gets alone, bit for bit.
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


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
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
            if self.cfg.exact_batching and engine.kind in ("sd", "sdxl"):
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
            raise _HTTPError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.batcher is None:
            if self.status == "failed":
                raise _HTTPError(503, f"the model failed to load: {self.error}")
            raise _HTTPError(503, "the model is still loading", headers={"Retry-After": "5"})
        return self.batcher


class _Guard:
    """ASGI middleware: bearer auth on every path but /health, and the per-status request counter."""

    def __init__(self, app: Any, state: State) -> None:
        self.app, self.state = app, state
        key = state.cfg.api_key
        self.expected = f"Bearer {key}".encode() if key else None
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_box = {"status": 0}

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-sdkern-pid", self.pid)]}
            await send(message)

        try:
            if self.expected is not None and path != "/health":
                got = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not hmac.compare_digest(got, self.expected):
                    await _send_json(
                        send_counted,
                        401,
                        _error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                        {"WWW-Authenticate": "Bearer"},
                    )
                    return
            await self.app(scope, receive, send_counted)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status_box["status"] or 499)).inc()


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def create_app(
    cfg: ServeConfig, engine_factory: Callable[[EngineOptions], Engine] = Engine, load_in_background: bool = True
) -> Any:
    """Build the FastAPI app.

    Parameters
    ----------
    cfg : ServeConfig
        Server settings.
    engine_factory : callable
        ``EngineOptions -> Engine`` (tests may substitute a fake that fails on purpose).
    load_in_background : bool
        Load the engine on a thread after startup (``/health`` answers "loading" meanwhile); False
        loads it during startup (Ray replicas: ready when constructed).

    Returns
    -------
    fastapi.FastAPI
    """
    state = State(cfg, engine_factory)

    def _start_batcher() -> None:
        if state.engine is None:
            return
        e = state.engine
        state.batcher = Batcher(
            e.generate, e.batch_key, cfg.max_batch, cfg.batch_wait_ms, cfg.queue_size, state.metrics.on_batch
        )
        state.batcher.start()
        state.status = "ready"
        logger.info(
            "sdkern serve: %s ready (%s on %s, patched: %s)", e.model_id, e.opts.dtype, e.opts.device, e.patched
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loader: Any = None
        if state.engine is not None:  # loaded already (a Ray replica loads in its constructor)
            _start_batcher()
        elif load_in_background:

            async def load() -> None:
                await loop.run_in_executor(None, state.load)
                _start_batcher()

            loader = loop.create_task(load())
        else:
            state.load()
            _start_batcher()
        yield
        state.status = "draining"
        if loader is not None and not loader.done():
            await loader
        if state.batcher is not None:
            await state.batcher.stop()
        state.status = "stopped"

    app = FastAPI(title="sdkern serve", version=_version(), lifespan=lifespan)
    app.state.sdkern = state

    @app.exception_handler(_HTTPError)
    async def _on_http_error(request: Request, exc: _HTTPError) -> Any:
        return JSONResponse(_error_body(exc.status, exc.message, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> Any:
        logger.exception("sdkern serve: internal error on %s", request.url.path)
        return JSONResponse(_error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            raise _HTTPError(413, f"body: larger than the limit of {cfg.max_body_bytes} bytes", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise _HTTPError(413, f"body: larger than the limit of {cfg.max_body_bytes} bytes", "body")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise _HTTPError(400, f"body: not valid JSON ({e})", "body") from None

    def validate(model: Any, data: Any) -> Any:
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise _HTTPError(400, "body: expected a JSON object", "body")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or "body"
            raise _HTTPError(422, f"{param}: {err['msg']}", param) from None

    def check_size(engine: Engine, width: int, height: int, wfield: str, hfield: str) -> None:
        for name, v in ((wfield, width), (hfield, height)):
            multiple = max(8, engine.factor)  # diffusers' rule; the VAE factor where it is larger
            if v % multiple or v < multiple:
                raise InputError(name, f"{v} is not a positive multiple of {multiple}")
            if v > engine.max_size:
                raise InputError(name, f"{v} is above this model's limit of {engine.max_size}")

    def scheduler_of(engine: Engine, name: str, field_name: str) -> str:
        c = canonical(name)
        if c is None or c not in engine.schedulers:
            raise InputError(field_name, f"unknown scheduler {name!r}; choose one of {', '.join(engine.schedulers)}")
        return c

    async def run_jobs(request: Request, endpoint: str, jobs: list[ImageJob]) -> list[bytes]:
        batcher = state.ready_batcher()
        engine = state.engine
        assert engine is not None
        t0 = time.monotonic()
        try:
            ticket = batcher.submit(jobs)
        except QueueFull as e:
            raise _HTTPError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting:
            raise _HTTPError(503, "the server is shutting down", headers={"Retry-After": "5"}) from None
        deadline = t0 + cfg.timeout_s
        while not ticket.future.done():
            await asyncio.wait({ticket.future}, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            if ticket.future.done():
                break
            if await request.is_disconnected():
                n = batcher.withdraw(ticket)
                logger.info("sdkern serve: client gone; dropped %d queued image(s)", n)
                raise _HTTPError(499, "client disconnected")
            if time.monotonic() >= deadline:
                batcher.withdraw(ticket)
                raise _HTTPError(504, f"the request did not finish within {cfg.timeout_s:g} s")
        exc = ticket.future.exception()
        if exc is not None:
            raise _HTTPError(500, f"generation failed: {type(exc).__name__}: {exc}")
        images = ticket.future.result()
        loop = asyncio.get_running_loop()
        pngs = await loop.run_in_executor(None, lambda: [engine.png(j, im) for j, im in zip(jobs, images, strict=True)])
        state.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
        return pngs

    def seed_of(seed: int | None) -> int:
        return secrets.randbelow(2**31) if seed is None or seed < 0 else seed

    def engine_or_503() -> Engine:
        state.ready_batcher()
        assert state.engine is not None
        return state.engine

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request) -> Any:
        """OpenAI Images API: ``{prompt, n, size, response_format, ...}`` -> ``{created, data: [{b64_json}]}``."""
        body = await read_json(request)
        req = validate(OpenAIImageRequest, body)
        engine = engine_or_503()
        try:
            if req.response_format not in (None, "b64_json"):
                raise InputError(
                    "response_format",
                    f"{req.response_format!r} is not supported: this server returns images inline only; "
                    "use response_format=b64_json",
                )
            if req.size is None:
                width = height = engine.native_size
            else:
                m = _SIZE.match(req.size)
                if not m:
                    raise InputError("size", f"{req.size!r} is not of the form WIDTHxHEIGHT, e.g. 512x512")
                width, height = int(m.group(1)), int(m.group(2))
            check_size(engine, width, height, "size", "size")
            sched = scheduler_of(engine, req.scheduler, "scheduler")
        except InputError as e:
            raise _HTTPError(400, str(e), e.field) from None
        seed = seed_of(req.seed)
        seeds = [seed + k for k in range(req.n)]
        jobs = [
            ImageJob(req.prompt, req.negative_prompt, width, height, req.steps, req.guidance_scale, sched, s)
            for s in seeds
        ]
        pngs = await run_jobs(request, "/v1/images/generations", jobs)
        data = [{"b64_json": base64.b64encode(p).decode(), "seed": s} for p, s in zip(pngs, seeds, strict=True)]
        return {"created": int(time.time()), "data": data}

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(request: Request) -> Any:
        """AUTOMATIC1111 WebUI API: ``{prompt, steps, cfg_scale, ...}`` -> ``{images, parameters, info}``."""
        body = await read_json(request)
        req = validate(A1111Txt2ImgRequest, body)
        engine = engine_or_503()
        try:
            width, height = req.width or engine.native_size, req.height or engine.native_size
            check_size(engine, width, height, "width", "height")
            count = req.batch_size * req.n_iter
            if count > MAX_IMAGES:
                raise InputError("batch_size", f"batch_size * n_iter = {count} is above the limit of {MAX_IMAGES}")
            sampler_field = "sampler_name" if req.sampler_name is not None else "sampler_index"
            sampler = req.sampler_name or req.sampler_index or "Euler a"
            sched = scheduler_of(engine, sampler, sampler_field)
        except InputError as e:
            raise _HTTPError(400, str(e), e.field) from None
        seed = seed_of(req.seed)
        seeds = [seed + k for k in range(count)]
        jobs = [
            ImageJob(req.prompt, req.negative_prompt, width, height, req.steps, req.cfg_scale, sched, s) for s in seeds
        ]
        pngs = await run_jobs(request, "/sdapi/v1/txt2img", jobs)
        infotexts = [engine.metadata(j)["parameters"] for j in jobs]
        info = {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * count,
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * count,
            "seed": seed,
            "all_seeds": seeds,
            "width": width,
            "height": height,
            "sampler_name": sampler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "sd_model_name": engine.model_id,
            "infotexts": infotexts,
        }
        return {
            "images": [base64.b64encode(p).decode() for p in pngs],
            "parameters": body,
            "info": json.dumps(info),
        }

    @app.get("/health")
    async def health() -> Any:
        """``{"status": "loading" | "ready" | "draining" | "failed", ...}``; 200 only when ready."""
        body: dict[str, Any] = {"status": state.status, "model": cfg.engine.model}
        if state.batcher is not None:
            body["queue_depth"] = state.batcher.depth
            body["running"] = state.batcher.busy
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus text exposition."""
        data, ctype = state.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def list_models() -> Any:
        """The served model, OpenAI ``/v1/models`` style."""
        mid = state.engine.model_id if state.engine is not None else cfg.engine.model
        return {
            "object": "list",
            "data": [{"id": mid, "object": "model", "created": state.started, "owned_by": "sdkern"}],
        }

    # starlette wraps the app in its exception middleware; the guard goes outside everything
    app.add_middleware(_GuardFactory, state=state)
    return app


class _GuardFactory(_Guard):
    def __init__(self, app: Any, state: State) -> None:
        super().__init__(app, state)


def _version() -> str:
    from sdkern._version import __version__

    return __version__
