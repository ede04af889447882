"""Rewrites of transformers' CLIP text encoder layers (imported only when a CLIP model is patched)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from sdkern.patch.cpu_engine import SdkernLinear, linear_add
from sdkern.patch.modules import PLAIN_LINEAR, ops_for

__all__ = ["EXPECTED_FORWARD_PARAMS", "SdkernCLIPEncoderLayer", "forward_matches"]

# The CLIPEncoderLayer.forward signature this rewrite was written against (transformers 5.x).
EXPECTED_FORWARD_PARAMS: tuple[str, ...] = ("self", "hidden_states", "attention_mask", "kwargs")


def forward_matches() -> bool:
    """Whether the installed transformers' CLIPEncoderLayer.forward has the expected signature."""
    return tuple(inspect.signature(CLIPEncoderLayer.forward).parameters) == EXPECTED_FORWARD_PARAMS


class SdkernCLIPEncoderLayer(CLIPEncoderLayer):
    """CLIP encoder layer with ``residual + attn`` + layer_norm2 -> ``skip_layer_norm`` and the MLP's
    fc2 bias + residual -> Linear without bias + ``bias_add``.

    The self-attention itself is left to transformers: CLIP text attention is causal and
    ``sdkern::attention`` has no mask.
    """

    _sdkern_backend: str
    _sdkern_sln: bool
    _sdkern_bias_add: bool

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """hidden_states (B, S, C) -> (B, S, C)."""
        ops = ops_for(self._sdkern_backend)
        residual = hidden_states
        h = self.layer_norm1(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, **kwargs)
        ln2 = self.layer_norm2
        if self._sdkern_sln:
            h, residual = ops.skip_layer_norm(h, residual, ln2.weight, ln2.bias, None, ln2.eps)
        else:
            residual = residual + h
            h = ln2(residual)
        mlp = self.mlp
        fc2 = mlp.fc2
        if self._sdkern_bias_add and type(fc2) in PLAIN_LINEAR and fc2.bias is not None:
            h = mlp.activation_fn(mlp.fc1(h))
            if type(fc2) is SdkernLinear:  # Linear + bias + residual in one primitive (CPU engine)
                return linear_add(fc2, h, residual)
            return ops.bias_add(F.linear(h, fc2.weight), fc2.bias, residual)
        return residual + mlp(h)
