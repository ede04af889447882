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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sdkern")

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
OPSET = 17


class _TextEncoder(torch.nn.Module):
    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


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
        if getattr(unet.config, "addition_embed_type", None):
            raise NotImplementedError(
                f"ONNX export of U-Nets with added conditioning ({unet.config.addition_embed_type}, e.g. SDXL) "
                "is not implemented yet"
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
    raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")


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
