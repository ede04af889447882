"""Pure-PyTorch references for every sdkern op.

They define the semantics (see docs/ARCHITECTURE.md, "The op contract"), serve as the float64 oracle in
the tests (call them on float64 tensors) and are the any-device fallback (DirectML, HPU, MPS, ...); the
backward of most ops is their vector-Jacobian product. Each op's spec (``sdkern/ops/<op>.py``) points
here: the references stay one module, apart from the kernels' glue they judge, sharing their helpers
(the group norms' core, the causal mask).
Arithmetic runs in ``promote(dtype, float32)``: fp16/bf16 inputs are upcast to fp32, float64 stays
float64. Outputs are returned in the input dtype and, for the norms, the input memory format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "bias_add",
    "bias_split_gelu",
    "causal_mask",
    "group_norm",
    "skip_group_norm",
    "skip_layer_norm",
]


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _broadcast_skip(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W), (N,C,1,1) or (N,C) -> broadcastable against x (N,C,H,W)."""
    if skip.dim() == 2:
        return skip[:, :, None, None]
    return skip


def _group_norm_core(
    s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float, silu: bool
) -> torch.Tensor:
    # s: (N, C, H, W) in the accumulation dtype.
    n, c, h, w = s.shape
    g = s.reshape(n, groups, (c // groups) * h * w)  # explicit size: -1 is ambiguous when N = 0
    mean = g.mean(dim=-1, keepdim=True)
    var = (g - mean).square().mean(dim=-1, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(s.shape)
    y = y * gamma.to(s.dtype)[None, :, None, None] + beta.to(s.dtype)[None, :, None, None]
    return F.silu(y) if silu else y


def group_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float, silu: bool
) -> torch.Tensor:
    """GroupNorm(+SiLU). x (N,C,H,W) any memory format; gamma, beta [C]. Returns y like x."""
    acc = _acc(x)
    y = _group_norm_core(x.to(acc), gamma, beta, groups, eps, silu)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


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
    """s = x + skip + bias; y = GroupNorm(s)(+SiLU). skip (N,C,H,W)/(N,C,1,1)/(N,C); bias [C] or None.

    Returns (y, s), both (N,C,H,W) in x's dtype and memory format. Like the fused kernels, the
    normalisation uses the fp32 sum before it is rounded to x's dtype.
    """
    acc = _acc(x)
    s = x.to(acc) + _broadcast_skip(skip, x).to(acc)
    if bias is not None:
        s = s + bias.to(acc)[None, :, None, None]
    y = _group_norm_core(s, gamma, beta, groups, eps, silu)
    fmt = _memory_format(x)
    return y.to(x.dtype).contiguous(memory_format=fmt), s.to(x.dtype).contiguous(memory_format=fmt)


def bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., 2D), bias [2D] -> (..., D): (x+b)[..., :D] * gelu_erf((x+b)[..., D:])."""
    acc = _acc(x)
    h = x.to(acc) + bias.to(acc)
    a, g = h.chunk(2, dim=-1)
    return (a * F.gelu(g)).to(x.dtype)


def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x (+ skip) (+ bias); y = LayerNorm(s) * gamma (+ beta) over the last dim. Returns (y, s).

    ``skip=None`` makes it a plain LayerNorm (``s`` is then x plus bias, or a copy of x).
    """
    acc = _acc(x)
    s = x.to(acc) if skip is None else x.to(acc) + skip.to(acc)
    if bias is not None:
        s = s + bias.to(acc)
    w = gamma.to(acc)
    b = beta.to(acc) if beta is not None else None
    y = F.layer_norm(s, (s.shape[-1],), w, b, eps)
    return y.to(x.dtype), s.to(x.dtype)


def bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """x (..., C) + bias [C] + skip (..., C)."""
    acc = _acc(x)
    return (x.to(acc) + bias.to(acc) + skip.to(acc)).to(x.dtype)


def causal_mask(sq: int, sk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Sq, Sk) bool, True where query i may see key j: ``j <= i + (Sk - Sq)`` (bottom-right aligned).

    For Sq == Sk this is torch SDPA's ``is_causal`` (lower triangle); for Sq < Sk the last query sees
    every key (ONNX Runtime's unidirectional attention with past keys). Sq > Sk is refused by the ops.
    """
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ·scale [+ causal mask]) v per head. q (B,Sq,H,D), k (B,Sk,H,D), v (B,Sk,H,Dv) -> (B,Sq,H,Dv).

    ``causal``: query i sees keys ``j <= i + (Sk - Sq)`` only (see :func:`causal_mask`; needs Sq <= Sk).
    Plain math (no fused kernels), processed in query chunks to bound memory.
    """
    acc = _acc(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.to(acc).permute(0, 2, 3, 1)  # (B,H,D,Sk)
    vv = v.to(acc).permute(0, 2, 1, 3)  # (B,H,Sk,Dv)
    out = torch.empty((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
    chunk = max(1, (1 << 24) // max(1, q.shape[0] * q.shape[2] * k.shape[1]))
    for i in range(0, q.shape[1], chunk):
        qc = q[:, i : i + chunk].to(acc).permute(0, 2, 1, 3)  # (B,H,c,D)
        s = torch.matmul(qc, kt) * scale
        if causal:
            allowed = causal_mask(q.shape[1], k.shape[1], q.device)[i : i + chunk]
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, i : i + chunk] = torch.matmul(p, vv).permute(0, 2, 1, 3).to(q.dtype)
    return out
