"""txt2img for ``sdkern generate``: per-image seeds, noise drawn on CPU, PNGs with their settings."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sdkern")

SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++")


@dataclass
class GenerateSettings:
    """Options of one ``sdkern generate`` run."""

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
    drawn on CPU, so an image is reproducible from its own seed whatever the batch or device.

    Returns
    -------
    list of Path
        The image files, then the grid file last.
    """
    from sdkern import models

    dtype = getattr(torch, s.dtype)
    if pipe is None:
        if s.model:
            pipe = models.load(s.model, dtype=dtype, device=s.device)
        else:
            pipe = models.build(s.preset, dtype=dtype, device=s.device)
    set_scheduler(pipe, s.scheduler)
    patched = _try_patch(pipe) if s.patch else "no (--no-patch)"
    factor = getattr(pipe, "vae_scale_factor", 8)
    default = pipe.unet.config.sample_size * factor
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
        "model": s.model or f"preset:{s.preset}",
        "dtype": s.dtype,
        "device": s.device,
        "patched": patched,
        "sdkern": sdkern.__version__,
    }
    paths: list[Path] = []
    images: list[Any] = []
    seeds: list[int] = []
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    for it in range(s.n_iter):
        batch_seeds = [s.seed + it * s.n_samples + j for j in range(s.n_samples)]
        gens = [torch.Generator("cpu").manual_seed(x) for x in batch_seeds]
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(s.device, dtype)
        kwargs: dict[str, Any] = {}
        if s.scheduler == "ddim":
            kwargs["eta"] = s.eta
        with torch.inference_mode():
            result = pipe(
                prompt=[s.prompt] * s.n_samples,
                negative_prompt=[s.negative_prompt] * s.n_samples if s.negative_prompt else None,
                height=height,
                width=width,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                latents=latents,
                generator=gens,  # later noise (ancestral / eta > 0 steps) also comes from the CPU generators
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
