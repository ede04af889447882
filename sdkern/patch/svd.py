"""Stable Video Diffusion: the temporal blocks of ``UNetSpatioTemporalConditionModel`` and of
``AutoencoderKLTemporalDecoder`` on the sdkern ops.

The rules that install these classes (by swapping the module's class, restored by :func:`sdkern.unpatch`) are
in :mod:`sdkern.patch.rules.svd`; each fusion:

- ``TemporalResnetBlock`` (``temporal_resnet``): both GroupNorm + SiLU over (C/groups, frames, H, W) ->
  ``group_norm(silu)`` on the (B, C, F*H, W) view of the (B, C, F, H, W) tensor (a view in NCDHW and in
  channels-last-3d, which is what a channels-last (B*F, C, H, W) feature map permuted to frames gives).
- ``Conv3d`` (k, 1, 1) with the CPU engine (``cpu_conv3d``, the engine phase): a prepacked oneDNN
  (k, 1) Conv2d on the (B, C, F, H*W) view, channels-last-3d in and out (:class:`SdkernTemporalConv3d`).
- ``SpatioTemporalResBlock`` (``time_mix``): the AlphaBlender blend ``a*x + (1-a)*(x + r)`` of the spatial
  output ``x`` and the temporal block's output ``x + r`` becomes one ``addcmul`` ``x + (1-a)*r`` (the
  temporal block's residual add is folded in).
- ``TemporalBasicTransformerBlock`` (``temporal_transformer_block``): the frame-major copy
  (B*F, S, C) -> (B*S, F, C) also adds the frame embedding (one pass, ``torch.add(out=)``); ``ff_in``'s
  last bias + residual + norm1, ``attn1 + h`` + norm2, ``attn2 + h`` + norm3 -> ``skip_layer_norm``; the
  feed-forward's last bias + residual -> ``bias_add`` (or the CPU engine's fused epilogue); attention over
  frames runs in the patched attention processor (``sdkern::attention`` with the frame axis as the
  sequence) and GEGLU in ``bias_split_gelu`` (their own rules). ``norm_in`` stays ``F.layer_norm``.
- ``TransformerSpatioTemporalModel`` (``time_mix``): the blend of spatial and temporal tokens is one
  ``lerp`` that also transposes the temporal tokens back to frame-major order; with the CPU engine
  ``proj_out`` adds the residual in its epilogue.
- ``UNetSpatioTemporalConditionModel`` / ``TemporalDecoder`` (``conv_norm_out``): GroupNorm + SiLU ->
  ``group_norm(silu)`` by the same rule as the SD U-Net and VAE (:mod:`sdkern.patch.rules.unet`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.resnet import AlphaBlender, SpatioTemporalResBlock, TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)
from torch import nn

from sdkern.patch.cpu_engine_modules import (
    _DTYPES,
    SdkernLinear,
    _needs_autograd,
    _PackedWeight,
    _reorder_conv,
    _to_compute,
    compute_dtype,
    dtype_problem,
    linear_add,
    repack_for_size,
)
from sdkern.patch.fused import PLAIN_LINEAR, ops_for

__all__ = [
    "SdkernSpatioTemporalResBlock",
    "SdkernTemporalBasicTransformerBlock",
    "SdkernTemporalConv3d",
    "SdkernTemporalResnetBlock",
    "SdkernTransformerSpatioTemporalModel",
    "conv3d_problem",
]


def _group_norm_5d(ops: Any, x: torch.Tensor, norm: nn.GroupNorm, silu: bool) -> torch.Tensor:
    """x (B, C, F, H, W) -> GroupNorm over (C/groups, F, H, W) (+SiLU), through the (B, C, F*H, W) view."""
    b, c, f, h, w = x.shape
    y = ops.group_norm(x.reshape(b, c, f * h, w), norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    return y.view(b, c, f, h, w)


def _temporal_weight(mixer: AlphaBlender, image_only_indicator: torch.Tensor | None, ndims: int, dtype: Any) -> Any:
    """Weight of the temporal input in AlphaBlender's blend (``1 - alpha``, or ``alpha`` when switched)."""
    alpha = mixer.get_alpha(image_only_indicator, ndims).to(dtype)
    return alpha if mixer.switch_spatial_to_temporal_mix else 1.0 - alpha


# ---------------------------------------------------------------------------------------------
class SdkernTemporalResnetBlock(TemporalResnetBlock):
    """TemporalResnetBlock with both GroupNorm + SiLU as ``group_norm(silu)`` over (frames x spatial)."""

    _sdkern_backend: str

    def branch(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """input_tensor (B, C, F, H, W), temb (B, F, T) or None -> conv2 output (B, Cout, F, H, W), no residual."""
        ops = ops_for(self._sdkern_backend)
        h = _group_norm_5d(ops, input_tensor, self.norm1, True)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(self.nonlinearity(temb))  # (B, F, Cout)
            h = h + t.permute(0, 2, 1)[:, :, :, None, None].to(h.dtype)
        h = _group_norm_5d(ops, h, self.norm2, True)
        h = self.dropout(h)
        return self.conv2(h)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """input_tensor (B, C, F, H, W), temb (B, F, T) -> (B, Cout, F, H, W)."""
        h = self.branch(input_tensor, temb)
        res = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return res + h


class SdkernSpatioTemporalResBlock(SpatioTemporalResBlock):
    """SpatioTemporalResBlock whose time mix is ``x + w * r`` in one ``addcmul`` (r: temporal branch)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        image_only_indicator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B*F, Cin, H, W), temb (B*F, T) or None, image_only_indicator (B, F) -> (B*F, C, H, W)."""
        tr = self.temporal_res_block
        if type(tr) is not SdkernTemporalResnetBlock or tr.conv_shortcut is not None:
            return super().forward(hidden_states, temb, image_only_indicator)
        num_frames = image_only_indicator.shape[-1]
        x = self.spatial_res_block(hidden_states, temb)
        batch_frames, channels, height, width = x.shape
        batch = batch_frames // num_frames
        x5 = x.reshape(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        if temb is not None:
            temb = temb.reshape(batch, num_frames, -1)
        r = tr.branch(x5, temb)
        w = _temporal_weight(self.time_mixer, image_only_indicator, 5, x.dtype)
        # eager: a*x + (1-a)*(x + r) == x + (1-a)*r
        out = torch.addcmul(x5, w, r)
        return out.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


# ---------------------------------------------------------------------------------------------
class SdkernTemporalBasicTransformerBlock(TemporalBasicTransformerBlock):
    """TemporalBasicTransformerBlock with fused residual/norm/bias steps (see the module docstring)."""

    _sdkern_backend: str

    def _frame_major(self, hidden_states: torch.Tensor, num_frames: int, emb: torch.Tensor | None) -> torch.Tensor:
        # (B*F, S, C) (+ emb (B*F, 1, C)) -> (B*S, F, C) contiguous, in one pass
        bf, s, c = hidden_states.shape
        b = bf // num_frames
        out = torch.empty((b, s, num_frames, c), dtype=hidden_states.dtype, device=hidden_states.device)
        src = hidden_states.reshape(b, num_frames, s, c)
        if emb is None:
            out.permute(0, 2, 1, 3).copy_(src)
        else:
            torch.add(src, emb.reshape(b, num_frames, 1, c).to(src.dtype), out=out.permute(0, 2, 1, 3))
        return out.view(b * s, num_frames, c)

    def mix(
        self,
        hidden_states: torch.Tensor,
        num_frames: int,
        encoder_hidden_states: torch.Tensor | None,
        emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B*F, S, C), emb (B*F, 1, C) or None -> temporal output in (B, S, F, C') order, contiguous.

        Equals eager ``forward(hidden_states + emb, ...)`` before its transpose back to (B*F, S, C').
        """
        ops = ops_for(self._sdkern_backend)
        bf, s, _ = hidden_states.shape
        b = bf // num_frames
        x = self._frame_major(hidden_states, num_frames, emb)  # (B*S, F, C): the residual
        h = F.layer_norm(x, self.norm_in.normalized_shape, self.norm_in.weight, self.norm_in.bias, self.norm_in.eps)
        last_in = self.ff_in.net[-1]
        if self.is_res and type(last_in) in PLAIN_LINEAR and last_in.bias is not None:
            y = h
            for m in self.ff_in.net[:-1]:
                y = m(y)
            if type(last_in) is SdkernLinear:
                y = linear_add(last_in, y, None, bias=False)
            else:
                y = F.linear(y, last_in.weight)
            n1 = self.norm1
            n, h = ops.skip_layer_norm(y, x, n1.weight, n1.bias, last_in.bias, n1.eps)
        else:
            h = self.ff_in(h)
            if self.is_res:
                h = h + x
            n = self.norm1(h)
        a = self.attn1(n, encoder_hidden_states=None)
        if self.attn2 is not None:
            n, h = ops.skip_layer_norm(a, h, self.norm2.weight, self.norm2.bias, None, self.norm2.eps)
            a = self.attn2(n, encoder_hidden_states=encoder_hidden_states)
        n, h = ops.skip_layer_norm(a, h, self.norm3.weight, self.norm3.bias, None, self.norm3.eps)
        last = self.ff.net[-1]
        if self.is_res and type(last) in PLAIN_LINEAR and last.bias is not None:
            y = n
            for m in self.ff.net[:-1]:
                y = m(y)
            if type(last) is SdkernLinear:
                out = linear_add(last, y, h)
            else:
                out = ops.bias_add(F.linear(y, last.weight), last.bias, h)
        else:
            out = self.ff(n)
            if self.is_res:
                out = out + h
        return out.view(b, s, num_frames, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_frames: int,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B*F, S, C) -> (B*F, S, C')."""
        if self._chunk_size is not None:
            return super().forward(hidden_states, num_frames, encoder_hidden_states)
        out = self.mix(hidden_states, num_frames, encoder_hidden_states)
        b, s, f, c = out.shape
        return out.permute(0, 2, 1, 3).reshape(b * f, s, c)


class SdkernTransformerSpatioTemporalModel(TransformerSpatioTemporalModel):
    """TransformerSpatioTemporalModel: frame-embedding add fused into the temporal block's transpose, time
    mix as one ``lerp`` reading the temporal tokens in their (B, S, F, C) order, and with the CPU engine
    ``proj_out`` + residual in one primitive (channels-last output)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        image_only_indicator: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        """hidden_states (B*F, C, H, W), encoder_hidden_states (B*F, Sk, Ck), image_only_indicator (B, F)."""
        blocks = self.temporal_transformer_blocks
        if (torch.is_grad_enabled() and self.gradient_checkpointing) or not all(
            type(t) is SdkernTemporalBasicTransformerBlock and t._chunk_size is None for t in blocks
        ):
            return super().forward(hidden_states, encoder_hidden_states, image_only_indicator, return_dict)
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch = batch_frames // num_frames

        ctx = encoder_hidden_states
        first = ctx[None, :].reshape(batch, num_frames, -1, ctx.shape[-1])[:, 0]
        time_context = first[:, None].broadcast_to(batch, height * width, ctx.shape[-2], ctx.shape[-1])
        time_context = time_context.reshape(batch * height * width, -1, ctx.shape[-1])

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, inner_dim)
        hidden_states = self.proj_in(hidden_states)

        frame_ids = torch.arange(num_frames, device=hidden_states.device).repeat(batch, 1).reshape(-1)
        emb = self.time_pos_embed(self.time_proj(frame_ids).to(dtype=hidden_states.dtype))[:, None, :]
        alpha = None
        for block, temporal_block in zip(self.transformer_blocks, blocks, strict=True):
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
            mix = temporal_block.mix(hidden_states, num_frames, time_context, emb)  # (B, S, F, C)
            if alpha is None:
                w = _temporal_weight(self.time_mixer, image_only_indicator, 3, hidden_states.dtype)
                alpha = 1.0 - w  # (B*F, 1, 1) per frame, or (1,) for the "fixed" / "learned" strategies
                if alpha.numel() != 1:
                    alpha = alpha.reshape(batch, num_frames, 1, 1)
            s, c = hidden_states.shape[1:]
            out = torch.empty((batch, num_frames, s, c), dtype=hidden_states.dtype, device=hidden_states.device)
            # eager: alpha * spatial + (1 - alpha) * temporal, temporal transposed back to frame-major
            torch.lerp(mix.permute(0, 2, 1, 3), hidden_states.view(batch, num_frames, s, c), alpha, out=out)
            hidden_states = out.view(batch_frames, s, c)

        proj = self.proj_out
        res = residual.permute(0, 2, 3, 1)  # a view when channels-last
        if type(proj) is SdkernLinear and res.is_contiguous():
            out = linear_add(proj, hidden_states, res.reshape(batch_frames, height * width, -1))
            output = out.view(batch_frames, height, width, -1).permute(0, 3, 1, 2)
        else:
            hidden_states = proj(hidden_states)
            hidden_states = hidden_states.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2)
            output = hidden_states.contiguous() + residual
        if not return_dict:
            return (output,)
        return TransformerTemporalModelOutput(sample=output)


# ---------------------------------------------------------------------------------------------
# CPU engine: the temporal (k, 1, 1) Conv3d as a (k, 1) Conv2d on the (B, C, F, H*W) view
def conv3d_problem(m: nn.Module) -> str | None:
    """Why the CPU engine cannot run ``m`` (an ``nn.Conv3d``) as a temporal convolution, or None."""
    if type(m) is not nn.Conv3d:
        return f"{type(m).__name__} is not a plain nn.Conv3d"
    if m.weight.device.type != "cpu" or m.weight.dtype not in _DTYPES:
        return f"weights {m.weight.dtype} on {m.weight.device.type} (the engine runs float32/bfloat16 on CPU)"
    if (why := dtype_problem(compute_dtype(m.weight.dtype))) is not None:
        return why
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r} / padding_mode {m.padding_mode!r} (only explicit zero padding)"
    if tuple(m.kernel_size[1:]) != (1, 1) or tuple(m.padding[1:]) != (0, 0):
        return f"kernel {tuple(m.kernel_size)} is not temporal-only (k, 1, 1)"
    if tuple(m.stride) != (1, 1, 1) or tuple(m.dilation) != (1, 1, 1):
        return "strided or dilated"
    if m.bias is not None and m.bias.dtype != m.weight.dtype:
        return "bias and weight dtypes differ"
    return None


class SdkernTemporalConv3d(_PackedWeight, nn.Conv3d):
    """A (k, 1, 1) ``nn.Conv3d`` over (B, C, F, H, W) run as a prepacked oneDNN (k, 1) Conv2d on the
    (B, C, F, H*W) view (channels-last-3d in and out: the layout a channels-last (B*F, C, H, W) map permuted
    to frames has, so no copies). ``weight`` holds the packed (O, I/groups, k, 1) tensor; ``state_dict()``
    gives the dense 5-D weight."""

    def _sdkern_repack(self, value: torch.Tensor, input_size: tuple[int, ...] | None = None) -> torch.Tensor:
        # value (O, I/groups, k, 1, 1) dense -> the packed (O, I/groups, k, 1) Conv2d weight, in the layout the
        # primitive for a (B, C, F, H*W) input of input_size wants (None: oneDNN's guess)
        w4 = value.reshape((*value.shape[:3], 1))
        return _reorder_conv(w4, [self.padding[0], 0], [1, 1], [1, 1], self.groups, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, F, H, W) -> (B, Cout, F, H, W) (channels-last-3d; contiguous for ``dense_out``)."""
        w = self.weight
        io = self.__dict__.get("_sdkern_io", w.dtype)
        if _needs_autograd(self, x) or x.dtype != io or x.dim() != 5:
            return F.conv3d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        x, bias = _to_compute(self, x, self.bias)  # bf16 -> fp32 where the weight is held as fp32 (compute_dtype)
        b, _, f, h, wd = x.shape
        x4 = x.reshape(b, x.shape[1], f, h * wd).contiguous(memory_format=torch.channels_last)
        w = repack_for_size(self, tuple(x4.shape), self._sdkern_repack)
        args = ([self.padding[0], 0], [1, 1], [1, 1], self.groups)
        y = torch.ops.mkldnn._convolution_pointwise(x4, w, bias, *args, "none", [], "").view(b, -1, f, h, wd)
        y = y if io == w.dtype else y.to(io)
        return y.contiguous() if self.__dict__.get("_sdkern_dense_out", False) else y
