"""Launch the native kernels (sdkern._C on CPU, sdkern._C_cuda on CUDA) on torch tensors.

Each function takes already-validated arguments (see _checks.py) and the extension module, allocates
the outputs (and the CUDA workspace) with torch's allocator, and calls the pointer-based launcher.
CUDA launches go to the current stream of the tensor's device and get two trailing arguments:
workspace pointer (group norms only) and stream handle. The launchers release the GIL and
re-validate sizes on the C++ side.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from sdkern.ops import _native as nat


def _stream(x: torch.Tensor) -> tuple[int, ...]:
    """Trailing stream argument: () on CPU, (cuda_stream,) on CUDA."""
    if x.is_cuda:
        return (torch.cuda.current_stream(x.device).cuda_stream,)
    return ()


def _workspace(mod: ModuleType, x: torch.Tensor, n: int, c: int, p: int, groups: int) -> torch.Tensor | None:
    """Workspace of the CUDA group norms (allocated by torch on the current stream, no sync); None on CPU.

    The caller keeps the tensor referenced until the launcher has returned (the kernels are then
    enqueued on the stream it was allocated on), so the memory is not handed to another allocation
    before they run -- with the caching allocator and with ``cudaMallocAsync`` alike.
    """
    if not x.is_cuda:
        return None
    nbytes = mod.group_norm_workspace_bytes(n, c, p, groups)
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)


def _ws_arg(ws: torch.Tensor | None) -> tuple[int, ...]:
    """Trailing workspace pointer argument: () on CPU."""
    return () if ws is None else (ws.data_ptr(),)


def _like(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """Bring an optional parameter to ref's dtype (the launchers read all parameters in one dtype)
    and make it contiguous (the launchers read parameter vectors [C] densely from data_ptr())."""
    if t is None:
        return t
    if t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    return t if t.is_contiguous() else t.contiguous()


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A parameter vector [C] the launchers can read densely: strided or stride-0 (expanded) vectors
    are copied (C elements: cheap); contiguous ones are passed as they are."""
    return t if t.is_contiguous() else t.contiguous()


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """:func:`_native.rows`, with overlapping rows (row stride < C, e.g. an expanded row) copied: the
    launchers require rows at least C apart."""
    t2, m, rs = nat.rows(t)
    if m > 1 and rs < t.shape[-1]:
        t2 = t2.contiguous()
        rs = t2.stride(0)
    return t2, m, rs


def group_norm(mod: ModuleType, x: torch.Tensor, gamma, beta, groups: int, eps: float, silu: bool):
    xd, sn, sc, sp = nat.nchw_view(x)
    gamma = _vec(gamma)
    beta = _like(beta, gamma)
    y = torch.empty_like(xd)  # xd is dense (NCHW or NHWC): same strides
    n, c, h, w = x.shape
    ws = _workspace(mod, x, n, c, h * w, groups)  # referenced until the kernels are enqueued
    mod.group_norm(
        xd.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(),
        n, c, h * w, groups, eps, silu, sn, sc, sp, nat.code(x), nat.code(gamma), *_ws_arg(ws), *_stream(x),
    )  # fmt: skip
    return y


def skip_group_norm(mod: ModuleType, x, skip, bias, gamma, beta, groups: int, eps: float, silu: bool):
    xd, sn, sc, sp = nat.nchw_view(x)
    sk, kn, kc, kp = nat.skip_strides(skip, x)
    gamma, bias = _vec(gamma), (None if bias is None else _vec(bias))
    beta = _like(beta, gamma)
    y, s = torch.empty_like(xd), torch.empty_like(xd)  # xd is dense (NCHW or NHWC): same strides
    n, c, h, w = x.shape
    ws = _workspace(mod, x, n, c, h * w, groups)  # referenced until the kernels are enqueued
    mod.skip_group_norm(
        xd.data_ptr(), sk.data_ptr(), nat.ptr(bias), gamma.data_ptr(), beta.data_ptr(),
        y.data_ptr(), s.data_ptr(), n, c, h * w, groups, eps, silu, sn, sc, sp, kn, kc, kp,
        nat.code(x), nat.code(gamma), nat.code(bias) if bias is not None else 0, *_ws_arg(ws), *_stream(x),
    )  # fmt: skip
    return y, s


def bias_split_gelu(mod: ModuleType, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x2, m, rs = _rows(x)
    bias = _vec(bias)
    d = x.shape[-1] // 2
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    mod.bias_split_gelu(
        x2.data_ptr(), bias.data_ptr(), y.data_ptr(), m, d, rs, nat.code(x), nat.code(bias), *_stream(x),
    )  # fmt: skip
    return y


def _empty_rows(x: torch.Tensor) -> torch.Tensor:
    """Contiguous output of x's shape and dtype (empty_like is the cheapest call for contiguous x)."""
    if x.is_contiguous():
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def skip_layer_norm(mod: ModuleType, x, skip, gamma, beta, bias, eps: float):
    x2, m, xrs = _rows(x)
    k2, _, krs = _rows(skip) if skip is not None else (None, m, 0)  # no skip: a plain LayerNorm
    gamma = _vec(gamma)
    beta, bias = _like(beta, gamma), _like(bias, gamma)
    y, s = _empty_rows(x), _empty_rows(x)
    mod.skip_layer_norm(
        x2.data_ptr(), nat.ptr(k2), gamma.data_ptr(), nat.ptr(beta), nat.ptr(bias),
        y.data_ptr(), s.data_ptr(), m, x.shape[-1], xrs, krs, eps, nat.code(x), nat.code(gamma),
        *_stream(x),
    )  # fmt: skip
    return y, s


def bias_add(mod: ModuleType, x, bias, skip) -> torch.Tensor:
    x2, m, xrs = _rows(x)
    k2, _, krs = _rows(skip)
    bias = _vec(bias)
    y = _empty_rows(x)
    mod.bias_add(
        x2.data_ptr(), bias.data_ptr(), k2.data_ptr(), y.data_ptr(), m, x.shape[-1],
        xrs, krs, nat.code(x), nat.code(bias), *_stream(x),
    )  # fmt: skip
    return y


def attention(mod: ModuleType, q, k, v, scale: float | None, causal: bool = False) -> torch.Tensor:
    b, sq, h, d = q.shape
    sk, dv = k.shape[1], v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    o = torch.empty((b, sq, h, dv), dtype=q.dtype, device=q.device)
    mod.attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), b, sq, sk, h, d, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], scale, bool(causal), nat.code(q), *_stream(q),
    )  # fmt: skip
    return o
