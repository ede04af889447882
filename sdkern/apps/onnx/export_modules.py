"""The modules traced for each exported component: they fix its ONNX inputs and outputs (see
:mod:`sdkern.apps.onnx.export` for the table) around the diffusers / transformers model they wrap."""

from __future__ import annotations

from typing import Any

import torch


class TextEncoderExport(torch.nn.Module):
    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class SdxlTextEncoderExport(torch.nn.Module):
    """SDXL's text encoder: first output (pooled / projected), last and penultimate hidden states."""

    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long(), output_hidden_states=True, return_dict=True)
        first = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return first, out.last_hidden_state, out.hidden_states[-2]


class UNetExport(torch.nn.Module):
    """The U-Net; with ``n_residuals`` > 0 it also takes a ControlNet's residuals (down blocks, then mid)."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool = False, n_residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.n_residuals = n_residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest):
        kw: dict[str, Any] = {}
        if self.sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": rest[0], "time_ids": rest[1]}
            rest = rest[2:]
        if self.n_residuals:
            kw["down_block_additional_residuals"] = list(rest[:-1])
            kw["mid_block_additional_residual"] = rest[-1]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kw)[0]


class ControlNetExport(torch.nn.Module):
    """A ``ControlNetModel``: the U-Net's inputs, ``controlnet_cond`` and ``conditioning_scale`` -> residuals."""

    def __init__(self, controlnet: torch.nn.Module, sdxl: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        *added: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cond = {"text_embeds": added[0], "time_ids": added[1]} if self.sdxl else None
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=cond,
            return_dict=False,
        )
        return (*down, mid)


class SafetyCheckerExport(torch.nn.Module):
    """``StableDiffusionSafetyChecker.forward_onnx``'s computation, with the flagged images zeroed by ``where``.

    ``forward_onnx``'s ``images[has_nsfw_concepts] = 0.0`` traces to an index_put whose mask broadcast is
    fixed to the example's shape (ORT then fails, or silently zeroes the wrong axis, for another batch or
    size: seen with onnxruntime 1.32); ``where`` over a (B, 1, 1, 1) mask holds for every shape and layout.
    """

    def __init__(self, checker: torch.nn.Module) -> None:
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        c = self.checker
        image_embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special_cos = cosine_distance(image_embeds, c.special_care_embeds)
        cos = cosine_distance(image_embeds, c.concept_embeds)
        special_care = torch.any(special_cos - c.special_care_embeds_weights > 0, dim=1)
        scores = cos - c.concept_embeds_weights + (special_care * 0.01).unsqueeze(1)
        flags = torch.any(scores > 0, dim=1)
        mask = flags.reshape(-1, *([1] * (images.dim() - 1)))
        return torch.where(mask, torch.zeros_like(images), images), flags


class VaeDecoderExport(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.sample(), dist.parameters
