"""Drop-in replacements used by :func:`sdkern.patch`.

Every rewrite keeps the module tree, the parameters and the ``state_dict`` keys of the original: a
patched module is the same object with its class swapped to a subclass whose ``forward`` calls the
fused ops (``__class__`` is restored by :func:`sdkern.unpatch`), and attention gets an sdkern
processor (:mod:`sdkern.patch.attention`, re-exported here). Each patched forward checks the few run-time
conditions its fusion needs (for example an attention mask, or a LoRA wrapper replacing a Linear) and otherwise
runs the original code. Which module gets which class is decided by the rule table (:mod:`sdkern.patch.rules`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from sdkern.patch.attention import SdkernAttnProcessor, fuse_linears, unfuse_linears
from sdkern.patch.cpu_engine_modules import SdkernLinear, conv2d_add, geglu, linear_add
from sdkern.patch.fused import ENGINE_CONV2D, PLAIN_LINEAR, ops_for

__all__ = [
    "PLAIN_LINEAR",
    "SdkernAttnProcessor",
    "SdkernBasicTransformerBlock",
    "SdkernGEGLU",
    "SdkernGroupNorm",
    "SdkernGroupNormSiLU",
    "SdkernLayerNorm",
    "SdkernResnetBlock2D",
    "SdkernTransformer2DModel",
    "fuse_linears",
    "ops_for",
    "unfuse_linears",
]


# ---------------------------------------------------------------------------------------------
# group norms
class SdkernGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (affine) computed by ``sdkern::group_norm``; keeps the input's memory format."""

    _sdkern_backend: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, *) -> GroupNorm(x), same shape; 4-D inputs go to the fused op, others to PyTorch."""
        if x.dim() != 4:
            return super().forward(x)
        return ops_for(self._sdkern_backend).group_norm(x, self.weight, self.bias, self.num_groups, self.eps, False)


class SdkernGroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by SiLU in one ``sdkern::group_norm(silu=True)`` call.

    Used for ``conv_norm_out``; the ``conv_act`` SiLU that followed it is replaced by ``nn.Identity``.
    """

    _sdkern_backend: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> SiLU(GroupNorm(x)), same memory format."""
        if x.dim() != 4:
            return F.silu(super().forward(x))
        return ops_for(self._sdkern_backend).group_norm(x, self.weight, self.bias, self.num_groups, self.eps, True)


class SdkernLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (affine, over the last dim) computed by ``sdkern::skip_layer_norm`` with no skip.

    Used for the LayerNorms no residual add precedes (CLIP's layer_norm1 and final_layer_norm, the
    transformer blocks' norm1). Inputs the op does not take (a float64 input, parameters in another
    half dtype) run PyTorch's LayerNorm.
    """

    _sdkern_backend: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> LayerNorm(x), same shape and dtype (contiguous)."""
        w = self.weight
        if x.dtype not in _HALF_OR_FLOAT or (w.dtype != torch.float32 and w.dtype != x.dtype) or x.dim() == 0:
            return super().forward(x)
        x = x if x.stride(-1) == 1 else x.contiguous()
        return ops_for(self._sdkern_backend).skip_layer_norm(x, None, w, self.bias, None, self.eps)[0]


_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class SdkernResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D with norm1+SiLU -> ``group_norm(silu)`` and ``h + temb`` + norm2 + SiLU -> ``skip_group_norm``.

    Only installed on blocks with ``time_embedding_norm == "default"`` (or any mode but "scale_shift"
    when there is no time embedding projection, as in the VAE), SiLU non-linearity and affine group
    norms. With the CPU engine, ``conv2`` adds the residual in its epilogue (``output_scale_factor == 1``).
    """

    _sdkern_backend: str

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """input_tensor (N, Cin, H, W), temb (N, T) or None -> (N, Cout, H', W')."""
        if temb is not None and self.time_emb_proj is None:  # eager adds a raw temb here; rare, not fused
            return super().forward(input_tensor, temb, *args, **kwargs)
        ops = ops_for(self._sdkern_backend)
        n1, n2 = self.norm1, self.norm2
        hidden_states = ops.group_norm(input_tensor, n1.weight, n1.bias, n1.num_groups, n1.eps, True)

        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)  # (N, Cout)
            hidden_states, _ = ops.skip_group_norm(
                hidden_states, temb.to(hidden_states.dtype), None, n2.weight, n2.bias, n2.num_groups, n2.eps, True
            )
        else:
            hidden_states = ops.group_norm(hidden_states, n2.weight, n2.bias, n2.num_groups, n2.eps, True)

        hidden_states = self.dropout(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        if type(self.conv2) in ENGINE_CONV2D and self.output_scale_factor == 1.0:
            # conv2 + bias + residual in one primitive (the CPU engine's fused epilogue)
            return conv2d_add(self.conv2, hidden_states, input_tensor)
        hidden_states = self.conv2(hidden_states)
        return (input_tensor + hidden_states) / self.output_scale_factor


# ---------------------------------------------------------------------------------------------
# feed-forward and transformer block
class SdkernGEGLU(GEGLU):
    """GEGLU as Linear without bias + ``bias_split_gelu(x, bias)`` (exact erf GELU, like ``F.gelu``)."""

    _sdkern_backend: str

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """hidden_states (..., Din) -> (..., Dout)."""
        proj = self.proj
        if type(proj) not in PLAIN_LINEAR or proj.bias is None:  # e.g. a LoRA wrapper installed after patching
            return super().forward(hidden_states, *args, **kwargs)
        if type(proj) is SdkernLinear:
            if "_sdkern_gate" in proj.__dict__:  # the CPU engine's two GEMMs, GELU and product in their epilogues
                return geglu(proj, hidden_states)
            h = linear_add(proj, hidden_states, None, bias=False)
        else:
            h = F.linear(hidden_states, proj.weight)
        return ops_for(self._sdkern_backend).bias_split_gelu(h, proj.bias)


class SdkernBasicTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock (``norm_type == "layer_norm"``) with fused residual/norm/bias steps.

    - ``attn1_out + h`` then norm2, and ``attn2_out + h`` then norm3 -> ``skip_layer_norm`` (both outputs
      used: the normalised input of the next sub-layer and the new residual stream);
    - the feed-forward's last Linear bias + residual -> Linear without bias + ``bias_add``.

    Anything outside the recognised case at run time (chunked feed-forward, GLIGEN, a 4-D attention
    output, a wrapped Linear) runs the original forward.
    """

    _sdkern_backend: str
    _sdkern_sln: bool
    _sdkern_bias_add: bool

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, S, C), encoder_hidden_states (B, Sk, Ck) or None -> (B, S, C)."""
        cak = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
        if self._chunk_size is not None or "gligen" in cak or "scale" in cak:
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs,
                class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs,
            )
        ops = ops_for(self._sdkern_backend)

        norm_hidden_states = self.norm1(hidden_states)
        attn_output = self.attn1(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask,
            **cak,
        )
        norm_hidden_states, hidden_states = self._add_norm(ops, attn_output, hidden_states, self.norm2)

        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cak,
        )
        norm_hidden_states, hidden_states = self._add_norm(ops, attn_output, hidden_states, self.norm3)

        net = self.ff.net
        last = net[-1]
        if self._sdkern_bias_add and type(last) in PLAIN_LINEAR and last.bias is not None:
            x = norm_hidden_states
            for m in net[:-1]:
                x = m(x)
            if type(last) is SdkernLinear:  # Linear + bias + residual in one primitive
                return linear_add(last, x, hidden_states)
            return ops.bias_add(F.linear(x, last.weight), last.bias, hidden_states)
        return self.ff(norm_hidden_states) + hidden_states

    def _add_norm(
        self, ops: Any, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual (B, S, C) -> (LayerNorm(x + residual), x + residual)
        if self._sdkern_sln and x.dim() == 3 and x.shape == residual.shape:
            # the block's input can arrive with a strided last dim (NCHW feature maps viewed as (B, HW, C))
            residual = residual if residual.stride(-1) == 1 else residual.contiguous()
            x = x if x.stride(-1) == 1 else x.contiguous()
            return ops.skip_layer_norm(x, residual, norm.weight, norm.bias, None, norm.eps)
        s = x + residual
        if s.ndim == 4:
            s = s.squeeze(1)
        return norm(s), s


# ---------------------------------------------------------------------------------------------
# Transformer2DModel (continuous inputs): proj_out + residual without leaving channels-last
class SdkernTransformer2DModel(Transformer2DModel):
    """Transformer2DModel whose output projection adds the residual in its epilogue and stays NHWC.

    diffusers ends the block with ``reshape(...).permute(0, 3, 1, 2).contiguous()``, which turns the
    (B, H*W, C) tokens back into an NCHW copy before ``proj_out``. Here the tokens are viewed as an NHWC
    feature map (no copy) and ``proj_out`` (1x1 conv or Linear, on the CPU engine) adds the residual.
    Installed only when ``proj_out`` runs on the CPU engine; the output is channels-last.
    """

    def _get_output_for_continuous_inputs(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        batch_size: int,
        height: int,
        width: int,
        inner_dim: int,
    ) -> torch.Tensor:
        """hidden_states (B, H*W, inner), residual (B, C, H, W) -> (B, C, H, W) channels-last."""
        proj = self.proj_out
        if type(proj) in ENGINE_CONV2D and not self.use_linear_projection:
            x = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
            return conv2d_add(proj, x, residual)
        if type(proj) is SdkernLinear and self.use_linear_projection:
            res = residual.permute(0, 2, 3, 1)  # a view when channels-last
            if res.is_contiguous():
                out = linear_add(proj, hidden_states, res.reshape(batch_size, height * width, -1))
                return out.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
        return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width, inner_dim)
