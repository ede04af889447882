"""The diffusers pipeline a run uses: the task's pipeline class, scheduler, ControlNet, safety checker, sdkern's
patch, and what makes diffusers' ONNX pipeline draw the same noise as the torch path."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sdkern.apps.generate.options import GenerateSettings, check_controlnet_fits, check_model_fit, controlnet_presets

logger = logging.getLogger("sdkern")


SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++")


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


def try_patch(pipe: Any) -> str:
    """Apply ``sdkern.patch``; return ``"yes"`` or why not."""
    try:
        import sdkern

        sdkern.patch(pipe)
        return "yes"
    except Exception as e:  # noqa: BLE001 - an unpatched run is still a valid run; say why
        logger.warning("sdkern generate: running unpatched: %s: %s", type(e).__name__, e)
        return f"no ({type(e).__name__}: {e})"


def seed_scheduler_noise(scheduler: Any, generators: list[torch.Generator]) -> None:
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


def float_init_noise_sigma(scheduler: Any) -> None:
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


def load_onnx(s: GenerateSettings) -> tuple[Any, dict[str, Any], str]:
    """The ONNX pipeline of ``s.onnx``, its geometry and the provider it runs on."""
    from sdkern.apps.onnx.pipeline import OrtStableDiffusionPipeline, pipeline_geometry, read_manifest, resolve_provider

    provider = resolve_provider(s.provider, read_manifest(s.onnx))
    pipe = OrtStableDiffusionPipeline.from_pretrained(s.onnx, provider=provider)
    return pipe, pipeline_geometry(pipe, s.onnx), provider


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


def attach_safety_checker(pipe: Any, model: str | None) -> None:
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


def task_pipeline(pipe: Any, s: GenerateSettings, controlnet: Any = None) -> Any:
    """The diffusers pipeline that runs ``s.pipeline`` with the components of ``pipe``.

    Raises ValueError for a model that does not fit the options: a mask without an inpainting U-Net (9 input
    channels), an inpainting model without a mask, a control image without a ControlNet or the reverse.
    ControlNet with an init image (and a mask) runs diffusers' ControlNet img2img (inpainting) pipeline.
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
        check_controlnet_fits(controlnet.config, pipe.unet.config, s.controlnet)
    if kind in ("controlnet-img2img", "controlnet-inpaint"):
        # AutoPipeline picks the ControlNet variant of the task (SD or SDXL) when given a ControlNet
        cn = controlnet if controlnet is not None else pipe.controlnet
        auto = diffusers.AutoPipelineForInpainting if kind.endswith("inpaint") else diffusers.AutoPipelineForImage2Image
        return auto.from_pipe(pipe, controlnet=cn)
    if kind == "inpaint":
        return pipe if "Inpaint" in type(pipe).__name__ else diffusers.AutoPipelineForInpainting.from_pipe(pipe)
    if kind == "img2img":
        return diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    if kind == "controlnet" and controlnet is not None:
        return diffusers.StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    return pipe
