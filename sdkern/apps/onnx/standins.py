"""ORT stand-ins for a pipeline's networks: text encoders, VAE, the U-Net's mirror, ControlNet, safety checker.

Each is a ``torch.nn.Module`` without parameters (the U-Net's is :class:`sdkern.apps.onnx.unet.OrtUNet`, fed a
:class:`_Mirror` of the exported U-Net's config) that runs an exported model (:mod:`sdkern.apps.onnx.export`)
and returns what diffusers' torch pipelines read, so those pipelines run unchanged with their scheduler,
generators and image processing in torch (:mod:`sdkern.apps.onnx.diffusers_pipelines` assembles them).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel

logger = logging.getLogger("sdkern")

ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def _numpy(t: torch.Tensor, ort_type: str) -> np.ndarray:
    """``t`` as a NumPy array of the ONNX input type ``ort_type`` (float16 or float32)."""
    return t.detach().cpu().to(ORT_TO_TORCH.get(ort_type, torch.float32)).numpy()


class OrtControlNet(ControlNetModel):
    """Stand-in for a ``ControlNetModel`` on ONNX Runtime.

    A ``ControlNetModel`` subclass because diffusers' ControlNet pipelines check ``isinstance``; its
    ``__init__`` builds no layers (``torch.nn.Module.__init__`` only), ``config`` mirrors the exported
    model's and ``dtype`` / ``device`` are the session's input type and ``device``.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of ``controlnet/model.onnx``: ``sample``, ``timestep``, ``encoder_hidden_states``,
        ``controlnet_cond``, ``conditioning_scale`` (SDXL: also ``text_embeds``, ``time_ids``) ->
        ``down_block_additional_residual_{i}``, ``mid_block_additional_residual``.
    config : mapping
        The source ControlNet's config (``controlnet/config.json``).
    device : torch.device or str
        Where the residuals are returned.
    """

    def __init__(self, session: Any, config: Any, device: torch.device | str = "cpu") -> None:
        torch.nn.Module.__init__(self)
        from diffusers.configuration_utils import FrozenDict

        self.session = session
        self._internal_dict = FrozenDict(config)
        self._types = {i.name: i.type for i in session.get_inputs()}
        self._dtype = ORT_TO_TORCH.get(self._types["sample"], torch.float32)
        self._device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> Any:
        """The residuals of ``ControlNetModel.forward`` for the same arguments.

        The graph multiplies every residual by ``conditioning_scale``; guess mode (per-block scales
        ``logspace(-1, 0)``) and ``global_pool_conditions`` (spatial mean) are applied here in torch to the
        graph's residuals at scale 1, as ``ControlNetModel.forward`` applies them after its blocks.
        """
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        given = {
            "class_labels": class_labels,
            "timestep_cond": timestep_cond,
            "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs,
        }
        unsupported = [k for k, v in given.items() if v is not None]
        if unsupported:
            raise NotImplementedError(f"OrtControlNet does not take {unsupported}")
        added = added_cond_kwargs or {}
        wanted = [n for n in ("text_embeds", "time_ids") if n in self._types]
        missing = [n for n in wanted if added.get(n) is None]
        if missing:
            raise ValueError(f"OrtControlNet: this ControlNet needs added_cond_kwargs {missing}")
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        post = guess_mode or bool(self.config.get("global_pool_conditions", False))
        scale = 1.0 if post else float(conditioning_scale)
        feeds = {
            "sample": _numpy(sample, self._types["sample"]),
            "timestep": np.array([t], dtype=np.float16 if self._types["timestep"] == "tensor(float16)" else np.float32),
            "encoder_hidden_states": _numpy(encoder_hidden_states, self._types["encoder_hidden_states"]),
            "controlnet_cond": _numpy(controlnet_cond, self._types["controlnet_cond"]),
            "conditioning_scale": _numpy(torch.tensor([scale]), self._types["conditioning_scale"]),
            **{n: _numpy(added[n], self._types[n]) for n in wanted},
        }
        outs = [torch.from_numpy(o).to(sample.device, sample.dtype) for o in self.session.run(None, feeds)]
        down, mid = outs[:-1], outs[-1]
        if guess_mode and not self.config.get("global_pool_conditions", False):
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        elif post:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.config.get("global_pool_conditions", False):
            down = [torch.mean(d, dim=(2, 3), keepdim=True) for d in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        if not return_dict:
            return tuple(down), mid
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)


class OrtSafetyChecker(torch.nn.Module):
    """Stand-in for ``StableDiffusionSafetyChecker`` on ONNX Runtime (its ``forward_onnx``, as exported).

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of ``safety_checker/model.onnx``: ``clip_input`` (B, 3, 224, 224), ``images`` (batch
        first, any layout) -> ``out_images`` (flagged images zeroed), ``has_nsfw_concepts`` (B,) bool.
    device : torch.device or str
        Where tensors are returned.
    """

    def __init__(self, session: Any, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.session = session
        self._types = {i.name: i.type for i in session.get_inputs()}
        self.dtype = ORT_TO_TORCH.get(self._types["clip_input"], torch.float32)
        self.device = torch.device(device)

    def forward(self, clip_input: torch.Tensor, images: Any) -> tuple[Any, list[bool]]:
        """Check ``images`` (torch (B, 3, H, W) or NumPy (B, H, W, 3)); returns (images with the flagged ones
        set to 0, as the torch checker does, in the type given; one flag per image)."""
        as_numpy = isinstance(images, np.ndarray)
        imgs = torch.from_numpy(images) if as_numpy else images
        feeds = {
            "clip_input": _numpy(clip_input, self._types["clip_input"]),
            "images": _numpy(imgs, self._types["images"]),
        }
        out, flags = self.session.run(None, feeds)
        has_nsfw = [bool(f) for f in flags]
        if any(has_nsfw):
            logger.warning(
                "sdkern onnx: potential NSFW content was detected in one or more images; they are replaced by "
                "blank images"
            )
        if as_numpy:
            return out.astype(images.dtype), has_nsfw
        return torch.from_numpy(out).to(imgs.device, imgs.dtype), has_nsfw


class _HiddenStates(tuple):
    """``(penultimate, last)``: the hidden states an exported SDXL text encoder provides."""

    def __getitem__(self, index: Any) -> Any:
        if index not in (-1, -2):
            raise NotImplementedError(
                "the ONNX SDXL text encoders export only the last and penultimate hidden states: "
                "clip_skip is not supported on the ONNX path"
            )
        return super().__getitem__(index)


class OrtTextEncoder(torch.nn.Module):
    """Stand-in for SDXL's ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` on ONNX Runtime.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of an exported SDXL text encoder (input ``input_ids``; outputs ``pooler_output`` or
        ``text_embeds``, ``last_hidden_state``, ``hidden_states.penultimate``).
    config : transformers.CLIPTextConfig or mapping
        The source model's config (``projection_dim`` is read by the pipeline).
    """

    def __init__(self, session: Any, config: Any, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.session = session
        self.config = config
        self._outputs = [o.name for o in session.get_outputs()]
        self._input_type = np.int32 if session.get_inputs()[0].type == "tensor(int32)" else np.int64
        self.dtype = ORT_TO_TORCH.get(session.get_outputs()[1].type, torch.float32)
        self.device = torch.device(device)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool | None = None, **kwargs: Any) -> Any:
        """Encode token ids; returns the output object ``StableDiffusionXLPipeline.encode_prompt`` reads."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        given = [k for k, v in kwargs.items() if v is not None and k != "return_dict"]
        if given:
            raise NotImplementedError(f"OrtTextEncoder supports input_ids only (got {given})")
        feeds = {"input_ids": input_ids.detach().cpu().numpy().astype(self._input_type)}
        got = dict(zip(self._outputs, self.session.run(None, feeds), strict=True))
        t = {k: torch.from_numpy(v).to(self.device) for k, v in got.items()}
        hidden = None  # SD 1.x/2.x exports: last_hidden_state and pooler_output only
        if "hidden_states.penultimate" in t:
            hidden = _HiddenStates((t["hidden_states.penultimate"], t["last_hidden_state"]))
        if hidden is None and output_hidden_states:
            raise NotImplementedError("this ONNX text encoder exports no hidden states: clip_skip is not supported")
        if "text_embeds" in t:
            return CLIPTextModelOutput(
                text_embeds=t["text_embeds"], last_hidden_state=t["last_hidden_state"], hidden_states=hidden
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=t["last_hidden_state"], pooler_output=t["pooler_output"], hidden_states=hidden
        )


class OrtVae(torch.nn.Module):
    """Stand-in for ``AutoencoderKL`` on ONNX Runtime.

    Parameters
    ----------
    decoder : onnxruntime.InferenceSession
        Session of ``vae_decoder/model.onnx`` (``latent_sample`` -> ``sample``).
    config : mapping
        The source VAE's config (``scaling_factor``, ``block_out_channels``, ``force_upcast``, ...).
    device : torch.device or str
        Where returned tensors go.
    encoder : onnxruntime.InferenceSession, optional
        Session of ``vae_encoder/model.onnx`` (``sample`` -> ``latent_sample``, ``latent_parameters``);
        without it :meth:`encode` is refused.
    """

    def __init__(self, decoder: Any, config: Any, device: torch.device | str = "cpu", encoder: Any = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.config = config
        self.dtype = ORT_TO_TORCH.get(decoder.get_inputs()[0].type, torch.float32)
        self.device = torch.device(device)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        """Decode latents (already divided by the scaling factor) to images in [-1, 1]."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        out = self.decoder.run(None, {"latent_sample": z.detach().cpu().numpy().astype(np_dtype)})[0]
        sample = torch.from_numpy(out).to(z.device, z.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        """Encode images (B, 3, H, W) in [-1, 1] to the latent distribution (B, C, H/f, W/f).

        Returns ``AutoencoderKLOutput`` (or a 1-tuple) whose ``latent_dist`` is diffusers'
        ``DiagonalGaussianDistribution`` of the exported ``latent_parameters`` in ``x``'s dtype: the
        pipeline samples it with its own generator, as on the torch path.
        """
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        outputs = [o.name for o in self.encoder.get_outputs()] if self.encoder is not None else []
        if "latent_parameters" not in outputs:
            raise NotImplementedError(
                "this ONNX directory's VAE encoder exports no latent_parameters (written by an older sdkern or "
                "another tool): re-run `sdkern optimize` for img2img / inpainting"
            )
        enc_in = self.encoder.get_inputs()[0]
        np_dtype = np.float16 if enc_in.type == "tensor(float16)" else np.float32
        params = self.encoder.run(["latent_parameters"], {enc_in.name: x.detach().cpu().numpy().astype(np_dtype)})[0]
        dist = DiagonalGaussianDistribution(torch.from_numpy(params).to(x.device, x.dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)


class _Mirror:
    """``config``, ``dtype`` and ``device`` of an exported U-Net, for :class:`OrtUNet`."""

    def __init__(self, config: Any, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.dtype = torch.float32
        self.device = torch.device(device)
