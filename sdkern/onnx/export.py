"""Export a Stable Diffusion pipeline's components to ONNX (TorchScript exporter, ``dynamo=False``:
the graphs ONNX Runtime's SD optimiser fuses best; see DESIGN.md "ONNX facts").

Components, their inputs/outputs and dynamic axes match diffusers' ``OnnxStableDiffusionPipeline``:

==============  ==========================================  ===============  =====================
component       inputs                                       outputs          dynamic axes
==============  ==========================================  ===============  =====================
text_encoder    input_ids int32 (B, 77)                      last_hidden_state, pooler_output   B
unet            sample (B,4,h,w), timestep (1,) or (B,),     out_sample       B, h, w
                encoder_hidden_states (B,77,D)
vae_decoder     latent_sample (B,4,h,w)                      sample           B, h, w
vae_encoder     sample (B,3,H,W)                             latent_sample    B, H, W
==============  ==========================================  ===============  =====================

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
refused by the ONNX text encoders (:mod:`sdkern.onnx.sdxl`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sdkern")

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
OPSET = 17


class _TextEncoder(torch.nn.Module):
    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _SdxlTextEncoder(torch.nn.Module):
    """SDXL's text encoder: first output (pooled / projected), last and penultimate hidden states."""

    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long(), output_hidden_states=True, return_dict=True)
        first = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return first, out.last_hidden_state, out.hidden_states[-2]


class _SdxlUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` has SDXL's components (a second text encoder)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def components_of(pipe: Any) -> tuple[str, ...]:
    """The exported components of ``pipe``: :data:`SDXL_COMPONENTS` for SDXL, else :data:`COMPONENTS`."""
    return SDXL_COMPONENTS if is_sdxl(pipe) else COMPONENTS


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


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].sample()


def _spec(pipe: Any, name: str, batch: int = 2, latent: int = 8) -> dict[str, Any]:
    """Wrapper module, example inputs, names and dynamic axes for one component."""
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    dev = unet.device
    dtype = unet.dtype
    seq = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77) or 77
    if name in ("text_encoder", "text_encoder_2") and is_sdxl(pipe):
        enc = pipe.text_encoder if name == "text_encoder" else pipe.text_encoder_2
        tok = getattr(pipe, "tokenizer" if name == "text_encoder" else "tokenizer_2", None)
        seq = getattr(tok, "model_max_length", 77) or 77
        first = "pooler_output" if name == "text_encoder" else "text_embeds"
        outputs = [first, "last_hidden_state", "hidden_states.penultimate"]
        return dict(
            module=_SdxlTextEncoder(enc),
            args=(torch.zeros(batch, seq, dtype=torch.int32, device=enc.device),),
            inputs=["input_ids"],
            outputs=outputs,
            axes={"input_ids": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        )
    if name == "text_encoder":
        ids = torch.zeros(batch, seq, dtype=torch.int32, device=dev)
        return dict(
            module=_TextEncoder(te),
            args=(ids,),
            inputs=["input_ids"],
            outputs=["last_hidden_state", "pooler_output"],
            axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
        )
    if name == "unet":
        c = unet.config.in_channels
        d = unet.config.cross_attention_dim
        _check_unet(unet)
        if unet.config.addition_embed_type == "text_time":
            n_time = 6  # original size, crop top-left, target size (StableDiffusionXLPipeline._get_add_time_ids)
            pooled = unet.config.projection_class_embeddings_input_dim - n_time * unet.config.addition_time_embed_dim
            return dict(
                module=_SdxlUNet(unet),
                args=(
                    torch.randn(batch, c, latent, latent, device=dev, dtype=dtype),
                    torch.tensor([999.0], device=dev, dtype=torch.float32),
                    torch.randn(batch, seq, d, device=dev, dtype=dtype),
                    torch.randn(batch, pooled, device=dev, dtype=dtype),
                    torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, device=dev, dtype=dtype),
                ),
                inputs=["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                outputs=["out_sample"],
                axes={
                    "sample": {0: "batch", 2: "height", 3: "width"},
                    "timestep": {0: "steps"},
                    "encoder_hidden_states": {0: "batch"},
                    "text_embeds": {0: "batch"},
                    "time_ids": {0: "batch"},
                    "out_sample": {0: "batch", 2: "height", 3: "width"},
                },
            )
        return dict(
            module=_UNet(unet),
            args=(
                torch.randn(batch, c, latent, latent, device=dev, dtype=dtype),
                torch.tensor([999.0], device=dev, dtype=torch.float32),
                torch.randn(batch, seq, d, device=dev, dtype=dtype),
            ),
            inputs=["sample", "timestep", "encoder_hidden_states"],
            outputs=["out_sample"],
            axes={
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "steps"},
                "encoder_hidden_states": {0: "batch"},
                "out_sample": {0: "batch", 2: "height", 3: "width"},
            },
        )
    if name == "vae_decoder":
        c = vae.config.latent_channels
        return dict(
            module=_VaeDecoder(vae),
            args=(torch.randn(1, c, latent, latent, device=dev, dtype=vae.dtype),),
            inputs=["latent_sample"],
            outputs=["sample"],
            axes={"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "H", 3: "W"}},
        )
    if name == "vae_encoder":
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return dict(
            module=_VaeEncoder(vae),
            args=(torch.randn(1, vae.config.in_channels, latent * scale, latent * scale, device=dev, dtype=vae.dtype),),
            inputs=["sample"],
            outputs=["latent_sample"],
            axes={"sample": {0: "batch", 2: "H", 3: "W"}, "latent_sample": {0: "batch", 2: "height", 3: "width"}},
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
