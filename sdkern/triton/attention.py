"""Flash-attention forward in Triton on strided (B, S, H, D) tensors.

One program per (BLOCK_M queries, batch*head), on a 1-D grid (no 65535 limit on batch*head).
Keys/values stream through in BLOCK_N tiles with an online softmax in base 2 (scores pre-multiplied
by scale*log2(e)) and fp32 accumulators. Head dims are padded to the next power of two (>= 16) with
masked loads; the last key tile is masked (Sk = 77 is not a multiple of any block). Under the
interpreter the dot operands are cast to fp32 (bf16 ``tl.dot`` is wrong there); fp32 inputs use IEEE
fp32 products on the GPU (no TF32). Causal (CAUSAL): query i sees keys j <= i + (Sk - Sq); a program
stops after the last key tile its last query sees and masks the diagonal tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sdkern.ops._spec import validated_by_caller
from sdkern.ops.attention import check
from sdkern.triton._common import arch_key, check_device, device_guard, interpreting, next_pow2, to_dtype

__all__ = ["attention", "attention_config", "attention_kernel"]

LOG2E = 1.4426950408889634


@triton.jit
def attention_kernel(
    q_ptr,  # (B, Sq, H, D) queries, strides (sqb, sqs, sqh, 1); fp32/fp16/bf16
    k_ptr,  # (B, Sk, H, D) keys, strides (skb, sks, skh, 1); q's dtype
    v_ptr,  # (B, Sk, H, Dv) values, strides (svb, svs, svh, 1); q's dtype
    o_ptr,  # (B, Sq, H, Dv) output, dense; q's dtype
    Sq,
    Sk,
    H,
    D,
    DV,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    svb,
    svs,
    svh,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,  # cast dot operands to fp32 (interpreter)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products instead of TF32
    CAUSAL: tl.constexpr,  # query i sees keys j <= i + (Sk - Sq) only (Sq <= Sk, checked by the launcher)
):
    # 1-D grid over (batch*head, query block), query blocks fastest: the programs of one head run
    # together (its K/V stay in L2) and B*H*blocks may reach 2**31 - 1 (grid axes 1 and 2 stop at 65535).
    pid = tl.program_id(0)
    mblocks = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % mblocks
    bh = pid // mblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    md = rd < D
    mdv = rdv < DV
    mm = rm < Sq

    # 64-bit (batch, head) base offsets; in-head offsets fit in int32 (checked by the launcher).
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    q = tl.load(q_base + rm[:, None] * sqs + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kt_ptrs = k_base + rn[None, :] * sks + rd[:, None]  # [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + rn[:, None] * svs + rdv[None, :]  # [BLOCK_N, BLOCK_DV]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    hi = Sk
    if CAUSAL:
        # keys past the last row's limit are masked for every row of this block: not loaded at all
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + (Sk - Sq))
    for n0 in range(0, hi, BLOCK_N):
        mn = (n0 + rn) < Sk
        kt = tl.load(kt_ptrs + n0 * sks, mask=mn[None, :] & md[:, None], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if CAUSAL:
            # padding rows (rm >= Sq) see at least key 0 too: no empty row, no NaN (never stored)
            ok = mn[None, :] & ((n0 + rn)[None, :] <= rm[:, None] + (Sk - Sq))
            s = tl.where(ok, s * qk_scale, float("-inf"))
        else:
            s = tl.where(mn[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(v_ptrs + n0 * svs, mask=mn[:, None] & mdv[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(p, v.to(tl.float32))
        elif IEEE:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = ((b * Sq + rm.to(tl.int64)) * H + h) * DV
    tl.store(o_ptr + o_rows[:, None] + rdv[None, :], to_dtype(out, o_ptr), mask=mm[:, None] & mdv[None, :])


def attention_config(sq: int, sk: int, d: int, dv: int, dtype: torch.dtype, arch: str, causal: bool = False) -> dict:
    """Deterministic tile choice per (head dims, dtype, arch); no autotuning (works in the interpreter).

    Causal half-precision tiles stop at 64 query rows: the diagonal mask costs registers (128 x 64 spills
    on sm_80), and shorter query blocks skip more fully masked key tiles (CLIP's 77 tokens: 2 blocks).
    """
    bd, bdv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    wide = max(bd, bdv)
    aligned = d % 16 == 0 and dv % 16 == 0  # Triton specialises them: vectorised, masks fold away
    # Chosen with setup_tools/check_triton.py (no spills on sm_80 / sm_90 for the SD head dims).
    if arch == "interp":
        bm, bn, warps, stages = 32, 32, 4, 1
    elif dtype == torch.float32:
        if wide <= 64:
            bm, bn, warps, stages = 32, 32, 4, 2
        elif wide <= 128:
            bm, bn, warps, stages = (32, 32, 4, 2) if arch == "sm90" else (16, 32, 4, 2)
        else:
            bm, bn, warps, stages = 16, 32, 8, 1
    elif wide <= 64:
        bm, bn, warps, stages = (128, 64, 4, 3) if aligned else (64, 64, 4, 3)
    elif wide <= 128:
        bm, bn, warps, stages = 128, 32, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    bm = min(bm, max(16, next_pow2(sq)))
    bn = min(bn, max(16, next_pow2(sk)))
    if causal and arch != "interp" and dtype != torch.float32:
        bm = min(bm, 64)
    if arch != "interp" and dtype != torch.float32 and wide == 128 and bm < 128:
        warps = 4  # short query blocks: 8 warps spill on sm_80
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bdv, "num_warps": warps, "num_stages": stages}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per head, optionally causal.

    Parameters
    ----------
    q : torch.Tensor
        (B, Sq, H, D), any strides with the last dim contiguous; fp32, fp16 or bf16.
    k : torch.Tensor
        (B, Sk, H, D), same dtype, last dim contiguous.
    v : torch.Tensor
        (B, Sk, H, Dv), same dtype, last dim contiguous.
    scale : float or None
        Score scale; None means 1/sqrt(D).
    causal : bool
        Query i sees keys ``j <= i + (Sk - Sq)`` only (bottom-right aligned; needs Sq <= Sk).

    Returns
    -------
    torch.Tensor
        (B, Sq, H, Dv) dense, q's dtype.
    """
    if not validated_by_caller():
        check(q, k, v, scale, causal)
    check_device("attention", q)
    b, sq, h, d = q.shape
    sk, dv = k.shape[1], v.shape[3]
    o = torch.empty((b, sq, h, dv), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[1] * t.stride(1) + t.shape[3] >= 2**31:
            raise NotImplementedError(f"sdkern.triton.attention: {name} spans >= 2**31 elements per (batch, head)")
    arch = arch_key(q)
    cfg = attention_config(sq, sk, d, dv, q.dtype, arch, bool(causal))
    programs = triton.cdiv(sq, cfg["BLOCK_M"]) * b * h
    if programs >= 2**31:
        raise NotImplementedError(f"sdkern.triton.attention: {programs} programs exceed the grid limit 2**31 - 1")
    with device_guard(q):
        attention_kernel[(programs,)](
            q, k, v, o, sq, sk, h, d, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], float(scale) * LOG2E,
            DOT_F32=interpreting(), IEEE=q.dtype == torch.float32 and not interpreting(), CAUSAL=bool(causal),
            **cfg,
        )  # fmt: skip
    return o
