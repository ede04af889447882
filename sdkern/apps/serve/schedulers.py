"""Scheduler names the server accepts: sdkern's own and the AUTOMATIC1111 sampler names, mapped to diffusers."""

from __future__ import annotations

from typing import Any

# canonical name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}

# AUTOMATIC1111 WebUI sampler names (case-insensitive) -> canonical name
A1111_SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler a": "euler-a",
    "ddim": "ddim",
    "dpm++ 2m": "dpm++",
    "dpm++ 2m karras": "dpm++-karras",
    "dpm++ 2m sde": "dpm++-sde",
    "plms": "pndm",
    "unipc": "unipc",
    "heun": "heun",
    "lms": "lms",
}

# schedulers an ``sdkern optimize`` ONNX pipeline can run (sdkern.apps.generate.set_scheduler)
ONNX_SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++")


def canonical(name: str) -> str | None:
    """The canonical scheduler name of ``name`` (sdkern or A1111 spelling), or None when unknown."""
    key = name.strip().lower()
    if key in SCHEDULERS:
        return key
    return A1111_SAMPLERS.get(key)


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh diffusers scheduler ``name`` (canonical) built from the pipeline's training config."""
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)
