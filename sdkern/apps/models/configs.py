"""Architecture configs of the offline presets, written as data.

The values are those of the published model repositories (``unet/config.json``, ``vae/config.json``,
``text_encoder/config.json``, ``scheduler/scheduler_config.json``) of Stable Diffusion 1.5
(runwayml/stable-diffusion-v1-5), 2.1 (stabilityai/stable-diffusion-2-1, 768-v) and SDXL base 1.0
(stabilityai/stable-diffusion-xl-base-1.0), SD 1.5 inpainting (runwayml/stable-diffusion-inpainting: the SD 1.5
U-Net with 9 input channels), the SD 1.5 ControlNets (lllyasviel/sd-controlnet-*, lllyasviel/control_v11p_sd15_*:
the U-Net's down and mid blocks plus the conditioning embedding and zero convolutions) and the SD 1.x safety checker
(CompVis/stable-diffusion-safety-checker: a CLIP ViT-L/14 vision tower with projection and concept embeddings).
Only architecture-defining keys are kept; everything else takes the diffusers/transformers default.
The ``tiny*`` presets keep every block type of SD 1.x (cross-attention down/up blocks, plain down/up blocks, the
cross-attention mid block) at small widths, for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdkern.apps.models.preset import SAFETY_CHECKER, PresetConfig
from sdkern.apps.models.svd import SVD_PRESETS

__all__ = ["PRESETS", "SAFETY_CHECKER", "SAFETY_CHECKER_TINY", "PresetConfig"]


# The same structure at test size: 2 layers, width 32, 8-pixel patches of a 32-pixel crop (16 patches).
SAFETY_CHECKER_TINY: dict[str, Any] = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "patch_size": 8,
        "image_size": 32,
        "hidden_act": "quick_gelu",
    },
    "projection_dim": 32,
    "image_size": 32,
}


_SD_SCHED = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


_VAE_SD = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


_CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD 1.x, SDXL text_encoder)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}


SD15 = PresetConfig(
    name="sd15",
    kind="sd",
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,  # diffusers' legacy name: 8 heads (head dims 40/80/160)
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    vae=dict(_VAE_SD),
    text_encoders=[dict(_CLIP_L)],
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHED, "skip_prk_steps": True},
    default_size=512,
    known_unet_params=859_520_964,
)


SD21 = PresetConfig(
    name="sd21",
    kind="sd",
    unet={  # the SD 1.5 U-Net with OpenCLIP-H context, head dim 64, linear projections
        **SD15.unet,
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],  # head dim 64 everywhere
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    vae={**_VAE_SD, "sample_size": 768},
    text_encoders=[
        {  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24 layers kept)
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
            "layer_norm_eps": 1e-5,
        }
    ],
    scheduler={"_class_name": "DDIMScheduler", **_SD_SCHED, "prediction_type": "v_prediction"},
    default_size=768,
    known_unet_params=865_910_724,
)


SDXL = PresetConfig(
    name="sdxl",
    kind="sdxl",
    unet={
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    vae={**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoders=[
        dict(_CLIP_L),
        {  # OpenCLIP ViT-bigG/14 text tower with projection
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 1280,
            "layer_norm_eps": 1e-5,
            "with_projection": True,
        },
    ],
    scheduler={
        "_class_name": "EulerDiscreteScheduler",
        **_SD_SCHED,
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
    },
    default_size=1024,
    known_unet_params=2_567_463_684,
)


TINY = PresetConfig(
    name="tiny",
    kind="sd",
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,  # 2 heads: head dims 16 and 32
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    vae={
        **_VAE_SD,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    text_encoders=[
        {
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
            "layer_norm_eps": 1e-5,
        }
    ],
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHED, "skip_prk_steps": True},
    default_size=32,
    safety_checker=dict(SAFETY_CHECKER_TINY),
)


def _controlnet_of(unet: dict[str, Any], embedding_channels: list[int]) -> dict[str, Any]:
    """ControlNetModel arguments matching a U-Net config (its down blocks, mid block and conditioning)."""
    keep = (
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "downsample_padding",
        "mid_block_scale_factor",
        "act_fn",
        "norm_num_groups",
        "norm_eps",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "upcast_attention",
        "flip_sin_to_cos",
        "freq_shift",
    )
    cfg = {k: unet[k] for k in keep if k in unet}
    cfg["conditioning_embedding_out_channels"] = list(embedding_channels)
    cfg["conditioning_channels"] = 3
    cfg["controlnet_conditioning_channel_order"] = "rgb"
    return cfg


SD15_INPAINT = PresetConfig(
    name="sd15-inpaint",
    kind="sd",
    unet={**SD15.unet, "in_channels": 9},  # 4 latent + 1 mask + 4 masked-image latent channels
    vae=dict(_VAE_SD),
    text_encoders=[dict(_CLIP_L)],
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHED, "skip_prk_steps": True},
    default_size=512,
    known_unet_params=859_535_364,
    pipeline="inpaint",
)


SD15_CONTROLNET = PresetConfig(
    name="sd15-controlnet",
    kind="sd",
    unet=dict(SD15.unet),
    vae=dict(_VAE_SD),
    text_encoders=[dict(_CLIP_L)],
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHED, "skip_prk_steps": True},
    default_size=512,
    known_unet_params=859_520_964,
    pipeline="controlnet",
    # Three stride-2 convolutions: the 512-px control image meets the 64-px latent.
    controlnet=_controlnet_of(SD15.unet, [16, 32, 96, 256]),
)


TINY_INPAINT = dataclasses.replace(TINY, name="tiny-inpaint", unet={**TINY.unet, "in_channels": 9}, pipeline="inpaint")


TINY_CONTROLNET = dataclasses.replace(
    TINY,
    name="tiny-controlnet",
    pipeline="controlnet",
    # The tiny VAE downsamples by 2 (two blocks): one stride-2 convolution in the conditioning embedding.
    controlnet=_controlnet_of(TINY.unet, [8, 16]),
)


PRESETS: dict[str, PresetConfig] = {
    p.name: p for p in (SD15, SD21, SDXL, TINY, SD15_INPAINT, SD15_CONTROLNET, TINY_INPAINT, TINY_CONTROLNET)
}
# Stable Video Diffusion presets (svd, tiny-svd) are written in their own module.
PRESETS.update(SVD_PRESETS)
