"""SkipLayerNorm in Triton: s = x (+ skip) (+ bias), y = LayerNorm(s) * gamma (+ beta), one row per program.

Without skip (``HAS_SKIP=False``) it is a plain LayerNorm.

Rows up to ``MAX_WHOLE_ROW`` channels stay in registers (one read of x and skip, one write of y and s,
exact two-pass mean/variance in fp32). Longer rows are processed in chunks: per-lane Welford
statistics in the first sweep, combined across lanes with Chan's formula, then a second sweep that
recomputes the fp32 sum and normalises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdkern.ops._layout import rows
from sdkern.ops._spec import validated_by_caller
from sdkern.ops.skip_layer_norm import check
from sdkern.triton._common import arch_key, check_device, device_guard, next_pow2, to_dtype

__all__ = ["MAX_WHOLE_ROW", "skip_layer_norm", "skip_layer_norm_config", "skip_layer_norm_kernel"]

MAX_WHOLE_ROW = 8192


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w, n


@triton.jit
def skip_layer_norm_kernel(
    x_ptr,  # (M, C) rows `sx` apart, channels contiguous; fp32/fp16/bf16
    k_ptr,  # (M, C) skip rows `sk` apart (read when HAS_SKIP), channels contiguous; x's dtype
    g_ptr,  # [C] gamma, fp32 or x's dtype
    be_ptr,  # [C] beta (read when HAS_BETA), fp32 or x's dtype
    bi_ptr,  # [C] bias (read when HAS_BIAS), fp32 or x's dtype
    y_ptr,  # (M, C) normalised output, dense; x's dtype
    s_ptr,  # (M, C) sum x + skip + bias, dense; x's dtype
    M,
    C,
    sx,
    sk,
    eps,
    HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
    HAS_SKIP: tl.constexpr = True,
):
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * sx
    kr = k_ptr + row * sk
    yr = y_ptr + row * C
    sr = s_ptr + row * C
    cols = tl.arange(0, BLOCK_C)
    if WHOLE_ROW:
        mask = cols < C
        s = tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SKIP:
            s += tl.load(kr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            s += tl.load(bi_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(sr + cols, to_dtype(s, s_ptr), mask=mask)
        mean = tl.sum(s, axis=0) / C
        d = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        y = d * rstd * tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BETA:
            y += tl.load(be_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(yr + cols, to_dtype(y, y_ptr), mask=mask)
    else:
        mean_v = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2_v = tl.zeros([BLOCK_C], dtype=tl.float32)
        n_v = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = c < C
            s = tl.load(xr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_SKIP:
                s += tl.load(kr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                s += tl.load(bi_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(sr + c, to_dtype(s, s_ptr), mask=mask)
            one = tl.where(mask, 1.0, 0.0)
            mean_v, m2_v, n_v = _welford_combine(mean_v, m2_v, n_v, s, tl.zeros_like(s), one)
        mean, m2, _n = tl.reduce((mean_v, m2_v, n_v), 0, _welford_combine)
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = c < C
            s = tl.load(xr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_SKIP:
                s += tl.load(kr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                s += tl.load(bi_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = (s - mean) * rstd * tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BETA:
                y += tl.load(be_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(yr + c, to_dtype(y, y_ptr), mask=mask)


def skip_layer_norm_config(c: int, arch: str) -> dict[str, int]:
    """One row per program; whole row in registers up to MAX_WHOLE_ROW channels, else 4096-wide chunks."""
    whole = next_pow2(c) <= MAX_WHOLE_ROW
    block_c = next_pow2(c) if whole else 4096
    warps = 1 if block_c <= 256 else 2 if block_c <= 512 else 4 if block_c <= 2048 else 8
    if arch == "sm90" and block_c >= 1024:
        warps = min(16, warps * 2)
    return {"BLOCK_C": block_c, "WHOLE_ROW": whole, "num_warps": warps}


def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x (+ skip) (+ bias); y = LayerNorm(s) over the last dim * gamma (+ beta).

    Parameters
    ----------
    x : torch.Tensor
        (..., C), fp32/fp16/bf16, last dim contiguous.
    skip : torch.Tensor or None
        x's shape and dtype, last dim contiguous; None: a plain LayerNorm.
    gamma : torch.Tensor
        [C]; beta, bias: [C] or None (fp32 or x's dtype).
    eps : float
        Added to the variance.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        (y, s), both (..., C) dense in x's dtype.
    """
    if not validated_by_caller():
        check(x, skip, gamma, beta, bias, eps)
    check_device("skip_layer_norm", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y, s
    x2, m, sx = rows(x)
    k2, _, sk = rows(skip) if skip is not None else (x2, m, 0)  # not read without skip
    c = x.shape[-1]
    cfg = skip_layer_norm_config(c, arch_key(x))
    gamma = gamma.contiguous()  # parameter vectors are read as dense [C]
    beta_ = beta.contiguous() if beta is not None else gamma
    bias_ = bias.contiguous() if bias is not None else gamma
    with device_guard(x):
        skip_layer_norm_kernel[(m,)](
            x2, k2, gamma, beta_, bias_, y, s,
            m, c, sx, sk, float(eps), HAS_BETA=beta is not None, HAS_BIAS=bias is not None,
            HAS_SKIP=skip is not None, **cfg,
        )  # fmt: skip
    return y, s
