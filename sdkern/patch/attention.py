"""The attention processor of :func:`sdkern.patch` (rule ``attention``) and the packed QKV/KV projections.

diffusers ``Attention`` modules keep their class; their processor becomes :class:`SdkernAttnProcessor`, which runs
``sdkern::attention`` on strided (B, S, H, D) views of one packed projection (:func:`fuse_linears`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdkern.patch.fused import PLAIN_LINEAR, ops_for

__all__ = ["SdkernAttnProcessor", "fuse_linears", "unfuse_linears"]


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pack the weights (and biases) of ``linears`` into one tensor without keeping a second copy.

    The packed weight (sum(out_i), in) is made once; every Linear's existing ``weight``/``bias``
    Parameter object is re-pointed (``.data``) to its row block of it, so ``state_dict``, ``parameters()``
    and in-place updates see (and change) the packed tensor.

    Returns
    -------
    weight : Tensor (sum(out_i), in)
    bias : Tensor (sum(out_i),) or None
        None when no Linear has a bias; all or none must have one.
    """
    with torch.no_grad(), torch.inference_mode(False):
        w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("cannot fuse Linears where only some have a bias")
        b = torch.cat([lin.bias.detach() for lin in linears], dim=0) if all(has_bias) else None
        off = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = w[off : off + n]
            if b is not None:
                lin.bias.data = b[off : off + n]
            off += n
    return w, b


def unfuse_linears(linears: Sequence[nn.Linear]) -> None:
    """Give every Linear its own storage again (values unchanged), undoing :func:`fuse_linears`."""
    with torch.no_grad(), torch.inference_mode(False):
        for lin in linears:
            lin.weight.data = lin.weight.data.clone()
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.clone()


def _still_fused(linears: Sequence[nn.Linear], w: torch.Tensor, b: torch.Tensor | None) -> bool:
    # True while every Linear's parameters are the row blocks of (w, b) made by fuse_linears.
    off = 0
    for lin in linears:
        lw = lin.weight
        expected = w.data_ptr() + off * w.stride(0) * w.element_size()
        if lw.dtype != w.dtype or lw.device != w.device or lw.data_ptr() != expected:
            return False
        if b is not None and (lin.bias is None or lin.bias.data_ptr() != b.data_ptr() + off * b.element_size()):
            return False
        off += lw.shape[0]
    return True


class SdkernAttnProcessor:
    """diffusers attention processor running ``sdkern::attention`` on strided (B, S, H, D) views.

    Self-attention projects once through the packed QKV weight (B, S, 3, H, D); cross-attention
    projects q, then the packed KV weight (B, Sk, 2, H, D) on the encoder states; the q/k/v views go
    to the fused attention without transposes or copies; then ``to_out``. A 4-D input (VAE mid-block)
    is normalised by ``attn.group_norm`` in its own memory format and viewed as (B, H*W, C) (free
    when channels-last). An attention mask, or projections wrapped after patching (LoRA layers), run
    the original processor instead.

    Parameters
    ----------
    original : processor
        The processor this one replaces (run for the cases above; restored by :func:`sdkern.unpatch`).
    backend : str
        ``"reference"`` or another PatchConfig backend (``torch.ops.sdkern``).
    qkv_fusion : bool
        Use packed projections (made by :meth:`fuse`).
    scale : float or None
        Softmax scale, as the original processor applied it (None: 1/sqrt(head_dim)).
    sdpa : bool
        Run the attention itself with ``F.scaled_dot_product_attention`` instead of ``sdkern::attention``
        (chosen by the patcher where PyTorch's kernel is faster: bf16 on CPUs with AMX, measured 2.5-3x
        on SD self-attention shapes; fp32 diffusers attention on CPUs without AVX-512, 0.88-1.9x by shape,
        +3.6 % on the 64x64 step; the projections and layout stay sdkern's).
    """

    def __init__(self, original: Any, backend: str, qkv_fusion: bool, scale: float | None, sdpa: bool = False) -> None:
        self.original = original
        self.backend = backend
        self.qkv_fusion = qkv_fusion
        self.scale = scale
        self.sdpa = sdpa

    # -- packed projections ------------------------------------------------------------------
    @staticmethod
    def _fused_linears(attn: nn.Module) -> list[nn.Linear]:
        if attn.is_cross_attention:
            return [attn.to_k, attn.to_v]
        return [attn.to_q, attn.to_k, attn.to_v]

    def fuse(self, attn: nn.Module) -> None:
        """(Re)build the packed projection of ``attn`` (stored as ``attn._sdkern_packed``)."""
        attn._sdkern_packed = fuse_linears(self._fused_linears(attn))

    def unfuse(self, attn: nn.Module) -> None:
        """Give ``to_q/to_k/to_v`` separate storage again and drop the packed projection."""
        if getattr(attn, "_sdkern_packed", None) is not None:
            unfuse_linears(self._fused_linears(attn))
        attn.__dict__.pop("_sdkern_packed", None)

    def _packed(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        packed = attn._sdkern_packed
        if not torch.compiler.is_compiling() and not _still_fused(self._fused_linears(attn), *packed):
            # the parameters were replaced (module.to(...), load_state_dict(assign=True), ...): re-pack
            self.fuse(attn)
            packed = attn._sdkern_packed
        return packed

    # -- call ------------------------------------------------------------------------------
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states (B, S, C) or (B, C, H, W); encoder_hidden_states (B, Sk, Ck) or None -> like hidden_states."""
        plain = all(type(m) in PLAIN_LINEAR for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))
        if attention_mask is not None or args or kwargs or not plain or attn.spatial_norm is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            x = hidden_states if attn.group_norm is None else attn.group_norm(hidden_states)
            x = x.permute(0, 2, 3, 1).reshape(batch, height * width, channel)  # a view when channels-last
        else:
            x = hidden_states
            if attn.group_norm is not None:
                x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        batch, seq = x.shape[:2]
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        cross = encoder_hidden_states is not None
        if cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        if self.qkv_fusion and cross == attn.is_cross_attention:
            w, b = self._packed(attn)
            lins = self._fused_linears(attn)
            if torch.is_grad_enabled() and any(lin.weight.requires_grad for lin in lins):
                # the packed tensor is no Parameter: concatenate the Parameters so gradients reach them
                w = torch.cat([lin.weight for lin in lins])
                b = None if b is None else torch.cat([lin.bias for lin in lins])
            if cross:
                q = attn.to_q(x).view(batch, seq, heads, head_dim)
                kv = F.linear(encoder_hidden_states, w, b)
                kv = kv.view(batch, encoder_hidden_states.shape[1], 2, heads, head_dim)
                k, v = kv[:, :, 0], kv[:, :, 1]
            else:
                qkv = F.linear(x, w, b).view(batch, seq, 3, heads, head_dim)
                q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            ctx = encoder_hidden_states if cross else x
            q = attn.to_q(x).view(batch, seq, heads, head_dim)
            k = attn.to_k(ctx).view(batch, ctx.shape[1], heads, head_dim)
            v = attn.to_v(ctx).view(batch, ctx.shape[1], heads, head_dim)

        if self.sdpa:  # PyTorch's flash attention (Context.diffusers_attn_sdpa) on the (B, H, S, D) views
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=self.scale).transpose(1, 2)
        else:
            out = ops_for(self.backend).attention(q, k, v, self.scale)  # (B, S, H, D) contiguous
        out = attn.to_out[0](out.reshape(batch, seq, heads * head_dim))
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.view(batch, height, width, channel).permute(0, 3, 1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
