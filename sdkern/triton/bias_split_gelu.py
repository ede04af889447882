"""BiasSplitGelu in Triton: y = (x + b)[..., :D] * gelu_erf((x + b)[..., D:]) in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdkern.ops._layout import rows
from sdkern.ops._spec import validated_by_caller
from sdkern.ops.bias_split_gelu import check
from sdkern.triton._common import arch_key, check_device, device_guard, to_dtype
from sdkern.triton.bias_add import bias_add_config

__all__ = ["bias_split_gelu", "bias_split_gelu_kernel"]


@triton.jit
def bias_split_gelu_kernel(
    x_ptr,  # (M, 2D) rows `sx` apart, channels contiguous; fp32/fp16/bf16
    b_ptr,  # [2D] bias, fp32 or x's dtype
    y_ptr,  # (M, D) output, dense; x's dtype
    M,
    D,
    sx,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mm, mc = rm < M, rc < D
    mask = mm[:, None] & mc[None, :]
    row = x_ptr + rm.to(tl.int64)[:, None] * sx + rc[None, :]
    a = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(row + D, mask=mask, other=0.0).to(tl.float32)
    a += tl.load(b_ptr + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
    g += tl.load(b_ptr + D + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * D + rc[None, :], to_dtype(y, y_ptr), mask=mask)


def bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU with the bias taken out of the Linear.

    Parameters
    ----------
    x : torch.Tensor
        (..., 2D), last dim contiguous; fp32, fp16 or bf16.
    bias : torch.Tensor
        [2D], fp32 or x's dtype.

    Returns
    -------
    torch.Tensor
        (..., D) dense, x's dtype.
    """
    if not validated_by_caller():
        check(x, bias)
    check_device("bias_split_gelu", x)
    d = x.shape[-1] // 2
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2, m, sx = rows(x)
    cfg = bias_add_config(m, d, arch_key(x))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_C"]))
    with device_guard(x):
        bias_split_gelu_kernel[grid](x2, bias.contiguous(), y, m, d, sx, **cfg)
    return y
