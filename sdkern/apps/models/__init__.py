"""Offline model presets: real Stable Diffusion architectures with deterministic random weights.

>>> pipe = sdkern.apps.models.build("sd15", dtype=torch.float16, device="cuda", seed=0)  # doctest: +SKIP

No network access is needed: configs are data in :mod:`sdkern.apps.models.configs`, weights are drawn from a
seeded generator and the CLIP tokenizer is generated into a cache directory.
"""

from __future__ import annotations

from sdkern.apps.models.build import (
    build,
    build_component,
    count_parameters,
    load,
    make_feature_extractor,
    make_tokenizer,
    preset_names,
)
from sdkern.apps.models.configs import PRESETS, PresetConfig

__all__ = [
    "PRESETS",
    "PresetConfig",
    "build",
    "build_component",
    "count_parameters",
    "load",
    "make_feature_extractor",
    "make_tokenizer",
    "preset_names",
]
