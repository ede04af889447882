"""txt2img for ``sdkern generate``: per-image seeds, noise drawn on CPU, PNGs with their settings."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("sdkern")

SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++")


@dataclass
class GenerateSettings:
    """Options of one ``sdkern generate`` run.

    ``onnx`` names a directory written by ``sdkern optimize``: the run then goes through
    :class:`sdkern.onnx.OrtStableDiffusionPipeline` on ONNX Runtime ``provider`` (default: the
    directory's optimisation target) and ``preset``, ``model``, ``dtype``, ``device`` and ``patch`` do
    not apply.
    """

    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    n_samples: int = 1
    n_iter: int = 1
    height: int | None = None
    width: int | None = None
    out: str = "outputs"
    preset: str = "sd15"
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    patch: bool = True
    onnx: str | None = None
    provider: str | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by ``name`` (one of :data:`SCHEDULERS`), keeping its training config."""
    import diffusers

    cfg = pipe.scheduler.config
    if name == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(cfg)
    elif name == "euler":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(cfg)
    elif name == "euler-a":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
    elif name == "dpm++":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def _try_patch(pipe: Any) -> str:
    """Apply ``sdkern.patch``; return ``"yes"`` or why not."""
    try:
        import sdkern

        sdkern.patch(pipe)
        return "yes"
    except Exception as e:  # noqa: BLE001 - an unpatched run is still a valid run; say why
        logger.warning("sdkern generate: running unpatched: %s: %s", type(e).__name__, e)
        return f"no ({type(e).__name__}: {e})"


def _seed_scheduler_noise(scheduler: Any, generators: list[torch.Generator]) -> None:
    """Make ``scheduler.step`` draw its noise (ancestral / eta > 0 steps) from ``generators``.

    diffusers' ONNX pipeline calls ``step`` without a generator, so that noise would come from torch's
    global RNG; the torch pipeline passes the per-image CPU generators. Wrapping ``step`` on the
    instance gives both paths the same noise. The wrapper keeps the signature (``functools.wraps``), so
    the pipeline's check for an ``eta`` parameter still sees it.
    """
    import functools
    import inspect

    step = scheduler.step
    if getattr(step, "_sdkern_generators", None) is not None:  # already wrapped: next batch's generators
        step._sdkern_generators[:] = generators
        return
    if "generator" not in inspect.signature(step).parameters:
        return
    current = list(generators)

    @functools.wraps(step)
    def seeded_step(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("generator", current)
        return step(*args, **kwargs)

    seeded_step._sdkern_generators = current  # type: ignore[attr-defined]
    scheduler.step = seeded_step


def _float_init_noise_sigma(scheduler: Any) -> None:
    """Make ``scheduler.init_noise_sigma`` a Python float.

    diffusers' ONNX pipeline computes ``numpy_latents * scheduler.init_noise_sigma``; Euler schedulers
    return a 0-d tensor there, which NumPy cannot multiply ("unsupported operand type(s)"). The
    instance gets a subclass whose property returns the same value as a float.
    """
    cls = type(scheduler)
    value = getattr(cls, "init_noise_sigma", None)
    if not isinstance(value, property) or getattr(cls, "_sdkern_float_sigma", False):
        return
    scheduler.__class__ = type(
        cls.__name__,
        (cls,),
        {
            "init_noise_sigma": property(lambda self: float(value.fget(self))),
            "_sdkern_float_sigma": True,
            "__module__": cls.__module__,
        },
    )


def _load_onnx(s: GenerateSettings) -> tuple[Any, dict[str, Any], str]:
    """The ONNX pipeline of ``s.onnx``, its geometry and the provider it runs on."""
    from sdkern.onnx.pipeline import OrtStableDiffusionPipeline, pipeline_geometry, read_manifest, resolve_provider

    provider = resolve_provider(s.provider, read_manifest(s.onnx))
    pipe = OrtStableDiffusionPipeline.from_pretrained(s.onnx, provider=provider)
    return pipe, pipeline_geometry(pipe, s.onnx), provider


def _png_info(meta: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    return info


def make_grid(images: list[Any], cols: int) -> Any:
    """Paste PIL images into a grid of ``cols`` columns."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def generate(s: GenerateSettings, pipe: Any | None = None) -> list[Path]:
    """Generate ``n_iter`` batches of ``n_samples`` images; write each PNG and a grid.

    Image ``k`` (counting from 0 over all batches) uses seed ``s.seed + k`` for its initial noise,
    drawn on CPU, so an image is reproducible from its own seed whatever the batch, device or path
    (torch, or ONNX Runtime with ``s.onnx``: the same latents and step noise are passed in).

    Parameters
    ----------
    s : GenerateSettings
        What to generate.
    pipe : diffusers pipeline, optional
        Use this torch pipeline instead of building ``s.preset`` / loading ``s.model`` (ignored with
        ``s.onnx``).

    Returns
    -------
    list of Path
        The image files, then the grid file last.
    """
    from sdkern import models

    dtype = getattr(torch, s.dtype)
    geometry: dict[str, Any] | None = None
    if s.onnx:
        pipe, geometry, provider = _load_onnx(s)
        factor = geometry["vae_scale_factor"]
        default = geometry["sample_size"] * factor
        channels = geometry["latent_channels"]
        patched = "onnx"
        device, dtype_name = provider, str(np.dtype(geometry["dtype"]))
    else:
        if pipe is None:
            if s.model:
                pipe = models.load(s.model, dtype=dtype, device=s.device)
            else:
                pipe = models.build(s.preset, dtype=dtype, device=s.device)
        patched = ""
        factor = getattr(pipe, "vae_scale_factor", 8)
        default = pipe.unet.config.sample_size * factor
        channels = pipe.unet.config.in_channels
        device, dtype_name = s.device, s.dtype
    set_scheduler(pipe, s.scheduler)
    if s.progress and hasattr(pipe, "set_progress_bar_config"):  # diffusers' per-step bar, on stderr
        pipe.set_progress_bar_config(disable=False, leave=False, desc="sdkern generate", unit="step")
    if not s.onnx:
        patched = _try_patch(pipe) if s.patch else "no (--no-patch)"
    height, width = s.height or default, s.width or default
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    import sdkern

    settings = {
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "steps": s.steps,
        "guidance": s.guidance,
        "scheduler": s.scheduler,
        "eta": s.eta,
        "height": height,
        "width": width,
        "model": f"onnx:{s.onnx}" if s.onnx else s.model or f"preset:{s.preset}",
        "dtype": dtype_name,
        "device": device,
        "patched": patched,
        "sdkern": sdkern.__version__,
    }
    paths: list[Path] = []
    images: list[Any] = []
    seeds: list[int] = []
    shape = (channels, height // factor, width // factor)
    for it in range(s.n_iter):
        batch_seeds = [s.seed + it * s.n_samples + j for j in range(s.n_samples)]
        gens = [torch.Generator("cpu").manual_seed(x) for x in batch_seeds]
        cpu_latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
        kwargs: dict[str, Any] = {}
        if s.scheduler == "ddim":
            kwargs["eta"] = s.eta
        if geometry is not None and geometry["numpy_io"]:
            # The same CPU-drawn latents as the torch path. diffusers' ONNX pipeline sizes latents as
            # height // 8 whatever the VAE, so it is given the size that yields these latents; the
            # decoded image has the requested size. Later noise: see _seed_scheduler_noise.
            _seed_scheduler_noise(pipe.scheduler, gens)
            _float_init_noise_sigma(pipe.scheduler)
            kwargs["latents"] = cpu_latents.numpy().astype(geometry["dtype"])
            kwargs["height"], kwargs["width"] = shape[1] * 8, shape[2] * 8
        elif geometry is not None:
            # torch pipeline with ORT stand-ins (SDXL, or SD on the CUDA EP; sdkern.onnx.sdxl): as the torch path
            kwargs["latents"] = cpu_latents.to(torch.float32 if geometry["dtype"] == np.float32 else torch.float16)
            kwargs["height"], kwargs["width"] = height, width
            kwargs["generator"] = gens
        else:
            kwargs["latents"] = cpu_latents.to(s.device, dtype)
            kwargs["height"], kwargs["width"] = height, width
            kwargs["generator"] = gens  # later noise (ancestral / eta > 0 steps) also from the CPU generators
        with torch.inference_mode():
            result = pipe(
                prompt=[s.prompt] * s.n_samples,
                negative_prompt=[s.negative_prompt] * s.n_samples if s.negative_prompt else None,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                output_type="pil",
                **kwargs,
            )
        for seed, im in zip(batch_seeds, result.images, strict=True):
            meta = {**settings, "seed": seed, "parameters": _a1111(settings, seed)}
            path = out / f"{len(paths):05d}-seed{seed}.png"
            im.save(path, pnginfo=_png_info(meta))
            paths.append(path)
            images.append(im)
            seeds.append(seed)
    grid_path = out / f"grid-seed{s.seed}.png"
    make_grid(images, s.n_samples).save(grid_path, pnginfo=_png_info({**settings, "seeds": seeds}))
    paths.append(grid_path)
    logger.info("sdkern generate: wrote %d images and %s (%s)", len(images), grid_path, asdict(s))
    return paths


def _a1111(settings: dict[str, Any], seed: int) -> str:
    neg = f"\nNegative prompt: {settings['negative_prompt']}" if settings["negative_prompt"] else ""
    return (
        f"{settings['prompt']}{neg}\nSteps: {settings['steps']}, Sampler: {settings['scheduler']}, "
        f"CFG scale: {settings['guidance']}, Seed: {seed}, Size: {settings['width']}x{settings['height']}, "
        f"Model: {settings['model']}"
    )
