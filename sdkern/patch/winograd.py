"""Winograd F(2x2, 3x3) for the CPU engine's deep float32 3x3 convolutions (opt-in: ``PatchConfig.winograd``).

A 3x3 stride-1 convolution computes every 2x2 output tile from a 4x4 input tile with 16 multiplies per
(input, output) channel pair instead of 36: the input tile is transformed (``V = Bt d B``), multiplied
point by point with the transformed filter (``U = G g Gt``, computed once at patch time in float64), summed
over input channels (16 GEMMs of (tiles, Cin) x (Cin, Cout)) and transformed back (``Y = At M A``). It cuts
the convolution's multiplies 2.25x; the transforms are additions over activations (memory-bound).

Where it pays (measured, ``benchmarks/results/cpu_engine_session7.md``): float32 with at least 640 input and
640 output channels, where oneDNN's direct convolution runs well below its peak (small spatial sizes,
weight-bound); there one convolution beats the prepacked direct one 1.2-1.6x (1 thread) and is *more* accurate
(rel. L2 vs float64 ~4e-7 vs ~0.9-1.2e-6). With 320 channels the transforms dominate and it loses, and in
bfloat16 on AMX the direct convolution is far faster and bf16 transforms triple the error, so neither is
rewritten. At the step level (SD1.5 U-Net, 2 threads) the gain is small: +0 % at 32x32 and +3 % at 64x64
latents, because the transforms here are torch element-wise ops.

Memory: the transformed filter is 16/9 of the weight and the original weight is kept (for ``state_dict``,
odd spatial sizes and a bit-exact :func:`sdkern.unpatch`), so the rewritten convolutions hold 2.8x their
weights: about +3.6 GB on an SD1.5 U-Net in float32. That is why it is opt-in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIN_CHANNELS",
    "SdkernWinogradConv2d",
    "problem",
    "rewrite",
    "shape_problem",
    "transform_filter",
    "winograd_conv2d",
]

#: Winograd is used when both channel counts reach this (below it the transforms dominate; see the module doc)
MIN_CHANNELS = 640

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def problem(m: nn.Module) -> str | None:
    """Why ``m`` is not rewritten to Winograd, or None when it is."""
    why = shape_problem(m)
    if why is None and (m.weight.dtype != torch.float32 or m.weight.device.type != "cpu"):
        return "Winograd runs float32 CPU convolutions only (bf16 transforms cost accuracy; AMX direct is faster)"
    return why


def shape_problem(m: nn.Module) -> str | None:
    """:func:`problem` without the dtype/device condition (FLOP accounting on the meta device)."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a plain nn.Conv2d"
    if tuple(m.kernel_size) != (3, 3) or tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1):
        return "not a 3x3 stride-1 undilated convolution"
    if m.groups != 1 or m.padding_mode != "zeros" or tuple(m.padding) != (1, 1):
        return "grouped, or not zero padding 1"
    if min(m.in_channels, m.out_channels) < MIN_CHANNELS:
        return f"fewer than {MIN_CHANNELS} channels (the transforms would dominate)"
    return None


def transform_filter(weight: torch.Tensor) -> torch.Tensor:
    """U = G g Gt for every (out, in) filter, in float64, cast to the weight's dtype.

    Parameters
    ----------
    weight : Tensor (Cout, Cin, 3, 3)

    Returns
    -------
    Tensor (16, Cin, Cout), contiguous: position ``4 a + b`` of the 4x4 transformed tile, as the right-hand
    side of the GEMM over input channels.
    """
    u = torch.einsum("ak,oikl,bl->abio", _G, weight.detach().double(), _G)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv2d(m: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """``m(x) + other`` by Winograd F(2x2, 3x3) (odd spatial sizes: the direct convolution).

    Parameters
    ----------
    m : SdkernWinogradConv2d
    x : Tensor (N, Cin, H, W), any memory format
    other : Tensor (N, Cout, H, W) or None

    Returns
    -------
    Tensor (N, Cout, H, W), channels-last.
    """
    n, c, h, w = x.shape
    grad = torch.is_grad_enabled() and (x.requires_grad or m.weight.requires_grad)
    if h % 2 or w % 2 or x.dtype != torch.float32 or grad:  # the direct convolution (autograd sees the weight)
        y = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        y = y.contiguous(memory_format=torch.channels_last)
        return y if other is None else y + other
    u: torch.Tensor = m.__dict__["_sdkern_wino"]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H+2, W+2, C): the padded NHWC copy
    th, tw = h // 2, w // 2
    s = xp.stride()
    d = xp.as_strided((n, th, tw, 4, 4, c), (s[0], 2 * s[1], 2 * s[2], s[1], s[2], s[3]))  # overlapping tiles
    # Bt d B, rows then columns; Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
    r = [d[:, :, :, 0] - d[:, :, :, 2], d[:, :, :, 1] + d[:, :, :, 2], d[:, :, :, 2] - d[:, :, :, 1]]
    r.append(d[:, :, :, 1] - d[:, :, :, 3])
    rows = torch.stack(r)  # (4, N, th, tw, 4, C)
    cols = [rows[..., 0, :] - rows[..., 2, :], rows[..., 1, :] + rows[..., 2, :], rows[..., 2, :] - rows[..., 1, :]]
    cols.append(rows[..., 1, :] - rows[..., 3, :])
    v = torch.stack(cols, 1).view(16, n * th * tw, c)  # (16, tiles, Cin)
    prod = torch.bmm(v, u).view(4, 4, n, th, tw, -1)  # (4, 4, N, th, tw, Cout)
    # At M A; At = [[1,1,1,0],[0,1,-1,-1]]
    s0 = prod[0] + prod[1] + prod[2]
    s1 = prod[1] - prod[2] - prod[3]
    y = torch.stack(
        [
            torch.stack([s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]], 3),
            torch.stack([s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]], 3),
        ],
        2,
    ).view(n, h, w, -1)  # (N, th, 2, tw, 2, Cout) -> NHWC
    if m.bias is not None:
        y += m.bias
    y = y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last
    if other is not None:
        y += other
    return y


class SdkernWinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (3x3, stride 1, padding 1, float32) by Winograd F(2x2, 3x3); NHWC output.

    The dense ``weight`` Parameter is kept as is (``state_dict`` and unpatch unchanged); the transformed
    filter lives in ``__dict__["_sdkern_wino"]`` and is rebuilt by :func:`sdkern.patch.cpu_engine.write_weight`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, Cin, H, W) -> (N, Cout, H, W), channels-last."""
        return winograd_conv2d(self, x, None)


def rewrite(m: nn.Conv2d, undo: list[Callable[[], None]]) -> None:
    """Rewrite ``m`` (see :func:`problem` first) onto Winograd; register the undo."""
    orig_cls = type(m)
    m.__dict__["_sdkern_wino"] = transform_filter(m.weight)
    m.__class__ = SdkernWinogradConv2d

    def restore() -> None:
        m.__class__ = orig_cls
        m.__dict__.pop("_sdkern_wino", None)

    undo.append(restore)
