"""Rewrites of transformers' CLIP encoder layers and attention (imported only when a CLIP model is patched).

- ``CLIPEncoderLayer``: residual + layer_norm2 -> ``skip_layer_norm``; the MLP's fc2 bias + residual ->
  ``bias_add`` (or the CPU engine's Linear + residual primitive).
- ``CLIPAttention``: q/k/v projections viewed as (B, S, H, D) (no transposes) -> ``sdkern::attention``,
  causal for the text encoder. transformers 5.x with ``attn_implementation="sdpa"`` (its default) hands
  the layers ``attention_mask=None`` plus ``is_causal=True`` when the only mask is the causal one (no
  padding mask, or an all-ones one; what diffusers' pipelines pass), so that call is what is rewritten.
  A padding mask arrives as a 4-D tensor and runs transformers' own attention (sdkern::attention takes
  no arbitrary mask).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

from sdkern.patch.cpu_engine_modules import SdkernLinear, linear_add
from sdkern.patch.fused import PLAIN_LINEAR, ops_for

__all__ = [
    "EXPECTED_ATTENTION_PARAMS",
    "EXPECTED_FORWARD_PARAMS",
    "SdkernCLIPAttention",
    "SdkernCLIPEncoderLayer",
    "attention_forward_matches",
    "attention_problem",
    "forward_matches",
]

# The CLIPEncoderLayer.forward / CLIPAttention.forward signatures these rewrites were written against
# (transformers 5.x).
EXPECTED_FORWARD_PARAMS: tuple[str, ...] = ("self", "hidden_states", "attention_mask", "kwargs")
EXPECTED_ATTENTION_PARAMS: tuple[str, ...] = ("self", "hidden_states", "attention_mask", "kwargs")

# The attn_implementation whose mask convention the attention rewrite follows (see the module docstring).
_SDPA = "sdpa"


def forward_matches() -> bool:
    """Whether the installed transformers' CLIPEncoderLayer.forward has the expected signature."""
    return tuple(inspect.signature(CLIPEncoderLayer.forward).parameters) == EXPECTED_FORWARD_PARAMS


def attention_forward_matches() -> bool:
    """Whether the installed transformers' CLIPAttention.forward has the expected signature."""
    return tuple(inspect.signature(CLIPAttention.forward).parameters) == EXPECTED_ATTENTION_PARAMS


def _impl(m: nn.Module) -> str | None:
    return getattr(getattr(m, "config", None), "_attn_implementation", None)


def attention_problem(m: CLIPAttention) -> str | None:
    """Why ``m`` cannot be rewritten onto ``sdkern::attention`` (None when it can)."""
    if not attention_forward_matches():
        return "CLIPAttention.forward signature differs from the one supported"
    if not all(type(x) is nn.Linear for x in (m.q_proj, m.k_proj, m.v_proj, m.out_proj)):
        return "projections are not plain nn.Linear"
    if m.embed_dim != m.num_heads * m.head_dim or m.q_proj.out_features != m.embed_dim:
        return "q/k/v widths do not split into num_heads x head_dim"
    impl = _impl(m)
    if impl != _SDPA:
        return (
            f"attn_implementation={impl!r}: only 'sdpa' is rewritten (its layers get attention_mask=None and "
            "is_causal for the causal-only mask; 'eager' always passes the causal mask as a float tensor)"
        )
    return None


class SdkernCLIPEncoderLayer(CLIPEncoderLayer):
    """CLIP encoder layer with ``residual + attn`` + layer_norm2 -> ``skip_layer_norm`` and the MLP's
    fc2 bias + residual -> Linear without bias + ``bias_add``.

    The self-attention is ``self.self_attn`` (a :class:`SdkernCLIPAttention` where that rule applies).
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


class SdkernCLIPAttention(CLIPAttention):
    """CLIPAttention on ``sdkern::attention``: q, k, v projected separately (each on the CPU engine when it
    runs), viewed as (B, S, H, D) without transposes or copies, attention causal exactly when
    transformers' SDPA path would make it causal, then ``out_proj``.

    Runs transformers' own forward instead when the call is not the recognised one: an attention mask
    (a padding mask; arbitrary masks are not an sdkern op), another ``attn_implementation`` set after
    patching, attention weights requested, dropout in training mode, or projections wrapped after
    patching (LoRA layers).
    """

    _sdkern_backend: str
    _sdkern_sdpa: bool  # torch SDPA for the attention itself (bf16 on AMX CPUs, as for the U-Net processor)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, S, C) -> ((B, S, C), None)."""
        plain = all(type(x) in PLAIN_LINEAR for x in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        if (
            attention_mask is not None
            or not plain
            or _impl(self) != _SDPA
            or kwargs.get("output_attentions")
            or (self.training and self.dropout > 0.0)
            or hidden_states.dim() != 3
        ):
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        # as transformers' sdpa_attention_forward: is_causal from the call, else the module's own flag
        causal = kwargs.get("is_causal")
        causal = bool(self.is_causal if causal is None else causal)
        b, s, _ = hidden_states.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(hidden_states).view(b, s, h, d)
        k = self.k_proj(hidden_states).view(b, s, h, d)
        v = self.v_proj(hidden_states).view(b, s, h, d)
        if self._sdkern_sdpa:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=self.scale).transpose(1, 2)
        else:
            out = ops_for(self._sdkern_backend).attention(q, k, v, float(self.scale), causal)  # (B, S, H, D)
        return self.out_proj(out.reshape(b, s, h * d)), None
