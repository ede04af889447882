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
rewritten. At the step level (SD1.5 U-Net, 2 threads) the gain was small (+0 % at 32x32, +3 % at 64x64
latents) while the transforms were torch element-wise ops and copies.

The transforms: :func:`input_transform` / :func:`output_transform` run sdkern's fused C++ kernels
(``kernels/cpu/winograd_input.cpp``, ``winograd_output.cpp``; torch ops ``sdkern::winograd_input`` /
``sdkern::winograd_output`` with fake kernels for ``torch.compile``): one parallel pass from the channels-last
activation (padding and partial tiles of odd H/W included) to the GEMMs' (16, tiles, Cin) operand, and one
from their (16, tiles, Cout) output to the channels-last result with bias and the residual ``other`` added.
The 16 GEMMs stay one ``torch.bmm``. :func:`input_transform_torch` / :func:`output_transform_torch` are the
torch-op reference (bit-identical: same additions in the same order) and the fallback when ``sdkern._C``
lacks the kernels (the patch report says so); ``SDKERN_WINOGRAD_TRANSFORMS=torch`` (or :data:`TRANSFORMS`)
picks them for comparisons (``benchmarks/winograd_transforms.py``, ``cpu_peers.py``'s ``sdkern-wino-torch``).

Memory: the transformed filter is 16/9 of the weight and the original weight is kept (for ``state_dict``,
autograd and a bit-exact :func:`sdkern.unpatch`), so the rewritten convolutions hold 2.8x their
weights: about +3.6 GB on an SD1.5 U-Net in float32. That is why it is opt-in.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIN_CHANNELS",
    "TRANSFORMS",
    "TRANSFORMS_ENV",
    "SdkernWinogradConv2d",
    "input_transform",
    "input_transform_torch",
    "output_transform",
    "output_transform_torch",
    "problem",
    "report_detail",
    "rewrite",
    "shape_problem",
    "tiles",
    "transform_filter",
    "transforms_unavailable_reason",
    "winograd_conv2d",
]

logger = logging.getLogger("sdkern")

#: Winograd is used when both channel counts reach this (below it the transforms dominate; see the module doc)
MIN_CHANNELS = 640

#: environment variable choosing the transforms (read at import into :data:`TRANSFORMS`)
TRANSFORMS_ENV = "SDKERN_WINOGRAD_TRANSFORMS"
#: "auto" (the fused C++ kernels when sdkern._C has them, else torch ops), "fused" (raise when unavailable) or
#: "torch" (the reference torch ops: the old path, kept for comparisons); read at call time
TRANSFORMS: str = os.environ.get(TRANSFORMS_ENV, "auto")

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_KRON_G = torch.kron(_G, _G)  # (16, 9): [4a+b, 3k+l] = G[a,k] G[b,l]
_CHUNK = 1 << 15  # filter columns per float64 product in transform_filter (~3.4 MB of float64 in flight)


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
    o, i = weight.shape[:2]
    # U[4a+b, i, o] = sum_kl G[a,k] G[b,l] g[o,i,k,l]: one (16, 9) x (9, I*O) product, in float64 over column
    # chunks that stay in cache (3x faster than one einsum over the whole float64 weight; the same values: every
    # product is exact and the <= 9-term sums of float32 values are exact in float64, so one rounding at the end)
    g = weight.detach().reshape(o, i, 9).permute(2, 1, 0).reshape(9, i * o)  # (9, I*O), a float32 copy
    k = _KRON_G.to(weight.device)
    u = torch.empty((16, i * o), dtype=weight.dtype, device=weight.device)
    for s in range(0, i * o, _CHUNK):
        u[:, s : s + _CHUNK] = torch.mm(k, g[:, s : s + _CHUNK].double())
    return u.view(16, i, o)


def transforms_unavailable_reason() -> str | None:
    """Why the fused C++ transforms cannot run (then the torch transforms do), or None when they can."""
    if TRANSFORMS == "torch":
        return f"{TRANSFORMS_ENV}=torch"
    return _extension_reason()


@functools.cache
def _extension_reason() -> str | None:
    from sdkern.ops import _native

    mod = _native.load("_C")
    if mod is None:
        return _native.load_error("_C")
    missing = [f for f in ("winograd_input", "winograd_output") if not hasattr(mod, f)]
    if missing:
        return f"sdkern._C has no {' / '.join(missing)} (built from older sources)"
    return None


@torch.compiler.assume_constant_result  # torch.compile: decided once at trace time (a guard-free constant)
def _fused() -> bool:
    if TRANSFORMS not in ("auto", "fused", "torch"):
        raise ValueError(f"{TRANSFORMS_ENV} (winograd.TRANSFORMS) must be auto, fused or torch, got {TRANSFORMS!r}")
    why = transforms_unavailable_reason()
    if why is not None and TRANSFORMS == "fused":
        raise RuntimeError(f"sdkern Winograd: fused transforms requested but unavailable: {why}")
    if why is not None and TRANSFORMS == "auto":
        _log_fallback(why)
    return why is None


@functools.cache
def _log_fallback(why: str) -> None:
    logger.warning("sdkern Winograd: fused C++ transforms unavailable (%s); running the torch-op transforms", why)


def report_detail(m: nn.Conv2d) -> str:
    """The patch report's line for a convolution rewritten to Winograd (says which transforms run, and why)."""
    base = f"3x3 conv {m.in_channels}->{m.out_channels}: Winograd F(2x2,3x3)"
    why = transforms_unavailable_reason()
    return f"{base}, fused C++ transforms" if why is None else f"{base}, torch transforms ({why})"


def tiles(n: int, h: int, w: int) -> int:
    """Number of 4x4 input (2x2 output) tiles of an (n, ., h, w) activation: n * ceil(h/2) * ceil(w/2)."""
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    # the C++ transforms read activations with channel stride 1 (what the engine feeds); others are copied once
    return t if t.shape[1] == 1 or t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def input_transform(x: torch.Tensor) -> torch.Tensor:
    """V = Bt d B over the 4x4 tiles of ``x`` zero-padded by 1 (fused C++ kernel, else :func:`input_transform_torch`).

    Parameters
    ----------
    x : Tensor (N, C, H, W) float32, any memory format (channels-last is read in place)

    Returns
    -------
    Tensor (16, T, C) contiguous, T = N * ceil(H/2) * ceil(W/2); row ``4 a + b`` holds position (a, b) of the
    transformed tiles, tile ``t = (n * ceil(H/2) + ty) * ceil(W/2) + tx``.
    """
    if _fused():
        return torch.ops.sdkern.winograd_input(_channels_last(x))
    return input_transform_torch(x)


def output_transform(
    prod: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None, n: int, h: int, w: int
) -> torch.Tensor:
    """Y = At M A per tile, + bias, + other (fused C++ kernel, else :func:`output_transform_torch`).

    Parameters
    ----------
    prod : Tensor (16, T, Cout) float32 contiguous
        The 16 GEMMs' output M.
    bias : Tensor (Cout,) or None
    other : Tensor (N, Cout, H, W) or None
        Residual added to the output (any memory format; channels-last is read in place).
    n, h, w : int
        Batch and spatial size of the output (partial tiles when h or w is odd).

    Returns
    -------
    Tensor (N, Cout, H, W), channels-last.
    """
    if _fused():
        other = None if other is None else _channels_last(other)
        return torch.ops.sdkern.winograd_output(prod, bias, other, n, h, w)
    return output_transform_torch(prod, bias, other, n, h, w)


def input_transform_torch(x: torch.Tensor) -> torch.Tensor:
    """The reference of :func:`input_transform` in torch ops (and its fallback); same arguments and result."""
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + w % 2, 1, 1 + h % 2))  # (N, 2th+2, 2tw+2, C): padded NHWC
    s = xp.stride()
    d = xp.as_strided((n, th, tw, 4, 4, c), (s[0], 2 * s[1], 2 * s[2], s[1], s[2], s[3]))  # overlapping tiles
    # Bt d B, rows then columns; Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
    r = [d[:, :, :, 0] - d[:, :, :, 2], d[:, :, :, 1] + d[:, :, :, 2], d[:, :, :, 2] - d[:, :, :, 1]]
    r.append(d[:, :, :, 1] - d[:, :, :, 3])
    rows = torch.stack(r)  # (4, N, th, tw, 4, C)
    cols = [rows[..., 0, :] - rows[..., 2, :], rows[..., 1, :] + rows[..., 2, :], rows[..., 2, :] - rows[..., 1, :]]
    cols.append(rows[..., 1, :] - rows[..., 3, :])
    return torch.stack(cols, 1).view(16, n * th * tw, c)  # (16, tiles, Cin)


def output_transform_torch(
    prod: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None, n: int, h: int, w: int
) -> torch.Tensor:
    """The reference of :func:`output_transform` in torch ops (and its fallback); same arguments and result."""
    th, tw = (h + 1) // 2, (w + 1) // 2
    prod = prod.view(4, 4, n, th, tw, -1)  # (4, 4, N, th, tw, Cout)
    # At M A; At = [[1,1,1,0],[0,1,-1,-1]]
    s0 = prod[0] + prod[1] + prod[2]
    s1 = prod[1] - prod[2] - prod[3]
    y = torch.stack(
        [
            torch.stack([s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]], 3),
            torch.stack([s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]], 3),
        ],
        2,
    ).view(n, 2 * th, 2 * tw, -1)  # (N, th, 2, tw, 2, Cout) -> NHWC
    if h % 2 or w % 2:  # partial tiles: drop the row/column outside the image
        y = y[:, :h, :w].contiguous()
    if bias is not None:
        y += bias
    y = y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last
    if other is not None:
        y += other
    return y


def winograd_conv2d(m: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """``m(x) + other`` by Winograd F(2x2, 3x3): input transform, 16 GEMMs (one ``torch.bmm``), output transform.

    The transforms are sdkern's fused C++ kernels (``sdkern::winograd_input`` / ``sdkern::winograd_output``)
    when the extension has them and :data:`TRANSFORMS` allows, else :func:`input_transform_torch` /
    :func:`output_transform_torch`. Autograd (an input that requires grad), non-float32 inputs and H or W of 1
    run the direct convolution.

    Parameters
    ----------
    m : SdkernWinogradConv2d
    x : Tensor (N, Cin, H, W), any memory format
    other : Tensor (N, Cout, H, W) or None

    Returns
    -------
    Tensor (N, Cout, H, W), channels-last.
    """
    n, _c, h, w = x.shape
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, m.weight, m.bias, other))
    # the direct convolution: autograd (it sees the weight); H or W of 1, where 2 of the 3 filter rows/columns
    # meet padding and Winograd's transform roundings reach ~2-4x the direct convolution's error (measured)
    if x.dtype != torch.float32 or grad or h < 2 or w < 2:
        y = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        y = y.contiguous(memory_format=torch.channels_last)
        return y if other is None else y + other
    u: torch.Tensor = m.__dict__["_sdkern_wino"]
    prod = torch.bmm(input_transform(x), u)  # (16, tiles, Cout): the 16 GEMMs over input channels
    return output_transform(prod, m.bias, other, n, h, w)


@torch.library.custom_op("sdkern::winograd_input", mutates_args=())
def _winograd_input(x: torch.Tensor) -> torch.Tensor:
    """:func:`input_transform` by the C++ kernel; x (N, C, H, W) float32 with channel stride 1."""
    from sdkern import _C

    n, c, h, w = x.shape
    v = x.new_empty((16, tiles(n, h, w), c))  # the kernel writes every element
    _C.winograd_input(x.data_ptr(), v.data_ptr(), n, c, h, w, *x.stride(), _native_code(x))
    return v


@_winograd_input.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty((16, tiles(n, h, w), c))


@torch.library.custom_op("sdkern::winograd_output", mutates_args=())
def _winograd_output(
    prod: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None, n: int, h: int, w: int
) -> torch.Tensor:
    """:func:`output_transform` by the C++ kernel; ``other`` with channel stride 1."""
    from sdkern import _C

    k = prod.shape[2]
    if prod.shape != (16, tiles(n, h, w), k) or not prod.is_contiguous():
        raise ValueError(f"sdkern.winograd_output: M must be contiguous (16, {tiles(n, h, w)}, K), got {prod.shape}")
    if bias is not None and (bias.shape != (k,) or bias.dtype != prod.dtype or not bias.is_contiguous()):
        raise ValueError(f"sdkern.winograd_output: bias must be a contiguous ({k},) {prod.dtype} tensor")
    if other is not None and (other.shape != (n, k, h, w) or other.dtype != prod.dtype):
        raise ValueError(f"sdkern.winograd_output: other must be ({n}, {k}, {h}, {w}) {prod.dtype}")
    y = torch.empty((n, k, h, w), dtype=prod.dtype, memory_format=torch.channels_last)  # the kernel writes all of it
    osn, osc, osh, osw = other.stride() if other is not None else (0, 1, 0, 0)
    _C.winograd_output(
        prod.data_ptr(), _ptr(bias), _ptr(other), y.data_ptr(), n, k, h, w, osn, osc, osh, osw, _native_code(prod)
    )
    return y


@_winograd_output.register_fake
def _(
    prod: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None, n: int, h: int, w: int
) -> torch.Tensor:
    return torch.empty(
        (n, prod.shape[2], h, w), dtype=prod.dtype, device=prod.device, memory_format=torch.channels_last
    )


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _native_code(t: torch.Tensor) -> int:
    from sdkern.ops._native import DTYPE_CODE

    code = DTYPE_CODE.get(t.dtype)
    if code is None:
        raise TypeError(f"sdkern Winograd transforms run float32 only, got {t.dtype}")
    return code


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
