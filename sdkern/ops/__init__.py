"""sdkern's fused operators.

Importing this package registers ``torch.ops.sdkern.*`` (see :mod:`sdkern.ops._library`). The
functions below are thin keyword-friendly wrappers over those ops; they accept fp32, fp16 and bf16,
accumulate in fp32 and return the input dtype.
"""

from __future__ import annotations

import torch

from sdkern.ops import _autograd, _library, reference
from sdkern.ops._dispatch import cuda_impl_order, set_cuda_impl
from sdkern.ops._library import OPS, SCHEMAS

__all__ = [
    "OPS",
    "SCHEMAS",
    "attention",
    "bias_add",
    "bias_split_gelu",
    "cuda_impl_order",
    "group_norm",
    "reference",
    "set_cuda_impl",
    "skip_group_norm",
    "skip_layer_norm",
]

_ops = torch.ops.sdkern
assert _library.OPS  # registration happens on import
_autograd.register(_library._lib)  # backward formulas of every op


def group_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm over (C/groups, H, W) per (n, group), then SiLU if ``silu``.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
        Any memory format; channels-last (NHWC) is the fast path and is preserved.
    gamma, beta : Tensor [C]
        float32 or x's dtype.
    groups : int
        Number of groups; must divide C.
    eps : float
        Added to the variance.
    silu : bool
        Apply SiLU to the output.

    Returns
    -------
    Tensor (N, C, H, W)
        Same dtype and memory format as ``x``.
    """
    return _ops.group_norm(x, gamma, beta, groups, eps, silu)


def skip_group_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + skip + bias``; ``y = GroupNorm(s)`` (+SiLU). Returns ``(y, s)``.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
        Any memory format (NHWC fast path).
    skip : Tensor (N, C, H, W), (N, C, 1, 1) or (N, C)
        Same dtype as x; the (N, C) forms broadcast over H, W (ResnetBlock2D's time embedding).
    gamma, beta : Tensor [C]
        float32 or x's dtype.
    bias : Tensor [C], optional
    groups, eps, silu
        As in :func:`group_norm`.

    Returns
    -------
    y, s : Tensor (N, C, H, W)
        Both in x's dtype and memory format. ``y`` normalises the fp32 sum.

    Notes
    -----
    The torch op's positional order is ``(x, skip, bias, gamma, beta, groups, eps, silu)``.
    """
    return _ops.skip_group_norm(x, skip, bias, gamma, beta, groups, eps, silu)


def bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU with the Linear's bias folded in.

    Parameters
    ----------
    x : Tensor (..., 2D)
        Last dimension contiguous.
    bias : Tensor [2D]

    Returns
    -------
    Tensor (..., D)
        ``(x + bias)[..., :D] * gelu_erf((x + bias)[..., D:])``.
    """
    return _ops.bias_split_gelu(x, bias)


def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x (+ skip) (+ bias)``; ``y = LayerNorm(s) * gamma (+ beta)``. Returns ``(y, s)``.

    With ``skip=None`` this is a plain LayerNorm over the last dim (``y`` is ``F.layer_norm``; ``s`` is x
    plus bias, a copy of x without one).

    Parameters
    ----------
    x : Tensor (..., C)
        Last dimension contiguous.
    skip : Tensor (..., C) or None
        x's shape and dtype, last dimension contiguous.
    gamma : Tensor [C]
    beta, bias : Tensor [C], optional

    Returns
    -------
    y, s : Tensor (..., C)
    """
    return _ops.skip_layer_norm(x, skip, gamma, beta, bias, eps)


def bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``x + bias + skip``.

    Parameters
    ----------
    x, skip : Tensor (..., C)
    bias : Tensor [C]

    Returns
    -------
    Tensor (..., C)
    """
    return _ops.bias_add(x, bias, skip)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` per batch and head, optionally causal.

    Parameters
    ----------
    q : Tensor (B, Sq, H, D)
    k : Tensor (B, Sk, H, D)
    v : Tensor (B, Sk, H, Dv)
        Any strides with a contiguous last dimension: views of a packed QKV (B, S, 3, H, D) or KV
        projection work without copies.
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Query i attends only to keys ``j <= i + (Sk - Sq)`` (bottom-right aligned: for Sq == Sk this is
        torch SDPA's ``is_causal``, CLIP's text mask; for Sq < Sk the last query sees every key, as in
        ONNX Runtime's unidirectional attention with past keys). Needs Sq <= Sk (ValueError otherwise).

    Returns
    -------
    Tensor (B, Sq, H, Dv)
        Contiguous, q's dtype.
    """
    return _ops.attention(q, k, v, scale, causal)
