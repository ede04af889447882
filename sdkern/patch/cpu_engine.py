"""The CPU engine: convolutions and GEMMs of a patched model on prepacked oneDNN primitives.

Eager PyTorch runs every ``nn.Conv2d`` / ``nn.Linear`` on CPU through oneDNN (or MKL) too, but it hands
the library the plain ``(O, I, kh, kw)`` / ``(O, I)`` weight on every call, so each call reorders the
weight into the blocked layout the primitive computes with (for a 1280x1280x3x3 conv that is a 59 MB
copy per call), and bias, residual adds and activations run as separate passes over the output.

The engine reorders each weight **once**, at patch time, into the layout oneDNN picks for it (a convolution's
again at its first call with a new input size: the layout its primitive wants depends on that size), and
calls oneDNN through PyTorch's own prepacked-primitive ops (the ones ``torch.compile``'s freezing path
uses: ``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``, with weights from
``torch.ops.mkldnn._reorder_convolution_weight`` (or ``torch._C._nn.mkldnn_reorder_conv2d_weight`` where that
is missing) / ``torch.ops.mkldnn._reorder_linear_weight``). Why these
and not a oneDNN linked by sdkern itself: they share PyTorch's oneDNN build, its primitive cache (a new
input shape costs one primitive creation, then hits the cache) and, above all, its GNU OpenMP runtime;
a second oneDNN from PyPI's ``onednn`` wheel brings Intel's OpenMP, and two OpenMP pools on the same
cores oversubscribe them. The ops are private to PyTorch, so :func:`unavailable_reason` probes them once
(existence, schema, a numerical smoke test) and the patcher leaves every module to PyTorch, with that
reason in the report, when the probe fails.

Weights are held once: the packed tensor replaces the module's ``weight`` Parameter (same name, so
``state_dict`` keys stay; its values are opaque until :func:`sdkern.unpatch` or ``to_dense()``), and
the original Parameter object is kept with empty storage. Unpatching reorders the packed weight back,
which is a permutation and therefore bit-exact, into the original Parameter object.

Fused epilogues: bias always; ``add`` of a residual (ResnetBlock2D ``conv2 + shortcut``, Transformer2D
``proj_out + residual``, the feed-forward output + residual); activations run with NHWC inputs so
activations stay channels-last from ``conv_in`` to ``conv_out``.

Two other forms (:mod:`sdkern.patch.cpu_engine_modules`): a convolution called with <= ``IM2COL_MAX_PIXELS`` output
pixels per image (64 with AVX-512; off without it, where the direct primitive is faster) runs as one GEMM over an
im2col of its NHWC input (its weight re-packed as the GEMM's matrix, one form held at a time), and a bf16 GEGLU
projection runs as two GEMMs, value and gate, with the erf GELU and the product in their epilogues (:func:`geglu`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdkern.patch.cpu_engine_modules import (
    IM2COL_MAX_PIXELS,
    SdkernConv2d,
    SdkernLinear,
    _im2col_ok,
    _reorder_conv,
    _reorder_linear,
    _swap_weight,
    compute_dtype,
    conv2d_add,
    dtype_problem,
    geglu,
    linear_add,
    write_weight,
)

__all__ = [
    "IM2COL_MAX_PIXELS",
    "SdkernConv2d",
    "SdkernLinear",
    "compute_dtype",
    "conv2d_add",
    "conv_problem",
    "dtype_problem",
    "geglu",
    "linear_add",
    "linear_problem",
    "pack_conv2d",
    "pack_linear",
    "unavailable_reason",
    "write_weight",
]

logger = logging.getLogger("sdkern")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the engine cannot run in this PyTorch build, or None when it can.

    Checks that PyTorch was built with oneDNN, that the prepacked-primitive ops exist with the
    signatures used here, and that a small convolution and linear through them match ``F.conv2d`` /
    ``F.linear`` (fp32). The result is cached for the process.
    """
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    try:
        mk = torch.ops.mkldnn
        ops = (
            mk._convolution_pointwise.default,
            mk._convolution_pointwise.binary,
            mk._linear_pointwise.default,
            mk._linear_pointwise.binary,
            mk._reorder_linear_weight,
            torch._C._nn.mkldnn_reorder_conv2d_weight,
        )
        del ops
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 8, 3, 3, generator=g)
        b = torch.randn(4, generator=g)
        other = torch.randn(1, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        wp = _reorder_conv(w, [1, 1], [1, 1], [1, 1], 1)
        y = mk._convolution_pointwise.binary(x, other, wp, b, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
        ref = F.conv2d(x, w, b, padding=1) + other
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-4):
            return "torch.ops.mkldnn._convolution_pointwise gave a wrong result in the start-up check"
        xl = torch.randn(3, 8, generator=g)
        wl = torch.randn(4, 8, generator=g)
        ol = torch.randn(3, 4, generator=g)
        yl = mk._linear_pointwise.binary(xl, ol, mk._reorder_linear_weight(wl, None), b, "add")
        if not torch.allclose(yl, F.linear(xl, wl, b) + ol, rtol=1e-4, atol=1e-4):
            return "torch.ops.mkldnn._linear_pointwise gave a wrong result in the start-up check"
    except (AttributeError, RuntimeError, TypeError) as e:  # private ops: absent or changed in this torch
        return f"PyTorch's prepacked oneDNN ops are unusable in torch {torch.__version__}: {e}"
    return None


def conv_problem(m: nn.Module) -> str | None:
    """Why the engine cannot run ``m`` (an ``nn.Conv2d``), or None when it can."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a plain nn.Conv2d"
    if m.weight.device.type != "cpu":
        return f"weights on {m.weight.device.type}, the engine is CPU-only"
    why = dtype_problem(compute_dtype(m.weight.dtype))
    if why is not None:
        return why
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only zero padding is fused into the primitive)"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} given as a string"
    if m.bias is not None and m.bias.dtype != m.weight.dtype:
        return "bias and weight dtypes differ"
    return None


def linear_problem(m: nn.Module) -> str | None:
    """Why the engine cannot run ``m`` (an ``nn.Linear``), or None when it can."""
    if type(m) is not nn.Linear:
        return f"{type(m).__name__} is not a plain nn.Linear"
    if m.weight.device.type != "cpu":
        return f"weights on {m.weight.device.type}, the engine is CPU-only"
    why = dtype_problem(compute_dtype(m.weight.dtype))
    if why is not None:
        return why
    if m.bias is not None and m.bias.dtype != m.weight.dtype:
        return "bias and weight dtypes differ"
    return None


def _is_pointwise(m: nn.Conv2d) -> bool:
    # 1x1, stride 1, no padding, one group: a GEMM over the NHWC pixels. oneDNN's convolution picks a
    # slow kernel for some of these with a packed weight (fp32 1280->1280 at 8x8: 120 ms vs 3.4 ms eager,
    # measured), its inner product does not.
    return (
        tuple(m.kernel_size) == (1, 1)
        and tuple(m.stride) == (1, 1)
        and tuple(m.padding) == (0, 0)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
    )


def pack_conv2d(m: nn.Conv2d, undo: list[Callable[[], None]], *, dense_out: bool = False) -> None:
    """Rewrite ``m`` onto the engine (see :func:`conv_problem` first).

    Parameters
    ----------
    m : nn.Conv2d
        Its weight (O, I/groups, kh, kw) is reordered once into oneDNN's blocked layout (a 1x1 stride-1
        convolution: into the inner-product layout of its (O, I) matrix, and it runs as a GEMM on the
        NHWC pixels).
    undo : list
        Receives the function that restores ``m`` bit-exactly.
    dense_out : bool
        Return contiguous NCHW (the model's last convolution: callers outside the model get the layout
        eager gives them); otherwise outputs are channels-last.
    """
    w = m.weight.detach().to(compute_dtype(m.weight.dtype))  # bf16 -> fp32 where the CPU has no bf16 primitives
    if _is_pointwise(m):
        packed = _reorder_linear(w.reshape(m.out_channels, m.in_channels))
    else:
        packed = _reorder_conv(w, list(m.padding), list(m.stride), list(m.dilation), m.groups)
    pointwise = _is_pointwise(m)
    _swap_weight(m, packed, undo, SdkernConv2d)
    m.__dict__["_sdkern_pointwise"] = pointwise
    m.__dict__["_sdkern_im2col"] = _im2col_ok(m)
    if dense_out:
        m.__dict__["_sdkern_dense_out"] = True


def pack_linear(m: nn.Linear, undo: list[Callable[[], None]], *, gated: bool = False) -> None:
    """Rewrite ``m`` onto the engine: its weight (O, I) is reordered once for oneDNN's inner product.

    ``gated``: ``m`` is a bfloat16 GEGLU projection (O = 2F: value rows, then gate rows); its two halves are packed
    as two (F, I) weights so that :func:`geglu` runs ``value * gelu(gate)`` in the GEMMs' epilogues.
    """
    if gated:
        if m.weight.dtype != torch.bfloat16 or compute_dtype(m.weight.dtype) != torch.bfloat16:
            # fp32: oneDNN's fp32 erf-GELU post-op is a few ulp less accurate than torch's (over 2x on tiny outputs),
            # and the fp32 step measured 0.95-0.99x with it: the engine packs fp32 GEGLUs as one GEMM
            raise ValueError(
                f"the gated GEGLU form is for bfloat16 weights on a CPU with bf16 primitives (got {m.weight.dtype}; "
                f"{dtype_problem(torch.bfloat16) or 'this CPU has them'})"
            )
        w = m.weight.detach()
        half = w.shape[0] // 2
        packed = _reorder_linear(w[:half])
        gate = _reorder_linear(w[half:])
        _swap_weight(m, packed, undo, SdkernLinear)
        m.__dict__["_sdkern_gate"] = gate
        return
    _swap_weight(m, _reorder_linear(m.weight.detach().to(compute_dtype(m.weight.dtype))), undo, SdkernLinear)
