"""``sdkern generate``: txt2img, img2img, inpainting and ControlNet with per-image seeds (noise drawn on CPU),
an optional safety checker, PNGs with their settings."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdkern.apps.generate.options import DEFAULT_STRENGTH, GenerateSettings, check_strength
from sdkern.apps.generate.pipelines import (
    attach_safety_checker,
    float_init_noise_sigma,
    load_controlnet,
    load_onnx,
    seed_scheduler_noise,
    set_scheduler,
    task_pipeline,
    try_patch,
)
from sdkern.apps.generate.png import a1111_parameters, make_grid, png_info

logger = logging.getLogger("sdkern")


def load_images(
    s: GenerateSettings, height: int | None, width: int | None, factor: int, check_only: bool = False
) -> dict[str, Any]:
    """The input images of ``s`` read, checked and sized to the output: ``{"height", "width", "init", "mask",
    "control"}`` (absent ones ``None``). The output size is ``height`` x ``width`` where given, else the init
    (or control) image's, rounded down to multiples of ``factor``. ``check_only``: read and check, nothing resized
    or logged (the command's early check, before a model is loaded). Errors: see :mod:`sdkern.imageio`."""
    from sdkern.apps import imageio

    init = imageio.load_rgb(s.init_image, "--init-image") if s.init_image else None
    size = init.size if init is not None else None
    mask = imageio.load_mask(s.mask, size, resize=not check_only) if s.mask else None
    control = imageio.load_rgb(s.control_image, "--control-image") if s.control_image else None
    if check_only:
        return {"height": height, "width": width, "init": init, "mask": mask, "control": control}
    source = init if init is not None else control
    if source is not None:
        height, width = imageio.output_size(source, height, width, factor)
    if init is not None:
        init = imageio.fit(init, width, height, "--init-image")
    if mask is not None:
        mask = imageio.fit(mask, width, height, "--mask", resample="nearest")
    if control is not None:
        control = imageio.fit(control, width, height, "--control-image")
    return {"height": height, "width": width, "init": init, "mask": mask, "control": control}


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
    from sdkern.apps import models

    dtype = getattr(torch, s.dtype)
    geometry: dict[str, Any] | None = None
    kind = s.pipeline
    if s.strength is not None:
        check_strength(s.strength)
    if s.onnx:
        if kind != "txt2img" or s.safety_checker or s.controlnet:
            raise ValueError("--onnx runs txt2img only (no init image, mask, control image or safety checker)")
        pipe, geometry, provider = load_onnx(s)
        factor = geometry["vae_scale_factor"]
        default = geometry["sample_size"] * factor
        channels = geometry["latent_channels"]
        patched = "onnx"
        device, dtype_name = provider, str(np.dtype(geometry["dtype"]))
    else:
        if pipe is None:
            if s.model:
                pipe = models.load(s.model, dtype=dtype, device=s.device)
            elif s.safety_checker:
                pipe = models.build(s.preset, dtype=dtype, device=s.device, safety_checker=True)
            else:
                pipe = models.build(s.preset, dtype=dtype, device=s.device)
        controlnet = load_controlnet(s.controlnet, dtype, s.device) if s.controlnet else None
        pipe = task_pipeline(pipe, s, controlnet)
        if s.safety_checker:
            attach_safety_checker(pipe, s.model)
        patched = ""
        factor = getattr(pipe, "vae_scale_factor", 8)
        default = pipe.unet.config.sample_size * factor
        channels = pipe.unet.config.get("out_channels", 4) if kind.endswith("inpaint") else pipe.unet.config.in_channels
        device, dtype_name = s.device, s.dtype
    set_scheduler(pipe, s.scheduler)
    if s.progress and hasattr(pipe, "set_progress_bar_config"):  # diffusers' per-step bar, on stderr
        # mininterval=0: every step is drawn (tqdm's default 0.1 s skips the steps of a fast run entirely)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="sdkern generate", unit="step", mininterval=0)
    elif kind != "txt2img" and hasattr(pipe, "set_progress_bar_config"):  # from_pipe pipelines start with a bar
        pipe.set_progress_bar_config(disable=True)
    if not s.onnx:
        patched = try_patch(pipe) if s.patch else "no (--no-patch)"
    images_in = load_images(s, s.height, s.width, factor)
    height, width = images_in["height"] or default, images_in["width"] or default
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    strength = s.strength if s.strength is not None else DEFAULT_STRENGTH.get(kind)
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
        "pipeline": kind,
    }
    for key, value in (
        ("init_image", s.init_image),
        ("strength", strength if kind in DEFAULT_STRENGTH else None),
        ("mask", s.mask),
        ("control_image", s.control_image),
        ("controlnet", s.controlnet),
        ("safety_checker", "on" if s.safety_checker else None),
    ):
        if value is not None:
            settings[key] = value
    paths: list[Path] = []
    images: list[Any] = []
    seeds: list[int] = []
    shape = (channels, height // factor, width // factor)
    for it in range(s.n_iter):
        batch_seeds = [s.seed + it * s.n_samples + j for j in range(s.n_samples)]
        gens = [torch.Generator("cpu").manual_seed(x) for x in batch_seeds]
        # (img2img / inpainting: the pipeline draws from the untouched generators instead)
        cpu_latents = (
            torch.stack([torch.randn(shape, generator=g) for g in gens]) if kind not in DEFAULT_STRENGTH else None
        )
        kwargs: dict[str, Any] = {}
        if s.scheduler == "ddim":
            kwargs["eta"] = s.eta
        if geometry is not None and geometry["numpy_io"]:
            # The same CPU-drawn latents as the torch path. diffusers' ONNX pipeline sizes latents as
            # height // 8 whatever the VAE, so it is given the size that yields these latents; the
            # decoded image has the requested size. Later noise: see seed_scheduler_noise.
            seed_scheduler_noise(pipe.scheduler, gens)
            float_init_noise_sigma(pipe.scheduler)
            kwargs["latents"] = cpu_latents.numpy().astype(geometry["dtype"])
            kwargs["height"], kwargs["width"] = shape[1] * 8, shape[2] * 8
        elif geometry is not None:
            # torch pipeline with ORT stand-ins (SDXL, or SD on the CUDA EP; sdkern.apps.onnx.diffusers_pipelines):
            # as the torch path
            kwargs["latents"] = cpu_latents.to(torch.float32 if geometry["dtype"] == np.float32 else torch.float16)
            kwargs["height"], kwargs["width"] = height, width
            kwargs["generator"] = gens
        elif kind in DEFAULT_STRENGTH:
            # img2img / inpainting: the pipeline draws each image's VAE-encoding sample and noise from its own CPU
            # generator (diffusers draws on the generator's device), so image k is reproducible from seed + k
            kwargs["image"] = [images_in["init"]] * s.n_samples
            kwargs["strength"] = strength
            kwargs["generator"] = gens
            if kind.endswith("inpaint"):
                kwargs["mask_image"] = [images_in["mask"]] * s.n_samples
                kwargs["height"], kwargs["width"] = height, width
            if kind.startswith("controlnet-"):  # ControlNet img2img / inpainting: all images sized alike
                kwargs["control_image"] = [images_in["control"]] * s.n_samples
                kwargs["height"], kwargs["width"] = height, width
        else:
            kwargs["latents"] = cpu_latents.to(s.device, dtype)
            kwargs["height"], kwargs["width"] = height, width
            kwargs["generator"] = gens  # later noise (ancestral / eta > 0 steps) also from the CPU generators
            if kind == "controlnet":
                kwargs["image"] = images_in["control"]
        with torch.inference_mode():
            result = pipe(
                prompt=[s.prompt] * s.n_samples,
                negative_prompt=[s.negative_prompt] * s.n_samples if s.negative_prompt else None,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                output_type="pil",
                **kwargs,
            )
        flags = getattr(result, "nsfw_content_detected", None) if s.safety_checker else None
        for j, (seed, im) in enumerate(zip(batch_seeds, result.images, strict=True)):
            meta = {**settings, "seed": seed, "parameters": a1111_parameters(settings, seed)}
            path = out / f"{len(paths):05d}-seed{seed}.png"
            if flags is not None:
                meta["nsfw_flagged"] = bool(flags[j])
                if flags[j]:
                    logger.warning(
                        "sdkern generate: %s (seed %d) was flagged by the safety checker: written as a black image",
                        path.name,
                        seed,
                    )
            im.save(path, pnginfo=png_info(meta))
            paths.append(path)
            images.append(im)
            seeds.append(seed)
    grid_path = out / f"grid-seed{s.seed}.png"
    make_grid(images, s.n_samples).save(grid_path, pnginfo=png_info({**settings, "seeds": seeds}))
    paths.append(grid_path)
    logger.info("sdkern generate: wrote %d images and %s (%s)", len(images), grid_path, asdict(s))
    return paths
