"""Glue between torch tensors and the pointer-based native launchers (sdkern._C, sdkern._C_cuda).

Both extension modules expose the same functions with the same positional arguments; the CUDA one
takes the stream handle (and, for the group norms, a workspace pointer) as trailing arguments.
Status codes come back as exceptions: ValueError (invalid argument), NotImplementedError
(unsupported here: the caller falls back), RuntimeError (device error).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def load(name: str) -> ModuleType | None:
    """Import ``sdkern.<name>`` once; None (with the reason in :func:`load_error`) when unavailable."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"sdkern.{name}")
        except ImportError as e:  # not built, or built against a missing runtime library
            _modules[name] = None
            _errors[name] = f"sdkern.{name} is not importable ({e})"
    return _modules[name]


def load_error(name: str) -> str:
    return _errors.get(name, "")


def code(t: torch.Tensor) -> int:
    return DTYPE_CODE[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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
