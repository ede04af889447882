"""What one ``sdkern generate`` run is asked for (:class:`GenerateSettings`) and the checks that options fit each
other and the model, run before any model is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


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
        """``"inpaint"`` (with a mask), ``"img2img"`` (an init image) or ``"txt2img"``; with a control image
        ``"controlnet"`` (txt2img), ``"controlnet-img2img"`` or ``"controlnet-inpaint"``."""
        task = "inpaint" if self.mask else "img2img" if self.init_image else "txt2img"
        if self.control_image:
            return "controlnet" if task == "txt2img" else f"controlnet-{task}"
        return task


#: diffusers' default strengths: img2img 0.8, inpainting 1.0 (the masked area starts from pure noise), with or
#: without a ControlNet
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "controlnet-img2img": 0.8, "controlnet-inpaint": 1.0}


def check_strength(strength: float) -> float:
    """``strength`` if it is in (0, 1], else ValueError."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    return strength


def controlnet_presets() -> list[str]:
    """Presets with a ControlNet (what ``--controlnet`` accepts besides a directory)."""
    from sdkern.apps.models.configs import PRESETS

    return [n for n, p in PRESETS.items() if getattr(p, "controlnet", None) is not None]


def check_options(s: GenerateSettings) -> None:
    """Raise ValueError for options of ``s`` that do not go together, whatever the model."""
    if s.mask and not s.init_image:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if s.strength is not None and not s.init_image:
        raise ValueError("--strength applies with --init-image (img2img or inpainting) only")
    if s.controlnet and not s.control_image:
        raise ValueError("--controlnet needs --control-image")
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
        check_controlnet_fits(PRESETS[s.controlnet].controlnet or {}, cfg.unet, s.controlnet)


def check_controlnet_fits(controlnet: Any, unet: Any, name: str | None) -> None:
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
    inpaint, control = kind.endswith("inpaint"), kind.startswith("controlnet")
    if inpaint and in_channels != 9:
        raise ValueError(
            f"--mask needs an inpainting model (a U-Net with 9 input channels; this one has {in_channels}): "
            "e.g. --preset tiny-inpaint or sd15-inpaint"
        )
    if not inpaint and in_channels == 9:
        raise ValueError("this is an inpainting model (a U-Net with 9 input channels): give --init-image and --mask")
    if control and not has_controlnet:
        raise ValueError("--control-image needs a ControlNet: --controlnet DIR_OR_PRESET or a *-controlnet preset")
    if not control and has_controlnet:
        raise ValueError("this model has a ControlNet (--controlnet or a *-controlnet preset): give --control-image")
    if s.safety_checker and sdxl:
        raise ValueError("--safety-checker: diffusers' SDXL pipelines have no safety checker")
