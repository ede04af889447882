"""Build offline presets (random weights) or load real weights with ``from_pretrained``."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from sdkern.apps.models.configs import PRESETS, PresetConfig
from sdkern.apps.models.tokenizer import _EOS, make_tokenizer

logger = logging.getLogger("sdkern")


def preset_names() -> list[str]:
    """Names accepted by :func:`build`."""
    return list(PRESETS)


@torch.no_grad()
def _init_weights(module: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype) -> None:
    """Materialise a meta-device module on ``device`` and fill it deterministically.

    Weights with a fan-in get U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear/Conv default scale), biases
    U(-1/sqrt(fan_in of their module), ...) (0.1 bound when the module has no matrix), norm scales U(0.9, 1.1),
    embeddings N(0, 0.02²). Values come from one CPU generator in parameter order, so they do not depend on
    the device or dtype.
    All values of one tensor come from a single RNG call (no per-element Python work).
    """
    for t in [*module.parameters(), *module.buffers()]:  # still on meta: free (and no diffusers .to() warning)
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    module.to_empty(device=device)
    gen = torch.Generator("cpu").manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for mod in module.modules():
        params = list(mod.named_parameters(recurse=False))
        if not params:
            continue
        is_norm = isinstance(mod, norm_types)
        is_embedding = isinstance(mod, torch.nn.Embedding)
        weight = getattr(mod, "weight", None)
        fan_in = weight[0].numel() if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None
        for p_name, p in params:
            # Fill in place when the parameter is a CPU fp32 tensor (one pass), else through a host fp32 tensor.
            direct = p.device.type == "cpu" and p.dtype == torch.float32
            host = p if direct else torch.empty(p.shape, dtype=torch.float32)
            if is_embedding:
                host.normal_(0.0, 0.02, generator=gen)
            elif is_norm and p_name == "weight":
                host.uniform_(0.9, 1.1, generator=gen)
            else:
                if p.dim() >= 2:
                    bound = 1.0 / math.sqrt(p[0].numel())
                else:
                    bound = 0.1 if fan_in is None else 1.0 / math.sqrt(fan_in)
                host.uniform_(-bound, bound, generator=gen)
            if not direct:
                p.copy_(host)
    # Buffers (e.g. CLIP position_ids) are not saved state we draw; recompute those that exist.
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        elif buf.is_floating_point():
            buf.zero_()


def build_component(preset: str | PresetConfig, component: str, index: int = 0, device: str = "meta") -> Any:
    """Construct one model of a preset without initialising it (``device="meta"`` by default).

    Parameters
    ----------
    preset : str or PresetConfig
        Preset name or config.
    component : {"unet", "vae", "text_encoder", "controlnet", "safety_checker"}
        Which model. ``"controlnet"`` needs a preset with a ControlNet (``pipeline="controlnet"``);
        ``"safety_checker"`` is diffusers' ``StableDiffusionSafetyChecker`` of the preset's
        ``safety_checker`` config (the feature extractor that goes with it: :func:`make_feature_extractor`).
    index : int
        Text encoder index (0, or 1 for SDXL's second encoder).
    device : str
        Device the parameters are created on; ``"meta"`` allocates nothing.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device(device):
        if cfg.kind == "svd":  # UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder, image encoder
            from sdkern.apps.models import svd

            return svd.build_component(cfg, component)
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**cfg.unet)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**cfg.vae)
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            kw = dict(cfg.text_encoders[index])
            with_proj = kw.pop("with_projection", False)
            tok = make_tokenizer()
            conf = CLIPTextConfig(
                **kw,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            conf._attn_implementation = "sdpa"
            return (CLIPTextModelWithProjection if with_proj else CLIPTextModel)(conf)
        if component == "controlnet":
            if cfg.controlnet is None:
                raise ValueError(f"preset {cfg.name!r} has no ControlNet (presets with one: {_with_controlnet()})")
            from diffusers import ControlNetModel

            return ControlNetModel(**cfg.controlnet)
        if component == "safety_checker":
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPConfig

            sc = {k: v for k, v in cfg.safety_checker.items() if k != "image_size"}
            conf = CLIPConfig(**sc)
            conf.vision_config._attn_implementation = "sdpa"
            return StableDiffusionSafetyChecker(conf)
    raise ValueError(
        f"component must be 'unet', 'vae', 'text_encoder', 'controlnet' or 'safety_checker', got {component!r}"
    )


def _with_controlnet() -> str:
    return ", ".join(n for n, p in PRESETS.items() if p.controlnet is not None)


def make_feature_extractor(preset: str | PresetConfig) -> Any:
    """The safety checker's image processor: CLIP's resize, center crop and normalisation at the preset's side.

    Parameters
    ----------
    preset : str or PresetConfig
        Preset name or config (``safety_checker["image_size"]``: 224 for full-size presets, 32 for ``tiny*``).

    Returns
    -------
    transformers.CLIPImageProcessor
        (``CLIPImageProcessorPil`` where transformers has it, which needs no torchvision.)
    """
    import transformers

    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    side = int(cfg.safety_checker["image_size"])
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True,
        size={"shortest_edge": side},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )


@torch.no_grad()
def _finish_safety_checker(checker: torch.nn.Module) -> None:
    """Thresholds as diffusers initialises them (ones): random-weight cosine similarities stay below 1, so random
    images are not flagged unless a caller lowers ``concept_embeds_weights`` / ``special_care_embeds_weights``."""
    checker.concept_embeds_weights.fill_(1.0)
    checker.special_care_embeds_weights.fill_(1.0)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters())


def _make_scheduler(cfg: PresetConfig) -> Any:
    import diffusers

    sched = dict(cfg.scheduler)
    cls = getattr(diffusers, sched.pop("_class_name"))
    return cls.from_config(sched)  # from_config ignores keys a scheduler does not take


def build(
    preset: str | PresetConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    safety_checker: bool = False,
) -> Any:
    """Build a diffusers pipeline of a preset with deterministic random weights, offline.

    Parameters
    ----------
    preset : str
        One of ``preset_names()``: sd15, sd21, sdxl, tiny, sd15-inpaint, sd15-controlnet, tiny-inpaint,
        tiny-controlnet, svd, tiny-svd.
        Architecture. ``sdxl`` gives a ``StableDiffusionXLPipeline``, ``*-inpaint`` a
        ``StableDiffusionInpaintPipeline`` (9-channel U-Net), ``*-controlnet`` a ``StableDiffusionControlNetPipeline``
        (with a random-weight ``ControlNetModel``), ``svd``/``tiny-svd`` a ``StableVideoDiffusionPipeline``
        (image-to-video), the others a ``StableDiffusionPipeline``. A :class:`PresetConfig` builds that
        architecture (e.g. a reduced-size variant made with ``dataclasses.replace``).
    dtype : torch.dtype
        Parameter dtype (the SDXL VAE keeps diffusers' ``force_upcast`` behaviour).
    device : str or torch.device
        Where the weights are created.
    seed : int
        Weight seed: the same seed gives bit-identical weights on every device.
    safety_checker : bool
        Add a random-weight ``StableDiffusionSafetyChecker`` and its ``CLIPImageProcessor`` feature extractor (SD
        kinds only; the other components' weights do not depend on this flag). Its thresholds are diffusers'
        initial ones (1.0), so random images are not flagged unless a caller lowers them.

    Returns
    -------
    diffusers.DiffusionPipeline
        Pipeline (without safety checker or feature extractor unless asked for), progress bar disabled.
    """
    if isinstance(preset, PresetConfig):
        cfg, preset = preset, preset.name
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    else:
        cfg = PRESETS[preset]
    if safety_checker and cfg.kind != "sd":
        raise ValueError(f"preset {preset!r}: a safety checker is part of SD 1.x/2.x pipelines only")
    device = torch.device(device)
    unet = build_component(cfg, "unet")
    vae = build_component(cfg, "vae")
    encoders = [build_component(cfg, "text_encoder", i) for i in range(len(cfg.text_encoders))]
    if cfg.kind == "svd":
        encoders = [build_component(cfg, "image_encoder")]
    # Distinct, fixed sub-seeds per component so that components do not share random streams.
    for k, m in enumerate([unet, vae, *encoders]):
        _init_weights(m, seed * 1000 + k, device, dtype)
        m.eval()
    controlnet = None
    if cfg.controlnet is not None:
        controlnet = build_component(cfg, "controlnet")
        _init_weights(controlnet, seed * 1000 + 100, device, dtype)
        controlnet.eval()
    checker, extractor = None, None
    if safety_checker:
        checker = build_component(cfg, "safety_checker")
        _init_weights(checker, seed * 1000 + 200, device, dtype)
        _finish_safety_checker(checker)
        checker.eval()
        extractor = make_feature_extractor(cfg)
    scheduler = _make_scheduler(cfg)
    if cfg.kind == "svd":
        from sdkern.apps.models import svd

        pipe = svd.build_pipeline(cfg, [unet, vae, *encoders], scheduler)
    elif cfg.kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=make_tokenizer(),
            tokenizer_2=make_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    else:
        import diffusers

        common: dict[str, Any] = {
            "vae": vae,
            "text_encoder": encoders[0],
            "tokenizer": make_tokenizer(pad_token="!" if preset == "sd21" else _EOS),
            "unet": unet,
            "scheduler": scheduler,
            "safety_checker": checker,
            "feature_extractor": extractor,
            "requires_safety_checker": checker is not None,
        }
        if cfg.pipeline == "inpaint":
            pipe = diffusers.StableDiffusionInpaintPipeline(**common)
        elif cfg.pipeline == "controlnet":
            pipe = diffusers.StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
        else:
            pipe = diffusers.StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    logger.info(
        "sdkern.models: built preset %s (%s, %s, seed %d%s)",
        preset,
        dtype,
        device,
        seed,
        ", safety checker" if checker is not None else "",
    )
    return pipe


def load(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load real weights with diffusers' ``DiffusionPipeline.from_pretrained`` (local path or hub id).

    Parameters
    ----------
    model : str
        A local directory, or a hub id present in the local cache (or downloadable when online).
    """
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if Path(model).is_dir() or os.environ.get("HF_HUB_OFFLINE"):
        kwargs["local_files_only"] = True
    try:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None, **kwargs)
        except TypeError:
            pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        from sdkern.apps.models.configs import PRESETS

        raise ValueError(
            f"cannot load model {model!r}: not a local diffusers directory and not available from the hub "
            f"cache ({type(e).__name__}). Offline presets: {', '.join(PRESETS)} (use --preset)."
        ) from e
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
