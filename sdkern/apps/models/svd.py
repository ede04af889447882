"""Stable Video Diffusion presets (image-to-video): ``svd`` (full size) and ``tiny-svd`` (tests).

The values of ``svd`` are those of stabilityai/stable-video-diffusion-img2vid-xt (``unet/config.json``:
``UNetSpatioTemporalConditionModel``; ``vae/config.json``: ``AutoencoderKLTemporalDecoder``;
``image_encoder/config.json``: ``CLIPVisionModelWithProjection`` (OpenCLIP ViT-H/14 vision tower);
``scheduler/scheduler_config.json``: ``EulerDiscreteScheduler``, v-prediction, Karras sigmas;
``feature_extractor/preprocessor_config.json``: ``CLIPImageProcessor``). img2vid (14 frames) has the same
architecture with ``num_frames=14``. ``tiny-svd`` keeps every block type (cross-attention spatio-temporal
down/up blocks, plain ones, the spatio-temporal mid block, the temporal VAE decoder with its mid-block
attention) at small widths.
"""

from __future__ import annotations

from typing import Any

import torch

from sdkern.apps.models.preset import PresetConfig

_SVD_SCHED = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "interpolation_type": "linear",
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}

_CLIP_IMAGE_PROCESSOR = {  # OpenAI CLIP preprocessing at 224x224
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

SVD = PresetConfig(
    name="svd",
    kind="svd",
    unet={
        "sample_size": 96,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": [
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ],
        "up_block_types": [
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ],
        "block_out_channels": [320, 640, 1280, 1280],
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 768,
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "transformer_layers_per_block": 1,
        "num_attention_heads": [5, 10, 20, 20],
        "num_frames": 25,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 768,
        "scaling_factor": 0.18215,
        "force_upcast": True,
    },
    text_encoders=[],
    scheduler=_SVD_SCHED,
    default_size=1024,  # 1024x576 native (width x height)
    known_unet_params=1_524_623_082,
    notes="image-to-video; default size 1024x576, 25 frames",
    extra={
        "image_encoder": {  # OpenCLIP ViT-H/14 vision tower with projection
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 16,
            "num_hidden_layers": 32,
            "patch_size": 14,
            "image_size": 224,
            "projection_dim": 1024,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        "feature_extractor": _CLIP_IMAGE_PROCESSOR,
        "default_height": 576,
        "default_frames": 25,
    },
)

TINY_SVD = PresetConfig(
    name="tiny-svd",
    kind="svd",
    unet={
        "sample_size": 8,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        "block_out_channels": [32, 64],
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 24,  # 3 added time ids x addition_time_embed_dim
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "transformer_layers_per_block": 1,
        "num_attention_heads": [2, 4],  # head dim 16
        "num_frames": 4,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    },
    text_encoders=[],
    scheduler=_SVD_SCHED,
    default_size=32,
    notes="tiny SVD architecture for tests",
    extra={
        "image_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 32,
            "image_size": 224,  # the pipeline resizes the conditioning image to 224x224 itself
            "projection_dim": 32,  # = the U-Net's cross_attention_dim
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        "feature_extractor": _CLIP_IMAGE_PROCESSOR,
        "default_height": 32,
        "default_frames": 4,
    },
)

SVD_PRESETS: dict[str, PresetConfig] = {p.name: p for p in (SVD, TINY_SVD)}


def build_component(cfg: PresetConfig, component: str) -> Any:
    """Construct one model of an SVD preset in the current default device (no weights drawn).

    Parameters
    ----------
    cfg : PresetConfig
        An SVD preset (``kind == "svd"``).
    component : {"unet", "vae", "image_encoder"}
        ``UNetSpatioTemporalConditionModel``, ``AutoencoderKLTemporalDecoder`` or ``CLIPVisionModelWithProjection``.
    """
    if component == "unet":
        from diffusers import UNetSpatioTemporalConditionModel

        return UNetSpatioTemporalConditionModel(**cfg.unet)
    if component == "vae":
        from diffusers import AutoencoderKLTemporalDecoder

        return AutoencoderKLTemporalDecoder(**cfg.vae)
    if component == "image_encoder":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        conf = CLIPVisionConfig(**cfg.extra["image_encoder"])
        conf._attn_implementation = "sdpa"
        return CLIPVisionModelWithProjection(conf)
    raise ValueError(f"component of an SVD preset must be 'unet', 'vae' or 'image_encoder', got {component!r}")


def build_pipeline(cfg: PresetConfig, models: list[torch.nn.Module], scheduler: Any) -> Any:
    """Assemble a ``StableVideoDiffusionPipeline`` from initialised ``[unet, vae, image_encoder]``."""
    from diffusers import StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    unet, vae, image_encoder = models
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(**cfg.extra["feature_extractor"]),
    )
