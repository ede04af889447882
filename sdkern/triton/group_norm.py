"""GroupNorm(+SiLU) in Triton, NHWC first (any (n, c, p) strides work, the output keeps x's layout).

Three launches, no host sync:

1. ``gn_stats_kernel`` — grid (N * SPLIT, channel blocks). Each program sweeps one slice of the
   pixels for a block of channels (coalesced [pixels, channels] tiles) and keeps per-channel fp32
   (mean, M2, count), merging tile statistics with Chan's parallel formula. With a skip it forms
   s = x + skip + bias on the fly and writes s once. Partial statistics go to a torch-allocated
   workspace (three [N, SPLIT, C] arrays).
2. ``gn_combine_kernel`` — one program per (n, group) merges its SPLIT x C/groups partials
   (Chan's formula again, in fp64: lane-wise then a tree reduction; tiny work) into mean and
   1/sqrt(var + eps), each rounded once to fp32.
3. ``gn_apply_kernel`` — one normalise (+SiLU) pass over [pixels, channels] tiles; x (+ skip + bias)
   is re-read and summed in fp32 so y normalises the unrounded sum, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdkern.ops._layout import nchw_view, skip_strides
from sdkern.ops._spec import validated_by_caller
from sdkern.ops.group_norm import check
from sdkern.triton._common import arch_key, check_device, device_guard, next_pow2, num_sms, to_dtype

__all__ = [
    "WIDE_OFFSETS",
    "gn_apply_kernel",
    "gn_combine_kernel",
    "gn_stats_kernel",
    "group_norm",
    "group_norm_config",
    "launch_group_norm",
]


@triton.jit
def _chan(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two (mean, M2, count) summaries (Chan et al.); empty sides (count 0) are neutral."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w, n


@triton.jit
def _load_sum(
    x_ptr, k_ptr, b_ptr, n, p, c, mask, mc, sn, sc, sp, kn, kc, kp, HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """fp32 tile x[n, c, p] (+ skip[n, c, p] + bias[c]) for p [BP, 1], c [1, BC]."""
    v = tl.load(x_ptr + n * sn + p * sp + c * sc, mask=mask, other=0.0).to(tl.float32)
    if HAS_SKIP:
        v += tl.load(k_ptr + n * kn + p * kp + c * kc, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float32)
    return v


@triton.jit
def gn_stats_kernel(
    x_ptr,  # (N, C, P) input, element (n, c, p) at n*sn + c*sc + p*sp; fp32/fp16/bf16
    k_ptr,  # (N, C, P) skip at n*kn + c*kc + p*kp (kp = 0 broadcasts over pixels); read when HAS_SKIP
    b_ptr,  # [C] bias, fp32 or x's dtype; read when HAS_BIAS
    s_ptr,  # (N, C, P) sum output with x's strides; written when HAS_SKIP
    mean_ptr,  # fp32 [N, SPLIT, C] workspace: per-channel partial mean
    m2_ptr,  # fp32 [N, SPLIT, C] workspace: per-channel partial M2
    cnt_ptr,  # fp32 [N, SPLIT, C] workspace: per-channel partial count
    C,
    P,
    SPLIT,
    CHUNK,  # pixels per split (a multiple of BLOCK_P)
    sn,
    sc,
    sp,
    kn,
    kc,
    kp,
    HAS_SKIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,  # 64-bit channel offsets
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // SPLIT).to(tl.int64)
    split = pid % SPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        c = c.to(tl.int64)  # c * sc or c * kc reaches 2**31 (NCHW with C * P >= 2**31)
    mc = c < C
    p_begin = split * CHUNK
    p_end = tl.minimum(p_begin + CHUNK, P)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    rp = tl.arange(0, BLOCK_P)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = (p0 + rp).to(tl.int64)
        mp = p < p_end
        mask = mp[:, None] & mc[None, :]
        v = _load_sum(x_ptr, k_ptr, b_ptr, n, p[:, None], c[None, :], mask, mc[None, :],
                      sn, sc, sp, kn, kc, kp, HAS_SKIP, HAS_BIAS)  # fmt: skip
        if HAS_SKIP:
            tl.store(s_ptr + n * sn + p[:, None] * sp + c[None, :] * sc, to_dtype(v, s_ptr), mask=mask)
        v = tl.where(mask, v, 0.0)  # masked pixels carry the bias
        nb = tl.minimum(p_end - p0, BLOCK_P).to(tl.float32)
        mean_b = tl.sum(v, axis=0) / nb
        d = tl.where(mask, v - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        mean, m2, cnt = _chan(mean, m2, cnt, mean_b, m2_b, tl.zeros_like(mean_b) + nb)
    off = (n * SPLIT + split) * C + c
    tl.store(mean_ptr + off, mean, mask=mc)
    tl.store(m2_ptr + off, m2, mask=mc)
    tl.store(cnt_ptr + off, cnt, mask=mc)


@triton.jit
def gn_combine_kernel(
    mean_ptr,  # fp32 [N, SPLIT, C] partial means from gn_stats_kernel
    m2_ptr,  # fp32 [N, SPLIT, C] partial M2
    cnt_ptr,  # fp32 [N, SPLIT, C] partial counts
    mu_ptr,  # fp32 [N, G] output: mean
    rstd_ptr,  # fp32 [N, G] output: 1/sqrt(var + eps)
    C,
    G,
    CG,  # channels per group, C // G
    SPLIT,
    eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    g = pid % G
    total = SPLIT * CG
    mean = tl.zeros([BLOCK], dtype=tl.float64)
    m2 = tl.zeros([BLOCK], dtype=tl.float64)
    cnt = tl.zeros([BLOCK], dtype=tl.float64)
    r = tl.arange(0, BLOCK)
    for j0 in range(0, total, BLOCK):
        j = j0 + r
        m = j < total
        off = (n * SPLIT + j // CG) * C + g * CG + j % CG
        mean_e = tl.load(mean_ptr + off, mask=m, other=0.0).to(tl.float64)
        m2_e = tl.load(m2_ptr + off, mask=m, other=0.0).to(tl.float64)
        cnt_e = tl.load(cnt_ptr + off, mask=m, other=0.0).to(tl.float64)
        mean, m2, cnt = _chan(mean, m2, cnt, mean_e, m2_e, cnt_e)
    mean_t, m2_t, cnt_t = tl.reduce((mean, m2, cnt), 0, _chan)
    var = m2_t / tl.maximum(cnt_t, 1.0)
    tl.store(mu_ptr + pid, mean_t.to(tl.float32))
    tl.store(rstd_ptr + pid, (1.0 / tl.sqrt(var + eps)).to(tl.float32))


@triton.jit
def gn_apply_kernel(
    x_ptr,  # (N, C, P) input at n*sn + c*sc + p*sp; fp32/fp16/bf16
    k_ptr,  # (N, C, P) skip at n*kn + c*kc + p*kp; read when HAS_SKIP
    b_ptr,  # [C] bias; read when HAS_BIAS
    g_ptr,  # [C] gamma, fp32 or x's dtype
    be_ptr,  # [C] beta, gamma's dtype
    mu_ptr,  # fp32 [N, G]: mean
    rstd_ptr,  # fp32 [N, G]: 1/sqrt(var + eps)
    y_ptr,  # (N, C, P) output with x's strides; x's dtype
    C,
    P,
    G,
    CG,
    sn,
    sc,
    sp,
    kn,
    kc,
    kp,
    HAS_SKIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    WIDE: tl.constexpr,  # 64-bit channel offsets
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pblocks = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // pblocks).to(tl.int64)
    p = ((pid % pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        c = c.to(tl.int64)  # c * sc or c * kc reaches 2**31 (NCHW with C * P >= 2**31)
    mc = c < C
    mask = (p < P)[:, None] & mc[None, :]
    v = _load_sum(x_ptr, k_ptr, b_ptr, n, p[:, None], c[None, :], mask, mc[None, :],
                  sn, sc, sp, kn, kc, kp, HAS_SKIP, HAS_BIAS)  # fmt: skip
    grp = n * G + c // CG
    mean = tl.load(mu_ptr + grp, mask=mc, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=mc, other=0.0)
    gamma = tl.load(g_ptr + c, mask=mc, other=0.0).to(tl.float32)
    beta = tl.load(be_ptr + c, mask=mc, other=0.0).to(tl.float32)
    a = rstd * gamma
    y = (v - mean[None, :]) * a[None, :] + beta[None, :]  # no cancellation between large v*a and mean*a
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + n * sn + p[:, None] * sp + c[None, :] * sc, to_dtype(y, y_ptr), mask=mask)


# Channel offsets c * stride at or above this use 64-bit arithmetic (a kernel variant; tests lower it).
WIDE_OFFSETS = 2**31


def _tile(c: int, p: int, channels_inner: bool, tile: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of ~``tile`` elements, wide along the contiguous dimension."""
    if channels_inner:
        block_c = 128
        while block_c > 16 and c % block_c:
            block_c //= 2
        block_c = min(next_pow2(c), block_c if c % block_c == 0 else 128)
        block_p = max(1, min(tile // block_c, next_pow2(p)))
    else:
        block_p = min(next_pow2(p), 128)
        block_c = max(1, min(tile // block_p, next_pow2(c)))
    return block_p, block_c


def group_norm_config(n: int, c: int, p: int, groups: int, channels_inner: bool, arch: str, sms: int) -> dict:
    """Deterministic launch plan for (shape, layout, arch): tiles, pixel split, warps."""
    tile = 4096
    bp, bc = _tile(c, p, channels_inner, tile)
    cblocks = triton.cdiv(c, bc)
    pblocks = triton.cdiv(p, bp)
    want = 4 * sms  # programs for the statistics sweep
    split = max(1, min(pblocks, triton.cdiv(want, n * cblocks)))
    chunk = triton.cdiv(pblocks, split) * bp
    split = triton.cdiv(p, chunk)
    warps = 8 if bp * bc >= 4096 else 4
    comb = min(1024, next_pow2(split * (c // groups)))
    return {
        "STATS_BLOCK_P": max(1, bp // 2),  # half tiles, 4 warps: no spills with skip + bias in fp32
        "stats_warps": 4,
        "BLOCK_P": bp,
        "BLOCK_C": bc,
        "SPLIT": split,
        "CHUNK": chunk,
        "num_warps": warps,
        "COMBINE_BLOCK": comb,
        "combine_warps": 1 if comb <= 128 else 4,
    }


def launch_group_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared launcher of group_norm / skip_group_norm on validated arguments; returns (y, s or None)."""
    xd, sn, sc, sp = nchw_view(x)
    y = torch.empty_strided(xd.shape, xd.stride(), dtype=x.dtype, device=x.device)
    s = torch.empty_strided(xd.shape, xd.stride(), dtype=x.dtype, device=x.device) if skip is not None else None
    if x.numel() == 0:
        return y, s
    n, c, h, w = x.shape
    p = h * w
    if skip is not None:
        kd, kn, kc, kp = skip_strides(skip, x)
    else:
        kd, kn, kc, kp = xd, 0, 0, 0
    cfg = group_norm_config(n, c, p, groups, sc == 1 and c > 1, arch_key(x), num_sms(x))
    split = cfg["SPLIT"]
    # Workspace: partial mean / M2 / count [N, SPLIT, C] each, then mean / rstd [N, G] each. It lives
    # until this function returns, after all three launches are enqueued on the current stream.
    part = n * split * c
    ws = torch.empty(3 * part + 2 * n * groups, dtype=torch.float32, device=x.device)
    means, m2s, cnts = ws[:part], ws[part : 2 * part], ws[2 * part : 3 * part]
    mu, rstd = ws[3 * part : 3 * part + n * groups], ws[3 * part + n * groups :]
    has_skip, has_bias = skip is not None, bias is not None
    wide = c * max(abs(sc), abs(kc)) >= WIDE_OFFSETS  # channel offsets need 64 bits (pixel/batch ones always have)
    gamma, beta = gamma.contiguous(), beta.contiguous()  # parameter vectors are read as dense [C]
    bias = bias.contiguous() if bias is not None else None
    bp, bc, warps = cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["num_warps"]
    with device_guard(x):
        gn_stats_kernel[(n * split, triton.cdiv(c, bc))](
            xd, kd, bias if has_bias else gamma, s if has_skip else y, means, m2s, cnts,
            c, p, split, cfg["CHUNK"], sn, sc, sp, kn, kc, kp,
            HAS_SKIP=has_skip, HAS_BIAS=has_bias, WIDE=wide, BLOCK_P=cfg["STATS_BLOCK_P"], BLOCK_C=bc,
            num_warps=cfg["stats_warps"],
        )  # fmt: skip
        gn_combine_kernel[(n * groups,)](
            means, m2s, cnts, mu, rstd, c, groups, c // groups, split, float(eps),
            BLOCK=cfg["COMBINE_BLOCK"], num_warps=cfg["combine_warps"],
        )  # fmt: skip
        gn_apply_kernel[(n * triton.cdiv(p, bp), triton.cdiv(c, bc))](
            xd, kd, bias if has_bias else gamma, gamma, beta, mu, rstd, y,
            c, p, groups, c // groups, sn, sc, sp, kn, kc, kp,
            HAS_SKIP=has_skip, HAS_BIAS=has_bias, SILU=bool(silu), WIDE=wide, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps,
        )  # fmt: skip
    return y, s


def group_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float, silu: bool
) -> torch.Tensor:
    """GroupNorm over (C/groups, H, W) per (n, group), then SiLU if asked.

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W), any memory format (NHWC preferred); fp32, fp16 or bf16.
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
    torch.Tensor
        (N, C, H, W) in x's dtype and memory format.
    """
    if not validated_by_caller():
        check(x, gamma, beta, groups, eps, silu)
    check_device("group_norm", x)
    y, _ = launch_group_norm(x, None, None, gamma, beta, groups, eps, silu)
    return y
