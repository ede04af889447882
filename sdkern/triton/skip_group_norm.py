"""SkipGroupNorm in Triton: s = x + skip + bias; y = GroupNorm(s)(+SiLU). Kernels live in group_norm.py."""

from __future__ import annotations

import torch

from sdkern.ops._spec import validated_by_caller
from sdkern.ops.skip_group_norm import check
from sdkern.triton._common import check_device
from sdkern.triton.group_norm import launch_group_norm

__all__ = ["skip_group_norm"]


def skip_group_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual/temb add + GroupNorm(+SiLU).

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W), any memory format (NHWC preferred); fp32, fp16 or bf16.
    skip : torch.Tensor
        (N, C, H, W), (N, C, 1, 1) or (N, C) in x's dtype (the last two broadcast over pixels).
    bias : torch.Tensor or None
        [C], fp32 or x's dtype.
    gamma, beta : torch.Tensor
        [C], fp32 or x's dtype.
    groups : int
        Divides C.
    eps : float
        Added to the variance.
    silu : bool
        Apply SiLU to the normalised output.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        (y, s), both (N, C, H, W) in x's dtype and memory format; y normalises the fp32 sum.
    """
    if not validated_by_caller():
        check(x, skip, bias, gamma, beta, groups, eps, silu)
    check_device("skip_group_norm", x)
    y, s = launch_group_norm(x, skip, bias, gamma, beta, groups, eps, silu)
    assert s is not None
    return y, s
