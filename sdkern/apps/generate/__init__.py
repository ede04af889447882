"""``sdkern generate``: txt2img, img2img, inpainting and ControlNet with per-image seeds (noise drawn on CPU),
an optional safety checker, PNGs with their settings.

- :mod:`~sdkern.apps.generate.options`: :class:`GenerateSettings` and the checks made before a model is built;
- :mod:`~sdkern.apps.generate.pipelines`: the diffusers pipeline of a run (task, scheduler, ControlNet, patch);
- :mod:`~sdkern.apps.generate.run`: :func:`generate` and the input images;
- :mod:`~sdkern.apps.generate.png`: PNG text chunks and the grid.
"""

from sdkern.apps.generate.options import (
    DEFAULT_STRENGTH,
    GenerateSettings,
    check_model_fit,
    check_options,
    check_preset_fit,
    check_strength,
    controlnet_presets,
)
from sdkern.apps.generate.pipelines import SCHEDULERS, load_controlnet, set_scheduler, task_pipeline
from sdkern.apps.generate.png import make_grid
from sdkern.apps.generate.run import generate, load_images

__all__ = [
    "DEFAULT_STRENGTH",
    "SCHEDULERS",
    "GenerateSettings",
    "check_model_fit",
    "check_options",
    "check_preset_fit",
    "check_strength",
    "controlnet_presets",
    "generate",
    "load_controlnet",
    "load_images",
    "make_grid",
    "set_scheduler",
    "task_pipeline",
]
