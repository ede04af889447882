"""Export a Stable Diffusion pipeline's components to ONNX (TorchScript exporter, ``dynamo=False``:
the graphs ONNX Runtime's SD optimiser fuses best; see DESIGN.md "ONNX facts").

Components, their inputs/outputs and dynamic axes match diffusers' ``OnnxStableDiffusionPipeline``:

==============  ==========================================  ===============  =====================
component       inputs                                       outputs          dynamic axes
==============  ==========================================  ===============  =====================
text_encoder    input_ids int32 (B, 77)                      last_hidden_state, pooler_output   B
unet            sample (B,C,h,w), timestep (1,) or (B,),     out_sample       B, h, w
                encoder_hidden_states (B,77,D)
vae_decoder     latent_sample (B,4,h,w)                      sample           B, h, w
vae_encoder     sample (B,3,H,W)                             latent_sample,   B, H, W
                                                             latent_parameters
==============  ==========================================  ===============  =====================

The U-Net's ``C`` is its ``in_channels``: 4, or 9 for inpainting U-Nets (latents, mask, masked-image latents).
``vae_encoder``'s ``latent_sample`` is drawn in the graph (diffusers' ONNX img2img pipeline reads it);
``latent_parameters`` (B, 2C, h, w) are the mean and log-variance of the latent distribution, from
which the stand-in VAE (:class:`sdkern.apps.onnx.standins.OrtVae`) samples with the pipeline's torch generator,
as the torch path does (img2img, inpainting).

Components only some pipelines have (:func:`components_of`):

- ``controlnet`` (a pipeline with a ``controlnet``): inputs as the U-Net's plus ``controlnet_cond``
  (B, 3, H, W) and ``conditioning_scale`` (1,) float; outputs ``down_block_additional_residual_{i}``
  and ``mid_block_additional_residual`` (dynamic axes ``height/<f>``, ``f`` the residual's downsampling;
  SDXL: ``text_embeds`` and ``time_ids`` after ``conditioning_scale``). The U-Net of such a pipeline
  takes those residuals as extra inputs of the same names (zeros: the plain U-Net;
  :class:`sdkern.onnx.OrtUNet` feeds them);
- ``safety_checker`` (``safety_checker=True``): diffusers' ``StableDiffusionSafetyChecker.forward_onnx``
  (as diffusers' ONNX conversion and Olive export it; the zeroing written as ``where``, see
  :class:`~sdkern.apps.onnx.export_modules.SafetyCheckerExport`): ``clip_input`` (B, 3, 224, 224) and ``images``
  (any layout, batch first) -> ``out_images`` (flagged images zeroed) and ``has_nsfw_concepts`` (B,) bool.

SDXL (a pipeline with ``text_encoder_2``; :data:`SDXL_COMPONENTS`, the component folders of Hugging Face
optimum's ONNX SDXL pipelines) changes three of them:

- ``text_encoder`` (CLIPTextModel) adds ``hidden_states.penultimate`` (B, 77, D1): the
  ``hidden_states[-2]`` that ``StableDiffusionXLPipeline.encode_prompt`` uses as the prompt embedding;
- ``text_encoder_2`` (CLIPTextModelWithProjection): ``input_ids`` -> ``text_embeds`` (B, P: the pooled
  embedding SDXL conditions on), ``last_hidden_state``, ``hidden_states.penultimate`` (B, 77, D2);
- ``unet`` takes the added conditioning of ``added_cond_kwargs`` as two more inputs, ``text_embeds``
  (B, P) and ``time_ids`` (B, 6), both float and batch-dynamic.

Only the penultimate hidden state is exported (not every layer's, as optimum does): SDXL's default, and
the ORT optimiser's fusions are not blocked by intermediate graph outputs; ``clip_skip`` is therefore
refused by the ONNX text encoders (:mod:`sdkern.apps.onnx.diffusers_pipelines`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sdkern.apps.onnx.export_modules import (
    ControlNetExport,
    SafetyCheckerExport,
    SdxlTextEncoderExport,
    TextEncoderExport,
    UNetExport,
    VaeDecoderExport,
    VaeEncoderExport,
)

logger = logging.getLogger("sdkern")


COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


OPSET = 17


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` has SDXL's components (a second text encoder)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def has_controlnet(pipe: Any) -> bool:
    """Whether ``pipe`` has one ControlNet (a ``MultiControlNetModel`` is refused: one clear error)."""
    cn = getattr(pipe, "controlnet", None)
    if cn is None:
        return False
    if not hasattr(cn, "controlnet_cond_embedding"):
        raise NotImplementedError(
            f"ONNX export of a {type(cn).__name__} is not supported: one ControlNetModel per pipeline only"
        )
    return True


def components_of(pipe: Any, safety_checker: bool = False) -> tuple[str, ...]:
    """The exported components of ``pipe``.

    Parameters
    ----------
    pipe : diffusers pipeline
    safety_checker : bool
        Also export ``pipe.safety_checker`` (a ValueError when the pipeline has none).

    Returns
    -------
    tuple of str
        :data:`SDXL_COMPONENTS` for SDXL, else :data:`COMPONENTS`; then ``controlnet`` when the pipeline
        has one and ``safety_checker`` when asked.
    """
    comps = SDXL_COMPONENTS if is_sdxl(pipe) else COMPONENTS
    if has_controlnet(pipe):
        comps = (*comps, "controlnet")
    if safety_checker:
        if getattr(pipe, "safety_checker", None) is None:
            raise ValueError("safety_checker=True: this pipeline has no safety checker to export")
        comps = (*comps, "safety_checker")
    return comps


def _check_unet(unet: Any) -> None:
    """One clear error for U-Net conditioning the export does not cover."""
    kind = getattr(unet.config, "addition_embed_type", None)
    unsupported = []
    if kind not in (None, "text_time"):
        unsupported.append(f"addition_embed_type={kind!r}")
    for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
        if getattr(unet.config, key, None) is not None:
            unsupported.append(f"{key}={getattr(unet.config, key)!r}")
    if unsupported:
        raise NotImplementedError(
            f"ONNX export of this U-Net is not supported ({', '.join(unsupported)}); supported: SD 1.x/2.x "
            "U-Nets and SDXL's text_time added conditioning"
        )


def _added_cond_args(model: Any, batch: int, dev: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Example ``text_embeds`` (B, P) and ``time_ids`` (B, 6) of SDXL's text_time conditioning."""
    n_time = 6  # original size, crop top-left, target size (StableDiffusionXLPipeline._get_add_time_ids)
    pooled = model.config.projection_class_embeddings_input_dim - n_time * model.config.addition_time_embed_dim
    return (
        torch.randn(batch, pooled, device=dev, dtype=dtype),
        torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, device=dev, dtype=dtype),
    )


@torch.no_grad()
def _residual_shapes(wrapper: torch.nn.Module, unet: Any, args: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    """Shapes of the residuals a ControlNet adds to ``unet``: one per down-block output (``conv_in``, each
    resnet / downsampler), then the mid block's; found by running ``wrapper(*args)`` once with hooks."""
    shapes: list[tuple[int, ...]] = []
    mid: list[tuple[int, ...]] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(tuple(t.shape) for t in o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(tuple(o.shape))))
    try:
        wrapper(*args)
    finally:
        for h in hooks:
            h.remove()
    return [*shapes, *mid]


def _denoiser_spec(pipe: Any, name: str, batch: int, latent: int, seq: int) -> dict[str, Any]:
    """The U-Net (with ControlNet residual inputs when the pipeline has a ControlNet) or the ControlNet."""
    unet = pipe.unet
    model = pipe.controlnet if name == "controlnet" else unet
    dev, dtype = model.device, model.dtype
    _check_unet(model)
    sdxl = model.config.addition_embed_type == "text_time"
    c = unet.config.in_channels if name == "unet" else model.config.in_channels
    args: tuple[torch.Tensor, ...] = (
        torch.randn(batch, c, latent, latent, device=dev, dtype=dtype),
        torch.tensor([999.0], device=dev, dtype=torch.float32),
        torch.randn(batch, seq, model.config.cross_attention_dim, device=dev, dtype=dtype),
    )
    inputs = ["sample", "timestep", "encoder_hidden_states"]
    axes: dict[str, dict[int, str]] = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "steps"},
        "encoder_hidden_states": {0: "batch"},
    }
    added = _added_cond_args(model, batch, dev, dtype) if sdxl else ()
    if sdxl:
        inputs += ["text_embeds", "time_ids"]
        axes.update(text_embeds={0: "batch"}, time_ids={0: "batch"})
    shapes = _residual_shapes(UNetExport(unet, sdxl), unet, (*args, *added)) if has_controlnet(pipe) else []
    names = [f"down_block_additional_residual_{i}" for i in range(len(shapes) - 1)]
    names += ["mid_block_additional_residual"] if shapes else []
    res_axes = {}
    for n, shape in zip(names, shapes, strict=True):
        f = latent // shape[-1]  # downsampling factor of this residual: equal factors, equal dynamic sizes
        res_axes[n] = {0: "batch", 2: f"height/{f}", 3: f"width/{f}"}
    if name == "unet":
        residuals = tuple(torch.randn(s, device=dev, dtype=dtype) for s in shapes)
        return dict(
            module=UNetExport(unet, sdxl, n_residuals=len(shapes)),
            args=(*args, *added, *residuals),
            inputs=inputs + names,
            outputs=["out_sample"],
            axes={**axes, **res_axes, "out_sample": {0: "batch", 2: "height", 3: "width"}},
        )
    factor = 2 ** (len(model.config.conditioning_embedding_out_channels) - 1)
    cond_channels = model.config.conditioning_channels
    return dict(
        module=ControlNetExport(model, sdxl),
        args=(
            *args,
            torch.rand(batch, cond_channels, latent * factor, latent * factor, device=dev, dtype=dtype),
            torch.tensor([0.75], device=dev, dtype=dtype),
            *added,
        ),
        inputs=[*inputs[:3], "controlnet_cond", "conditioning_scale", *inputs[3:]],
        outputs=names,
        axes={**axes, "controlnet_cond": {0: "batch", 2: "H", 3: "W"}, **res_axes},
    )


def _spec(pipe: Any, name: str, batch: int = 2, latent: int = 8) -> dict[str, Any]:
    """Wrapper module, example inputs, names and dynamic axes for one component."""
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    dev = unet.device
    seq = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77) or 77
    if name in ("text_encoder", "text_encoder_2") and is_sdxl(pipe):
        enc = pipe.text_encoder if name == "text_encoder" else pipe.text_encoder_2
        tok = getattr(pipe, "tokenizer" if name == "text_encoder" else "tokenizer_2", None)
        seq = getattr(tok, "model_max_length", 77) or 77
        first = "pooler_output" if name == "text_encoder" else "text_embeds"
        outputs = [first, "last_hidden_state", "hidden_states.penultimate"]
        return dict(
            module=SdxlTextEncoderExport(enc),
            args=(torch.zeros(batch, seq, dtype=torch.int32, device=enc.device),),
            inputs=["input_ids"],
            outputs=outputs,
            axes={"input_ids": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        )
    if name == "text_encoder":
        ids = torch.zeros(batch, seq, dtype=torch.int32, device=dev)
        return dict(
            module=TextEncoderExport(te),
            args=(ids,),
            inputs=["input_ids"],
            outputs=["last_hidden_state", "pooler_output"],
            axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
        )
    if name in ("unet", "controlnet"):
        return _denoiser_spec(pipe, name, batch, latent, seq)
    if name == "vae_decoder":
        c = vae.config.latent_channels
        return dict(
            module=VaeDecoderExport(vae),
            args=(torch.randn(1, c, latent, latent, device=dev, dtype=vae.dtype),),
            inputs=["latent_sample"],
            outputs=["sample"],
            axes={"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "H", 3: "W"}},
        )
    if name == "vae_encoder":
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        lat_axes = {0: "batch", 2: "height", 3: "width"}
        return dict(
            module=VaeEncoderExport(vae),
            args=(torch.randn(1, vae.config.in_channels, latent * scale, latent * scale, device=dev, dtype=vae.dtype),),
            inputs=["sample"],
            outputs=["latent_sample", "latent_parameters"],
            axes={"sample": {0: "batch", 2: "H", 3: "W"}, "latent_sample": lat_axes, "latent_parameters": lat_axes},
        )
    if name == "safety_checker":
        checker = pipe.safety_checker
        size = int(checker.config.vision_config.image_size)
        return dict(
            module=SafetyCheckerExport(checker),
            args=(
                torch.randn(batch, 3, size, size, device=checker.device, dtype=checker.dtype),
                torch.rand(batch, latent * 8, latent * 8, 3, device=checker.device, dtype=checker.dtype),
            ),
            inputs=["clip_input", "images"],
            outputs=["out_images", "has_nsfw_concepts"],
            axes={
                "clip_input": {0: "batch", 1: "channels", 2: "height", 3: "width"},
                "images": {0: "batch", 1: "height", 2: "width", 3: "channels"},
                "out_images": {0: "batch", 1: "height", 2: "width", 3: "channels"},
                "has_nsfw_concepts": {0: "batch"},
            },
        )
    raise ValueError(f"unknown component {name!r}; expected one of {components_of(pipe)}")


@torch.no_grad()
def export_component(pipe: Any, name: str, path: str | Path, opset: int = OPSET) -> Path:
    """Export one component to ``path`` (external data next to it when over 2 GB) and check it.

    Returns
    -------
    Path of the written model.
    """
    import onnx

    spec = _spec(pipe, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = spec["module"].eval()
    torch.onnx.export(
        module,
        spec["args"],
        str(path),
        input_names=spec["inputs"],
        output_names=spec["outputs"],
        dynamic_axes=spec["axes"],
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    onnx.checker.check_model(str(path))  # path form: works past 2 GB with external data
    logger.info("sdkern onnx: exported %s -> %s", name, path)
    return path


def example_inputs(pipe: Any, name: str, batch: int = 2, latent: int = 8) -> dict[str, Any]:
    """Numpy feeds for a component (used by tests and the optimiser's parity checks)."""
    spec = _spec(pipe, name, batch=batch, latent=latent)
    return {n: a.detach().cpu().numpy() for n, a in zip(spec["inputs"], spec["args"], strict=True)}
