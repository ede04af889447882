"""The files of an optimised pipeline directory besides the models: ``model_index.json``, component configs,
tokenizers, scheduler and the optional components' entries (diffusers' ONNX pipeline layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdkern.apps.onnx.export import is_sdxl


def _config_dict(module: Any) -> dict[str, Any]:
    cfg = module.config
    return json.loads(cfg.to_json_string()) if hasattr(cfg, "to_json_string") else json.loads(json.dumps(dict(cfg)))


def write_sdxl_pipeline_files(pipe: Any, root: Path) -> None:
    """The files of an SDXL directory besides the models, in the layout of optimum's ONNX SDXL pipelines.

    ``model_index.json`` names the class ``OnnxStableDiffusionXLPipeline`` (which diffusers does not
    have: load with :class:`sdkern.onnx.OrtStableDiffusionPipeline`); each component folder holds its
    source module's full ``config.json`` (the ORT stand-ins of :mod:`sdkern.apps.onnx.diffusers_pipelines` mirror it).
    """
    import diffusers

    index = {
        "_class_name": _class_name(pipe, "OnnxStableDiffusionXL"),
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "text_encoder_2": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
        "tokenizer_2": ["transformers", type(pipe.tokenizer_2).__name__],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
        **optional_entries(pipe, root),
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_scheduler(pipe, root)
    pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    pipe.tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
    configs = {
        "text_encoder": _config_dict(pipe.text_encoder),
        "text_encoder_2": _config_dict(pipe.text_encoder_2),
        "unet": _config_dict(pipe.unet),
        "vae_decoder": _config_dict(pipe.vae),
        "vae_encoder": _config_dict(pipe.vae),
    }
    configs.update(optional_configs(pipe, root))
    for comp, cfg in configs.items():
        if (root / comp).is_dir():
            (root / comp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_scheduler(pipe: Any, root: Path) -> None:
    pipe.scheduler.save_pretrained(str(root / "scheduler"))
    # Keys the source scheduler took as class defaults are left out, as in the source: a scheduler
    # built from this config with another class (``sdkern generate --scheduler``) then takes that
    # class's defaults (e.g. timestep_spacing) exactly as on the torch path.
    defaults = set(pipe.scheduler.config.get("_use_default_values", []))
    if defaults:
        cfg_file = root / "scheduler" / "scheduler_config.json"
        cfg = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in defaults}
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_pipeline_files(pipe: Any, root: Path) -> None:
    import diffusers

    if is_sdxl(pipe):
        write_sdxl_pipeline_files(pipe, root)
        return

    index = {
        "_class_name": _class_name(pipe, "OnnxStableDiffusion"),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__] if pipe.tokenizer is not None else [None, None],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
        **optional_entries(pipe, root),
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_scheduler(pipe, root)
    if pipe.tokenizer is not None:
        pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    # Each component folder holds its source module's full config.json: diffusers' ONNX pipeline reads the
    # VAE's scaling factor and channels from vae_decoder/config.json, ``sdkern generate --onnx`` the U-Net's
    # native latent size, and the ORT stand-ins of :mod:`sdkern.apps.onnx.diffusers_pipelines` (CUDA EP, IO
    # binding) mirror all.
    configs = {"vae_decoder": pipe.vae, "vae_encoder": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for comp, module in configs.items():
        if module is not None and (root / comp).is_dir():
            (root / comp / "config.json").write_text(json.dumps(_config_dict(module), indent=2, sort_keys=True) + "\n")
    for comp, cfg in optional_configs(pipe, root).items():
        (root / comp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _class_name(pipe: Any, prefix: str) -> str:
    """``model_index.json``'s class: ``<prefix>[Inpaint|ControlNet]Pipeline`` after the U-Net and ControlNet.

    SD's txt2img and inpainting names are diffusers' ONNX pipelines; the others name no diffusers class
    (load every kind with :class:`sdkern.onnx.OrtStableDiffusionPipeline`).
    """
    if getattr(pipe, "controlnet", None) is not None:
        return f"{prefix}ControlNetPipeline"
    if pipe.unet.config.in_channels == 9:  # latents, mask, masked-image latents
        return f"{prefix}InpaintPipeline"
    return f"{prefix}Pipeline"


def optional_entries(pipe: Any, root: Path) -> dict[str, Any]:
    """``model_index.json`` entries of the exported optional components (and the safety checker's image
    processor, saved to ``root/feature_extractor``); ``[None, None]`` for a standard one not exported
    (``components=`` without it)."""
    entries: dict[str, Any] = {
        comp: [None, None]
        for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
        if not (root / comp).is_dir() and (comp != "text_encoder_2" or is_sdxl(pipe))
    }
    if (root / "controlnet").is_dir():
        entries["controlnet"] = ["diffusers", "OnnxRuntimeModel"]
    if (root / "safety_checker").is_dir():
        fe = pipe.feature_extractor
        if fe is None:
            raise ValueError("the safety checker needs the pipeline's feature_extractor (its image processor)")
        fe.save_pretrained(str(root / "feature_extractor"))
        entries["safety_checker"] = ["diffusers", "OnnxRuntimeModel"]
        entries["feature_extractor"] = ["transformers", type(fe).__name__]
        entries["requires_safety_checker"] = True
    return entries


def optional_configs(pipe: Any, root: Path) -> dict[str, dict[str, Any]]:
    """The source configs of the exported optional components, by component folder."""
    configs: dict[str, dict[str, Any]] = {}
    if (root / "controlnet").is_dir():
        configs["controlnet"] = _config_dict(pipe.controlnet)
    if (root / "safety_checker").is_dir():
        configs["safety_checker"] = pipe.safety_checker.config.to_dict()
    return configs
