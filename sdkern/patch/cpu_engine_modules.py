"""The CPU engine's modules (:mod:`sdkern.patch.cpu_engine`): ``nn.Conv2d`` / ``nn.Linear`` whose weight is held
prepacked for oneDNN, the fused ``conv + bias + residual`` / ``linear + bias + residual`` calls, the custom ops a
compiled graph calls instead, and :func:`write_weight` (used by LoRA to update one packed weight in place).

Weights are held once: the packed tensor replaces the module's ``weight`` Parameter (same name, so ``state_dict``
keys stay; ``state_dict()`` gives it dense and ``load_state_dict`` re-packs) and the original Parameter object is
kept with empty storage; the undo reorders the packed weight back (a permutation: bit-exact) into it.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IM2COL_MAX_PIXELS",
    "SdkernConv2d",
    "SdkernLinear",
    "compute_dtype",
    "conv2d_add",
    "cpu_has_avx512",
    "dtype_problem",
    "geglu",
    "linear_add",
    "repack_for_size",
    "write_weight",
]

_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def dtype_problem(dtype: torch.dtype) -> str | None:
    """Why the engine cannot run weights of ``dtype`` on this CPU, or None when it can (cached per dtype).

    float32 runs everywhere oneDNN does. PyTorch's bfloat16 oneDNN primitives need a CPU with AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT; elsewhere (e.g. AMD Zen 3, Intel before Cooper Lake) their weight reorders raise, and
    :func:`compute_dtype` makes the engine hold bf16 weights as fp32. Probed by packing and running a small bf16
    inner product and convolution against ``F.linear`` / ``F.conv2d``.
    """
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the engine runs float32 and bfloat16)"
    if dtype == torch.float32:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).to(dtype)
    w = torch.randn(8, 16, generator=g).to(dtype)
    xc = torch.randn(1, 16, 4, 4, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(8, 16, 3, 3, generator=g).to(dtype)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, _reorder_linear(w), None, "none", [], "")
        yc = torch.ops.mkldnn._convolution_pointwise(
            xc, _reorder_conv(wc, [1, 1], [1, 1], [1, 1], 1), None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
    except (AttributeError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"PyTorch's {dtype} oneDNN primitives are unavailable on this CPU ({first})"
    ok = torch.allclose(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2) and torch.allclose(
        yc.float(), F.conv2d(xc, wc, padding=1).float(), rtol=2e-2, atol=5e-2
    )
    return None if ok else f"PyTorch's {dtype} oneDNN primitives gave a wrong result in the start-up check"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine packs and computes weights of ``dtype`` in (see :func:`dtype_problem` first).

    ``dtype`` itself where this CPU has oneDNN primitives for it; float32 for bfloat16 on a CPU without bf16
    primitives (AMD Zen 3, Intel before Cooper Lake): there PyTorch's own bf16 convolution falls back to a
    reference path (a 320->320 3x3 convolution at 64x64: 29 s vs 0.10 s in fp32 on an AMD EPYC, measured in
    benchmarks/results/cpu_engine_session13.md), so the engine holds the bf16 weight as fp32 (exact) and runs
    fp32 primitives with bf16 activations converted at the module's boundary.
    """
    if dtype == torch.bfloat16 and dtype_problem(dtype) is not None:
        return torch.float32
    return dtype


# A convolution whose output has at most IM2COL_MAX_PIXELS pixels per image runs as one GEMM over an im2col of
# its NHWC input, with the weight packed as the (O, kh*kw*I) matrix of oneDNN's inner product. The weight is held
# in one form at a time: the first call at <= IM2COL_MAX_PIXELS re-packs it into the GEMM form, a call above
# CONV_MIN_PIXELS back into the convolution form (hysteresis, so alternating 512 / 768 px images do not re-pack
# every step). SDKERN_IM2COL_MAX_PIXELS in the environment (or IM2COL_MAX_PIXELS set before the first call)
# overrides the default; 0 keeps every convolution direct.
# The default depends on the ISA, by measurement: with AVX-512 64 px (bf16 1280->1280 3x3 at 4x4 1.5x, at 8x8
# 1.1-1.2x over the direct primitive, fp32 1.1-1.6x; benchmarks/results/cpu_engine_session10.md, measured before
# direct weights were packed for the call's input size, so to be re-measured there); on AVX2 0: the direct
# primitive with its weight packed for the input size is 1.1-1.3x the GEMM form at every SD1.5 shape from 4x4
# to 16x16 (benchmarks/results/cpu_engine_session14.md).
def cpu_has_avx512() -> bool:
    """Whether torch's own CPU dispatch level ("DEFAULT", "AVX2", "AVX512", ...), which its oneDNN runs with, is
    AVX-512: the engine's per-ISA choices (this threshold, the attention kernel) key on it."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


IM2COL_MAX_PIXELS = int(os.environ.get("SDKERN_IM2COL_MAX_PIXELS", 64 if cpu_has_avx512() else 0))
CONV_MIN_PIXELS = 256
_FORM_LOCK = threading.Lock()


@functools.cache
def _dense_conv_reorder() -> Any:
    """``torch.ops.mkldnn._reorder_convolution_weight`` (private, inductor's freezing op: one reorder from the dense
    weight, ~2x faster than ``to_mkldnn`` + ``mkldnn_reorder_conv2d_weight``) when it exists and packs a probe
    weight exactly as the public two-step path does; None otherwise (the two-step path is used)."""
    try:
        op = torch.ops.mkldnn._reorder_convolution_weight
        w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0))
        a = op(w, [1, 1], [1, 1], [1, 1], 1, None)
        b = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, None)
        if torch.ops.mkldnn._nbytes(a) == torch.ops.mkldnn._nbytes(b) and torch.equal(a.to_dense(), b.to_dense()):
            return op
    except (AttributeError, RuntimeError, TypeError):
        pass
    return None


def _reorder_conv(
    w: torch.Tensor,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
    input_size: tuple[int, ...] | None = None,
) -> Any:
    # w (O, I/groups, kh, kw) dense -> opaque oneDNN tensor in the blocked layout the primitive for an input of
    # input_size (N, C, H, W) expects; None: oneDNN's guess for an unknown input, which is often not that layout
    # (see _weight_for)
    w = w.detach().contiguous()
    size = None if input_size is None else list(input_size)
    op = _dense_conv_reorder()
    if op is not None:
        return op(w, padding, stride, dilation, groups, size)
    return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), padding, stride, dilation, groups, size)


def _reorder_linear(w: torch.Tensor) -> Any:
    # w (O, I) dense -> opaque oneDNN inner-product weight
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


def _reorder_im2col(w: torch.Tensor) -> Any:
    # w (O, I, kh, kw) dense -> opaque oneDNN inner-product weight of the (O, kh*kw*I) matrix, (kh, kw, I) order
    o = w.shape[0]
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().permute(0, 2, 3, 1).reshape(o, -1).contiguous(), None)


def _im2col_ok(m: nn.Conv2d) -> bool:
    """Can ``m`` run as a GEMM over an im2col of its input (one group, no dilation; any kernel, stride, padding)."""
    return m.groups == 1 and tuple(m.dilation) == (1, 1) and not m.__dict__.get("_sdkern_pointwise", False)


def _out_hw(m: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _weight_for(m: nn.Conv2d, size: tuple[int, ...], pixels: int) -> torch.Tensor:
    """``m``'s packed weight in the form and layout a call on an input of ``size`` (N, C, H, W) with ``pixels``
    output pixels per image runs best on.

    Returns the 4-D convolution form or the 2-D im2col-GEMM form (only where ``m`` may take it); re-packs (under a
    lock, once per crossing of the thresholds) when the held form is the other one. The 4-D form is packed for
    the input size of the call: the blocked weight layout oneDNN's convolution wants depends on it (on AVX2 a
    320->320 3x3 convolution at 32x32 wants Acdb24a where the size-less reorder gives Acdb32a, and then
    oneDNN reorders the 3.7 MB weight inside every call: 48 ms vs 19 ms, benchmarks/results/cpu_engine_session14.md).
    So the first call at a new input size re-packs the 4-D form for it (one reorder of this weight; a model
    called at one size packs once). The form is read from the returned tensor itself, so a thread that fetched
    the weight before another re-packed it still runs a consistent (weight, path) pair; a weight packed for
    another size is still correct, only slower.
    """
    w = m.weight
    im2col = w.dim() == 2
    if m.__dict__.get("_sdkern_im2col", False) and (
        pixels <= IM2COL_MAX_PIXELS or (im2col and pixels <= CONV_MIN_PIXELS)
    ):
        if im2col:
            return w
        with _FORM_LOCK:
            if m.weight.dim() != 2:  # (else another thread re-packed it meanwhile)
                dense = m.dense_weight().to(m.weight.dtype)  # type: ignore[operator]  (the packed dtype)
                m._parameters["weight"] = nn.Parameter(_reorder_im2col(dense), requires_grad=False)
                m.__dict__.pop("_sdkern_packed_for", None)
            return m._parameters["weight"]
    # the direct form, packed for this size (from the GEMM form too: it has no _sdkern_packed_for)
    return repack_for_size(m, size, lambda dense, size: _reorder_conv(dense, *_conv_args(m), size))


def _conv_args(m: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    return list(m.padding), list(m.stride), list(m.dilation), m.groups


def repack_for_size(
    m: nn.Module, size: tuple[int, ...], pack: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
) -> torch.Tensor:
    """``m``'s packed convolution weight, re-packed by ``pack(dense, size)`` first unless it was packed for an input
    of ``size`` already (see :func:`_weight_for`; for engine modules defined with their rules, e.g. SVD's temporal
    convolution). A weight packed for another size is still correct, only slower."""
    if m.__dict__.get("_sdkern_packed_for") == size:
        return m.weight
    with _FORM_LOCK:
        if m.__dict__.get("_sdkern_packed_for") != size:
            dense = m.dense_weight().to(m.weight.dtype)  # type: ignore[operator]  (the packed dtype)
            m._parameters["weight"] = nn.Parameter(pack(dense, size), requires_grad=False)
            m.__dict__["_sdkern_packed_for"] = size
        return m._parameters["weight"]


def _im2col_gemm(
    m: nn.Conv2d,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    other: torch.Tensor | None,
    ho: int,
    wo: int,
) -> torch.Tensor:
    """The convolution as one GEMM: (N*Ho*Wo, kh*kw*Cin) columns times the packed (Cout, kh*kw*Cin) weight.

    x (N, Cin, H, W) channels-last; other (N, Cout, Ho, Wo) or None; returns (N, Cout, Ho, Wo) channels-last.
    """
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
    xh = x.permute(0, 2, 3, 1)  # (N, H, W, Cin), a view of the channels-last x
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    taps = [xh[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)]
    cols = (torch.cat(taps, dim=-1) if len(taps) > 1 else taps[0].contiguous()).view(n * ho * wo, kh * kw * c)
    if other is None:
        y = torch.ops.mkldnn._linear_pointwise(cols, w, bias, "none", [], "")
    else:
        res = other.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * ho * wo, -1)
        y = torch.ops.mkldnn._linear_pointwise.binary(cols, res, w, bias, "add")
    return y.view(n, ho, wo, -1).permute(0, 3, 1, 2)


# torch.compile: a traced graph must not hold the opaque packed weights (inductor cannot lower oneDNN-layout
# graph inputs), so under compilation the engine runs as the custom ops below, which reach their module
# through an integer handle; the packed weight never enters the graph.
_HANDLES: dict[int, weakref.ref[nn.Module]] = {}
_next_handle = itertools.count(1)


def _module(handle: int) -> nn.Module:
    ref = _HANDLES.get(handle)
    m = ref() if ref is not None else None
    if m is None or "_sdkern_wshape" not in m.__dict__:
        raise RuntimeError(f"sdkern CPU engine: module handle {handle} is gone (unpatched or freed); recompile")
    return m


def _swap_weight(m: nn.Module, packed: torch.Tensor, undo: list[Callable[[], None]], cls: type) -> None:
    """Install ``packed`` as ``m.weight`` and free the original Parameter's storage; register the undo."""
    orig: nn.Parameter = m.weight
    handle = next(_next_handle)
    _HANDLES[handle] = weakref.ref(m)
    m.__dict__["_sdkern_handle"] = handle
    orig_cls = type(m)
    cl = torch.channels_last
    channels_last = orig.dim() == 4 and not orig.is_contiguous() and orig.is_contiguous(memory_format=cl)
    m.__dict__["_sdkern_wshape"] = tuple(orig.shape)  # the logical shape (a 1x1 conv packs as a 2-D GEMM weight)
    m.__dict__["_sdkern_weight_grad"] = orig.requires_grad  # a training setup: refuse grad-mode calls (see forward)
    if packed.dtype != orig.dtype:  # bf16 held as fp32 (compute_dtype): activations converted at the boundary
        m.__dict__["_sdkern_io"] = orig.dtype
    m._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
    with torch.no_grad():
        orig.data = torch.empty(0, dtype=orig.dtype, device=orig.device)
    m.__class__ = cls

    def restore() -> None:
        dense = m.dense_weight()
        if channels_last:
            dense = dense.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            orig.data = dense
        m._parameters["weight"] = orig
        m.__class__ = orig_cls
        _HANDLES.pop(handle, None)
        for k in (
            "_sdkern_dense_out", "_sdkern_wshape", "_sdkern_pointwise", "_sdkern_im2col", "_sdkern_weight_grad",
            "_sdkern_handle", "_sdkern_gate", "_sdkern_io", "_sdkern_packed_for",
        ):  # fmt: skip
            m.__dict__.pop(k, None)

    undo.append(restore)


def _io_dtype(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a dense weight of ``m``) in the module's own dtype: bf16 where the engine holds it as fp32 (exact:
    every value came from bf16)."""
    io = m.__dict__.get("_sdkern_io")
    return t if io is None else t.to(io)


def _to_compute(m: nn.Module, *ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Activations (and the bias) of a call converted to the packed weight's dtype (a no-op unless ``m`` holds
    a bf16 weight as fp32); memory formats are kept."""
    if "_sdkern_io" not in m.__dict__:
        return ts
    return tuple(None if t is None else t.float() for t in ts)


class _PackedWeight:
    """state_dict support for a module whose ``weight`` is held packed: saved dense, loaded by re-packing."""

    def dense_weight(self) -> torch.Tensor:
        """The weight unpacked (a bit-exact dense copy) in its logical shape, e.g. (O, I, kh, kw), and dtype."""
        w = self.weight.detach().to_dense().reshape(self.__dict__["_sdkern_wshape"])  # type: ignore[attr-defined]
        return _io_dtype(self, w)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if not keep_vars:
            destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        value = state_dict.get(key)
        if value is not None and not value.is_mkldnn:
            if tuple(value.shape) != self.__dict__["_sdkern_wshape"]:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                    f"the shape in current model is {self.__dict__['_sdkern_wshape']}."
                )
            else:
                write_weight(self, value)  # type: ignore[arg-type]
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            local_metadata = dict(local_metadata)
            missing = list(missing_keys)
            super()._load_from_state_dict(  # type: ignore[misc]
                state_dict, prefix, local_metadata, strict, missing, unexpected_keys, error_msgs
            )
            missing_keys.extend(k for k in missing if k != key)
            return
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _needs_autograd(m: nn.Module, *tensors: torch.Tensor | None) -> bool:
    """True when autograd must see this call (grad mode and an input that requires grad).

    Raises when a gradient of the packed weight itself would be needed: the engine holds weights for
    inference and cannot give the original Parameter its gradient.
    """
    if not torch.is_grad_enabled():
        return False
    if m.__dict__.get("_sdkern_weight_grad", False):
        raise RuntimeError(
            f"sdkern.patch: the CPU engine prepacks this {type(m).__bases__[-1].__name__}'s weight for inference, "
            "so it cannot compute the weight's gradient. Run inference under torch.no_grad() / "
            "torch.inference_mode() (diffusers pipelines do), or patch with cpu_engine=False to train "
            "(or call sdkern.unpatch first)."
        )
    return any(t is not None and t.requires_grad for t in tensors)


class SdkernConv2d(_PackedWeight, nn.Conv2d):
    """``nn.Conv2d`` on a prepacked oneDNN primitive; NHWC (channels-last) activations in and out.

    ``weight`` holds the packed (opaque) tensor while patched; ``state_dict()`` gives it dense and
    ``load_state_dict`` re-packs. With autograd recording and an input
    that requires grad, the convolution runs as ``F.conv2d`` on the unpacked weight (gradients reach
    the input; the packed weight is frozen while patched).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, Cin, H, W), any memory format -> (N, Cout, H', W'), channels-last."""
        return conv2d_add(self, x, None)

    def dense_weight(self) -> torch.Tensor:
        """The weight unpacked (a bit-exact dense copy), (O, I, kh, kw), from whichever form is held."""
        w = self.weight.detach()
        if w.dim() == 2 and not self.__dict__.get("_sdkern_pointwise", False):  # im2col form: (O, kh*kw*I)
            o, i, kh, kw = self.__dict__["_sdkern_wshape"]
            return _io_dtype(self, w.to_dense().view(o, kh, kw, i).permute(0, 3, 1, 2).contiguous())
        return super().dense_weight()


def conv2d_add(m: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """``m(x) + other`` in one primitive (bias and the add are the convolution's epilogue).

    Parameters
    ----------
    m : SdkernConv2d
    x : Tensor (N, Cin, H, W)
    other : Tensor (N, Cout, H', W') or None
        Residual added to the output.

    Returns
    -------
    Tensor (N, Cout, H', W'), channels-last (contiguous NCHW for a ``dense_out`` convolution).
    """
    if "_sdkern_wino" in m.__dict__:  # PatchConfig.winograd (plain torch ops: traceable as they are)
        from sdkern.patch.winograd import winograd_conv2d

        return winograd_conv2d(m, x, other)
    if torch.compiler.is_compiling():
        return torch.ops.sdkern.engine_conv2d(x, other, m.__dict__["_sdkern_handle"])
    return _conv2d_add(m, x, other)


def _conv2d_add(m: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    w = m.weight
    io = m.__dict__.get("_sdkern_io", w.dtype)
    if _needs_autograd(m, x, other) or x.dtype != io or x.dim() != 4:
        y = F.conv2d(x, m.dense_weight(), m.bias, m.stride, m.padding, m.dilation, m.groups)
        return y if other is None else y + other
    if io != w.dtype:  # a bf16 weight held as fp32 (compute_dtype): fp32 primitives, bf16 at the boundary
        x, other, bias = _to_compute(m, x, other, m.bias)
        return _conv2d_run(m, x, other, bias).to(io)  # type: ignore[arg-type]
    return _conv2d_run(m, x, other, m.bias)


def _conv2d_run(m: nn.Conv2d, x: torch.Tensor, other: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    # x (N, Cin, H, W), other (N, Cout, H', W') or None, bias (Cout,) or None, all in the packed weight's dtype
    w = m.weight
    x = x.contiguous(memory_format=torch.channels_last)
    if m.__dict__.get("_sdkern_pointwise", False):
        n, _, h, wd = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n * h * wd, -1)  # a view: x is NHWC
        if other is None:
            y = torch.ops.mkldnn._linear_pointwise(tokens, w, bias, "none", [], "")
        else:
            res = other.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * wd, -1)
            y = torch.ops.mkldnn._linear_pointwise.binary(tokens, res, w, bias, "add")
        y = y.view(n, h, wd, -1).permute(0, 3, 1, 2)
    else:
        ho, wo = _out_hw(m, x.shape[2], x.shape[3])
        w = _weight_for(m, tuple(x.shape), ho * wo)
        if w.dim() == 2:
            y = _im2col_gemm(m, x, w, bias, other, ho, wo)
        else:
            y = _conv_primitive(m, x, w, bias, other)
    if m.__dict__.get("_sdkern_dense_out", False):
        y = y.contiguous()
    return y


def _conv_primitive(
    m: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None
) -> torch.Tensor:
    """oneDNN's convolution on the packed 4-D weight; x channels-last, returns channels-last."""
    args = (list(m.padding), list(m.stride), list(m.dilation), m.groups)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, *args, "none", [], "")
    other = other.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, w, bias, *args, "add", 1.0, None, [], None)


class SdkernLinear(_PackedWeight, nn.Linear):
    """``nn.Linear`` on a prepacked oneDNN inner product (weight reordered once; dense in ``state_dict()``).

    A GEGLU projection (``pack_linear(..., gated=True)``) holds its (2F, in) weight as two packed halves:
    ``weight`` the value rows, ``__dict__["_sdkern_gate"]`` the gate rows (see :func:`geglu`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        return linear_add(self, x, None)

    def dense_weight(self) -> torch.Tensor:
        """The weight unpacked (a bit-exact dense copy), (out, in); both halves of a gated projection."""
        gate = self.__dict__.get("_sdkern_gate")
        if gate is None:
            return super().dense_weight()
        return torch.cat([self.weight.detach().to_dense(), gate.to_dense()])


def geglu(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` of a gated GEGLU projection ``m``, the GELU and the product in the GEMMs' epilogues.

    Parameters
    ----------
    m : SdkernLinear
        Packed with ``gated=True``: value half (F, in) in ``weight``, gate half in ``__dict__["_sdkern_gate"]``.
    x : Tensor (..., in)

    Returns
    -------
    Tensor (..., F), contiguous: ``(x Wv^T + bv) * gelu(x Wg^T + bg)`` (exact erf GELU, like ``F.gelu``).
    """
    if torch.compiler.is_compiling():
        return torch.ops.sdkern.engine_geglu(x, m.__dict__["_sdkern_handle"])
    return _geglu(m, x)


def _geglu(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, gate = m.weight, m.__dict__["_sdkern_gate"]
    f = w.shape[0]
    if _needs_autograd(m, x) or x.dtype != w.dtype or x.dim() < 2:
        h = F.linear(x, m.dense_weight(), m.bias)
        return h[..., :f] * F.gelu(h[..., f:])
    x = x.contiguous()
    bv, bg = (None, None) if m.bias is None else (m.bias[:f], m.bias[f:])
    g = torch.ops.mkldnn._linear_pointwise(x, gate, bg, "gelu", [], "none")  # "none": erf GELU, not tanh
    return torch.ops.mkldnn._linear_pointwise.binary(x, g, w, bv, "mul")


def linear_add(m: nn.Linear, x: torch.Tensor, other: torch.Tensor | None, *, bias: bool = True) -> torch.Tensor:
    """``m(x) + other`` in one primitive (bias and the add are the GEMM's epilogue).

    Parameters
    ----------
    m : SdkernLinear
    x : Tensor (..., in)
    other : Tensor (..., out) or None
        Residual added to the output.
    bias : bool
        Add ``m.bias`` (False: the caller adds it later, e.g. in ``bias_split_gelu``).

    Returns
    -------
    Tensor (..., out), contiguous.
    """
    if torch.compiler.is_compiling():
        return torch.ops.sdkern.engine_linear(x, other, m.__dict__["_sdkern_handle"], bias)
    return _linear_add(m, x, other, bias)


def _linear_add(m: nn.Linear, x: torch.Tensor, other: torch.Tensor | None, bias: bool) -> torch.Tensor:
    w = m.weight
    b = m.bias if bias else None
    io = m.__dict__.get("_sdkern_io", w.dtype)
    if _needs_autograd(m, x, other) or x.dtype != io or x.dim() < 2 or "_sdkern_gate" in m.__dict__:
        # (a gated GEGLU projection called as a plain Linear, e.g. by a wrapper: both halves, concatenated)
        y = F.linear(x, m.dense_weight(), b)
        return y if other is None else y + other
    if io != w.dtype:  # a bf16 weight held as fp32 (compute_dtype)
        x, other, b = _to_compute(m, x, other, b)  # type: ignore[assignment]
    x = x.contiguous()
    if other is None:
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), w, b, "add")
    return y if io == w.dtype else y.to(io)


@torch.library.custom_op("sdkern::engine_conv2d", mutates_args=())
def _engine_conv2d(x: torch.Tensor, other: torch.Tensor | None, handle: int) -> torch.Tensor:
    """:func:`conv2d_add` of the engine module ``handle`` (the form a compiled graph calls)."""
    y = _conv2d_add(_module(handle), x, other)
    return y.clone() if y is x or y is other else y


@_engine_conv2d.register_fake
def _(x: torch.Tensor, other: torch.Tensor | None, handle: int) -> torch.Tensor:
    m = _module(handle)
    n, _, h, w = x.shape
    kh, kw = m.kernel_size
    ho = (h + 2 * m.padding[0] - m.dilation[0] * (kh - 1) - 1) // m.stride[0] + 1
    wo = (w + 2 * m.padding[1] - m.dilation[1] * (kw - 1) - 1) // m.stride[1] + 1
    fmt = torch.contiguous_format if m.__dict__.get("_sdkern_dense_out", False) else torch.channels_last
    return x.new_empty((n, m.out_channels, ho, wo), memory_format=fmt)


@torch.library.custom_op("sdkern::engine_linear", mutates_args=())
def _engine_linear(x: torch.Tensor, other: torch.Tensor | None, handle: int, bias: bool) -> torch.Tensor:
    """:func:`linear_add` of the engine module ``handle`` (the form a compiled graph calls)."""
    return _linear_add(_module(handle), x, other, bias)


@_engine_linear.register_fake
def _(x: torch.Tensor, other: torch.Tensor | None, handle: int, bias: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _module(handle).out_features))


@torch.library.custom_op("sdkern::engine_geglu", mutates_args=())
def _engine_geglu(x: torch.Tensor, handle: int) -> torch.Tensor:
    """:func:`geglu` of the gated engine module ``handle`` (the form a compiled graph calls)."""
    return _geglu(_module(handle), x)


@_engine_geglu.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _module(handle).out_features // 2))


@torch.no_grad()
def write_weight(m: nn.Module, value: torch.Tensor) -> None:
    """Set the weight of ``m`` to ``value`` (same shape) in place; an engine module re-packs just this weight.

    Used by :mod:`sdkern.lora` so that fusing an adapter into a patched model touches only the layers
    it adapts. For modules without a packed weight this is ``m.weight.copy_(value)`` (storage kept, so
    views and captured graphs stay valid).
    """
    w = m.weight
    if not w.is_mkldnn:
        w.copy_(value)
        if "_sdkern_wino" in m.__dict__:  # a Winograd convolution: re-transform its filter
            from sdkern.patch.winograd import transform_filter

            m.__dict__["_sdkern_wino"] = transform_filter(w)
        return
    shape = m.__dict__["_sdkern_wshape"]
    if tuple(value.shape) != shape:
        raise ValueError(f"weight of shape {shape} cannot take a value of shape {tuple(value.shape)}")
    # rounded to the module's own dtype first: a bf16 module held as fp32 computes with what eager would hold
    value = value.detach().to(m.__dict__.get("_sdkern_io", w.dtype)).to(w.dtype).contiguous()
    repack = getattr(m, "_sdkern_repack", None)  # engine modules defined with their rules (sdkern/patch/svd.py)
    if "_sdkern_gate" in m.__dict__:  # a gated GEGLU projection: value and gate halves
        half = value.shape[0] // 2
        m.__dict__["_sdkern_gate"] = _reorder_linear(value[half:])
        packed = _reorder_linear(value[:half])
    elif repack is not None:
        packed = repack(value, m.__dict__.get("_sdkern_packed_for"))
    elif type(m) is SdkernConv2d and not m.__dict__.get("_sdkern_pointwise", False):
        with _FORM_LOCK:  # pack in the form held now (see _weight_for)
            if m.weight.dim() == 2:
                packed = _reorder_im2col(value)
            else:  # for the input size it was last packed for (see _weight_for)
                packed = _reorder_conv(value, *_conv_args(m), m.__dict__.get("_sdkern_packed_for"))
            m._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
        return
    else:
        packed = _reorder_linear(value.reshape(w.shape))
    m._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
