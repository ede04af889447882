"""Fixtures of the patch tests."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def fp32_noise(monkeypatch):
    """Draw every random tensor of diffusers (initial latents, VAE posterior samples, scheduler noise) in float32 and
    cast it: ``randn_tensor(dtype=float64)`` draws other numbers than in float32, so without this the float64 oracle
    would denoise different noise and the criterion would compare unrelated images."""
    import sys

    from diffusers.utils import torch_utils

    original = torch_utils.randn_tensor
    for cls in (  # import the (lazily loaded) modules that draw noise before patching their randn_tensor
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionXLPipeline",
        "StableVideoDiffusionPipeline",
        "LCMScheduler",
        "EulerAncestralDiscreteScheduler",
        "AutoencoderKL",
    ):
        getattr(diffusers, cls)

    def randn_fp32(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        out = original(shape, generator=generator, device=device, dtype=torch.float32, layout=layout, **kw)
        return out.to(dtype) if dtype is not None else out

    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is original:
            monkeypatch.setattr(mod, "randn_tensor", randn_fp32)
