"""Tensor-layout helpers shared by the native launches, the Triton launchers and the fake kernels.

Neutral: imports torch only (no registration, no dispatcher).
"""

from __future__ import annotations

import torch

__all__ = ["dense_like", "nchw_view", "norm_output", "rows", "skip_strides"]


def nchw_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(N,C,H,W) -> (dense tensor, sn, sc, sp) with element (n,c,p) at n*sn + c*sc + p*sp.

    NCHW- or NHWC-dense inputs are used as they are; anything else is copied once into the
    channels-last layout (or NCHW when the channel stride suggests it).
    """
    _n, _c, _h, w = x.shape
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        fmt = torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
    sn, sc, sh, sw = x.stride()
    sp = sw if w > 1 else sh
    return x, sn, sc, sp


def norm_output(x: torch.Tensor) -> torch.Tensor:
    """Empty (N,C,H,W) output in the layout :func:`nchw_view` gives x: what the group norms return."""
    fmt = torch.contiguous_format
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif not x.is_contiguous() and x.stride(1) == 1:
        fmt = torch.channels_last  # matches nchw_view's copy for other strides
    return torch.empty_like(x, memory_format=fmt)


def skip_strides(skip: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Strides of skip (N,C,H,W) / (N,C,1,1) / (N,C) in the (N,C,P) view; sp = 0 for broadcasts."""
    if skip.dim() == 2 or (skip.shape[2] == 1 and skip.shape[3] == 1 and x.shape[2] * x.shape[3] != 1):
        return skip, skip.stride(0), skip.stride(1), 0
    skip, sn, sc, sp = nchw_view(skip)
    return skip, sn, sc, sp


def rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(..., C) with a contiguous last dim -> (tensor, M rows, row stride) of its (M, C) view.

    Contiguous inputs (the common case) are passed through without creating a view; others are
    reshaped (copied only if unavoidable) to 2-D and the tensor returned is that 2-D one.
    """
    c = t.shape[-1]
    if t.is_contiguous():  # fast path: rows of C elements, C apart
        return t, (t.numel() // c if c else 0), c
    t2 = t.reshape(-1, c) if t.dim() != 2 else t
    if c > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.shape[0], (t2.stride(0) if t2.shape[0] > 1 else c)


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """Contiguous output of x's shape and dtype (empty_like is the cheapest call for contiguous x)."""
    if x.is_contiguous():
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
