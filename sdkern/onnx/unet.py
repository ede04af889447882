"""A U-Net stand-in that runs on ONNX Runtime (CPU execution provider + sdkern's custom ops).

Used by ``sdkern bench --engines ort``: the pipeline stays diffusers', only ``pipe.unet`` is replaced.
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch


class OrtUNet:
    """Callable with the ``UNet2DConditionModel`` interface diffusers' SD pipeline uses.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of an exported (and optimised) U-Net with inputs sample, timestep,
        encoder_hidden_states.
    unet : UNet2DConditionModel
        The source module: its config, dtype and device are mirrored.
    """

    def __init__(self, session: Any, unet: torch.nn.Module) -> None:
        self.session = session
        self.config = unet.config
        self.dtype = unet.dtype
        self.device = unet.device
        self._np_dtype = {torch.float16: np.float16}.get(unet.dtype, np.float32)

    @classmethod
    def from_module(cls, unet: torch.nn.Module, target: str = "cpu", workdir: str | None = None) -> OrtUNet:
        """Export ``unet``, optimise it for ``target`` (sdkern ops on the CPU EP) and open a session."""
        import onnxruntime as ort

        from sdkern.onnx.build import optimize_component
        from sdkern.onnx.export import export_component
        from sdkern.onnx.pipeline import session_options

        root = Path(workdir or tempfile.mkdtemp(prefix="sdkern-ort-unet-"))
        holder = types.SimpleNamespace(unet=unet, text_encoder=None, vae=None, tokenizer=None)
        raw = export_component(holder, "unet", root / "raw" / "model.onnx")
        optimize_component(raw, root / "opt" / "model.onnx", "unet", target, fp16=unet.dtype == torch.float16)
        providers = ["CPUExecutionProvider"] if target == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        session = ort.InferenceSession(str(root / "opt" / "model.onnx"), session_options(), providers=providers)
        return cls(session, unet)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unsupported = [k for k, v in kwargs.items() if v is not None and k not in ("cross_attention_kwargs",)]
        if args or unsupported:
            raise NotImplementedError(
                f"OrtUNet supports sample, timestep, encoder_hidden_states only (got {unsupported})"
            )
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        feeds = {
            "sample": sample.detach().cpu().numpy().astype(self._np_dtype),
            "timestep": np.array([t], dtype=np.float32),
            "encoder_hidden_states": encoder_hidden_states.detach().cpu().numpy().astype(self._np_dtype),
        }
        out = torch.from_numpy(self.session.run(None, feeds)[0]).to(sample.device, sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
