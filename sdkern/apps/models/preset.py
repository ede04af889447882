"""The record a preset is (:class:`PresetConfig`) and the safety checker config it defaults to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PresetConfig:
    """Everything needed to build one preset.

    Attributes
    ----------
    name : str
        Preset name.
    kind : str
        ``"sd"`` (Stable Diffusion 1.x/2.x architecture) or ``"sdxl"`` (StableDiffusionXLPipeline).
    unet, vae : dict
        Keyword arguments of ``UNet2DConditionModel`` / ``AutoencoderKL``.
    text_encoders : list of dict
        ``CLIPTextConfig`` keyword arguments, one per text encoder; key ``"with_projection"`` selects
        ``CLIPTextModelWithProjection``.
    scheduler : dict
        Scheduler class name (``"_class_name"``) and its config.
    default_size : int
        Native image side in pixels.
    known_unet_params : int, optional
        Parameter count of the published U-Net (checked by the tests on the meta device).
    pipeline : str
        ``"txt2img"`` (StableDiffusionPipeline / StableDiffusionXLPipeline), ``"inpaint"``
        (StableDiffusionInpaintPipeline; the U-Net takes 9 channels: latents, mask, masked-image latents) or
        ``"controlnet"`` (StableDiffusionControlNetPipeline with the ControlNetModel of ``controlnet``).
    controlnet : dict, optional
        Keyword arguments of ``ControlNetModel`` (``pipeline="controlnet"`` only).
    safety_checker : dict
        The safety checker's ``CLIPConfig`` (``text_config``, ``vision_config``, ``projection_dim``) and the feature
        extractor's image side (``"image_size"``); built only when asked for (``build(..., safety_checker=True)``).
    """

    name: str
    kind: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]
    scheduler: dict[str, Any]
    default_size: int
    known_unet_params: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    pipeline: str = "txt2img"
    controlnet: dict[str, Any] | None = None
    safety_checker: dict[str, Any] = field(default_factory=lambda: dict(SAFETY_CHECKER))


# CompVis/stable-diffusion-safety-checker (the SD 1.x ``safety_checker`` component): StableDiffusionSafetyChecker
# uses only the vision tower (CLIP ViT-L/14 at 224 px) and its 768-d projection; the text config is kept for CLIPConfig.
SAFETY_CHECKER: dict[str, Any] = {
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "image_size": 224,
        "hidden_act": "quick_gelu",
    },
    "projection_dim": 768,
    "image_size": 224,  # the CLIPImageProcessor's resize / center-crop side
}
