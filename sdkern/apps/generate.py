"""``sdkern generate``: txt2img, img2img, inpainting and ControlNet with per-image seeds (noise drawn on CPU),
an optional safety checker, PNGs with their settings."""

from __future__ import annotations

import json
import logging
import os
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

    ``init_image`` (img2img, ``strength`` in (0, 1], default 0.8), with ``mask`` (inpainting, an inpainting
    model, ``strength`` default 1.0), ``control_image`` (ControlNet: a ``*-controlnet`` preset or model, or
    ``controlnet`` naming a ControlNet directory or preset) and ``safety_checker`` apply to the torch path of
    SD 1.x/2.x models; see :mod:`sdkern.imageio` for how the images are read and sized.
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
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None
    control_image: str | None = None
    controlnet: str | None = None
    safety_checker: bool = False

    @property
    def pipeline(self) -> str:
        """``"inpaint"`` (with a mask), ``"img2img"`` (an init image), ``"controlnet"`` or ``"txt2img"``."""
        if self.mask:
            return "inpaint"
        if self.init_image:
            return "img2img"
        return "controlnet" if self.control_image else "txt2img"


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
    from sdkern.apps.onnx.pipeline import OrtStableDiffusionPipeline, pipeline_geometry, read_manifest, resolve_provider

    provider = resolve_provider(s.provider, read_manifest(s.onnx))
    pipe = OrtStableDiffusionPipeline.from_pretrained(s.onnx, provider=provider)
    return pipe, pipeline_geometry(pipe, s.onnx), provider


#: diffusers' default strengths: img2img 0.8, inpainting 1.0 (the masked area starts from pure noise)
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


def check_strength(strength: float) -> float:
    """``strength`` if it is in (0, 1], else ValueError."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    return strength


def controlnet_presets() -> list[str]:
    """Presets with a ControlNet (what ``--controlnet`` accepts besides a directory)."""
    from sdkern.apps.models.configs import PRESETS

    return [n for n, p in PRESETS.items() if getattr(p, "controlnet", None) is not None]


def load_controlnet(name: str, dtype: torch.dtype, device: str) -> Any:
    """A ``ControlNetModel`` from a diffusers directory, or the random-weight one of a ``*-controlnet`` preset
    (the same weights as that preset's pipeline builds)."""
    import diffusers

    from sdkern.apps import models

    if name in controlnet_presets():
        import importlib

        model_build = importlib.import_module("sdkern.apps.models.build")  # the module (models.build is the function)
        cn = models.build_component(name, "controlnet")
        # the sub-seed build() gives a preset's ControlNet (weight seed 0, as generate builds presets)
        model_build._init_weights(cn, 100, torch.device(device), dtype)
        return cn.eval()
    if os.path.isdir(name):
        try:
            return diffusers.ControlNetModel.from_pretrained(name, torch_dtype=dtype).to(device)
        except (OSError, ValueError) as e:
            raise ValueError(f"--controlnet {name}: not a diffusers ControlNet directory ({type(e).__name__})") from e
    raise ValueError(
        f"--controlnet {name}: neither a directory nor a ControlNet preset ({', '.join(controlnet_presets())})"
    )


def _attach_safety_checker(pipe: Any, model: str | None) -> None:
    """Give ``pipe`` the safety checker and feature extractor of ``model`` (a diffusers directory or hub id)."""
    if getattr(pipe, "safety_checker", None) is not None and getattr(pipe, "feature_extractor", None) is not None:
        return
    if model is None:
        raise ValueError("--safety-checker: this pipeline has no safety checker")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(model, subfolder="safety_checker")
        extractor = CLIPImageProcessor.from_pretrained(model, subfolder="feature_extractor")
    except (OSError, ValueError) as e:
        raise ValueError(f"--safety-checker: model {model!r} has no safety_checker/feature_extractor") from e
    pipe.register_modules(safety_checker=checker.to(pipe.device, pipe.unet.dtype), feature_extractor=extractor)


def check_options(s: GenerateSettings) -> None:
    """Raise ValueError for options of ``s`` that do not go together, whatever the model."""
    if s.mask and not s.init_image:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if s.strength is not None and not s.init_image:
        raise ValueError("--strength applies with --init-image (img2img or inpainting) only")
    if s.controlnet and not s.control_image:
        raise ValueError("--controlnet needs --control-image")
    if s.control_image and (s.init_image or s.mask):
        raise ValueError("--control-image with --init-image/--mask (ControlNet img2img/inpainting) is not supported")
    if s.controlnet and not os.path.isdir(s.controlnet) and s.controlnet not in controlnet_presets():
        raise ValueError(
            f"--controlnet {s.controlnet}: neither a directory nor a ControlNet preset "
            f"({', '.join(controlnet_presets()) or 'none'})"
        )


def check_preset_fit(s: GenerateSettings) -> None:
    """:func:`check_model_fit` for ``s.preset`` (and a ``s.controlnet`` preset) from their configs, without building
    anything."""
    from sdkern.apps.models.configs import PRESETS

    cfg = PRESETS[s.preset]
    has_cn = s.controlnet is not None or getattr(cfg, "controlnet", None) is not None
    try:
        check_model_fit(s, cfg.unet["in_channels"], has_cn, sdxl=cfg.kind == "sdxl")
    except ValueError as e:
        raise ValueError(f"{e} (preset {s.preset})") from None
    if s.controlnet in PRESETS:
        _check_controlnet_fits(PRESETS[s.controlnet].controlnet or {}, cfg.unet, s.controlnet)


def _check_controlnet_fits(controlnet: Any, unet: Any, name: str | None) -> None:
    """ValueError unless a ControlNet config (dict or diffusers config) matches a U-Net config's widths."""
    keys = ("cross_attention_dim", "block_out_channels")
    got = {k: list(v) if isinstance(v, (list, tuple)) else v for k in keys for v in [controlnet.get(k)]}
    want = {k: list(v) if isinstance(v, (list, tuple)) else v for k in keys for v in [unet.get(k)]}
    if got != want:
        raise ValueError(f"--controlnet {name}: made for another U-Net ({got}; this U-Net: {want})")


def check_model_fit(s: GenerateSettings, in_channels: int, has_controlnet: bool, sdxl: bool = False) -> None:
    """Raise ValueError when the model (a U-Net with ``in_channels`` inputs, with or without a ControlNet) does not
    fit the options of ``s`` (after :func:`check_options`): a mask needs an inpainting U-Net (9 channels) and an
    inpainting U-Net a mask, a control image needs a ControlNet and a ControlNet a control image; no safety checker
    on SDXL (diffusers' SDXL pipelines have none)."""
    check_options(s)
    kind = s.pipeline
    if kind == "inpaint" and in_channels != 9:
        raise ValueError(
            f"--mask needs an inpainting model (a U-Net with 9 input channels; this one has {in_channels}): "
            "e.g. --preset tiny-inpaint or sd15-inpaint"
        )
    if kind != "inpaint" and in_channels == 9:
        raise ValueError("this is an inpainting model (a U-Net with 9 input channels): give --init-image and --mask")
    if kind == "controlnet" and not has_controlnet:
        raise ValueError("--control-image needs a ControlNet: --controlnet DIR_OR_PRESET or a *-controlnet preset")
    if kind != "controlnet" and has_controlnet:
        raise ValueError("this model has a ControlNet (--controlnet or a *-controlnet preset): give --control-image")
    if s.safety_checker and sdxl:
        raise ValueError("--safety-checker: diffusers' SDXL pipelines have no safety checker")


def task_pipeline(pipe: Any, s: GenerateSettings, controlnet: Any = None) -> Any:
    """The diffusers pipeline that runs ``s.pipeline`` with the components of ``pipe``.

    Raises ValueError for a model that does not fit the options: a mask without an inpainting U-Net (9 input
    channels), an inpainting model without a mask, a control image without a ControlNet or the reverse, and
    ControlNet with an init image (not supported yet).
    """
    import diffusers

    kind = s.pipeline
    check_model_fit(
        s,
        pipe.unet.config.in_channels,
        controlnet is not None or getattr(pipe, "controlnet", None) is not None,
        sdxl="XL" in type(pipe).__name__,
    )
    if controlnet is not None:
        _check_controlnet_fits(controlnet.config, pipe.unet.config, s.controlnet)
    if kind == "inpaint":
        return pipe if "Inpaint" in type(pipe).__name__ else diffusers.AutoPipelineForInpainting.from_pipe(pipe)
    if kind == "img2img":
        return diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    if kind == "controlnet" and controlnet is not None:
        return diffusers.StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    return pipe


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
    from sdkern.apps import models

    dtype = getattr(torch, s.dtype)
    geometry: dict[str, Any] | None = None
    kind = s.pipeline
    if s.strength is not None:
        check_strength(s.strength)
    if s.onnx:
        if kind != "txt2img" or s.safety_checker or s.controlnet:
            raise ValueError("--onnx runs txt2img only (no init image, mask, control image or safety checker)")
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
            elif s.safety_checker:
                pipe = models.build(s.preset, dtype=dtype, device=s.device, safety_checker=True)
            else:
                pipe = models.build(s.preset, dtype=dtype, device=s.device)
        controlnet = load_controlnet(s.controlnet, dtype, s.device) if s.controlnet else None
        pipe = task_pipeline(pipe, s, controlnet)
        if s.safety_checker:
            _attach_safety_checker(pipe, s.model)
        patched = ""
        factor = getattr(pipe, "vae_scale_factor", 8)
        default = pipe.unet.config.sample_size * factor
        channels = pipe.unet.config.get("out_channels", 4) if kind == "inpaint" else pipe.unet.config.in_channels
        device, dtype_name = s.device, s.dtype
    set_scheduler(pipe, s.scheduler)
    if s.progress and hasattr(pipe, "set_progress_bar_config"):  # diffusers' per-step bar, on stderr
        # mininterval=0: every step is drawn (tqdm's default 0.1 s skips the steps of a fast run entirely)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="sdkern generate", unit="step", mininterval=0)
    elif kind != "txt2img" and hasattr(pipe, "set_progress_bar_config"):  # from_pipe pipelines start with a bar
        pipe.set_progress_bar_config(disable=True)
    if not s.onnx:
        patched = _try_patch(pipe) if s.patch else "no (--no-patch)"
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
            # decoded image has the requested size. Later noise: see _seed_scheduler_noise.
            _seed_scheduler_noise(pipe.scheduler, gens)
            _float_init_noise_sigma(pipe.scheduler)
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
            if kind == "inpaint":
                kwargs["mask_image"] = [images_in["mask"]] * s.n_samples
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
            meta = {**settings, "seed": seed, "parameters": _a1111(settings, seed)}
            path = out / f"{len(paths):05d}-seed{seed}.png"
            if flags is not None:
                meta["nsfw_flagged"] = bool(flags[j])
                if flags[j]:
                    logger.warning(
                        "sdkern generate: %s (seed %d) was flagged by the safety checker: written as a black image",
                        path.name,
                        seed,
                    )
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
        + (f", Denoising strength: {settings['strength']}" if "strength" in settings else "")
        + (f", ControlNet: {settings.get('controlnet') or settings['model']}" if "control_image" in settings else "")
    )
