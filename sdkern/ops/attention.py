"""``sdkern::attention``: softmax(q kᵀ · scale) v per batch and head, optionally causal (bottom-right aligned).

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
function whose vector-Jacobian product is the backward, the public keyword wrapper; the semantics
are :func:`sdkern.ops.reference.attention`.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference

SCHEMA = "attention(Tensor q, Tensor k, Tensor v, float? scale, bool causal=False) -> Tensor"


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool = False) -> None:
    op = "attention"
    if not _spec.on_one_device(q, k, v):
        _spec.tensors(op, q=q, k=k, v=v)
        _spec.devices(op, q=q, k=k, v=v)
    _spec.float_dtype("q", q, op)
    _spec.same_dtype("k", k, q, op)
    _spec.same_dtype("v", v, q, op)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sdkern.{op}: {name} must be 4-D (B, S, H, D), got shape {list(t.shape)}")
        _spec.last_dim_contiguous(name, t, op)
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"sdkern.{op}: k must have shape (B={b}, Sk, H={h}, D={d}) to match q, got {list(k.shape)}")
    if v.shape[0] != b or v.shape[1] != k.shape[1] or v.shape[2] != h:
        raise ValueError(f"sdkern.{op}: v must have shape (B={b}, Sk={k.shape[1]}, H={h}, Dv), got {list(v.shape)}")
    if d == 0 or v.shape[3] == 0:
        raise ValueError(f"sdkern.{op}: head dims must be positive (D={d}, Dv={v.shape[3]})")
    if k.shape[1] == 0:
        raise ValueError(f"sdkern.{op}: k/v must have at least one key (Sk=0)")
    if scale is not None and not (scale == scale):  # NaN
        raise ValueError(f"sdkern.{op}: scale must be a number, got {scale}")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(
            f"sdkern.{op}: causal attention needs Sq <= Sk (query i sees keys j <= i + Sk - Sq, bottom-right "
            f"aligned), got Sq={q.shape[1]} > Sk={k.shape[1]}"
        )


def outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[3]))


def is_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> bool:
    return q.numel() == 0 or v.numel() == 0


def launch(mod: ModuleType, q, k, v, scale: float | None, causal: bool = False) -> torch.Tensor:
    b, sq, h, d = q.shape
    sk, dv = k.shape[1], v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    o = torch.empty((b, sq, h, dv), dtype=q.dtype, device=q.device)
    mod.attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), b, sq, sk, h, d, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], scale, bool(causal), nat.code(q), *nat.stream(q),
    )  # fmt: skip
    return o


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool = False) -> torch.Tensor:
    """Attention with torch's differentiable kernel (its VJP is the op's backward): (B,Sq,H,D) layout,
    accumulation dtype, q's dtype out; flash/efficient backward kernels where torch has them, so no
    (Sq, Sk) matrix is kept between forward and backward.

    ``causal`` follows the op's bottom-right convention: torch's ``is_causal`` when Sq == Sk, an
    explicit :func:`reference.causal_mask` otherwise.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    sq, sk = q.shape[1], k.shape[1]
    mask = reference.causal_mask(sq, sk, q.device) if causal and sq != sk else None
    o = F.scaled_dot_product_attention(
        q.to(acc).transpose(1, 2),
        k.to(acc).transpose(1, 2),
        v.to(acc).transpose(1, 2),
        attn_mask=mask,
        is_causal=bool(causal) and sq == sk,
        scale=scale,
    )
    return o.transpose(1, 2).to(q.dtype)


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
    return torch.ops.sdkern.attention(q, k, v, scale, causal)


SPEC = _spec.OpSpec(
    SCHEMA,
    check=check,
    outputs=outputs,
    launch=launch,
    reference=reference.attention,
    is_empty=is_empty,
    vjp_of=sdpa,
)
