"""The FastAPI application: OpenAI Images and AUTOMATIC1111 endpoints, health, metrics, models.

:func:`create_app` returns an app that loads its engine in the background when it starts (``/health``
says ``loading`` until the pipeline is loaded, patched and warmed up, then ``ready``). The same app runs
under uvicorn (:mod:`sdkern.apps.serve.server`) and as a Ray Serve deployment (:mod:`sdkern.apps.serve.ray_app`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdkern.apps.serve.batching import Batcher, NotAccepting, QueueFull
from sdkern.apps.serve.engine import Engine, EngineOptions, ImageJob
from sdkern.apps.serve.middleware import GuardFactory
from sdkern.apps.serve.schedulers import canonical
from sdkern.apps.serve.schemas import MAX_IMAGES, A1111Txt2ImgRequest, InputError, OpenAIImageRequest
from sdkern.apps.serve.state import HTTPError, ServeConfig, State, error_body

__all__ = ["ServeConfig", "State", "create_app"]

logger = logging.getLogger("sdkern")


_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


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
            loaded: asyncio.Future[None] = loop.create_future()

            def finished() -> None:
                if not loaded.done():
                    loaded.set_result(None)

            def load_thread() -> None:
                # a daemon thread, not the loop's executor: asyncio.run joins executor threads at exit, and a
                # server stopped while loading must not wait minutes for a model nobody will use
                try:
                    state.load()
                finally:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped meanwhile
                        loop.call_soon_threadsafe(finished)

            async def load() -> None:
                threading.Thread(target=load_thread, name="sdkern-serve-load", daemon=True).start()
                await loaded
                _start_batcher()

            loader = loop.create_task(load())
        else:
            state.load()
            _start_batcher()
        yield
        state.status = "draining"
        if loader is not None and not loader.done():
            # stopped before the model was ready: nothing was accepted (no batcher yet), so do not wait for a load
            # that can take minutes; the loading thread cannot be stopped, run_server ends the process instead
            logger.info("sdkern serve: stopped while loading the model; not waiting for it")
            loader.cancel()
        if state.batcher is not None:
            await state.batcher.stop()
        state.status = "stopped"

    app = FastAPI(title="sdkern serve", version=_version(), lifespan=lifespan)
    app.state.sdkern = state

    @app.exception_handler(HTTPError)
    async def _on_http_error(request: Request, exc: HTTPError) -> Any:
        return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> Any:
        logger.exception("sdkern serve: internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            raise HTTPError(413, f"body: larger than the limit of {cfg.max_body_bytes} bytes", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise HTTPError(413, f"body: larger than the limit of {cfg.max_body_bytes} bytes", "body")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body: not valid JSON ({e})", "body") from None

    def validate(model: Any, data: Any) -> Any:
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise HTTPError(400, "body: expected a JSON object", "body")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or "body"
            raise HTTPError(422, f"{param}: {err['msg']}", param) from None

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
            raise HTTPError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting:
            raise HTTPError(503, "the server is shutting down", headers={"Retry-After": "5"}) from None
        deadline = t0 + cfg.timeout_s
        while not ticket.future.done():
            await asyncio.wait({ticket.future}, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            if ticket.future.done():
                break
            if await request.is_disconnected():
                n = batcher.withdraw(ticket)
                logger.info("sdkern serve: client gone; dropped %d queued image(s)", n)
                raise HTTPError(499, "client disconnected")
            if time.monotonic() >= deadline:
                batcher.withdraw(ticket)
                raise HTTPError(504, f"the request did not finish within {cfg.timeout_s:g} s")
        exc = ticket.future.exception()
        if exc is not None:
            raise HTTPError(500, f"generation failed: {type(exc).__name__}: {exc}")
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
            raise HTTPError(400, str(e), e.field) from None
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
            raise HTTPError(400, str(e), e.field) from None
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
    app.add_middleware(GuardFactory, state=state)
    return app


def _version() -> str:
    from sdkern._version import __version__

    return __version__
