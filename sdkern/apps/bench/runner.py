"""``sdkern bench``: run engines side by side on the same pipeline, latents and prompts."""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sdkern.apps.bench import measure
from sdkern.apps.bench.engines import Engine, all_engines, default_engine_names
from sdkern.runtime import release_free_memory

logger = logging.getLogger("sdkern")

PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"


@dataclass
class BenchSettings:
    """Options of one bench run (the ``sdkern bench`` flags)."""

    preset: str = "sd15"
    model: str | None = None
    height: int = 256
    width: int = 256
    steps: int = 4
    batch_size: int = 1
    batch_count: int = 2
    warmup: int = 0
    guidance: float = 7.5
    dtype: str = "float32"
    device: str = "cpu"
    engines: list[str] = field(default_factory=list)
    seed: int = 0
    roofline: bool = True
    progress: bool = True
    pipeline: str = "txt2img"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


#: img2img / inpainting strength of the bench; ``ceil(steps / BENCH_STRENGTH)`` scheduler steps make ``steps``
#: denoising steps run
BENCH_STRENGTH = 0.75


def bench_preset(preset: str, pipeline: str) -> str:
    """The preset that runs ``pipeline`` with ``preset``'s architecture: ``preset`` itself, or its
    ``<preset>-inpaint`` / ``<preset>-controlnet`` variant (ValueError when there is none)."""
    from sdkern.apps.models.configs import PRESETS

    own = getattr(PRESETS[preset], "pipeline", "txt2img")
    want = pipeline if pipeline in ("inpaint", "controlnet") else "txt2img"
    if own == want:
        return preset
    variant = f"{preset}-{want}" if want != "txt2img" else preset.rsplit("-", 1)[0]
    if variant in PRESETS and getattr(PRESETS[variant], "pipeline", "txt2img") == want:
        return variant
    have = [n for n, p in PRESETS.items() if getattr(p, "pipeline", "txt2img") == want]
    raise ValueError(f"--pipeline {pipeline}: preset {preset} has no {want} variant; presets that have: {have}")


def load_pipeline(s: BenchSettings) -> Any:
    """Build the preset (its variant for ``s.pipeline``, see :func:`bench_preset`) or load ``s.model`` on
    ``s.device`` in ``s.dtype``, as the diffusers pipeline of ``s.pipeline``."""
    from sdkern.apps import models
    from sdkern.apps.generate import GenerateSettings, task_pipeline

    if s.model:
        pipe = models.load(s.model, dtype=s.torch_dtype, device=s.device)
    else:
        pipe = models.build(bench_preset(s.preset, s.pipeline), dtype=s.torch_dtype, device=s.device, seed=s.seed)
    # the options generate would have for this pipeline (file names are not read here)
    g = GenerateSettings(
        init_image="x" if s.pipeline in ("img2img", "inpaint") else None,
        mask="x" if s.pipeline == "inpaint" else None,
        control_image="x" if s.pipeline == "controlnet" else None,
    )
    return task_pipeline(pipe, g)


def bench_images(s: BenchSettings) -> dict[str, Any]:
    """Deterministic inputs of ``s.pipeline`` drawn from ``s.seed``: a smooth RGB init image, a centred
    rectangular mask (half the width and height) and a sparse binary control image, each ``width`` x ``height``."""
    from PIL import Image

    gen = torch.Generator("cpu").manual_seed(s.seed)
    h, w = s.height, s.width
    coarse = torch.rand((1, 3, max(1, h // 8), max(1, w // 8)), generator=gen)
    init = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    mask = torch.zeros((h, w), dtype=torch.uint8)
    mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 255
    control = (torch.rand((h, w), generator=gen) > 0.9).to(torch.uint8).mul(255)

    def pil(t: torch.Tensor, mode: str) -> Any:
        return Image.fromarray(t.numpy()).convert(mode)

    return {
        "init": pil((init * 255).round().to(torch.uint8).permute(1, 2, 0), "RGB"),
        "mask": pil(mask, "L"),
        "control": pil(control, "RGB"),
    }


def draw_latents(pipe: Any, s: BenchSettings) -> torch.Tensor:
    """Initial latents drawn on CPU from ``s.seed`` (identical on every device), moved to the device."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    shape = (s.batch_size, pipe.unet.config.in_channels, s.height // factor, s.width // factor)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(s.device, s.torch_dtype)


def _roofline_floor(s: BenchSettings, device: torch.device) -> tuple[str | None, float | None]:
    """(device name, floor seconds of one U-Net step) for the bench device, or (None, None)."""
    from sdkern.apps.bench import roofline as rl

    if s.model is not None:
        return None, None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = next((d for k, d in rl.DEVICES.items() if k in name), None)
        if spec is None:
            return None, None
    elif device.type == "cpu":
        spec = rl.measure_cpu(0.3)
    else:
        return None, None
    unet_batch = s.batch_size * (2 if s.guidance > 1 else 1)
    counts = rl.count_unet(bench_preset(s.preset, s.pipeline), s.height, s.width, unet_batch, s.torch_dtype)
    return spec.name, rl.floor_seconds(counts, spec, s.torch_dtype)["total"]


def run_bench(s: BenchSettings, out: Any = sys.stdout) -> list[dict[str, Any]]:
    """Run every requested engine and return one result row per engine (columns of :mod:`sdkern.bench.report`).

    Parameters
    ----------
    s : BenchSettings
        What to run.
    out : file
        Where skip reasons and status lines are printed.
    """
    device = torch.device(s.device)
    engines_by_name = all_engines()
    names = s.engines or default_engine_names(device)
    unknown = [n for n in names if n not in engines_by_name]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; choose from {', '.join(engines_by_name)}")
    if "eager" in names:  # eager is the reference of the diff column: run it first
        names = ["eager", *[n for n in names if n != "eager"]]

    t0 = time.perf_counter()
    pipe = load_pipeline(s)
    load_s = time.perf_counter() - t0
    print(f"loaded {s.model or 'preset ' + s.preset} on {device} ({s.dtype}) in {load_s:.1f}s", file=out)
    latents = draw_latents(pipe, s) if s.pipeline in ("txt2img", "controlnet") else None
    prompts = [PROMPT] * s.batch_size
    inputs = bench_images(s)
    pipe_kwargs: dict[str, Any] = {"num_inference_steps": s.steps}
    if s.pipeline in ("img2img", "inpaint"):
        pipe_kwargs["num_inference_steps"] = math.ceil(s.steps / BENCH_STRENGTH)  # s.steps denoising steps run
        pipe_kwargs.update(image=[inputs["init"]] * s.batch_size, strength=BENCH_STRENGTH)
    if s.pipeline == "inpaint":
        pipe_kwargs["mask_image"] = [inputs["mask"]] * s.batch_size
    if s.pipeline == "controlnet":
        pipe_kwargs["image"] = inputs["control"]

    roof_dev, roof_floor = (None, None)
    if s.roofline and s.pipeline != "controlnet":  # the U-Net roofline leaves out the ControlNet's work
        try:
            roof_dev, roof_floor = _roofline_floor(s, device)
        except Exception as e:  # noqa: BLE001 - the roofline is an extra, never a reason to fail a bench
            logger.warning("sdkern bench: roofline unavailable: %s", e)

    bar = None
    seen = [0]  # progress-bar steps counted in the current call

    def call(step_cb: Any) -> torch.Tensor:
        seen[0] = 0

        def on_step(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            if bar is not None:
                bar.update(1)
                seen[0] += 1
            return step_cb(p, i, t, kw) if step_cb is not None else kw

        try:
            return _call(on_step)
        finally:
            if bar is not None and seen[0] < s.steps:  # an engine whose loop skips the callback: whole call
                bar.update(s.steps - seen[0])

    def _call(step_cb: Any) -> torch.Tensor:
        kwargs = dict(pipe_kwargs)
        if latents is not None:
            kwargs["latents"] = latents.clone()
        else:  # img2img / inpainting draw the encoding sample and noise: the same generators for every call
            kwargs["generator"] = [torch.Generator("cpu").manual_seed(s.seed + i) for i in range(s.batch_size)]
        if s.pipeline != "img2img":
            kwargs.update(height=s.height, width=s.width)
        with torch.inference_mode():
            res = pipe(
                prompt=prompts,
                guidance_scale=s.guidance,
                output_type="pt",
                callback_on_step_end=step_cb,
                **kwargs,
            )
        return res.images

    runnable: list[tuple[str, Engine, str | None]] = []
    for n in names:
        e = engines_by_name[n]
        runnable.append((n, e, e.supports(s.pipeline) or e.available(pipe, device)))
    total_calls = sum(1 + s.warmup + s.batch_count for _, _, why in runnable if why is None)
    if s.progress:
        from tqdm import tqdm

        # One tick per denoising step of every call (first, warm-up and timed calls of every engine).
        bar = tqdm(total=total_calls * s.steps, desc="sdkern bench", unit="step", file=sys.stderr, leave=False)

    base = {
        "disable_safety_checker": True,
        "height": s.height,
        "width": s.width,
        "steps": s.steps,
        "batch_size": s.batch_size,
        "batch_count": s.batch_count,
        "num_prompts": 1,
        "pipeline": s.pipeline,
        "model": s.model or s.preset,
        "device": str(device),
        "dtype": s.dtype,
        "warmup": s.warmup,
        "roofline_device": roof_dev,
        "roofline_floor_ms": roof_floor * 1e3 if roof_floor is not None else None,
    }
    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    for name, engine, why in runnable:
        row: dict[str, Any] = {"engine": name, "version": engine.version(), "provider": engine.provider, **base}
        rows.append(row)
        if why is not None:
            row["status"] = f"skipped: {why}"
            print(f"[{name}] skipped: {why}", file=out)
            continue
        try:
            if bar is not None:
                bar.set_postfix_str(name)
            t = time.perf_counter()
            engine.setup(pipe)
            row["setup_s"] = time.perf_counter() - t
            try:
                first = measure.timed_call(lambda cb, engine=engine: engine.run(pipe, lambda _p: call(cb)), device)
                for _ in range(s.warmup):
                    engine.run(pipe, lambda _p: call(None))
                timed = []
                for _ in range(s.batch_count):
                    timed.append(
                        measure.timed_call(lambda cb, engine=engine: engine.run(pipe, lambda _p: call(cb)), device)
                    )
            finally:
                engine.teardown(pipe)
                # the engine's memory (an ONNX Runtime session: ~9 GB for SD1.5 fp32) back to the system before the
                # next engine sets up; the tuned allocator would otherwise keep it resident for the whole run
                release_free_memory()
        except Exception as e:
            logger.exception("sdkern bench: engine %s failed", name)
            row["status"] = f"error: {type(e).__name__}: {e}"
            print(f"[{name}] error: {type(e).__name__}: {e}", file=out)
            continue
        lat = [c.seconds for c in timed] or [first.seconds]
        rates = [r for r in (measure.unet_steps_per_s(c.step_times) for c in (timed or [first])) if r is not None]
        steps_per_s = statistics.mean(rates) if rates else None
        output = (timed[0] if timed else first).output.float().cpu()
        if name == "eager":
            # The eager first call is the reference; eager's own column then shows its run-to-run difference.
            reference = first.output.float().cpu()
        row.update(
            {
                "average_latency": statistics.mean(lat),
                "median_latency": statistics.median(lat),
                "latencies": lat,
                "first_call_s": first.seconds,
                "first_run_memory_MB": first.memory.headline(device),
                "second_run_memory_MB": (timed[0].memory if timed else first.memory).headline(device),
                "memory_detail": {
                    "first": asdict(first.memory),
                    "second": asdict(timed[0].memory) if timed else None,
                },
                "unet_steps_per_s": steps_per_s,
                "max_abs_diff_vs_eager": (float((output - reference).abs().max()) if reference is not None else None),
                "roofline_fraction": (roof_floor * steps_per_s if roof_floor is not None and steps_per_s else None),
                "status": "ok",
            }
        )
    if bar is not None:
        bar.close()
    return rows
