"""BiasAdd in Triton: y = x + bias + skip over rows of C channels (one read of each input, one write)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdkern.ops._layout import rows
from sdkern.ops._spec import validated_by_caller
from sdkern.ops.bias_add import check
from sdkern.triton._common import arch_key, check_device, device_guard, next_pow2, to_dtype

__all__ = ["bias_add", "bias_add_config", "bias_add_kernel"]


@triton.jit
def bias_add_kernel(
    x_ptr,  # (M, C) rows `sx` apart, channels contiguous; fp32/fp16/bf16
    b_ptr,  # [C] bias, fp32 or x's dtype
    s_ptr,  # (M, C) skip rows `ss` apart, channels contiguous; x's dtype
    y_ptr,  # (M, C) output, dense; x's dtype
    M,
    C,
    sx,
    ss,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mm, mc = rm < M, rc < C
    mask = mm[:, None] & mc[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rm64 * sx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rm64 * ss + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rc, mask=mc, other=0.0).to(tl.float32)
    y = x + b[None, :] + s
    tl.store(y_ptr + rm64 * C + rc[None, :], to_dtype(y, y_ptr), mask=mask)


def bias_add_config(m: int, c: int, arch: str) -> dict[str, int]:
    """Tile of the row-wise elementwise kernels: 4K elements (16 per thread), whole rows up to 1024 channels."""
    block_c = min(next_pow2(c), 1024)
    block_m = max(1, min(4096 // block_c, next_pow2(m)))
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "num_warps": 8 if block_m * block_c >= 4096 else 4}


def bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """y = x + bias + skip.

    Parameters
    ----------
    x : torch.Tensor
        (..., C), last dim contiguous; fp32, fp16 or bf16.
    bias : torch.Tensor
        [C], fp32 or x's dtype.
    skip : torch.Tensor
        Shape and dtype of x, last dim contiguous.

    Returns
    -------
    torch.Tensor
        (..., C) dense, x's dtype.
    """
    if not validated_by_caller():
        check(x, bias, skip)
    check_device("bias_add", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2, m, sx = rows(x)
    s2, _, ss = rows(skip)
    c = x.shape[-1]
    cfg = bias_add_config(m, c, arch_key(x))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c, cfg["BLOCK_C"]))
    with device_guard(x):
        bias_add_kernel[grid](x2, bias.contiguous(), s2, y, m, c, sx, ss, **cfg)
    return y
